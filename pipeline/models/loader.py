"""Load a registered model (or any local transformers causal LM) onto a device.

The first load of a GGUF de-quantises every tensor, which takes 15-35 s on
a 2-core CPU. The result is saved once as safetensors beside the GGUF, so
later loads read plain tensors in seconds. A GGUF-loaded model rejects
`save_pretrained`, so the state dict and the config are written directly,
without the config's quantization entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

# transformers otherwise contacts a model hub while loading local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import structlog  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pipeline.models.packed_linear import (  # noqa: E402
    WEIGHT_FORMATS,
    PackedFp16Linear,
    WeightFormatError,
    fp16_packing_available,
    pack_linear_layers,
)
from pipeline.models.pull import gguf_path, is_pulled, model_dir  # noqa: E402
from pipeline.models.registry import MODELS, get_spec  # noqa: E402

log = structlog.get_logger(__name__)


class ModelNotPulledError(RuntimeError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} is not in the cache; run `chatpipe models pull {name}` first")


@dataclass
class LoadedModel:
    name: str
    model: "torch.nn.Module"
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    load_s: float
    source: str  # "gguf" (de-quantised now) or "safetensors" (converted copy)
    weight_format: str = "dense"  # or "fp16-packed": see packed_linear.py


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Pick the compute dtype for a device.

    Decode reads every weight once per step, so bf16 halves the bytes read,
    but whether that turns into speed depends on the CPU's bf16 kernels. So
    on CPU the choice is made by timing decode-shaped products in both
    dtypes, for one row (a single stream) and for 16 rows (a batch). On the
    2-core AMD EPYC (Zen 3, AVX2, no native bf16) used for development, bf16
    won for one row. But its time grew linearly with the rows (16 rows: 3.9
    ms against 0.64 ms in fp32), so fp32 is chosen there. CUDA uses bf16
    where the GPU supports it.
    """
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_bf16_is_faster() else torch.float32


@functools.cache
def _cpu_bf16_is_faster() -> bool:
    return _cached_verdict("bf16_is_faster", _probe_bf16_is_faster)


def record_cpu_verdicts() -> None:
    """Run the dtype and weight-format probes now and keep their verdicts, whatever the load average.

    `chatpipe up` calls this before it starts any worker. The load average
    may then still count work that has just ended, but nothing else runs.
    """
    _cached_verdict("bf16_is_faster", _probe_bf16_is_faster, keep_under_load=True)
    if fp16_packing_available():
        _cached_verdict("fp16_packed_is_faster", _probe_fp16_packed_is_faster, keep_under_load=True)


