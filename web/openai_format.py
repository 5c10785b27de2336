"""OpenAI chat-completion bodies built from a job's events.

A streamed answer is a `chat.completion.chunk` per event; a non-streamed
answer is one `chat.completion` built after the `finish` event. chatpipe's
own events (stage, tool, finish details) travel as chunks with
`choices: []` and an extra `chatpipe` object, so OpenAI clients skip them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# Codes of per-request errors caused by the request itself; any other code
# of an `error` event is a server-side failure.
REQUEST_ERROR_CODES = ("context_length_exceeded", "invalid_request")


def error_body(message: str, *, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Build an OpenAI-style error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_body_from_event(event: dict[str, Any]) -> dict[str, Any]:
    """Build the error object for a job's `error` event."""
    code = event.get("code") or "internal_error"
    error_type = "invalid_request_error" if code in REQUEST_ERROR_CODES else "server_error"
    return error_body(event.get("message") or "the job failed", error_type=error_type, code=code)


@dataclass
class StreamOptions:
    """What a client asked to receive besides the answer text."""

    include_usage: bool = False
    include_stages: bool = False
    include_logprobs: bool = False


@dataclass
class ChunkBuilder:
    """Turn one job's events into `chat.completion.chunk` objects.

    `model` starts as the requested model and follows the `model` field of
    any event that carries one, so chunks after routing name the model that
    serves the job.
    """

    job_id: str
    model: str
    options: StreamOptions = field(default_factory=StreamOptions)
    created_at: float = field(default_factory=time.time)  # Unix time in seconds

    @property
    def created(self) -> int:
        return int(self.created_at)

    def role_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def chunks_for(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the chunks for one `delta`, `stage`, `tool` or `finish` event, in sending order."""
        self.model = event.get("model") or self.model
        event_type = event["type"]

        if event_type == "delta":
            logprobs = self._logprobs(event)
            return [self._chunk({"content": event.get("text", "")}, logprobs=logprobs)]

        chunks = []
        if self.options.include_stages:
            chunks.append(self._extension_chunk(event))
        if event_type == "finish":
            chunks.append(self._chunk({}, finish_reason=event.get("finish_reason") or "stop"))
            if self.options.include_usage:
                chunks.append(self._usage_chunk(event.get("usage")))
        return chunks

    def _chunk(
        self, delta: dict[str, Any], *, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope([choice])

    def _usage_chunk(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        body = self._envelope([])
        body["usage"] = normalize_usage(usage)
        return body

    def _extension_chunk(self, event: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope([])
        body["chatpipe"] = dict(event)
        return body

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.job_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _logprobs(self, event: dict[str, Any]) -> dict[str, Any] | None:
        if not self.options.include_logprobs or not event.get("logprobs"):
            return None
        return {"content": event["logprobs"]}


def normalize_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """Return OpenAI's three usage counts, computing the total when a stage left it out."""
    usage = usage or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    total_tokens = int(usage.get("total_tokens") or prompt_tokens + completion_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total_tokens}


def completion_body(
    *, job_id: str, model: str, created: int, events: list[dict[str, Any]], include_logprobs: bool
) -> dict[str, Any]:
    """Build a `chat.completion` from all of a job's events, the last being `finish`."""
    finish = events[-1]
    deltas = [e for e in events if e["type"] == "delta"]
    text = "".join(e.get("text", "") for e in deltas)

    logprobs = None
    if include_logprobs:
        logprobs = {"content": [entry for e in deltas for entry in (e.get("logprobs") or [])]}

    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish.get("finish_reason") or "stop",
    }
    return {
        "id": job_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": normalize_usage(finish.get("usage")),
    }
