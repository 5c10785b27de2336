"""Load a registered model (or any local transformers causal LM) onto a device.

The first load of a GGUF de-quantises every tensor, which takes 15-35 s on
a 2-core CPU. The result is saved once as safetensors beside the GGUF, so
later loads read plain tensors in seconds. A GGUF-loaded model rejects
`save_pretrained`, so the state dict and the config are written directly,
without the config's quantization entry.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

# transformers otherwise contacts a model hub while loading local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import structlog  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

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


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Pick the compute dtype for a device.

    bf16 halves the bytes read per decode step, and decode is bound by
    memory bandwidth: on a CPU with AVX512-BF16 it measured about 2x faster
    than fp32 for both registered models (transformers `generate`, 2
    threads). A CPU without native bf16 falls back to fp32, because there
    bf16 matmuls are emulated and slower. CUDA uses bf16 where the GPU
    supports it.
    """
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16() -> bool:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return False
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def load_model(name_or_path: str, cache: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load tokenizer and model; de-quantise a GGUF once and cache the result as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(torch_device, dtype)
    name, folder, gguf_file = resolve_source(name_or_path, cache)

    source = "folder"
    if gguf_file is not None:
        converted = converted_dir(cache, name, torch_dtype) if name in MODELS else folder / "converted"
        if (converted / "model.safetensors").is_file():
            folder, gguf_file, source = converted, None, "safetensors"
        else:
            source = "gguf"

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    model.to(torch_device).eval()

    if source == "gguf":
        _save_converted(model, tokenizer, converted)

    load_s = time.perf_counter() - started
    log.info("model_loaded", model=name, device=str(torch_device), dtype=str(torch_dtype), source=source,
             load_s=round(load_s, 2))
    return LoadedModel(name, model, tokenizer, torch_device, torch_dtype, load_s, source)


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
