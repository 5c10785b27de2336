"""A chat message through every stage, with real workers, real models, Redis and Postgres."""

from __future__ import annotations

import json
import time

import httpx
import openai
import psycopg
import pytest
from pgvector.psycopg import register_vector

from pipeline.embeddings import get_embedder
from pipeline.models.loader import load_tokenizer
from pipeline.retrieval import ingest_paths
from pipeline.settings import get_settings
from pipeline.store import JobStore
SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"

pytestmark = pytest.mark.slow


def stream_chat(base_url: str, body: dict) -> tuple[str, list[dict]]:
    """POST a streaming chat; return the job id and the decoded `data:` payloads up to [DONE]."""
    chunks = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        job_id = resp.headers["x-chatpipe-job-id"]
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                return job_id, chunks
            chunks.append(json.loads(payload))
    raise AssertionError("stream ended without [DONE]")


def content_of(chunks: list[dict]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if c.get("choices") and c["choices"][0]["delta"].get("content")]


def stages_of(database_url: str, job_id: str) -> list[str]:
    return [run["stage"] for run in JobStore(database_url).list_stage_runs(job_id)]


def test_stream_passes_every_stage(system, database_url):
    body = {"model": "chatpipe", "messages": [{"role": "user", "content": "Describe the colour of the sky in one sentence."}],
            "max_tokens": 24, "temperature": 0}
    job_id, chunks = stream_chat(system, body)

    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(content_of(chunks)).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert stages_of(database_url, job_id) == ["context", "intent", "inference", "detokenize"]
    job = JobStore(database_url).get_job(job_id)
    assert job["status"] == "finished"
    assert job["route"] == "chat"
    assert job["target_model"] == SMOL
    assert job["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(("text", "expected_language_marker"), [("你好", "你好"), ("hello there", "Hello")])
def test_greeting_answers_without_model(system, database_url, text, expected_language_marker):
    job_id, chunks = stream_chat(system, {"model": "chatpipe", "messages": [{"role": "user", "content": text}]})

    reply = "".join(content_of(chunks))
    assert expected_language_marker in reply
    assert stages_of(database_url, job_id) == ["context", "intent"]
    assert JobStore(database_url).get_job(job_id)["route"] == "greeting"


def test_knowledge_prompt_contains_ingested_passage(system, database_url, knowledge_dir):
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_vector(conn)
        ingest_paths(conn, get_embedder(), [knowledge_dir])
        passages = [row[0] for row in conn.execute("SELECT content FROM chunks")]
    question = "What does the documentation say about the refund policy?"
    job_id, chunks = stream_chat(system, {"model": "chatpipe", "messages": [{"role": "user", "content": question}],
                                          "max_tokens": 16, "temperature": 0})

    assert stages_of(database_url, job_id) == ["context", "intent", "retrieval", "inference", "detokenize"]
    prompt_messages = JobStore(database_url).get_stage_message(job_id, "inference")["messages"]
    system_prompt = prompt_messages[0]["content"]
    assert prompt_messages[0]["role"] == "system"
    assert any(passage in system_prompt for passage in passages)


def test_chinese_answer_streams_whole_characters(system, database_url):
    """Byte-level BPE splits Chinese characters across tokens; no delta may carry a broken character."""
    body = {"model": QWEN, "messages": [{"role": "user", "content": "用中文介绍一下长城，两句话。"}],
            "max_tokens": 40, "temperature": 0}
    job_id, chunks = stream_chat(system, body)

    deltas = content_of(chunks)
    assert all("\ufffd" not in delta for delta in deltas)
    token_ids = JobStore(database_url).get_stage_message(job_id, "detokenize")["token_ids"]
    tokenizer = load_tokenizer(QWEN, get_settings().model_cache)
    assert "".join(deltas) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(deltas))


def test_openai_client_streaming_and_not(system):
    client = openai.OpenAI(base_url=f"{system}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Name three fruits."}]

    completion = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=12, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens >= 1
    assert completion.choices[0].message.content == streamed


def test_replay_from_inference_reproduces_tokens(system, database_url, redis_url, capsys):
    from chatpipe.jobs import replay

    body = {"model": SMOL, "messages": [{"role": "user", "content": "Write a short poem about rain."}],
            "max_tokens": 16, "temperature": 0.9, "seed": 1234}
    job_id, _ = stream_chat(system, body)

    assert replay(database_url, redis_url, job_id, "inference", 120) == 0
    store = JobStore(database_url)
    with psycopg.connect(database_url) as conn:
        replay_id = conn.execute("SELECT job_id FROM jobs WHERE replay_of = %s", (job_id,)).fetchone()[0]
    original_ids = store.get_stage_message(job_id, "detokenize")["token_ids"]
    replayed_ids = store.get_stage_message(replay_id, "detokenize")["token_ids"]
    assert replayed_ids == original_ids
    assert "finish_reason=" in capsys.readouterr().out


