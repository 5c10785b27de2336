"""`chatpipe up`: every service and stage of the pipeline on one machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import structlog

from chatpipe.processes import Child, stop_all, stage_children, web_child
from chatpipe.services import EmbeddedPostgres, EmbeddedRedis, ServiceError, apply_migrations, port_is_free
from pipeline.models.pull import is_pulled
from pipeline.models.registry import get_spec
from pipeline.settings import Settings, get_settings

log = structlog.get_logger(__name__)

DEFAULT_REDIS_PORT = 6380


def run_file(settings: Settings) -> Path:
    """File where a running `chatpipe up` records its service URLs for other commands."""
    return settings.home / "run.json"


def _read_run_file(settings: Settings) -> dict:
    try:
        return json.loads(run_file(settings).read_text())
    except (OSError, ValueError):
        return {}


def running_urls(settings: Settings) -> tuple[str | None, str | None]:
    """Return (redis_url, database_url): the environment's, else those of a running `chatpipe up`."""
    recorded = _read_run_file(settings)
    return settings.redis_url or recorded.get("redis_url"), settings.database_url or recorded.get("database_url")


@contextlib.contextmanager
def require_database_url() -> Iterator[str]:
    """Yield a database URL: DATABASE_URL, a running `chatpipe up`, or the embedded server started for this command."""
    settings = get_settings()
    _, url = running_urls(settings)
    if url:
        yield url
        return
    server = EmbeddedPostgres(settings.data_dir / "pg").start()
    try:
        apply_migrations(server.url)
        yield server.url
    finally:
        server.stop()


def _check_models(settings: Settings) -> None:
    missing = [m for m in settings.models if not is_pulled(settings.model_cache, get_spec(m))]
    if missing:
        raise ServiceError(f"models not pulled: {', '.join(missing)}; run `chatpipe models pull {' '.join(missing)}`")


def _start_services(settings: Settings, stack: contextlib.ExitStack) -> tuple[str, str]:
    redis_url, database_url = settings.redis_url, settings.database_url
    if not redis_url:
        port = int(os.environ.get("CHATPIPE_REDIS_PORT", DEFAULT_REDIS_PORT))
        server = EmbeddedRedis(settings.data_dir / "redis", port).start()
        stack.callback(server.stop)
        redis_url = server.url
    if not database_url:
        pg = EmbeddedPostgres(settings.data_dir / "pg").start()
        stack.callback(pg.stop)
        database_url = pg.url
    applied = apply_migrations(database_url)
    log.info("migrations_checked", applied=len(applied))
    return redis_url, database_url


def _check_alive(children: list[Child]) -> None:
    dead = [c.name for c in children if not c.is_running()]
    if dead:
        raise ServiceError(f"process exited during start: {', '.join(dead)}")


def _wait_for_web(url: str, children: list[Child], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(children)
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise ServiceError(f"web server did not respond on {url}/healthz within {timeout_s:.0f}s")


def run_up(args) -> int:
    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    if not port_is_free(host, port):
        print(f"error: port {port} on {host} is already in use; stop the process using it or pass --port", flush=True)
        return 1
    try:
        _check_models(settings)
    except ServiceError as exc:
        print(f"error: {exc}", flush=True)
        return 1

    _measure_cpu()
    with contextlib.ExitStack() as stack:
        try:
            redis_url, database_url = _start_services(settings, stack)
        except ServiceError as exc:
            print(f"error: {exc}", flush=True)
            return 1
        env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url,
               "CHATPIPE_HOST": host, "CHATPIPE_PORT": str(port)}
        children = stage_children(settings, env) + [web_child(Settings(host=host, port=port), env)]
        stack.callback(stop_all, children)
        run_file(settings).parent.mkdir(parents=True, exist_ok=True)
        run_file(settings).write_text(json.dumps({"redis_url": redis_url, "database_url": database_url,
                                                  "pid": os.getpid()}))
        stack.callback(run_file(settings).unlink, missing_ok=True)
        return _supervise(children, f"http://{host}:{port}", redis_url, database_url, settings.models)


def _measure_cpu() -> None:
    """Run the dtype and weight-format probes before any worker starts, in a child process.

    Workers starting together would otherwise probe while the others load
    models, and a busy CPU can time the formats wrongly. The verdicts are
    kept in CHATPIPE_HOME, and the workers read them there. A child process
    keeps torch out of this supervisor.
    """
    result = subprocess.run([sys.executable, "-c", "import chatpipe.up as up; up.measure_cpu_verdicts()"],
                            check=False)
    if result.returncode != 0:
        log.warning("cpu_probes_failed", returncode=result.returncode,
                    consequence="each inference worker measures the CPU itself")


def measure_cpu_verdicts() -> None:
    """Record the CPU probes' verdicts when the models run on the CPU."""
    from pipeline.logs import configure_logging
    from pipeline.models.loader import choose_device, record_cpu_verdicts

    configure_logging()
    if choose_device(get_settings().device).type == "cpu":
        record_cpu_verdicts()


def _wait_for_engines(redis_url: str, models: tuple[str, ...], children: list[Child], timeout_s: float) -> None:
    """Wait until every inference worker has loaded its model and published engine stats."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(children)
        ready = {json.loads(client.get(key) or "{}").get("model") for key in client.scan_iter("chatpipe:engine_stats:*")}
        if set(models) <= ready:
            return
        time.sleep(0.5)
    raise ServiceError(f"inference workers did not load {', '.join(models)} within {timeout_s:.0f}s")


def _supervise(children: list[Child], url: str, redis_url: str, database_url: str, models: tuple[str, ...]) -> int:
    stopping = False

    def _on_term(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_term)
    for child in children:
        child.start()
    try:
        _wait_for_web(url, children)
        print(f"loading models: {', '.join(models)}…", flush=True)
        # A first start converts each GGUF once, which takes minutes on a small CPU.
        _wait_for_engines(redis_url, models, children, timeout_s=900)
        print(f"redis: {redis_url}\npostgres: {database_url}", flush=True)
        print(f"chatpipe is up: {url}  (Ctrl-C stops everything)", flush=True)
        while not stopping:
            dead = [c for c in children if not c.is_running()]
            if dead:
                print(f"error: {dead[0].name} exited with code {dead[0].process.returncode}; stopping", flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except ServiceError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    print("stopping chatpipe…", flush=True)
    return 0
