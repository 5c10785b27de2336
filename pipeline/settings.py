"""Settings read from the environment, once, with the CHATPIPE_ prefix.

REDIS_URL and DATABASE_URL keep their conventional names because every
deployment tool already sets them. When either is unset, `chatpipe up`
starts the embedded server and exports its URL to the processes it starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not an integer; set it to a whole number such as {default}") from exc
    if value < minimum:
        raise SettingsError(f"{name}={value} is below the minimum {minimum}")
    return value


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a number; set it to a value such as {default}") from exc
    if not value >= minimum:
        raise SettingsError(f"{name}={value} is below the minimum {minimum}")
    return value


def _default_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "chatpipe"


DEFAULT_ROUTE_MODELS = {
    "code": "qwen2.5-coder-0.5b-instruct",
    "task": "qwen2.5-coder-0.5b-instruct",
    "knowledge": "qwen2.5-coder-0.5b-instruct",
    "chat": "qwen2.5-coder-0.5b-instruct",
}


def _parse_route_models(raw: str | None) -> dict[str, str]:
    """Parse CHATPIPE_ROUTE_MODELS, e.g. "chat=smollm2-135m-instruct,code=qwen2.5-coder-0.5b-instruct"."""
    routes = dict(DEFAULT_ROUTE_MODELS)
    if not raw:
        return routes
    for item in raw.split(","):
        route, sep, model = item.strip().partition("=")
        if not sep or route not in routes or not model:
            raise SettingsError(
                f"CHATPIPE_ROUTE_MODELS entry {item!r} is invalid; use ROUTE=MODEL with ROUTE one of {sorted(routes)}"
            )
        routes[route] = model
    return routes


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path(_env_str("CHATPIPE_HOME", str(_default_home()))))
    model_cache: Path | None = None
    redis_url: str | None = field(default_factory=lambda: os.environ.get("REDIS_URL") or None)
    database_url: str | None = field(default_factory=lambda: os.environ.get("DATABASE_URL") or None)
    host: str = field(default_factory=lambda: _env_str("CHATPIPE_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _env_int("CHATPIPE_PORT", 8000, minimum=1))
    api_keys: tuple[str, ...] = field(
        default_factory=lambda: tuple(k for k in _env_str("CHATPIPE_API_KEYS", "").split(",") if k)
    )
    rate_limit_per_min: int = field(default_factory=lambda: _env_int("CHATPIPE_RATE_LIMIT_PER_MIN", 120))
    route_models: dict[str, str] = field(
        default_factory=lambda: _parse_route_models(os.environ.get("CHATPIPE_ROUTE_MODELS"))
    )
    models: tuple[str, ...] = ()
    context_budget_tokens: int = field(default_factory=lambda: _env_int("CHATPIPE_CONTEXT_BUDGET_TOKENS", 2048, 64))
    default_max_tokens: int = field(default_factory=lambda: _env_int("CHATPIPE_DEFAULT_MAX_TOKENS", 512, 1))
    max_tool_rounds: int = field(default_factory=lambda: _env_int("CHATPIPE_MAX_TOOL_ROUNDS", 3, 0))
    retrieval_top_k: int = field(default_factory=lambda: _env_int("CHATPIPE_RETRIEVAL_TOP_K", 3, 1))
    # Engine capacity: how many jobs one inference worker decodes at once, and
    # the KV cache memory budget per worker.
    max_num_seqs: int = field(default_factory=lambda: _env_int("CHATPIPE_MAX_NUM_SEQS", 16, 1))
    kv_cache_bytes: int = field(default_factory=lambda: _env_int("CHATPIPE_KV_CACHE_BYTES", 512 * 1024 * 1024, 1 << 20))
    kv_block_size: int = field(default_factory=lambda: _env_int("CHATPIPE_KV_BLOCK_SIZE", 16, 1))
    max_num_batched_tokens: int = field(
        default_factory=lambda: _env_int("CHATPIPE_MAX_NUM_BATCHED_TOKENS", 512, 16)
    )
    device: str = field(default_factory=lambda: _env_str("CHATPIPE_DEVICE", "auto"))
    dtype: str = field(default_factory=lambda: _env_str("CHATPIPE_DTYPE", "auto"))
    # How linear weights are stored: dense (the compute dtype) or fp16-packed
    # (CPU, float32 compute). auto measures which is faster on this machine.
    weight_format: str = field(default_factory=lambda: _env_str("CHATPIPE_WEIGHT_FORMAT", "auto"))
    # C kernels for decode attention and the element-wise layer steps, built on
    # first use (x86-64 CPUs with AVX2, float32): on, off, or auto (where they build).
    native_kernels: str = field(default_factory=lambda: _env_str("CHATPIPE_NATIVE_KERNELS", "auto"))
    num_threads: int = field(default_factory=lambda: _env_int("CHATPIPE_NUM_THREADS", 0))
    job_ttl_s: int = field(default_factory=lambda: _env_int("CHATPIPE_JOB_TTL_S", 3600, 1))
    request_timeout_s: float = field(default_factory=lambda: _env_float("CHATPIPE_REQUEST_TIMEOUT_S", 600.0, 1.0))

    def __post_init__(self) -> None:
        if self.model_cache is None:
            raw = os.environ.get("CHATPIPE_MODEL_CACHE")
            object.__setattr__(self, "model_cache", Path(raw) if raw else self.home / "models")
        if not self.models:
            object.__setattr__(self, "models", tuple(sorted(set(self.route_models.values()))))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SettingsError(f"CHATPIPE_DEVICE={self.device!r} is invalid; use auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise SettingsError(f"CHATPIPE_DTYPE={self.dtype!r} is invalid; use auto, bfloat16, float16 or float32")
        if self.weight_format not in ("auto", "dense", "fp16-packed"):
            raise SettingsError(
                f"CHATPIPE_WEIGHT_FORMAT={self.weight_format!r} is invalid; use auto, dense or fp16-packed"
            )
        if self.native_kernels not in ("auto", "on", "off"):
            raise SettingsError(f"CHATPIPE_NATIVE_KERNELS={self.native_kernels!r} is invalid; use auto, on or off")

    @property
    def data_dir(self) -> Path:
        return self.home / "data"


_settings: Settings | None = None


def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


def reset_settings() -> None:
    """Forget cached settings so the next get_settings() reads the environment again (tests)."""
    global _settings
    _settings = None
