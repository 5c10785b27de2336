"""HTTP routes: OpenAI chat completions, job stream resume and cancel, models, health.

A chat request becomes a Job. The handler subscribes to the job's events
BEFORE it starts the job, so the fastest answer is still seen, and then
waits for the job's first event: none within the request timeout means no
worker took the job (HTTP 503). Once events flow, a failure of the job
itself arrives as an `error` event and is sent to the client as such.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import redis
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.events import request_abort
from pipeline.job import InvalidParameterError, Job
from pipeline.settings import Settings
from web.openai_format import (
    REQUEST_ERROR_CODES,
    ChunkBuilder,
    StreamOptions,
    completion_body,
    error_body,
    error_body_from_event,
)
from web.sse import DONE, KEEPALIVE_INTERVAL_S, EventStreamResponse, JobEventFollower, encode_comment, encode_event
from web.validation import AUTO_MODEL, BodyTooLargeError, parse_chat_request, read_json_body

log = structlog.get_logger(__name__)

JOB_ID_HEADER = "X-Chatpipe-Job-Id"
T = TypeVar("T")


class WorkerUnavailableError(RuntimeError):
    """No stage picked up the job, or Redis or the job queue cannot be reached."""


def served_models(settings: Settings) -> tuple[str, ...]:
    """Return the concrete model ids a request may name, besides "chatpipe"."""
    return tuple(sorted(set(settings.route_models.values()) | set(settings.models)))


def _invalid_request(message: str, param: str | None, status_code: int = 400) -> JSONResponse:
    return JSONResponse(error_body(message, error_type="invalid_request_error", param=param), status_code=status_code)


def _unavailable(message: str, job_id: str | None = None) -> JSONResponse:
    headers = {JOB_ID_HEADER: job_id} if job_id else None
    body = error_body(message, error_type="server_error", code="service_unavailable")
    return JSONResponse(body, status_code=503, headers=headers)


async def _abort(request: Request, job_id: str, reason: str) -> None:
    """Ask the stages to drop the job; a Redis failure is logged, not raised."""
    try:
        await anyio.to_thread.run_sync(lambda: request_abort(request.app.state.sync_redis, job_id, reason))
        log.info("job_abort_requested", job_id=job_id, reason=reason)
    except redis.exceptions.RedisError as exc:
        log.error("job_abort_failed", job_id=job_id, reason=reason, error=str(exc))


async def _unless_disconnected(request: Request, wait: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run `wait` until it returns or the client disconnects; return (is_disconnected, result).

    An exception from `wait` is re-raised as itself, not inside an ExceptionGroup.
    """
    outcome: dict[str, Any] = {"is_disconnected": False, "result": None, "error": None}

    async def listen(cancel_scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        outcome["is_disconnected"] = True
        cancel_scope.cancel()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(listen, task_group.cancel_scope)
        try:
            outcome["result"] = await wait()
        except Exception as exc:  # re-raised below, outside the task group
            outcome["error"] = exc
        task_group.cancel_scope.cancel()

    if outcome["error"] is not None:
        raise outcome["error"]
    return outcome["is_disconnected"], outcome["result"]


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    state = request.app.state
    try:
        chat = parse_chat_request(await read_json_body(request), served_models(state.settings))
    except BodyTooLargeError as exc:
        return _invalid_request(str(exc), None, status_code=413)
    except InvalidParameterError as exc:
        return _invalid_request(str(exc), exc.param)

    job = chat.job
    log.info("chat_request_accepted", job_id=job.job_id, request_id=job.request_id, stream=chat.stream,
             requested_model=job.requested_model, num_messages=len(job.messages))
    deadline = time.monotonic() + state.settings.request_timeout_s
    follower = JobEventFollower(state.redis, state.sync_redis, job.job_id)
    try:
        is_disconnected, first_event = await _unless_disconnected(
            request, lambda: _start_and_wait(request, follower, job, deadline)
        )
    except WorkerUnavailableError as exc:
        await follower.close()
        return _unavailable(str(exc), job.job_id)

    if is_disconnected:
        await follower.close()
        await _abort(request, job.job_id, "client_disconnected")
        return Response(status_code=499)

    builder = ChunkBuilder(job.job_id, job.requested_model, chat.options)
    if chat.stream:
        return _stream_response(request, follower, builder, first_event, deadline, record=True)
    return await _complete(request, follower, builder, first_event, deadline)


async def _start_and_wait(request: Request, follower: JobEventFollower, job: Job, deadline: float) -> dict[str, Any]:
    """Subscribe, start the job, read its log and return its first event; raise WorkerUnavailableError."""
    try:
        await follower.subscribe()
    except redis.exceptions.RedisError as exc:
        log.error("job_subscribe_failed", job_id=job.job_id, error=str(exc))
        raise WorkerUnavailableError(f"cannot reach Redis to follow the job: {exc}") from exc

    try:
        await anyio.to_thread.run_sync(request.app.state.start_job, job)
    except Exception as exc:  # the dispatcher's broker or database failed; the client gets a 503
        log.error("job_start_failed", job_id=job.job_id, error=str(exc), error_type=type(exc).__name__)
        raise WorkerUnavailableError(f"the job could not be queued: {type(exc).__name__}") from exc

    try:
        await follower.catch_up()
        first_event = await follower.next_event(deadline - time.monotonic())
    except redis.exceptions.RedisError as exc:
        log.error("job_events_read_failed", job_id=job.job_id, error=str(exc))
        raise WorkerUnavailableError(f"lost Redis while waiting for the job: {exc}") from exc

    if first_event is None:
        await _abort(request, job.job_id, "no_worker")
        timeout_s = request.app.state.settings.request_timeout_s
        log.error("job_no_worker", job_id=job.job_id, timeout_s=timeout_s)
        raise WorkerUnavailableError(f"no worker picked up job {job.job_id} within {timeout_s} s; check that the stage workers are running")
    return first_event


def _stream_response(
    request: Request,
    follower: JobEventFollower,
    builder: ChunkBuilder,
    first_event: dict[str, Any] | None,
    deadline: float,
    *,
    record: bool,
    send_role_chunk: bool = True,
) -> EventStreamResponse:
    """Build the SSE response; `record` feeds the finish event to /metrics (off for resumed streams)."""
    job_id = builder.job_id

    async def on_disconnect() -> None:
        if not follower.is_finished:
            await _abort(request, job_id, "client_disconnected")

    body = _stream_events(request, follower, builder, first_event, deadline, record=record, send_role_chunk=send_role_chunk)
    return EventStreamResponse(body, headers={JOB_ID_HEADER: job_id}, on_disconnect=on_disconnect)


async def _stream_events(
    request: Request,
    follower: JobEventFollower,
    builder: ChunkBuilder,
    event: dict[str, Any] | None,
    deadline: float,
    *,
    record: bool,
    send_role_chunk: bool,
) -> AsyncGenerator[str, None]:
    """Yield the SSE text of a job: role chunk (id 0), one or more chunks per event, then [DONE]."""
    try:
        if send_role_chunk:
            yield encode_event(builder.role_chunk(), 0)
        while True:
            if event is not None:
                for text in _encode_job_event(builder, event):
                    yield text
                if follower.is_finished:
                    _log_finished(request, builder, event, record=record)
                    return

            wait_s = max(0.0, min(KEEPALIVE_INTERVAL_S, deadline - time.monotonic()))
            event = await follower.next_event(wait_s)
            if event is None and time.monotonic() >= deadline:
                async for text in _timed_out(request, builder):
                    yield text
                return
            if event is None:
                yield encode_comment("keep-alive")
    except redis.exceptions.RedisError as exc:
        log.error("job_stream_redis_failed", job_id=builder.job_id, error=str(exc))
        yield encode_event(error_body("lost the connection to Redis while streaming", error_type="server_error", code="service_unavailable"))
        yield encode_event(DONE)
    finally:
        await follower.close()


def _encode_job_event(builder: ChunkBuilder, event: dict[str, Any]) -> list[str]:
    seq = event["seq"]
    if event["type"] == "error":
        return [encode_event(error_body_from_event(event), seq), encode_event(DONE, seq)]

    texts = [encode_event(chunk, seq) for chunk in builder.chunks_for(event)]
    if event["type"] == "finish":
        texts.append(encode_event(DONE, seq))
    return texts


async def _timed_out(request: Request, builder: ChunkBuilder) -> AsyncGenerator[str, None]:
    timeout_s = request.app.state.settings.request_timeout_s
    log.error("job_timed_out", job_id=builder.job_id, timeout_s=timeout_s)
    await _abort(request, builder.job_id, "timeout")
    message = f"job {builder.job_id} did not finish within the request timeout of {timeout_s} s"
    yield encode_event(error_body(message, error_type="server_error", code="timeout"))
    yield encode_event(DONE)


def _log_finished(request: Request, builder: ChunkBuilder, event: dict[str, Any], *, record: bool) -> None:
    """Write the one summary line of a finished job and update /metrics."""
    if not record:
        return
    request.app.state.metrics.observe_terminal(event, builder.model)
    metrics = event.get("metrics") or {}
    usage = event.get("usage") or {}
    log.info(
        "chat_request_finished",
        job_id=builder.job_id,
        event_type=event["type"],
        finish_reason=event.get("finish_reason"),
        error_code=event.get("code"),
        model=builder.model,
        route=event.get("route"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        ttft_s=metrics.get("job_ttft_s", metrics.get("ttft_s")),
        duration_s=round(time.time() - builder.created_at, 3),
    )


async def _complete(
    request: Request, follower: JobEventFollower, builder: ChunkBuilder, first_event: dict[str, Any], deadline: float
) -> Response:
    """Wait for the job's terminal event and return the whole answer as one chat.completion."""
    headers = {JOB_ID_HEADER: builder.job_id}
    try:
        is_disconnected, events = await _unless_disconnected(
            request, lambda: _collect_events(follower, first_event, deadline)
        )
    except redis.exceptions.RedisError as exc:
        log.error("job_events_read_failed", job_id=builder.job_id, error=str(exc))
        return _unavailable(f"lost Redis while waiting for the job: {exc}", builder.job_id)
    finally:
        await follower.close()

    if is_disconnected or not follower.is_finished:
        reason = "client_disconnected" if is_disconnected else "timeout"
        await _abort(request, builder.job_id, reason)
        if is_disconnected:
            return Response(status_code=499, headers=headers)
        timeout_s = request.app.state.settings.request_timeout_s
        message = f"job {builder.job_id} did not finish within the request timeout of {timeout_s} s"
        return JSONResponse(error_body(message, error_type="server_error", code="timeout"), status_code=504, headers=headers)

    for event in events:
        builder.model = event.get("model") or builder.model
    terminal = events[-1]
    _log_finished(request, builder, terminal, record=True)
    if terminal["type"] == "error":
        status_code = 400 if terminal.get("code") in REQUEST_ERROR_CODES else 500
        return JSONResponse(error_body_from_event(terminal), status_code=status_code, headers=headers)

    body = completion_body(
        job_id=builder.job_id, model=builder.model, created=builder.created,
        events=events, include_logprobs=builder.options.include_logprobs,
    )
    return JSONResponse(body, headers=headers)


async def _collect_events(follower: JobEventFollower, first_event: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    events = [first_event]
    while not follower.is_finished:
        event = await follower.next_event(deadline - time.monotonic())
        if event is None:
            break
        events.append(event)
    return events


def _parse_resume_point(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not raw.isdigit():
        raise InvalidParameterError("after", f"resume point {raw!r} is invalid; send Last-Event-ID or ?after= as an integer >= 0")
    return int(raw)


def _query_flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


async def job_events(request: Request) -> Response:
    """GET /v1/jobs/{job_id}/events: replay the events after Last-Event-ID (or ?after=), then follow live.

    Query flags `chatpipe_stages` and `include_usage` select the same extra
    chunks as the chat request's options. The role chunk is sent only when
    replaying from the start.
    """
    state = request.app.state
    job_id = request.path_params["job_id"]
    try:
        after_seq = _parse_resume_point(request)
    except InvalidParameterError as exc:
        return _invalid_request(str(exc), exc.param)

    follower = JobEventFollower(state.redis, state.sync_redis, job_id, after_seq=after_seq)
    try:
        await follower.subscribe()
        logged = await follower.catch_up()
    except redis.exceptions.RedisError as exc:
        await follower.close()
        return _unavailable(f"cannot reach Redis to read the job's events: {exc}", job_id)

    # NOTE: a job that is queued but has published nothing yet has no log,
    # so it is reported as not found as well.
    if not logged:
        await follower.close()
        return _invalid_request(f"job {job_id!r} has no events; it does not exist or its log expired", "job_id", status_code=404)

    options = StreamOptions(include_usage=_query_flag(request, "include_usage"), include_stages=_query_flag(request, "chatpipe_stages"))
    builder = ChunkBuilder(job_id, AUTO_MODEL, options)
    for event in logged:
        if event["seq"] <= after_seq:
            builder.model = event.get("model") or builder.model

    deadline = time.monotonic() + state.settings.request_timeout_s
    if follower.is_finished:
        return EventStreamResponse(_done_only(follower), headers={JOB_ID_HEADER: job_id}, on_disconnect=_nothing)
    return _stream_response(request, follower, builder, None, deadline, record=False, send_role_chunk=after_seq == 0)


async def _done_only(follower: JobEventFollower) -> AsyncGenerator[str, None]:
    try:
        yield encode_event(DONE, follower.last_seq)
    finally:
        await follower.close()


async def _nothing() -> None:
    return None


async def cancel_job(request: Request) -> Response:
    """POST /v1/jobs/{job_id}/cancel: ask every stage to drop the job; 202 because stopping is asynchronous."""
    job_id = request.path_params["job_id"]
    try:
        await anyio.to_thread.run_sync(lambda: request_abort(request.app.state.sync_redis, job_id, "cancelled"))
    except redis.exceptions.RedisError as exc:
        log.error("job_cancel_failed", job_id=job_id, error=str(exc))
        return _unavailable(f"cannot reach Redis to cancel the job: {exc}", job_id)
    log.info("job_cancel_requested", job_id=job_id)
    return JSONResponse({"id": job_id, "object": "chat.completion.cancel", "status": "cancelling"}, status_code=202)


async def list_models(request: Request) -> Response:
    """GET /v1/models: the route-default models plus "chatpipe", which routes automatically."""
    settings = request.app.state.settings
    names = [*sorted(set(settings.route_models.values())), AUTO_MODEL]
    created = request.app.state.started_at
    data = [{"id": name, "object": "model", "created": created, "owned_by": "chatpipe"} for name in names]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    """GET /healthz: 200 while Redis answers PING, 503 otherwise."""
    try:
        with anyio.fail_after(2.0):
            await request.app.state.redis.ping()
    except (redis.exceptions.RedisError, TimeoutError) as exc:
        log.error("healthz_redis_failed", error=str(exc))
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok"})


def routes() -> list[Route]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
