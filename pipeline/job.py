"""The job message: one assistant turn as it travels from stage to stage.

Every stage receives a job as a plain dict (JSON on the queue), rebuilds it
with `Job.from_dict`, adds what it produced and sends `job.to_dict()` on.
The stored copy of each consumed message is what `chatpipe replay` re-sends.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

ROUTES = ("greeting", "code", "knowledge", "task", "chat")
STAGES = ("context", "intent", "retrieval", "inference", "tools", "detokenize")


class InvalidParameterError(ValueError):
    """A request parameter is outside its allowed range; `param` names it for the API error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    allowed = f"{'(' if low_open else '['}{low}, {high}]"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise InvalidParameterError(name, f"{name}={value!r} is invalid; use a number in the range {allowed}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise InvalidParameterError(name, f"{name}={value!r} is invalid; allowed range is {allowed}")


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy; top_k 0 or -1 means no limit."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None: the configured default, clamped to the context length
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> "SamplingParams":
        """Raise InvalidParameterError naming the first parameter outside its range."""
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise InvalidParameterError("top_k", f"top_k={self.top_k!r} is invalid; use -1 or 0 for no limit, or a positive integer")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0, low_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise InvalidParameterError("seed", f"seed={self.seed!r} is invalid; use a non-negative integer")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise InvalidParameterError("max_tokens", f"max_tokens={self.max_tokens!r} is invalid; use an integer >= 1")
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameterError("stop", "stop must be a non-empty string or a list of at most 4 non-empty strings")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise InvalidParameterError("top_logprobs", f"top_logprobs={self.top_logprobs!r} is invalid; allowed range is [0, 20]")
        return self


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Job:
    """One assistant turn. Fields are filled in by the stages named in their comments."""

    job_id: str
    request_id: str
    conversation_id: str
    messages: list[dict[str, Any]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    requested_model: str = "chatpipe"  # the `model` field of the API request
    stream: bool = True
    created_at: float = field(default_factory=time.time)
    # context: token count of the kept messages and how many turns were dropped
    num_context_tokens: int | None = None
    num_dropped_messages: int = 0
    # intent: route and its similarity score; the model that serves the route
    route: str | None = None
    route_score: float | None = None
    target_model: str | None = None
    # retrieval: passages injected into the system prompt
    passages: list[dict[str, Any]] = field(default_factory=list)
    # tools: completed tool rounds; tool messages are appended to `messages`
    tool_rounds: int = 0
    # inference: prompt and completion tokens summed over all rounds so far
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    # replay: the job whose stored message this job was re-sent from, if any
    replay_of: str | None = None
    # set by the sender on every hop, so the next stage can report queue time
    sent_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        data = dict(data)
        data["sampling"] = SamplingParams(**data.get("sampling", {}))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def create(cls, messages: list[dict[str, Any]], **kwargs: Any) -> "Job":
        return cls(
            job_id=kwargs.pop("job_id", None) or new_id("job"),
            request_id=kwargs.pop("request_id", None) or new_id("req"),
            conversation_id=kwargs.pop("conversation_id", None) or new_id("conv"),
            messages=messages,
            **kwargs,
        )
