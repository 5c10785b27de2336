"""Engine capacity settings, validated once when the engine is built."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.native_kernels import NATIVE_KERNEL_CHOICES


@dataclass(frozen=True)
class EngineConfig:
    """Capacity of one engine: batch size, per-step token budget and KV cache memory.

    max_model_len None means the model config's max_position_embeddings. The
    engine lowers its effective limit further when the KV pool cannot hold
    one sequence of that length, and reports the value in `stats()`.
    """

    max_num_seqs: int = 16
    # Tokens computed per step across all seqs; a prompt longer than the budget
    # is prefilled in chunks so that running decodes keep getting a token.
    max_num_batched_tokens: int = 512
    block_size: int = 16
    kv_cache_bytes: int = 512 * 1024 * 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # Run Llama/Qwen2-style models through the lean forward in fast_forward.py;
    # False (or any other architecture) runs the transformers modules.
    enable_fast_path: bool = True
    # C kernels of native_kernels.py on the fast path: "auto" where they build
    # and fit the model, "on" or an error, "off" for torch operations only.
    native_kernels: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r} is invalid; use an integer >= 1")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len!r} is invalid; use None or an integer >= 2")
        if self.native_kernels not in NATIVE_KERNEL_CHOICES:
            raise ValueError(f"EngineConfig.native_kernels={self.native_kernels!r} is invalid; "
                             "use 'auto', 'on' or 'off'")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens={self.max_num_batched_tokens} is below "
                f"max_num_seqs={self.max_num_seqs}; every running seq needs one token per decode step, "
                "so raise max_num_batched_tokens or lower max_num_seqs"
            )
