"""Start and stop the worker and web processes that `chatpipe up` runs on one machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import structlog

from pipeline.settings import Settings
from workers.app import STAGE_QUEUES

log = structlog.get_logger(__name__)


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.process = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("process_started", name=self.name, pid=self.process.pid)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def celery_worker_argv(queue: str, concurrency: int) -> list[str]:
    """Arguments of a Celery worker for one queue; `chatpipe worker` and compose.yaml run exactly this."""
    # Threads, not forked processes: stage work waits on Redis and Postgres,
    # and an inference task thread waits on its sequence while the engine
    # thread steps every sequence together.
    return [
        "-A", "workers.app", "worker", "-Q", queue, "-n", f"{queue}@%h", "--pool", "threads",
        "--concurrency", str(concurrency), "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]


def stage_children(settings: Settings, env: dict[str, str]) -> list[Child]:
    """Build one worker per stage queue, and one inference worker per configured model."""
    children = []
    for stage in STAGE_QUEUES:
        children.append(Child(f"worker:{stage}", [sys.executable, "-m", "chatpipe.cli", "worker", stage], env))
    for model in settings.models:
        cmd = [sys.executable, "-m", "chatpipe.cli", "worker", "inference", "--model", model]
        children.append(Child(f"worker:inference:{model}", cmd, env))
    return children


def web_child(settings: Settings, env: dict[str, str]) -> Child:
    cmd = [sys.executable, "-m", "chatpipe.cli", "web", "--host", settings.host, "--port", str(settings.port)]
    return Child("web", cmd, env)


def stop_all(children: list[Child], timeout_s: float = 15.0) -> None:
    """SIGTERM every child (Celery finishes its current task), then SIGKILL what is left after the timeout."""
    for child in children:
        if child.is_running():
            os.killpg(child.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        log.info("process_stopped", name=child.name, returncode=child.process.returncode)
