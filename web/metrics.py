"""Prometheus metrics of the gateway, plus the engines' stats read from Redis at scrape time.

Each app owns a CollectorRegistry, so two apps in one process (tests) do
not share counters. Inference workers write their stats as JSON to
`chatpipe:engine_stats:{model}:{worker}` every second with a 10 s expiry.
A scrape reads the keys that are alive, so a dead worker drops out within
10 s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import redis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.events import KEY_PREFIX

log = structlog.get_logger(__name__)

ENGINE_STATS_PATTERN = f"{KEY_PREFIX}:engine_stats:*"

# Latency buckets in seconds: TTFT spans a warm prefix hit to a long
# prefill behind a queue; inter-token latency spans GPU to 2-core CPU decode.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

# (stats field, metric name, help) for gauges, then for counters.
_ENGINE_GAUGES = (
    ("num_running", "chatpipe_engine_num_requests_running", "Sequences the engine is decoding."),
    ("num_waiting", "chatpipe_engine_num_requests_waiting", "Sequences waiting for a slot or KV blocks."),
    ("cache_usage", "chatpipe_engine_kv_cache_usage_ratio", "Fraction of KV cache blocks in use, 0 to 1."),
    ("num_free_blocks", "chatpipe_engine_num_free_blocks", "Free KV cache blocks."),
    ("num_total_blocks", "chatpipe_engine_num_total_blocks", "KV cache blocks in total."),
    ("kv_cache_bytes", "chatpipe_engine_kv_cache_bytes", "KV cache memory in bytes."),
)
_ENGINE_COUNTERS = (
    ("prompt_tokens_total", "chatpipe_engine_prompt_tokens", "Prompt tokens prefilled."),
    ("generation_tokens_total", "chatpipe_engine_generation_tokens", "Tokens generated."),
    ("prefix_cache_hit_tokens_total", "chatpipe_engine_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache."),
    ("num_preempted_total", "chatpipe_engine_num_preemptions", "Sequences preempted for lack of KV blocks."),
)


def read_engine_stats(client: redis.Redis) -> list[dict[str, Any]]:
    """Return the stats objects of all live inference workers; unreadable entries are skipped."""
    keys = sorted(client.scan_iter(match=ENGINE_STATS_PATTERN, count=100))
    if not keys:
        return []

    stats = []
    for key, raw in zip(keys, client.mget(keys)):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("engine_stats_invalid_json", key=key)
            continue
        if isinstance(entry, dict) and entry.get("model") and entry.get("worker"):
            stats.append(entry)
    return stats


class EngineStatsCollector(Collector):
    """Collector that reads the engines' stats keys from Redis on every collect()."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("chatpipe_engine_stats_up", "1 when the engine stats could be read from Redis.")
        try:
            stats = read_engine_stats(self._client)
        except redis.exceptions.RedisError as exc:
            log.error("engine_stats_read_failed", error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        for field, name, documentation in _ENGINE_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["model", "worker"])
            _add_samples(family, field, stats)
            yield family
        for field, name, documentation in _ENGINE_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=["model", "worker"])
            _add_samples(family, field, stats)
            yield family


def _add_samples(family: GaugeMetricFamily | CounterMetricFamily, field: str, stats: list[dict[str, Any]]) -> None:
    for entry in stats:
        value = entry.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            family.add_metric([str(entry["model"]), str(entry["worker"])], value)


class GatewayMetrics:
    """The app's registry: request counts, latencies and token counts from finish events."""

    def __init__(self) -> None:
        # auto_describe off: it would make register() run the engine collector,
        # reading Redis, while the app starts.
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "chatpipe_http_requests", "API responses by route and HTTP status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.ttft = Histogram(
            "chatpipe_time_to_first_token_seconds", "Time from job creation to its first text delta.",
            ["model"], buckets=TTFT_BUCKETS_S, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "chatpipe_inter_token_latency_seconds", "Mean time per output token after the first, one sample per job.",
            ["model"], buckets=ITL_BUCKETS_S, registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "chatpipe_prompt_tokens", "Prompt tokens of finished jobs.", ["model"], registry=self.registry,
        )
        self.completion_tokens = Counter(
            "chatpipe_completion_tokens", "Completion tokens of finished jobs.", ["model"], registry=self.registry,
        )
        self.finished_jobs = Counter(
            "chatpipe_finished_jobs", "Jobs that ended, by finish_reason (error for an error event).",
            ["finish_reason"], registry=self.registry,
        )

    def attach_engine_stats(self, client: redis.Redis) -> None:
        self.registry.register(EngineStatsCollector(client))

    def observe_terminal(self, event: dict[str, Any], model: str) -> None:
        """Record a job's finish or error event."""
        if event["type"] == "error":
            self.finished_jobs.labels(finish_reason="error").inc()
            return

        model = event.get("model") or model
        self.finished_jobs.labels(finish_reason=event.get("finish_reason") or "stop").inc()
        metrics = event.get("metrics") or {}
        # job_ttft_s counts from job creation, so it includes the queue and
        # the stages before inference; the engine's ttft_s starts at admission.
        ttft_s = metrics.get("job_ttft_s", metrics.get("ttft_s"))
        if isinstance(ttft_s, (int, float)):
            self.ttft.labels(model=model).observe(ttft_s)
        if isinstance(metrics.get("tpot_s"), (int, float)):
            self.inter_token_latency.labels(model=model).observe(metrics["tpot_s"])

        usage = event.get("usage") or {}
        self.prompt_tokens.labels(model=model).inc(max(0, int(usage.get("prompt_tokens") or 0)))
        self.completion_tokens.labels(model=model).inc(max(0, int(usage.get("completion_tokens") or 0)))


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus text format."""
    registry = request.app.state.metrics.registry
    # collect() reads Redis with the blocking client, so keep it off the event loop.
    body = await anyio.to_thread.run_sync(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def route_template(scope: Scope) -> str:
    """Return the path template of the route that serves the request, so job ids do not become labels."""
    for route in scope["app"].router.routes:
        if isinstance(route, Route) and route.matches(scope)[0] == Match.FULL:
            return route.path
    return "other"


class RequestMetricsMiddleware:
    """ASGI middleware counting /v1/ responses by route and status, rejections included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        status_codes: list[int] = []

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_codes.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            status = str(status_codes[0]) if status_codes else "500"
            metrics = scope["app"].state.metrics
            metrics.requests.labels(method=scope["method"], route=route_template(scope), status=status).inc()