def test_replay_rejects_unknown_stage_and_job(system, database_url, redis_url, capsys):
    from chatpipe.jobs import replay

    assert replay(database_url, redis_url, "job-missing", "inference", 5) == 1
    assert replay(database_url, redis_url, "job-missing", "sampling", 5) == 2
    err = capsys.readouterr().err
    assert "job 'job-missing' not found" in err
    assert "--from 'sampling' is invalid" in err


def test_jobs_show_lists_stages_with_timings(system, database_url, capsys):
    from chatpipe.jobs import show_job

    job_id, _ = stream_chat(system, {"model": "chatpipe", "messages": [{"role": "user", "content": "hi"}]})

    assert show_job(database_url, job_id) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}" in out
    assert "route=greeting" in out
    lines = [line.split()[0] for line in out.splitlines() if line.startswith(("context", "intent"))]
    assert lines == ["context", "intent"]


def test_task_route_runs_the_calculator(system, database_url):
    body = {"model": "chatpipe", "messages": [{"role": "user", "content": "What is 37 * 91 + 12? Use the calculator."}],
            "max_tokens": 64, "temperature": 0, "chatpipe_stages": True}
    job_id, chunks = stream_chat(system, body)

    tool_events = [c["chatpipe"] for c in chunks if c.get("chatpipe", {}).get("type") == "tool"]
    assert JobStore(database_url).get_job(job_id)["route"] == "task"
    assert "tools" in stages_of(database_url, job_id)
    assert tool_events[0]["name"] == "calculator"
    assert tool_events[0]["result"] == "3379"
    assert "<tool_call>" not in "".join(content_of(chunks))


def test_client_disconnect_aborts_and_frees_blocks(system, database_url, redis_client):
    """A client that closes the stream must not leave its sequence decoding or holding KV blocks."""
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Count from one to two hundred in words."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{system}/v1/chat/completions", json=body, timeout=120) as resp:
        job_id = resp.headers["x-chatpipe-job-id"]
        for line in resp.iter_lines():
            if line.startswith("data: {") and content_of([json.loads(line.removeprefix("data: "))]):
                break  # the first generated text arrived: the sequence is decoding

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = JobStore(database_url).get_job(job_id)
        stats = [json.loads(redis_client.get(k)) for k in redis_client.scan_iter(f"chatpipe:engine_stats:{SMOL}:*")]
        if job["status"] == "aborted" and all(s["num_free_blocks"] == s["num_total_blocks"] for s in stats):
            break
        time.sleep(0.5)
    assert job["status"] == "aborted"
    assert job["finish_reason"] == "abort"
    assert all(s["num_running"] == 0 for s in stats)
    assert all(s["num_free_blocks"] == s["num_total_blocks"] for s in stats)
    assert job["usage"]["completion_tokens"] < 400


def test_prompt_over_context_length_gets_400(system, database_url):
    """A prompt longer than the model's context must fail as a request error, not as a server error."""
    body = {"model": SMOL, "messages": [{"role": "user", "content": "apple " * 9000}], "max_tokens": 8}
    resp = httpx.post(f"{system}/v1/chat/completions", json=body, timeout=120)

    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "the context limit is 8192 tokens" in error["message"]
    job = JobStore(database_url).get_job(resp.headers["x-chatpipe-job-id"])
    assert job["status"] == "failed"


def test_logprobs_follow_greedy_choice(system):
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Say something about the sea."}],
            "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2, "stop": ["\n\n\n"]}
    resp = httpx.post(f"{system}/v1/chat/completions", json=body, timeout=120)

    assert resp.status_code == 200
    choice = resp.json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == resp.json()["usage"]["completion_tokens"]
    for entry in entries:
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["token"] == entry["top_logprobs"][0]["token"]
    assert "".join(e["token"] for e in entries).startswith(choice["message"]["content"])


@pytest.mark.parametrize("question", ["What is 37 * 91 + 12?", "37乘以91再加12等于多少？"])
def test_task_answer_is_prose_not_tool_json(system, question):
    """After its tool rounds the model must answer in words, never with raw tool-call JSON."""
    body = {"model": "chatpipe", "messages": [{"role": "user", "content": question}], "max_tokens": 64,
            "temperature": 0}
    _, chunks = stream_chat(system, body)
    answer = "".join(content_of(chunks))

    assert answer.strip()
    assert '"name"' not in answer
    assert "<tool_call>" not in answer