def _cached_verdict(probe: str, run_probe, keep_under_load: bool = False) -> bool:
    """Return a probe's verdict, measured once per CPU model, torch version and thread count and kept in a file.

    Keeping the verdict makes every worker on the machine pick the same
    dtype and weight format, which a replay needs to reproduce tokens. A
    verdict measured while the 1-minute load average exceeds the core count
    is used by this process but not kept (unless `keep_under_load`), because
    other processes may have skewed the timings. A later start measures again.
    """
    from pipeline.settings import get_settings

    cpu = platform.processor() or platform.machine()
    for line in _read_cpuinfo().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    # The number at the front changes whenever a probe changes, so older verdicts are measured again.
    key = f"probe 4|{cpu}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = get_settings().home / "cpu_probes.json"
    with file_lock(path.with_name(path.name + ".lock")):
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            recorded = {}
        entry = recorded.get(probe)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("verdict"), bool):
            return entry["verdict"]
        load_average, cores = os.getloadavg()[0], os.cpu_count() or 1
        verdict = run_probe()
        if load_average > cores and not keep_under_load:
            log.warning("cpu_probe_verdict_not_kept", probe=probe, verdict=verdict,
                        load_average=round(load_average, 2), cores=cores)
            return verdict
        recorded[probe] = {"key": key, "verdict": verdict}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recorded, indent=2))
    return verdict


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _probe_bf16_is_faster() -> bool:
    """Time y = x W^T for a [4864, 896] weight (Qwen 0.5B's MLP shape) with 1 and 16 rows, in fp32 and bf16."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(4864, 896).to(dtype)
        for num_rows in (1, 16):
            x = torch.randn(num_rows, 896).to(dtype)
            trials = []
            # The minimum of several short trials is robust to other processes
            # briefly taking a core.
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(10):
                    torch.nn.functional.linear(x, weight)
                trials.append((time.perf_counter() - started) / 10)
            timings[(dtype, num_rows)] = min(trials)
    # bf16 must win clearly in both shapes: a near tie keeps fp32, which has no rounding loss.
    is_faster = all(timings[(torch.bfloat16, n)] < 0.8 * timings[(torch.float32, n)] for n in (1, 16))
    log.info("cpu_dtype_probe", chosen="bfloat16" if is_faster else "float32",
             **{f"{str(d).removeprefix('torch.')}_{n}rows_us": round(t * 1e6, 1) for (d, n), t in timings.items()})
    return is_faster


def choose_weight_format(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """Pick how linear weights are stored: "dense" (the compute dtype) or "fp16-packed".

    fp16-packed needs a CPU, float32 compute and FBGEMM. With "auto" it is
    chosen when a timing probe finds it clearly faster. packed_linear.py
    says what it changes and what it measured.
    """
    if requested not in WEIGHT_FORMATS:
        raise WeightFormatError(f"weight format {requested!r} is invalid; use one of {', '.join(WEIGHT_FORMATS)}")
    packable = device.type == "cpu" and dtype == torch.float32 and fp16_packing_available()
    if requested == "fp16-packed" and not packable:
        raise WeightFormatError(
            f"weight format fp16-packed needs float32 on a CPU with FBGEMM, got {str(dtype).removeprefix('torch.')} "
            f"on {device.type}; use CHATPIPE_WEIGHT_FORMAT=dense or auto"
        )
    if requested != "auto":
        return requested
    if packable and _cached_verdict("fp16_packed_is_faster", _probe_fp16_packed_is_faster):
        return "fp16-packed"
    return "dense"


def _probe_fp16_packed_is_faster() -> bool:
    """Time decode-shaped products with float32 and fp16-packed weights, for 1 and 16 rows.

    Four [4864, 896] weights (70 MB together, more than a CPU's last-level
    cache) are used in turn, so the timing includes reading weights from
    memory as a real decode step does.

    The verdict is the median, over 9 rounds, of the packed-to-dense time
    ratio measured back to back within a round, so that a short burst of
    other work skews one ratio rather than one format's timing. With two
    other busy processes on a 2-core machine no timing was reliable (this
    probe picked dense in three of four runs), which is why `chatpipe up`
    probes before it starts workers and a verdict measured under load is
    not kept.
    """
    weights = [torch.randn(4864, 896) for _ in range(4)]
    formats = {"dense": [functools.partial(torch.nn.functional.linear, weight=w) for w in weights],
               "fp16-packed": [PackedFp16Linear(weight) for weight in weights]}
    inputs = {num_rows: torch.randn(num_rows, 896) for num_rows in (1, 16)}
    ratios: dict[int, list[float]] = {num_rows: [] for num_rows in inputs}
    for _ in range(9):
        for num_rows, x in inputs.items():
            seconds = {}
            for kind, layers in formats.items():
                started = time.perf_counter()
                for layer in layers * 3:
                    layer(x)
                seconds[kind] = time.perf_counter() - started
            ratios[num_rows].append(seconds["fp16-packed"] / seconds["dense"])
    median_ratios = {num_rows: statistics.median(values) for num_rows, values in ratios.items()}
    # A near tie keeps dense weights, which have no rounding loss.
    is_faster = all(ratio < 0.8 for ratio in median_ratios.values())
    log.info("cpu_weight_format_probe", chosen="fp16-packed" if is_faster else "dense",
             **{f"packed_to_dense_{num_rows}rows": round(ratio, 3) for num_rows, ratio in median_ratios.items()})
    return is_faster


def converted_dir(cache: Path, name: str, dtype: torch.dtype) -> Path:
    return model_dir(cache, get_spec(name)) / "converted" / str(dtype).removeprefix("torch.")


def resolve_source(name_or_path: str, cache: Path) -> tuple[str, Path, str | None]:
    """Return (display name, folder, gguf file name or None) for a registered name or a local path."""
    if name_or_path in MODELS:
        spec = get_spec(name_or_path)
        if not is_pulled(cache, spec):
            raise ModelNotPulledError(name_or_path)
        path = gguf_path(cache, spec)
        return spec.name, path.parent, path.name
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path.parent, path.name
    if path.is_dir():
        return path.name, path, None
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a registered name ({', '.join(sorted(MODELS))}), "
        "a .gguf file nor a folder with a transformers model"
    )


def load_tokenizer(name_or_path: str, cache: Path):
    from transformers import AutoTokenizer

    name, folder, gguf_file = resolve_source(name_or_path, cache)
    if gguf_file is not None:
        converted = next(iter(sorted((folder / "converted").glob("*/tokenizer.json"))), None)
        if converted is not None:
            return AutoTokenizer.from_pretrained(converted.parent)
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(folder)


def load_model(name_or_path: str, cache: Path, device: str = "auto", dtype: str = "auto",
               weight_format: str = "auto") -> LoadedModel:
    """Load tokenizer and model; de-quantise a GGUF once and cache the result as safetensors.

    The safetensors copy has the dense weights, and packing for the chosen
    weight format happens after every load, in memory.
    """

    started = time.perf_counter()
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(torch_device, dtype)
    chosen_format = choose_weight_format(torch_device, torch_dtype, weight_format)
    name, folder, gguf_file = resolve_source(name_or_path, cache)

    if gguf_file is None:
        model, tokenizer = _from_pretrained(folder, torch_dtype, torch_device)
        source = "folder"
    else:
        converted = converted_dir(cache, name, torch_dtype) if name in MODELS else folder / "converted"
        # Several workers may start on a cold cache at once; one converts while the others wait.
        with file_lock(converted.parent / ".convert.lock"):
            if (converted / "model.safetensors").is_file():
                model, tokenizer = _from_pretrained(converted, torch_dtype, torch_device)
                source = "safetensors"
            else:
                model, tokenizer = _from_pretrained(folder, torch_dtype, torch_device, gguf_file=gguf_file)
                _save_converted(model, tokenizer, converted)
                source = "gguf"

    if chosen_format == "fp16-packed":
        pack_linear_layers(model)

    load_s = time.perf_counter() - started
    log.info("model_loaded", model=name, device=str(torch_device), dtype=str(torch_dtype), source=source,
             weight_format=chosen_format, load_s=round(load_s, 2))
    return LoadedModel(name, model, tokenizer, torch_device, torch_dtype, load_s, source, chosen_format)


def _from_pretrained(folder: Path, dtype: torch.dtype, device: torch.device, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if missing), so that one process at a time does the work inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_converted(model, tokenizer, target: Path) -> None:
    """Write the de-quantised weights, config and tokenizer so the next load skips the GGUF."""
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    # Tied embeddings share storage; safetensors rejects shared tensors, and
    # transformers re-ties them on load.
    state = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        state[key] = tensor.detach().to("cpu").contiguous()
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    log.info("model_converted", path=str(target))
