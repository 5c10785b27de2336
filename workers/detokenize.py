"""Detokenize stage: token ids to text deltas on the job's event stream.

Messages of one job round may reach different detokenize processes, so the
decoding state lives in Redis, not in the process: the round's token ids,
the incremental decoder's offsets and the text held back. A per-round lock
serialises the messages of one round. A message that arrives before its
predecessor is retried, and a redelivered one is skipped by its `start`
index, so every id is decoded exactly once.

Two kinds of message arrive: `tokens` (new ids of many jobs from one engine
step) and `finish` (a round ended; sent by the inference task after the
engine's last step for that round).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis
import structlog
from celery import signals

from pipeline.detokenize import IncrementalDetokenizer, StopStringMatcher
from pipeline.events import KEY_PREFIX
from pipeline.tools import could_be_tool_call
from workers.app import app, task_name
from workers.models import tokenizer_for
from workers.runtime import publisher, redis_client, serves_stage, store, worker_name

log = structlog.get_logger(__name__)

TOOL_CALL_TAG = "<tool_call>"
STATE_TTL_S = 3600
LOCK_TIMEOUT_S = 30
RETRY_DELAY_S = 0.02
MAX_RETRIES = 500  # about 10 s for a missing predecessor message


class OutOfOrder(Exception):
    """A message arrived before the ids it continues from; it is retried."""


def _key(job_id: str, round_index: int, part: str) -> str:
    return f"{KEY_PREFIX}:detok:{job_id}:{round_index}:{part}"


@dataclass
class RoundState:
    """Decoder state of one job round, stored in Redis between messages; deleted when the round ends."""

    prefix_offset: int = 0  # absolute token offsets of the incremental decoder
    read_offset: int = 0
    stop_held: str = ""  # text that may be the start of a stop string
    tool_held: str = ""  # text that may still become a tool call (task route)
    emitted: str = ""  # text published in this round
    matched: str | None = None  # stop string or tool-call tag found; nothing more is published
    pending_logprobs: list = field(default_factory=list)  # OpenAI logprob entries not yet sent with a delta
    first_delta_at: float | None = None

    @classmethod
    def load(cls, client: redis.Redis, job_id: str, round_index: int) -> "RoundState":
        raw = client.get(_key(job_id, round_index, "state"))
        return cls(**json.loads(raw)) if raw else cls()

    def save(self, client: redis.Redis, job_id: str, round_index: int) -> None:
        client.set(_key(job_id, round_index, "state"), json.dumps(self.__dict__), ex=STATE_TTL_S)


def _stops(item: dict) -> list[str]:
    stops = list(item.get("stop") or [])
    if item.get("hold_tool_calls"):
        # Text from a tool-call tag on is never published as reply text.
        stops.append(TOOL_CALL_TAG)
    return stops


def _store_ids(client: redis.Redis, item: dict, state: RoundState) -> None:
    ids_key = _key(item["job_id"], item["round"], "ids")
    num_stored = client.llen(ids_key)
    if item["start"] > num_stored:
        raise OutOfOrder(f"ids from {item['start']} arrived before ids from {num_stored}")
    num_seen = num_stored - item["start"]
    fresh = item["ids"][num_seen:]
    if fresh:
        client.rpush(ids_key, *fresh)
        client.expire(ids_key, STATE_TTL_S)
    if item.get("logprobs"):
        state.pending_logprobs.extend(_openai_logprobs(item["model"], item["logprobs"][num_seen:]))


def _openai_logprobs(model: str, entries: list[dict]) -> list[dict]:
    """Convert the engine's {token_id, logprob, top_logprobs} entries to OpenAI's {token, logprob, bytes, top_logprobs}."""
    tokenizer = tokenizer_for(model)

    def token(token_id: int) -> dict:
        # NOTE: a token holding part of a UTF-8 character decodes to U+FFFD here, so its
        # `bytes` are those of U+FFFD rather than the token's raw bytes.
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "bytes": list(text.encode("utf-8"))}

    return [
        {**token(entry["token_id"]), "logprob": entry["logprob"],
         "top_logprobs": [{**token(top["token_id"]), "logprob": top["logprob"]} for top in entry.get("top_logprobs", [])]}
        for entry in entries
    ]


def _decode(client: redis.Redis, item: dict, state: RoundState, *, final: bool) -> str:
    """Return the text completed since the last call, advancing the decoder offsets."""
    tokenizer = tokenizer_for(item["model"])
    window = [int(i) for i in client.lrange(_key(item["job_id"], item["round"], "ids"), state.prefix_offset, -1)]
    detok = IncrementalDetokenizer(tokenizer)
    detok.token_ids = window
    detok.read_offset = state.read_offset - state.prefix_offset
    text = detok.flush() if final else detok.push([])
    old_prefix = state.prefix_offset
    state.prefix_offset = old_prefix + detok.prefix_offset
    state.read_offset = old_prefix + detok.read_offset
    return text


def _emit(item: dict, state: RoundState, text: str, *, final: bool) -> None:
    """Cut at stop strings, hold back a possible tool call, and publish the rest."""
    if state.matched is not None:
        return
    matcher = StopStringMatcher(_stops(item))
    matcher.held = state.stop_held
    visible, matched = matcher.push(text)
    state.stop_held = matcher.held
    if matched is not None:
        state.matched = matched
    elif final:
        visible += matcher.flush()
        state.stop_held = ""

    pending = state.tool_held + visible
    if not final and item.get("hold_tool_calls") and could_be_tool_call(state.emitted + pending):
        state.tool_held = pending
        return
    state.tool_held = ""
    if pending or (final and state.pending_logprobs):
        state.first_delta_at = state.first_delta_at or time.time()
        state.emitted += pending
        fields = {"logprobs": state.pending_logprobs} if state.pending_logprobs else {}
        state.pending_logprobs = []
        publisher().publish(item["job_id"], "delta", text=pending, **fields)


def handle_tokens(client: redis.Redis, item: dict) -> None:
    with client.lock(_key(item["job_id"], item["round"], "lock"), timeout=LOCK_TIMEOUT_S):
        state = RoundState.load(client, item["job_id"], item["round"])
        _store_ids(client, item, state)
        _emit(item, state, _decode(client, item, state, final=False), final=False)
        state.save(client, item["job_id"], item["round"])


def handle_finish(client: redis.Redis, item: dict) -> None:
    job_id, round_index = item["job_id"], item["round"]
    ids_key = _key(job_id, round_index, "ids")
    with client.lock(_key(job_id, round_index, "lock"), timeout=LOCK_TIMEOUT_S):
        if client.llen(ids_key) < item["num_output_tokens"]:
            raise OutOfOrder(f"finish arrived with {client.llen(ids_key)} of {item['num_output_tokens']} ids")
        state = RoundState.load(client, job_id, round_index)
        if item["finish_reason"] != "tool_calls":
            _emit(item, state, _decode(client, item, state, final=True), final=True)
        token_ids = [int(i) for i in client.lrange(ids_key, 0, -1)]
        client.delete(ids_key, _key(job_id, round_index, "state"))

    _record(item, state, token_ids)


def _record(item: dict, state: RoundState, token_ids: list[int]) -> None:
    """Store the round as the stage's consumed message; publish and store the finish of the job."""
    job_id = item["job_id"]
    message = {"job": item["job"], "round": item["round"], "token_ids": token_ids,
               "finish_reason": item["finish_reason"]}
    runs = store()
    run_id = runs.start_stage(job_id, "detokenize", message, worker_name())
    runs.end_stage(run_id, "published", 0.0)
    if item["finish_reason"] == "tool_calls":
        return

    metrics = dict(item.get("metrics") or {})
    if state.first_delta_at is not None:
        metrics["job_ttft_s"] = round(state.first_delta_at - item["created_at"], 4)
    metrics["job_total_s"] = round(time.time() - item["created_at"], 4)
    finish_reason = "stop" if state.matched and state.matched != TOOL_CALL_TAG else item["finish_reason"]
    status = "aborted" if finish_reason == "abort" else "finished"
    # Store first: a client that reads the job after the finish event must see it finished.
    runs.finish_job(job_id, status, finish_reason=finish_reason, usage=item["usage"], metrics=metrics)
    publisher().publish(job_id, "finish", finish_reason=finish_reason, usage=item["usage"], metrics=metrics,
                        route=item.get("route"), model=item["model"])
    log.info("job_finished", job_id=job_id, finish_reason=finish_reason, route=item.get("route"),
             prompt_tokens=item["usage"].get("prompt_tokens"), completion_tokens=item["usage"].get("completion_tokens"),
             ttft_s=metrics.get("job_ttft_s"), total_s=metrics["job_total_s"])


@app.task(name=task_name("detokenize"), bind=True, max_retries=MAX_RETRIES)
def detokenize_task(self, message: dict) -> None:
    client = redis_client()
    items = message["items"] if message["kind"] == "tokens" else [message]
    handler = handle_tokens if message["kind"] == "tokens" else handle_finish
    waiting = []
    for item in items:
        try:
            handler(client, item)
        except OutOfOrder:
            waiting.append(item)
    if waiting:
        # Only the items still missing their predecessor are retried.
        retry_message = {**message, "items": waiting} if message["kind"] == "tokens" else message
        raise self.retry(args=[retry_message], countdown=RETRY_DELAY_S)


@signals.worker_init.connect
def _load_tokenizers_at_start(**_kwargs) -> None:
    if serves_stage("detokenize"):
        from pipeline.settings import get_settings

        for model in set(get_settings().route_models.values()):
            tokenizer_for(model)
