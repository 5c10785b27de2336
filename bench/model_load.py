"""Model load time, cold (GGUF de-quantised by transformers) against warm (chatpipe's converted safetensors copy),
and single-stream decode speed with transformers `generate`.

Runs on a copy of the model cache in a temporary folder, so the real cache
and its converted copies stay untouched.

    .venv/bin/python bench/model_load.py --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline.models.loader import load_model
from pipeline.models.pull import gguf_path, is_pulled
from pipeline.models.registry import get_spec
from pipeline.settings import get_settings

PROMPT = [{"role": "user", "content": "Explain what a hash map is, in detail."}]


def copy_gguf(name: str, cache: Path) -> None:
    spec = get_spec(name)
    source_cache = get_settings().model_cache
    if not is_pulled(source_cache, spec):
        raise SystemExit(f"{name} is not pulled; run `chatpipe models pull {name}`")
    target = gguf_path(cache, spec)
    target.parent.mkdir(parents=True)
    os.link(gguf_path(source_cache, spec), target) if _same_fs(source_cache, cache) else shutil.copy(
        gguf_path(source_cache, spec), target)
    shutil.copy(gguf_path(source_cache, spec).with_suffix(".sha256"), target.with_suffix(".sha256"))


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def decode_tokens_per_s(loaded, new_tokens: int) -> float:
    ids = loaded.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")["input_ids"].to(loaded.device)
    loaded.model.generate(ids, max_new_tokens=4, do_sample=False)
    started = time.perf_counter()
    loaded.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - started)


def bench_model(name: str, dtype: str, new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="chatpipe-bench-", dir=get_settings().home) as tmp:
        cache = Path(tmp)
        copy_gguf(name, cache)
        cold = load_model(name, cache, dtype=dtype)
        del cold.model
        warm = load_model(name, cache, dtype=dtype)
        return {
            "model": name,
            "dtype": str(warm.dtype).removeprefix("torch."),
            "cold_load_s": round(cold.load_s, 2),
            "warm_load_s": round(warm.load_s, 2),
            "generate_tokens_per_s": round(decode_tokens_per_s(warm, new_tokens), 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print("| model | dtype | cold load (GGUF) s | warm load (safetensors) s | generate tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        row = bench_model(name, args.dtype, args.new_tokens)
        print(f"| {row['model']} | {row['dtype']} | {row['cold_load_s']} | {row['warm_load_s']} | "
              f"{row['generate_tokens_per_s']} |", flush=True)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
