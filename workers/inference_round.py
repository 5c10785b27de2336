"""One inference round of a job: prompt, engine run, and the decision what follows."""

from __future__ import annotations

import json

import structlog

from pipeline.job import Job
from pipeline.prompt import encode_prompt
from pipeline.settings import get_settings
from pipeline.tools import ToolCall, parse_tool_call, tool_specs
from workers.app import app, task_name
from workers.runtime import Next

log = structlog.get_logger(__name__)


def offers_tools(job: Job) -> bool:
    # Tools are offered on the task route only: offered tools make the model
    # call them even for a greeting.
    return job.route == "task" and job.tool_rounds < get_settings().max_tool_rounds


def is_repeated_call(job: Job, call: ToolCall) -> bool:
    """True when the model requests a call whose result is already in the conversation."""
    for message in job.messages:
        for previous in message.get("tool_calls") or []:
            function = previous["function"]
            if function["name"] == call.name and function["arguments"] == call.arguments:
                return True
    return False


def messages_for_answer(messages: list[dict]) -> list[dict]:
    """Fold tool turns into the newest user message for a round that offers no tools.

    Shown its own tool calls and their results in the template's tool
    format, a 0.5B model keeps writing tool calls even when none are
    offered. Stated in the user's turn, the results read as facts to answer
    from. Tool turns of earlier questions are dropped: their answers follow them.
    """
    kept: list[dict] = []
    results: list[str] = []
    calls: dict[int, str] = {}
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            function = message["tool_calls"][0]["function"]
            calls[len(results)] = f"{function['name']} with {json.dumps(function['arguments'], ensure_ascii=False)}"
        elif message.get("role") == "tool":
            call = calls.get(len(results), message.get("name") or "a tool")
            results.append(f"{call} returned {message.get('content', '')}")
        else:
            if message.get("role") == "user":
                results, calls = [], {}
            kept.append(dict(message))
    last_user = next((m for m in reversed(kept) if m.get("role") == "user"), None)
    if results and last_user is not None:
        note = "; ".join(results)
        last_user["content"] = (f"{last_user.get('content', '')}\n\nA tool already ran: {note}. "
                                "Reply to my question in plain words.")
    return kept


def run_round(worker, job: Job) -> Next | None:
    """Run the job's current round on the worker's engine; return the next stage or None when finished."""
    tools = tool_specs() if offers_tools(job) else None
    messages = job.messages if tools is not None else messages_for_answer(job.messages)
    prompt_ids = encode_prompt(worker.tokenizer, messages, tools)
    request_id = worker.request_id(job)
    info = {"job_id": job.job_id, "round": job.tool_rounds, "model": worker.model_name, "route": job.route,
            "hold_tool_calls": tools is not None, "stop": list(job.sampling.stop)}
    with worker.lock:
        worker.requests[request_id] = info
    try:
        handle = worker.service.submit(request_id, prompt_ids, job.sampling, arrival_time=job.sent_at)
        final = handle.result(timeout=get_settings().request_timeout_s)
    except BaseException:
        with worker.lock:
            worker.requests.pop(request_id, None)
        raise

    job.usage["prompt_tokens"] += len(prompt_ids)
    job.usage["completion_tokens"] += len(final.output_token_ids)
    call = None
    # A small model may repeat a bare JSON call until max_tokens; the first complete call still counts.
    if tools is not None and final.finish_reason in ("stop", "length"):
        call = parse_tool_call(worker.tokenizer.decode(final.output_token_ids, skip_special_tokens=True))

    if call is not None:
        send_round_end(info, final, "tool_calls", job)
        if is_repeated_call(job, call):
            # Run the next round without tools so the model answers from the
            # result it already has instead of calling again.
            log.info("repeated_tool_call_dropped", tool=call.name)
            job.tool_rounds = get_settings().max_tool_rounds
            return Next("inference", job)
        job.messages.append({
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}],
        })
        return Next("tools", job)

    send_round_end(info, final, final.finish_reason, job)
    return None


def send_round_end(info: dict, final, finish_reason: str, job: Job) -> None:
    """Tell the detokenize stage that the round ended, with everything its finish event needs."""
    usage = {**job.usage, "total_tokens": job.usage["prompt_tokens"] + job.usage["completion_tokens"]}
    message = {
        "kind": "finish",
        **info,
        "num_output_tokens": len(final.output_token_ids),
        "finish_reason": finish_reason,
        "stop_reason": final.stop_reason if isinstance(final.stop_reason, (str, int)) else None,
        "usage": usage,
        "metrics": {k: v for k, v in (final.metrics or {}).items() if isinstance(v, (int, float))},
        "created_at": job.created_at,
        "job": json.loads(json.dumps(job.to_dict())),
    }
    app.send_task(task_name("detokenize"), args=[message], queue="detokenize")
