"""The Starlette application: API routes, /metrics, the chat page, and their middleware.

Serve it with `uvicorn --factory web.app:get_app` (or `uvicorn web.app:app`,
built on first access). Tests build their own
app with `create_app(redis_url=..., start_job=...)`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis
import structlog
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.job import Job
from pipeline.logs import configure_logging
from pipeline.settings import Settings, SettingsError, get_settings
from web import api
from web.gateway import GatewayMiddleware
from web.metrics import GatewayMetrics, RequestMetricsMiddleware, metrics_endpoint

log = structlog.get_logger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
REDIS_SOCKET_TIMEOUT_S = 5.0

# The page loads only its own files and talks only to this origin, so
# model output that slips past the Markdown escaping still cannot load
# or run anything.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class SecurityHeadersMiddleware:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _default_start_job() -> Callable[[Job], None]:
    # Imported here so the web package does not pull in Celery unless it serves for real.
    from workers.dispatch import start_job

    return start_job


def create_app(
    *,
    redis_url: str | None = None,
    start_job: Callable[[Job], None] | None = None,
    settings: Settings | None = None,
) -> Starlette:
    """Build the gateway app; start_job queues a job (default: workers.dispatch.start_job)."""
    settings = settings or get_settings()
    redis_url = redis_url or settings.redis_url
    if not redis_url:
        raise SettingsError("REDIS_URL is not set; point it at a Redis server or start everything with `chatpipe up`")
    start_job = start_job or _default_start_job()
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        options = {"decode_responses": True, "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S}
        app.state.redis = aioredis.Redis.from_url(redis_url, **options)
        app.state.sync_redis = redis.Redis.from_url(redis_url, **options)
        metrics.attach_engine_stats(app.state.sync_redis)
        log.info("web_started", num_api_keys=len(settings.api_keys), rate_limit_per_min=settings.rate_limit_per_min,
                 request_timeout_s=settings.request_timeout_s)
        try:
            yield
        finally:
            await app.state.redis.aclose()
            app.state.sync_redis.close()

    routes = [
        *api.routes(),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeadersMiddleware),
        Middleware(RequestMetricsMiddleware),
        Middleware(GatewayMiddleware, settings=settings),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.settings = settings
    app.state.start_job = start_job
    app.state.metrics = metrics
    app.state.started_at = int(time.time())
    return app


def get_app() -> Starlette:
    """Build the app from the environment; the factory for `uvicorn --factory web.app:get_app`."""
    configure_logging()
    return create_app()


_app: Starlette | None = None


def __getattr__(name: str) -> Starlette:
    """Build `web.app:app` on first access, so importing this module reads no settings."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = get_app()
    return _app
