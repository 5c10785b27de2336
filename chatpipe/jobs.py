"""`chatpipe jobs` and `chatpipe replay`."""

from __future__ import annotations

import json
import sys
import time

import redis

from pipeline.events import channel_key
from pipeline.job import STAGES, Job, new_id
from pipeline.store import JobStore


def _fmt_ms(value) -> str:
    return "-" if value is None else f"{value:9.1f} ms"


def show_job(database_url: str, job_id: str) -> int:
    store = JobStore(database_url)
    job = store.get_job(job_id)
    if job is None:
        print(f"error: job {job_id!r} not found; `chatpipe jobs list` shows recent job ids", file=sys.stderr)
        return 1
    print(f"job {job['job_id']}  status={job['status']}  route={job['route']}  model={job['target_model']}  "
          f"finish_reason={job['finish_reason']}")
    if job["replay_of"]:
        print(f"replay of {job['replay_of']}")
    print(f"usage {json.dumps(job['usage'])}")
    print(f"metrics {json.dumps(job['metrics'])}")
    print(f"{'STAGE':<12} {'QUEUED':>12} {'DURATION':>12}  {'WORKER':<28} OUTCOME")
    for run in store.list_stage_runs(job_id):
        queued_ms = None
        if run["queued_at"] is not None:
            queued_ms = (run["started_at"] - run["queued_at"]).total_seconds() * 1000
        print(f"{run['stage']:<12} {_fmt_ms(queued_ms):>12} {_fmt_ms(run['duration_ms']):>12}  "
              f"{run['worker']:<28} {run['outcome']}")
    return 0


def list_jobs(database_url: str, limit: int) -> int:
    for job in JobStore(database_url).recent_jobs(limit):
        print(f"{job['job_id']}  {job['created_at']:%Y-%m-%d %H:%M:%S}  {job['status']:<9} "
              f"{job['route'] or '-':<10} {job['finish_reason'] or '-'}")
    return 0


def replay(database_url: str, redis_url: str, job_id: str, stage: str, timeout_s: float) -> int:
    """Re-send the stored message of `stage` as a new job and print its deltas as they arrive."""
    from workers.app import use_broker
    from workers.dispatch import send

    if stage not in STAGES or stage == "detokenize":
        allowed = ", ".join(s for s in STAGES if s != "detokenize")
        print(f"error: --from {stage!r} is invalid; use one of {allowed}", file=sys.stderr)
        return 2
    store = JobStore(database_url)
    if store.get_job(job_id) is None:
        print(f"error: job {job_id!r} not found; `chatpipe jobs list` shows recent job ids", file=sys.stderr)
        return 1
    message = store.get_stage_message(job_id, stage)
    if message is None:
        passed = sorted({r["stage"] for r in store.list_stage_runs(job_id)})
        print(f"error: job {job_id!r} has no stored message for stage {stage!r}; stages stored: "
              f"{', '.join(passed) or 'none'}", file=sys.stderr)
        return 1

    use_broker(redis_url)
    job = Job.from_dict(message)
    job.replay_of, job.job_id, job.created_at = job_id, new_id("job"), time.time()
    store.create_job(job)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel_key(job.job_id))
    send(stage, job)
    print(f"replaying {job_id} from {stage} as {job.job_id}", file=sys.stderr)
    return _print_stream(pubsub, timeout_s)


def _print_stream(pubsub, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1.0)
        if message is None:
            continue
        event = json.loads(message["data"])
        if event["type"] == "delta":
            print(event["text"], end="", flush=True)
        elif event["type"] == "finish":
            print(f"\n[finish_reason={event['finish_reason']} usage={json.dumps(event['usage'])}]", flush=True)
            return 0
        elif event["type"] == "error":
            print(f"\nerror: {event['message']}", file=sys.stderr)
            return 1
    print(f"\nerror: no finish within {timeout_s:.0f}s", file=sys.stderr)
    return 1
