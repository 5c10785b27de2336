"""Per-process resources of a stage worker and the wrapper every stage runs in.

The wrapper stores the consumed message with its timings, binds the job's
ids to every log line, skips aborted jobs, turns a stage failure into an
`error` event for the client, and forwards the job to its next queue.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import structlog

from pipeline.events import EventPublisher, is_aborted
from pipeline.job import Job
from pipeline.logs import configure_logging
from pipeline.settings import get_settings
from pipeline.store import JobStore

log = structlog.get_logger(__name__)


@dataclass
class Next:
    """The stage a job goes to next, with the job as the finished stage left it."""

    stage: str
    job: Job


@functools.cache
def redis_client() -> redis.Redis:
    url = get_settings().redis_url
    if not url:
        raise RuntimeError("REDIS_URL is not set; start workers through `chatpipe up` or set REDIS_URL")
    return redis.Redis.from_url(url)


@functools.cache
def publisher() -> EventPublisher:
    return EventPublisher(redis_client(), ttl_s=get_settings().job_ttl_s)


@functools.cache
def store() -> JobStore:
    url = get_settings().database_url
    if not url:
        raise RuntimeError("DATABASE_URL is not set; start workers through `chatpipe up` or set DATABASE_URL")
    return JobStore(url)


def serves_stage(stage: str) -> bool:
    """True in a worker process started for `stage` by `chatpipe worker` (every task module is imported everywhere)."""
    return os.environ.get("CHATPIPE_WORKER_STAGE") == stage


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def zero_usage() -> dict[str, int]:
    """Return the usage of a job that ends without running the model."""
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def fail_job(job_id: str, stage: str, exc: BaseException) -> None:
    """Report a per-job failure to the client and the store; the worker itself keeps running."""
    message = f"{stage} stage failed: {type(exc).__name__}: {exc}"[:500]
    # Errors caused by the request itself carry a `code` the gateway maps to HTTP 400.
    code = getattr(exc, "code", None) or "stage_failed"
    # Store first: a client that reads the job after the event must see it failed.
    store().finish_job(job_id, "failed", error=message)
    publisher().publish(job_id, "error", message=message, code=code, stage=stage)


def run_stage(stage: str, message: dict, handler: Callable[[Job], Next | None]) -> None:
    """Run one stage on one job message."""
    configure_logging()
    job = Job.from_dict(message)
    structlog.contextvars.bind_contextvars(job_id=job.job_id, request_id=job.request_id, stage=stage)
    try:
        if is_aborted(redis_client(), job.job_id):
            log.info("job_skipped_aborted")
            # Store first, then the terminal event, so a client still reading
            # the stream ends instead of waiting for its timeout.
            usage = zero_usage()
            store().finish_job(job.job_id, "aborted", finish_reason="abort", usage=usage)
            publisher().publish(job.job_id, "finish", finish_reason="abort", usage=usage, metrics={}, stage=stage)
            return
        run_id = store().start_stage(job.job_id, stage, message, worker_name(), queued_at=job.sent_at)
        started = time.perf_counter()

        try:
            outcome = handler(job)
        except Exception as exc:
            duration_ms = (time.perf_counter() - started) * 1000
            log.exception("stage_failed", duration_ms=round(duration_ms, 2))
            store().end_stage(run_id, f"error: {type(exc).__name__}", duration_ms)
            fail_job(job.job_id, stage, exc)
            return

        duration_ms = (time.perf_counter() - started) * 1000
        next_stage = outcome.stage if outcome else "published"
        store().end_stage(run_id, next_stage, duration_ms)
        publisher().publish(job.job_id, "stage", stage=stage, duration_ms=round(duration_ms, 3))
        log.debug("stage_done", next_stage=next_stage, duration_ms=round(duration_ms, 2))
        if outcome is not None:
            from workers.dispatch import send

            send(outcome.stage, outcome.job)
    finally:
        structlog.contextvars.clear_contextvars()
