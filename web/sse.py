"""Follow a job's events on Redis and send them as a server-sent event stream.

`JobEventFollower` yields each event of a job exactly once, in seq order:
it subscribes to the job's channel first, then reads the job's log, then
takes live messages, dropping any seq it has already yielded. A job that
published everything before the reader looked (a fast answer, a resumed
stream) is therefore complete, and a live message that overlaps the log is
not sent twice.

`EventStreamResponse` is the ASGI response for the stream. It listens for
the client's disconnect while it sends, stops reading at once and calls an
abort callback, so a closed tab releases its engine slot.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
import structlog
from starlette.types import Receive, Scope, Send

from pipeline.events import TERMINAL_TYPES, channel_key, read_log

log = structlog.get_logger(__name__)

# A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_INTERVAL_S = 15.0
SUBSCRIBE_TIMEOUT_S = 5.0
DONE = "[DONE]"


class SubscribeTimeoutError(redis.exceptions.ConnectionError):
    """Redis did not confirm a SUBSCRIBE in time."""


class JobEventFollower:
    """Read one job's events in seq order, each exactly once. Use `async with`."""

    def __init__(self, client: aioredis.Redis, sync_client: redis.Redis, job_id: str, after_seq: int = 0) -> None:
        self.job_id = job_id
        self.last_seq = after_seq  # highest seq yielded (or skipped by the resume point)
        self.is_finished = False  # set by a yielded finish or error event, or one before the resume point
        self._client = client
        self._sync_client = sync_client
        self._pubsub = client.pubsub()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()

    async def __aenter__(self) -> "JobEventFollower":
        await self.subscribe()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Unsubscribe and release the connection, even while the caller is being cancelled."""
        with anyio.CancelScope(shield=True):
            await self._pubsub.aclose()

    async def subscribe(self) -> None:
        """Subscribe and wait for Redis to confirm it.

        Waiting matters: SUBSCRIBE and the stages' PUBLISH travel on
        different connections, so an unconfirmed subscription could miss an
        event that a log read made before that event also misses.
        """
        await self._pubsub.subscribe(channel_key(self.job_id))
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while time.monotonic() < deadline:
            message = await self._pubsub.get_message(timeout=deadline - time.monotonic())
            if message is not None and message["type"] == "subscribe":
                return
        raise SubscribeTimeoutError(f"Redis did not confirm the subscription within {SUBSCRIBE_TIMEOUT_S} s")

    async def catch_up(self) -> list[dict[str, Any]]:
        """Queue the logged events after `last_seq` and return the whole log.

        A terminal event at or before `last_seq` (a stream resumed after its
        end) sets `is_finished`, because nothing will follow it.
        """
        events = await anyio.to_thread.run_sync(read_log, self._sync_client, self.job_id, 0)
        self._pending.extend(e for e in events if e["seq"] > self.last_seq)
        if any(e["type"] in TERMINAL_TYPES and e["seq"] <= self.last_seq for e in events):
            self.is_finished = True
        return events

    async def next_event(self, timeout_s: float) -> dict[str, Any] | None:
        """Return the next unseen event, or None when none arrives within timeout_s."""
        if self._pending:
            return self._take(self._pending.popleft())

        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
            if message is None or message["type"] != "message":
                continue
            event = json.loads(message["data"])
            if event["seq"] <= self.last_seq:
                continue
            if event["seq"] > self.last_seq + 1:
                return await self._fill_gap(event)
            return self._take(event)
        return None

    async def _fill_gap(self, event: dict[str, Any]) -> dict[str, Any]:
        # Pub/sub dropped something (a reconnect or an output buffer limit);
        # the log has every event, so take the missing ones from there.
        log.warning("job_events_gap", job_id=self.job_id, last_seq=self.last_seq, received_seq=event["seq"])
        await self.catch_up()
        if self._pending:
            return self._take(self._pending.popleft())
        return self._take(event)

    def _take(self, event: dict[str, Any]) -> dict[str, Any]:
        self.last_seq = event["seq"]
        self.is_finished = event["type"] in TERMINAL_TYPES
        return event


def encode_event(data: str | dict[str, Any], event_id: int | None = None) -> str:
    """Encode one SSE event; a dict is sent as compact JSON on one data line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return "\n".join(lines) + "\n\n"


def encode_comment(text: str) -> str:
    return f": {text}\n\n"


class EventStreamResponse:
    """Send an iterator of encoded SSE text as `text/event-stream`, aborting on disconnect.

    `on_disconnect` runs when the client leaves before the iterator is done;
    it runs shielded from cancellation so the abort reaches Redis.
    """

    def __init__(
        self,
        body: AsyncGenerator[str, None],
        *,
        headers: dict[str, str],
        on_disconnect: Callable[[], Awaitable[None]],
    ) -> None:
        self._body = body
        self._headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **headers,
        }
        self._on_disconnect = on_disconnect
        self.is_disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self._headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})

        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._listen_for_disconnect, receive, task_group.cancel_scope)
                await self._stream(send)
                task_group.cancel_scope.cancel()
        except OSError:
            self.is_disconnected = True
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()
                if self.is_disconnected:
                    await self._on_disconnect()

        if not self.is_disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send: Send) -> None:
        async for text in self._body:
            await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": True})

    async def _listen_for_disconnect(self, receive: Receive, cancel_scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.is_disconnected = True
                cancel_scope.cancel()
                return
