"""Resuming a job's stream (GET /v1/jobs/{job_id}/events) and cancelling a job."""

from __future__ import annotations

import json

import httpx
from web_helpers import SERVED_MODEL, ScriptedJobs, chat_body, parse_sse

from pipeline.events import abort_key


def finished_job(start_server, redis_url) -> tuple[str, str]:
    """Run one scripted job to the end and return (base_url, job_id)."""
    jobs = ScriptedJobs(redis_url)
    base_url = start_server(jobs)
    httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), timeout=30)
    return base_url, jobs.jobs[0].job_id


def test_resume_after_last_event_id(start_server, redis_url):
    base_url, job_id = finished_job(start_server, redis_url)

    response = httpx.get(f"{base_url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "4"}, timeout=30)

    assert response.status_code == 200
    assert response.headers["x-chatpipe-job-id"] == job_id
    events = parse_sse(response.text)
    assert [e.event_id for e in events] == ["5", "6", "6"]
    assert json.loads(events[0].data)["choices"][0]["delta"] == {"content": "ld!"}
    assert json.loads(events[0].data)["model"] == SERVED_MODEL
    assert json.loads(events[1].data)["choices"][0]["finish_reason"] == "stop"
    assert events[2].data == "[DONE]"


def test_resume_query_after_with_stages(start_server, redis_url):
    base_url, job_id = finished_job(start_server, redis_url)

    response = httpx.get(f"{base_url}/v1/jobs/{job_id}/events?after=0&chatpipe_stages=true&include_usage=1", timeout=30)

    events = parse_sse(response.text)
    assert [e.event_id for e in events] == ["0", "1", "2", "3", "4", "5", "6", "6", "6", "6"]
    assert json.loads(events[0].data)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(events[1].data)["chatpipe"]["stage"] == "context"
    assert json.loads(events[8].data)["usage"]["total_tokens"] == 15
    assert events[9].data == "[DONE]"


def test_resume_after_finish_sends_done(start_server, redis_url):
    base_url, job_id = finished_job(start_server, redis_url)

    response = httpx.get(f"{base_url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "6"}, timeout=30)

    assert [(e.event_id, e.data) for e in parse_sse(response.text)] == [("6", "[DONE]")]


def test_resume_follows_live_job(start_server, redis_url):
    jobs = ScriptedJobs(redis_url, is_synchronous=False, pause_s=0.1)
    base_url = start_server(jobs)
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=chat_body(stream=True), timeout=30) as first:
        job_id = first.headers["x-chatpipe-job-id"]
        first.close()

    response = httpx.get(f"{base_url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "0"}, timeout=30)

    contents = [json.loads(e.data)["choices"][0]["delta"].get("content") for e in parse_sse(response.text)[1:-2]]
    assert "".join(contents) == "Hello, world!"


def test_resume_unknown_job_404(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url))

    response = httpx.get(f"{base_url}/v1/jobs/job-missing/events", timeout=30)

    assert response.status_code == 404
    assert response.json()["error"]["param"] == "job_id"


def test_resume_bad_last_event_id_400(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url))

    response = httpx.get(f"{base_url}/v1/jobs/job-x/events", headers={"Last-Event-ID": "-3"}, timeout=30)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "after"


def test_cancel_marks_job_aborted(start_server, redis_url, redis_client):
    base_url = start_server(ScriptedJobs(redis_url))

    response = httpx.post(f"{base_url}/v1/jobs/job-to-cancel/cancel", timeout=30)

    assert response.status_code == 202
    assert response.json() == {"id": "job-to-cancel", "object": "chat.completion.cancel", "status": "cancelling"}
    assert redis_client.get(abort_key("job-to-cancel")) == "cancelled"
