"""C kernels for the CPU decode path, compiled on first use and called through ctypes.

At decode sizes a CPU step spends much of its time outside the matmuls,
in operations whose arithmetic is tiny but whose torch kernels carry fixed
costs. Measured on 2 threads of a Zen 3 CPU with 16 decode seqs of
SmolLM2-135M (3 KV heads, 3 query heads each, 30 to 140 positions):

- Decode attention: gathering the KV blocks and running SDPA took 410 to
  450 us per layer. kernels/paged_attention.c reads keys and values in
  place through the block table, loads each row once for all the query
  heads that share it, and took 150 to 170 us.
- RMSNorm took 21 us per call, and SiLU with the multiply 32 us. The
  kernels in kernels/layer_ops.c run the residual add with the next norm,
  SiLU with its multiply, and rotary with the KV write, one pass each.

Whole engine runs with and without them are in docs/benchmarks.md
(bench/engine.py --native-kernels on,off).

The C files are compiled together with the system C compiler into
CHATPIPE_HOME/kernels, once per source and flags (the file name carries
their hash), under a file lock so that workers starting together build it
once. They need an x86-64 CPU with AVX2 and FMA, and a model running in
float32 on the CPU. Anywhere else, or with `native_kernels="off"` in
EngineConfig, the engine runs the torch operations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

NATIVE_KERNEL_CHOICES = ("auto", "on", "off")
SOURCES = tuple(Path(__file__).with_name("kernels") / name for name in ("paged_attention.c", "layer_ops.c"))
# Without -ffp-contract=off the compiler fuses a * b + c into one FMA, which
# rounds differently from torch. The kernels call FMA explicitly where they want it.
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
# libmvec contains the 8-wide expf that the kernels' simd loops call.
LINK_FLAGS = ("-lmvec", "-lm")


class NativeKernelError(RuntimeError):
    """The native kernels were requested but cannot be built or run here."""


class NativeKernels:
    """The compiled library's functions, taking and returning torch tensors (float32, CPU)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, int64, real, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        self._attention = _bind(library.chatpipe_paged_decode_attention, ctypes.c_int,
                                [pointer, int64, pointer, pointer, int64, pointer, pointer,
                                 int64, int64, int64, int64, int64, real, count])
        self._rms_norm = _bind(library.chatpipe_rms_norm, None, [pointer, pointer, pointer, int64, int64, real, count])
        self._add_rms_norm = _bind(library.chatpipe_add_rms_norm, None,
                                   [pointer, pointer, pointer, pointer, int64, int64, real, count])
        self._silu_and_mul = _bind(library.chatpipe_silu_and_mul, None, [pointer, pointer, int64, int64, count])
        self._rotary_write_kv = _bind(library.chatpipe_rotary_write_kv, None,
                                      [pointer, int64, pointer, pointer, pointer, pointer, pointer,
                                       int64, int64, int64, int64, count])
        self.max_group = library.chatpipe_max_group()

    def supports(self, num_q_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        """True when the attention kernel handles this head layout."""
        return head_dim % 8 == 0 and num_q_heads // num_kv_heads <= self.max_group

    def paged_decode_attention(self, query: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """Write attention of each seq's query to its context into `out`.

        - query: [num_seqs, num_q_heads, head_dim]. Row-major inside each seq
          avoids a copy, and a view of the fused q/k/v output is.
        - cache: [num_blocks, block_size, 2, num_kv_heads, head_dim], contiguous.
        - block_tables [num_seqs, max_blocks] and context_lens [num_seqs]: int64, contiguous.
        - out: [num_seqs, num_q_heads, head_dim], contiguous.
        """
        num_seqs, num_q_heads, head_dim = query.shape
        if query.stride(2) != 1 or query.stride(1) != head_dim:
            query = query.contiguous()  # the transformers path passes heads-major views
        status = self._attention(
            query.data_ptr(), query.stride(0), cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            context_lens.data_ptr(), out.data_ptr(), num_seqs, num_q_heads, cache.shape[3], head_dim,
            cache.shape[1], scale, torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("native decode attention could not allocate its score buffer")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * (x / sqrt(mean(x^2) + eps)) over the last dim of contiguous x [rows, hidden]."""
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
                       torch.get_num_threads())
        return out

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """Add delta into residual in place, and return rms_norm of the sum; both contiguous [rows, hidden]."""
        out = torch.empty_like(residual)
        self._add_rms_norm(residual.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                           residual.shape[0], residual.shape[1], eps, torch.get_num_threads())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for contiguous gate_up [rows, 2 * width] laid out as [gate | up]."""
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty((rows, width))
        self._silu_and_mul(gate_up.data_ptr(), out.data_ptr(), rows, width, torch.get_num_threads())
        return out


    def rotary_write_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                        slot_mapping: torch.Tensor, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
        """Rotate q and k of qkv [tokens, (q + 2 kv heads) * head_dim] and store k and v in the cache's slots.

        cos and sin are [tokens, head_dim] contiguous, cache is one layer's
        [num_blocks, block_size, 2, num_kv_heads, head_dim]. Returns the
        rotated q and k as [tokens, num_q_heads + num_kv_heads, head_dim].
        """
        tokens, head_dim = qkv.shape[0], cos.shape[1]
        if qkv.stride(1) != 1:
            qkv = qkv.contiguous()
        qk = qkv.new_empty((tokens, num_q_heads + num_kv_heads, head_dim))
        self._rotary_write_kv(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qk.data_ptr(),
                              cache.data_ptr(), slot_mapping.data_ptr(), tokens, num_q_heads, num_kv_heads, head_dim,
                              torch.get_num_threads())
        return qk


def _bind(function, restype, argtypes):
    function.restype = restype
    function.argtypes = argtypes
    return function


def unavailable_reason() -> str | None:
    """Why the kernels cannot run on this machine, or None when they can be built."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the CPU is {platform.machine()}, and the kernels are written for x86-64"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"torch reports CPU capability {capability}; the kernels need AVX2 and FMA"
    if _compiler() is None:
        return "no C compiler was found (set CC, or install gcc)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@functools.cache
def load() -> NativeKernels:
    """Build (once per source and flags) and load the kernels; raise NativeKernelError when they cannot be."""
    reason = unavailable_reason()
    if reason is not None:
        raise NativeKernelError(f"native kernels are unavailable: {reason}")
    from pipeline.models.loader import file_lock
    from pipeline.settings import get_settings

    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join(COMPILE_FLAGS + LINK_FLAGS).encode())
    target = get_settings().home / "kernels" / f"chatpipe_kernels-{digest.hexdigest()[:16]}.so"
    with file_lock(target.with_suffix(".lock")):
        if not target.exists():
            _compile(target)
    # torch is imported first, so the library's libgomp resolves to the copy
    # torch already loaded, and both share one OpenMP thread pool.
    return NativeKernels(ctypes.CDLL(str(target)))


def _compile(target: Path) -> None:
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = [_compiler(), *COMPILE_FLAGS, *map(str, SOURCES), "-o", str(partial), *LINK_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NativeKernelError(
            f"compiling the native kernels failed with exit code {result.returncode}: {result.stderr.strip()[-2000:]}"
        )
    partial.replace(target)
    log.info("native_kernels_built", path=str(target))


def choose_native_kernels(requested: str, device: torch.device, dtype: torch.dtype, num_q_heads: int,
                          num_kv_heads: int, head_dim: int) -> NativeKernels | None:
    """Return the kernels to use, or None for the torch operations.

    "auto" takes them wherever they build and fit the model, "on" insists
    and raises NativeKernelError naming the reason, "off" never uses them.
    """
    if requested not in NATIVE_KERNEL_CHOICES:
        raise ValueError(f"native_kernels={requested!r} is invalid; use one of {', '.join(NATIVE_KERNEL_CHOICES)}")
    if requested == "off":
        return None
    if device.type != "cpu" or dtype != torch.float32:
        problem = f"they run float32 on the CPU, and this engine runs {dtype} on {device.type}"
    else:
        try:
            kernels = load()
        except NativeKernelError as error:
            problem = str(error)
        else:
            if kernels.supports(num_q_heads, num_kv_heads, head_dim):
                return kernels
            problem = (f"they need head_dim divisible by 8 and at most {kernels.max_group} query heads per KV head, "
                       f"and this model has head_dim {head_dim} and {num_q_heads // num_kv_heads}")
    if requested == "on":
        raise NativeKernelError(f"native_kernels='on' cannot be used: {problem}; use 'auto' or 'off'")
    log.info("native_kernels_skipped", reason=problem)
    return None
