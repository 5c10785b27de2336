"""Session fixtures: a real Redis and a real Postgres with pgvector.

REDIS_URL and DATABASE_URL, when set, point the tests at existing servers;
otherwise the session starts the embedded ones in a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
import redis

from chatpipe.services import EmbeddedPostgres, EmbeddedRedis, apply_migrations, free_port
from pipeline.logs import configure_logging

configure_logging()


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory) -> Path:
    # Unix socket paths are limited to 107 bytes, so keep the folder short.
    path = Path(os.environ.get("CHATPIPE_TEST_SERVICES_DIR", f"/tmp/chatpipe-test-{os.getpid()}"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def redis_url(services_dir):
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = EmbeddedRedis(services_dir / "redis", free_port()).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def database_url(services_dir):
    if os.environ.get("DATABASE_URL"):
        url = os.environ["DATABASE_URL"]
        apply_migrations(url)
        yield url
        return
    server = EmbeddedPostgres(services_dir / "pg").start()
    apply_migrations(server.url)
    yield server.url
    server.stop()


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def db(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def model_cache() -> Path:
    from pipeline.settings import get_settings

    return get_settings().model_cache
