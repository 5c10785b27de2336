"""Streamed and non-streamed answers over real HTTP, with scripted jobs on the real Redis."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from web_helpers import ANSWER, ANSWER_PARTS, METRICS, SERVED_MODEL, USAGE, ScriptedJobs, answer_script, chat_body, parse_sse

import web.api
from chatpipe.services import free_port
from pipeline.events import abort_key
from web.app import create_app
from servers import serve
from web_helpers import make_settings


def post_stream(base_url: str, **body_fields) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(stream=True, **body_fields), timeout=30)


def test_stream_exact_chunk_sequence(start_server, redis_url):
    jobs = ScriptedJobs(redis_url)
    base_url = start_server(jobs)

    response = post_stream(base_url)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    job_id = jobs.jobs[0].job_id
    assert response.headers["x-chatpipe-job-id"] == job_id
    events = parse_sse(response.text)
    # seq 1 and 2 are the stage events, 3-5 the deltas, 6 the finish.
    assert [e.event_id for e in events] == ["0", "3", "4", "5", "6", "6"]
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {job_id}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert [c["model"] for c in chunks] == ["chatpipe", SERVED_MODEL, SERVED_MODEL, SERVED_MODEL, SERVED_MODEL]
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        *[[{"index": 0, "delta": {"content": part}, "logprobs": None, "finish_reason": None}] for part in ANSWER_PARTS],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
    ]


def test_stream_usage_chunk_when_requested(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url))

    response = post_stream(base_url, stream_options={"include_usage": True})

    events = parse_sse(response.text)
    usage_chunk = json.loads(events[-2].data)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == USAGE
    assert events[-1].data == "[DONE]"


def test_stage_events_only_when_requested(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url))

    plain = parse_sse(post_stream(base_url).text)
    staged = parse_sse(post_stream(base_url, chatpipe_stages=True).text)

    assert not any("chatpipe" in json.loads(e.data) for e in plain if e.data != "[DONE]")
    extensions = [json.loads(e.data) for e in staged if e.data != "[DONE]" and "chatpipe" in json.loads(e.data)]
    assert [(c["chatpipe"]["type"], c["chatpipe"]["seq"]) for c in extensions] == [("stage", 1), ("stage", 2), ("finish", 6)]
    assert all(c["choices"] == [] for c in extensions)
    assert extensions[1]["chatpipe"] == {"seq": 2, "type": "stage", "stage": "intent", "duration_ms": 2.0, "route": "chat", "model": SERVED_MODEL}
    assert extensions[2]["chatpipe"]["metrics"] == METRICS
    assert extensions[2]["chatpipe"]["route"] == "chat"


def test_fast_job_loses_nothing(start_server, redis_url):
    """A job that publishes every event before the handler reads must still arrive complete and exactly once."""
    script = answer_script([f"t{i} " for i in range(40)])
    base_url = start_server(ScriptedJobs(redis_url, script=script, is_synchronous=True))

    events = parse_sse(post_stream(base_url).text)

    deltas = [json.loads(e.data)["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert "".join(deltas) == "".join(f"t{i} " for i in range(40))
    assert [e.event_id for e in events[1:-1]] == [str(seq) for seq in range(3, 44)]


def test_live_job_streams_in_order(start_server, redis_url):
    script = answer_script([f"w{i} " for i in range(15)])
    base_url = start_server(ScriptedJobs(redis_url, script=script, is_synchronous=False, pause_s=0.01))

    events = parse_sse(post_stream(base_url).text)

    deltas = [json.loads(e.data)["choices"][0]["delta"]["content"] for e in events[1:-2]]
    assert deltas == [f"w{i} " for i in range(15)]
    assert events[-1].data == "[DONE]"


def test_error_event_ends_stream(start_server, redis_url):
    script = [("delta", {"text": "Hel"}), ("error", {"message": "inference worker failed", "code": "engine_error"})]
    base_url = start_server(ScriptedJobs(redis_url, script=script))

    events = parse_sse(post_stream(base_url).text)

    assert [e.event_id for e in events] == ["0", "1", "2", "2"]
    assert json.loads(events[2].data) == {
        "error": {"message": "inference worker failed", "type": "server_error", "param": None, "code": "engine_error"}
    }
    assert events[3].data == "[DONE]"


def test_keepalive_comment_while_idle(start_server, redis_url, monkeypatch):
    monkeypatch.setattr(web.api, "KEEPALIVE_INTERVAL_S", 0.1)
    base_url = start_server(ScriptedJobs(redis_url, is_synchronous=False, pause_s=0.35))

    response = post_stream(base_url)

    assert ": keep-alive\n\n" in response.text
    assert "".join(
        json.loads(e.data)["choices"][0]["delta"]["content"] for e in parse_sse(response.text)[1:-2]
    ) == ANSWER


def test_disconnect_aborts_job(start_server, redis_url, redis_client):
    """Closing the stream mid-answer must mark the job aborted so the engine frees its slot."""
    script = [("delta", {"text": "first"}), *[("delta", {"text": "."}) for _ in range(50)]]
    jobs = ScriptedJobs(redis_url, script=script, is_synchronous=False, pause_s=0.2)
    base_url = start_server(jobs)

    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=chat_body(stream=True), timeout=30) as response:
        lines = response.iter_lines()
        while "first" not in next(lines):
            pass
    job_id = jobs.jobs[0].job_id

    deadline = time.monotonic() + 5
    while redis_client.get(abort_key(job_id)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client.get(abort_key(job_id)) == "client_disconnected"


def test_no_worker_returns_503(start_server, redis_client):
    """A job that no stage picks up must end in HTTP 503, not a hung request, and be aborted."""
    started = []
    base_url = start_server(started.append, request_timeout_s=1.0)

    for stream in (True, False):
        response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(stream=stream), timeout=30)

        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
        job_id = response.headers["x-chatpipe-job-id"]
        assert job_id == started[-1].job_id
        assert redis_client.get(abort_key(job_id)) == "no_worker"


def test_start_job_failure_returns_503(start_server):
    def failing_start_job(job):
        raise ConnectionError("broker down")

    base_url = start_server(failing_start_job)

    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(stream=True), timeout=30)

    assert response.status_code == 503
    assert response.json()["error"]["message"] == "the job could not be queued: ConnectionError"


def test_redis_down_returns_503(redis_url):
    app = create_app(redis_url=f"redis://127.0.0.1:{free_port()}/0", start_job=lambda job: None, settings=make_settings())

    with serve(app) as base_url:
        chat = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(stream=True), timeout=30)
        health = httpx.get(f"{base_url}/healthz", timeout=30)

    assert chat.status_code == 503
    assert chat.json()["error"]["code"] == "service_unavailable"
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "redis": "unreachable"}


def test_non_stream_completion_body(start_server, redis_url):
    jobs = ScriptedJobs(redis_url)
    base_url = start_server(jobs)

    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), timeout=30)

    assert response.status_code == 200
    body = response.json()
    job_id = jobs.jobs[0].job_id
    assert response.headers["x-chatpipe-job-id"] == job_id
    assert body["id"] == job_id
    assert body["object"] == "chat.completion"
    assert body["model"] == SERVED_MODEL
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == USAGE


def test_non_stream_logprobs(start_server, redis_url):
    entry_a = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    entry_b = {"token": "!", "logprob": -0.5, "bytes": [33], "top_logprobs": []}
    script = [
        ("delta", {"text": "Hi", "logprobs": [entry_a]}),
        ("delta", {"text": "!", "logprobs": [entry_b]}),
        ("finish", {"finish_reason": "length", "usage": {"prompt_tokens": 4, "completion_tokens": 2}}),
    ]
    base_url = start_server(ScriptedJobs(redis_url, script=script))

    body = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(logprobs=True), timeout=30).json()

    assert body["choices"][0]["logprobs"] == {"content": [entry_a, entry_b]}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


@pytest.mark.parametrize("code,status_code,error_type", [("context_length_exceeded", 400, "invalid_request_error"), ("engine_error", 500, "server_error")])
def test_non_stream_error_event(start_server, redis_url, code, status_code, error_type):
    script = [("error", {"message": "job failed", "code": code})]
    base_url = start_server(ScriptedJobs(redis_url, script=script))

    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), timeout=30)

    assert response.status_code == status_code
    assert response.json() == {"error": {"message": "job failed", "type": error_type, "param": None, "code": code}}


def test_non_stream_timeout_returns_504(start_server, redis_url, redis_client):
    script = [("stage", {"stage": "context", "duration_ms": 1.0})]
    jobs = ScriptedJobs(redis_url, script=script)
    base_url = start_server(jobs, request_timeout_s=1.0)

    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), timeout=30)

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert redis_client.get(abort_key(jobs.jobs[0].job_id)) == "timeout"


def test_stream_timeout_sends_error(start_server, redis_url, redis_client):
    script = [("stage", {"stage": "context", "duration_ms": 1.0})]
    jobs = ScriptedJobs(redis_url, script=script)
    base_url = start_server(jobs, request_timeout_s=1.0)

    events = parse_sse(post_stream(base_url).text)

    assert json.loads(events[-2].data)["error"]["code"] == "timeout"
    assert events[-1].data == "[DONE]"
    assert redis_client.get(abort_key(jobs.jobs[0].job_id)) == "timeout"
