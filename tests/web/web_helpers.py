"""Helpers for the gateway tests: a real uvicorn server on 127.0.0.1 and scripted jobs.

A scripted job takes the place of the stage workers. Its start_job publishes
a fixed list of events through the real EventPublisher on the real Redis,
either inside start_job (before the handler reads anything) or from a
thread with a pause between events.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.events import EventPublisher
from pipeline.job import Job
from pipeline.settings import Settings

ANSWER_PARTS = ["Hello", ", wor", "ld!"]
ANSWER = "".join(ANSWER_PARTS)
SERVED_MODEL = "qwen2.5-coder-0.5b-instruct"
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
METRICS = {"queue_s": 0.01, "ttft_s": 0.05, "tpot_s": 0.05, "prefill_s": 0.04, "num_cached_tokens": 0, "job_ttft_s": 0.3}


def answer_script(parts: list[str] = ANSWER_PARTS) -> list[tuple[str, dict[str, Any]]]:
    """Events of a plain answer: two stages, the text deltas, then finish."""
    return [
        ("stage", {"stage": "context", "duration_ms": 1.5}),
        ("stage", {"stage": "intent", "duration_ms": 2.0, "route": "chat", "model": SERVED_MODEL}),
        *[("delta", {"text": part}) for part in parts],
        ("finish", {"finish_reason": "stop", "usage": USAGE, "metrics": METRICS, "route": "chat", "model": SERVED_MODEL}),
    ]


@dataclass
class ScriptedJobs:
    """A start_job that plays `script` for every job and records the jobs it started."""

    redis_url: str
    script: list[tuple[str, dict[str, Any]]] = field(default_factory=answer_script)
    is_synchronous: bool = True
    pause_s: float = 0.0
    jobs: list[Job] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __call__(self, job: Job) -> None:
        self.jobs.append(job)
        if self.is_synchronous:
            self.play(job.job_id)
            return
        thread = threading.Thread(target=self.play, args=(job.job_id,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def play(self, job_id: str) -> None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        publisher = EventPublisher(client)
        for event_type, fields in self.script:
            if self.pause_s:
                time.sleep(self.pause_s)
            publisher.publish(job_id, event_type, **fields)
        client.close()


def make_settings(**overrides: Any) -> Settings:
    values = {"api_keys": (), "rate_limit_per_min": 0, "request_timeout_s": 10.0}
    values.update(overrides)
    return Settings(**values)




@dataclass
class SseEvent:
    """One parsed server-sent event; `data` is the joined data lines, `event_id` the id line or None."""

    data: str
    event_id: str | None


def parse_sse(text: str) -> list[SseEvent]:
    """Parse an event-stream body into events; comment lines are dropped."""
    events = []
    for block in text.split("\n\n"):
        data_lines, event_id = [], None
        for line in block.split("\n"):
            if line.startswith("data: "):
                data_lines.append(line[len("data: "):])
            elif line.startswith("id: "):
                event_id = line[len("id: "):]
        if data_lines:
            events.append(SseEvent("\n".join(data_lines), event_id))
    return events


def chat_body(**overrides: Any) -> dict[str, Any]:
    body = {"model": "chatpipe", "messages": [{"role": "user", "content": "Say hello"}]}
    body.update(overrides)
    return body
