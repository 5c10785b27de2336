"""The stage runner on the session's real Redis and Postgres."""

from __future__ import annotations

import pytest

import pipeline.settings as settings_module
from pipeline.events import read_log, request_abort
from pipeline.job import Job
from pipeline.store import JobStore
from workers import runtime


@pytest.fixture
def stage_env(monkeypatch, redis_url, database_url):
    """Point the runner's cached clients at the session's servers, and reset them afterwards."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DATABASE_URL", database_url)
    caches = (runtime.redis_client, runtime.publisher, runtime.store)
    monkeypatch.setattr(settings_module, "_settings", None)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_aborted_job_is_stored_and_finished_without_running(stage_env, database_url):
    job = Job.create([{"role": "user", "content": "Hello there, how are you?"}])
    JobStore(database_url).create_job(job)
    request_abort(runtime.redis_client(), job.job_id, "cancelled")
    calls = []

    runtime.run_stage("context", job.to_dict(), lambda current: calls.append(current))

    assert calls == []
    stored = JobStore(database_url).get_job(job.job_id)
    assert stored["status"] == "aborted"
    assert stored["finish_reason"] == "abort"
    events = read_log(runtime.redis_client(), job.job_id)
    assert [event["type"] for event in events] == ["finish"]
    assert events[0]["finish_reason"] == "abort"
    assert events[0]["usage"]["completion_tokens"] == 0
