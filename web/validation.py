"""Request body of POST /v1/chat/completions → a validated Job.

Every check raises InvalidParameterError naming the field as OpenAI's error
body does (`messages[1].role`, `temperature`, ...), with the allowed values
in the message. Fields the API does not know are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from pipeline.job import InvalidParameterError, Job, SamplingParams
from web.openai_format import StreamOptions

ROLES = ("system", "user", "assistant", "tool")
AUTO_MODEL = "chatpipe"

# NOTE: 4 MiB is far above any prompt that the context budget keeps. The cap
# only stops a client from making the gateway buffer an unbounded body.
MAX_BODY_BYTES = 4 * 1024 * 1024

# Body fields copied into SamplingParams unchanged when present and not null.
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "logprobs", "top_logprobs",
)


class BodyTooLargeError(ValueError):
    """The request body is longer than MAX_BODY_BYTES."""


@dataclass
class ChatRequest:
    """A validated chat request: the job to start and how to answer."""

    job: Job
    stream: bool
    options: StreamOptions


async def read_json_body(request: Request) -> Any:
    """Read and parse the body, raising BodyTooLargeError or InvalidParameterError(param=None)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLargeError(f"request body of {declared} bytes exceeds the maximum of {MAX_BODY_BYTES} bytes")

    body = bytearray()
    async for part in request.stream():
        body.extend(part)
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLargeError(f"request body exceeds the maximum of {MAX_BODY_BYTES} bytes")

    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(None, f"request body is not valid JSON ({exc}); send a JSON object") from exc


def parse_chat_request(body: Any, known_models: tuple[str, ...]) -> ChatRequest:
    """Validate a decoded request body and build the job it requests."""
    if not isinstance(body, dict):
        raise InvalidParameterError(None, f"request body must be a JSON object, got {type(body).__name__}")

    model = _parse_model(body.get("model"), known_models)
    messages = parse_messages(body.get("messages"))
    stream = _optional_bool(body, "stream", default=False)
    options = _parse_stream_options(body, stream)
    _check_n(body.get("n"))
    sampling = parse_sampling(body)
    options.include_logprobs = sampling.logprobs

    job = Job.create(messages, sampling=sampling, requested_model=model, stream=stream)
    return ChatRequest(job=job, stream=stream, options=options)


def _parse_model(model: Any, known_models: tuple[str, ...]) -> str:
    if model is None:
        return AUTO_MODEL
    allowed = (AUTO_MODEL, *known_models)
    if not isinstance(model, str) or model not in allowed:
        raise InvalidParameterError("model", f"model={model!r} is not served here; use one of {list(allowed)}, "
            "or serve it by naming it in CHATPIPE_ROUTE_MODELS")
    return model


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the conversation and return it with list contents joined into strings."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "messages must be a non-empty list of {role, content} objects")
    return [_parse_message(index, message) for index, message in enumerate(messages)]


def _parse_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidParameterError(where, f"{where} must be an object with role and content")

    role = message.get("role")
    if role not in ROLES:
        raise InvalidParameterError(f"{where}.role", f"{where}.role={role!r} is invalid; use one of {list(ROLES)}")

    parsed = dict(message)
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        parsed["content"] = ""
        return parsed
    parsed["content"] = _parse_content(f"{where}.content", content)
    return parsed


def _parse_content(where: str, content: Any) -> str:
    """Return the content as one string; a list of text parts is joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InvalidParameterError(where, f"{where} must be a string or a non-empty list of text parts")

    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidParameterError(
                f"{where}[{index}]", f'{where}[{index}] must be {{"type": "text", "text": string}}; other part types are not supported'
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _optional_bool(body: dict[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"{name}={value!r} is invalid; use true or false")
    return value


def _parse_stream_options(body: dict[str, Any], stream: bool) -> StreamOptions:
    include_stages = _optional_bool(body, "chatpipe_stages", default=False)
    raw = body.get("stream_options")
    if raw is None:
        return StreamOptions(include_stages=include_stages)

    if not stream:
        raise InvalidParameterError("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(raw, dict):
        raise InvalidParameterError("stream_options", "stream_options must be an object such as {\"include_usage\": true}")
    include_usage = raw.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidParameterError(
            "stream_options.include_usage", f"stream_options.include_usage={include_usage!r} is invalid; use true or false"
        )
    return StreamOptions(include_usage=include_usage, include_stages=include_stages)


def _check_n(n: Any) -> None:
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise InvalidParameterError("n", f"n={n!r} is not supported; only n=1 (one choice per request) is served")


def parse_sampling(body: dict[str, Any]) -> SamplingParams:
    """Build SamplingParams from the body; null means the default."""
    values = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    if "logprobs" in values and not isinstance(values["logprobs"], bool):
        raise InvalidParameterError("logprobs", f"logprobs={values['logprobs']!r} is invalid; use true or false")
    if values.get("top_logprobs") and not values.get("logprobs"):
        raise InvalidParameterError("top_logprobs", "top_logprobs requires logprobs to be true")

    values["max_tokens"] = _parse_max_tokens(body)
    values["stop"] = _parse_stop(body.get("stop"))
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidParameterError(name, f"{name}={value!r} is invalid; use a finite number")

    return SamplingParams(**values).validate()


def _parse_max_tokens(body: dict[str, Any]) -> int | None:
    """Return max_completion_tokens, or the older max_tokens, or None for the default."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidParameterError(name, f"{name}={value!r} is invalid; use an integer >= 1")
        return value
    return None


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        raise InvalidParameterError("stop", f"stop={stop!r} is invalid; use a string or a list of at most 4 strings")
    return stop
