"""API keys and per-client rate limits in front of every /v1/ route.

Keys come from settings.api_keys; with none configured the API is open.
The rate limit is a fixed one-minute window counted in Redis, so every
gateway replica shares one counter per client. A client is its API key
(stored only as a SHA-256 fingerprint) or, with keys off, its address.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

import redis
import redis.asyncio as aioredis
import structlog
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.events import KEY_PREFIX
from pipeline.settings import Settings
from web.openai_format import error_body

log = structlog.get_logger(__name__)

API_PREFIX = "/v1/"
WINDOW_S = 60


def key_fingerprint(api_key: str) -> str:
    """Return a short SHA-256 fingerprint that identifies a key without revealing it."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


def find_api_key(authorization: str | None, api_keys: tuple[str, ...]) -> str | None:
    """Return the configured key that the Authorization header carries, or None.

    Every configured key is compared with hmac.compare_digest, with no early
    exit, so the time taken does not reveal how much of a guess matched.
    """
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None

    matched = None
    for api_key in api_keys:
        if hmac.compare_digest(presented.strip().encode("utf-8"), api_key.encode("utf-8")):
            matched = api_key
    return matched


def rate_limit_key(client_id: str, window_index: int) -> str:
    return f"{KEY_PREFIX}:ratelimit:{client_id}:{window_index}"


async def count_request(client: aioredis.Redis, client_id: str, limit_per_min: int, now: float) -> float | None:
    """Count one request in the current window; return seconds until the window ends when over the limit."""
    window_index = int(now // WINDOW_S)
    key = rate_limit_key(client_id, window_index)
    async with client.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, WINDOW_S + 1)
        count, _ = await pipe.execute()

    if count <= limit_per_min:
        return None
    return (window_index + 1) * WINDOW_S - now


class GatewayMiddleware:
    """ASGI middleware: 401 without a valid key, 429 over the rate limit, 503 when Redis is down."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return

        client_id = self._identify(scope)
        if client_id is None:
            response = JSONResponse(
                error_body(
                    "missing or invalid API key; send the header 'Authorization: Bearer <key>'",
                    error_type="invalid_request_error",
                    code="invalid_api_key",
                ),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return

        rejection = await self._check_rate_limit(scope, client_id)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _identify(self, scope: Scope) -> str | None:
        """Return the rate-limit identity of the request, or None when its key is rejected."""
        if not self.settings.api_keys:
            host = scope["client"][0] if scope.get("client") else "unknown"
            return f"addr:{host}"
        api_key = find_api_key(Headers(scope=scope).get("authorization"), self.settings.api_keys)
        return None if api_key is None else f"key:{key_fingerprint(api_key)}"

    async def _check_rate_limit(self, scope: Scope, client_id: str) -> JSONResponse | None:
        limit = self.settings.rate_limit_per_min
        if limit == 0:
            return None

        try:
            retry_after_s = await count_request(scope["app"].state.redis, client_id, limit, time.time())
        except redis.exceptions.RedisError as exc:
            log.error("rate_limit_redis_failed", error=str(exc))
            return JSONResponse(
                error_body("the rate limiter cannot reach Redis; retry later", error_type="server_error", code="service_unavailable"),
                status_code=503,
            )

        if retry_after_s is None:
            return None
        log.info("rate_limited", client_id=client_id, limit_per_min=limit)
        return JSONResponse(
            error_body(
                f"rate limit of {limit} requests per minute exceeded; retry after the Retry-After header's seconds",
                error_type="rate_limit_error",
                code="rate_limit_exceeded",
            ),
            status_code=429,
            headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
        )
