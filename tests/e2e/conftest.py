"""The whole system as `chatpipe up` runs it: a Celery worker per stage queue, an
inference worker per model, and the web server, all as real processes on the
session's Redis and Postgres.

SmolLM2 serves the chat and knowledge routes so most tests run fast; Qwen
serves code and task, and any request that names it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
import redis

from chatpipe.processes import stage_children, stop_all, web_child
from chatpipe.services import free_port
from pipeline.settings import Settings

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
ROUTE_MODELS = {"chat": SMOL, "knowledge": SMOL, "code": QWEN, "task": QWEN}
START_TIMEOUT_S = 900  # a first load de-quantises each GGUF once (about 40 s and 80 s on 2 cores)


def _wait_until(predicate, timeout_s: float, what: str, children) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [c.name for c in children if not c.is_running()]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}")
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready within {timeout_s}s")


def _web_is_up(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _engines_ready(client: redis.Redis) -> bool:
    models = {json.loads(client.get(k))["model"] for k in client.scan_iter("chatpipe:engine_stats:*")}
    return set(ROUTE_MODELS.values()) <= models


@pytest.fixture(scope="session")
def system(redis_url, database_url):
    port = free_port()
    settings = Settings(route_models=dict(ROUTE_MODELS), max_num_seqs=4, host="127.0.0.1", port=port)
    route_env = ",".join(f"{route}={model}" for route, model in ROUTE_MODELS.items())
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "CHATPIPE_ROUTE_MODELS": route_env,
           "CHATPIPE_MAX_NUM_SEQS": "4", "CHATPIPE_PORT": str(port)}
    children = stage_children(settings, env) + [web_child(settings, env)]
    for child in children:
        child.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        client = redis.Redis.from_url(redis_url)
        _wait_until(lambda: _web_is_up(base_url), 120, "web server", children)
        _wait_until(lambda: _engines_ready(client), START_TIMEOUT_S, "inference engines", children)
        yield base_url
    finally:
        stop_all(children)


@pytest.fixture(scope="session")
def knowledge_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "docs" / "examples" / "knowledge"
