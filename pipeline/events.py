"""Per-job event stream on Redis: pub/sub for live readers plus a short-lived replay log.

Each event gets a sequence number from a per-job counter, is appended to the
job's log list and published on the job's channel, atomically in one Lua
script, so a reader that subscribes, then reads the log, sees every event
exactly once when it drops log entries with seq <= the last one it saw.

Event types:
  delta   {"text": str}                        text appended to the answer
  stage   {"stage": str, "duration_ms": float} a stage finished its work on the job
  tool    {"name": str, "arguments": str, "result": str}
  finish  {"finish_reason": str, "usage": {...}, "metrics": {...}}
  error   {"message": str, "code": str}        the job failed; no more events follow
"""

from __future__ import annotations

import json
from typing import Any

import redis

KEY_PREFIX = "chatpipe"
TERMINAL_TYPES = ("finish", "error")


def channel_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}:events"


def log_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}:log"


def seq_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}:seq"


def abort_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}:abort"


ABORT_CHANNEL = f"{KEY_PREFIX}:abort"

# KEYS: seq, log, channel. ARGV: event JSON object without seq (never empty), ttl seconds.
_PUBLISH_LUA = """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
-- Splice seq into the JSON object text: re-encoding with cjson would turn
-- empty lists into empty objects.
local payload = '{"seq":' .. seq .. ',' .. string.sub(ARGV[1], 2)
redis.call('RPUSH', KEYS[2], payload)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], payload)
return seq
"""


class EventPublisher:
    def __init__(self, client: redis.Redis, ttl_s: int = 3600) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._script = client.register_script(_PUBLISH_LUA)

    def publish(self, job_id: str, event_type: str, **fields: Any) -> int:
        """Append one event to the job's log, publish it, and return its sequence number."""
        body = json.dumps({"type": event_type, **fields}, ensure_ascii=False)
        keys = [seq_key(job_id), log_key(job_id), channel_key(job_id)]
        return int(self._script(keys=keys, args=[body, self._ttl_s]))


def read_log(client: redis.Redis, job_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
    """Return logged events with seq > after_seq, in order."""
    events = [json.loads(raw) for raw in client.lrange(log_key(job_id), 0, -1)]
    return [e for e in events if e["seq"] > after_seq]


def request_abort(client: redis.Redis, job_id: str, reason: str = "abort", ttl_s: int = 3600) -> None:
    """Mark a job aborted; stages skip it and the engine drops it at the next step."""
    client.set(abort_key(job_id), reason, ex=ttl_s)
    client.publish(ABORT_CHANNEL, job_id)


def is_aborted(client: redis.Redis, job_id: str) -> bool:
    return bool(client.exists(abort_key(job_id)))
