"""Linear layers whose weights are stored as fp16 in FBGEMM's packed layout, computed in float32.

A CPU decode step reads every weight once, so the bytes per weight set its
speed. FBGEMM (PyTorch's own CPU GEMM library) keeps a weight as fp16 in a
blocked layout and widens it to fp32 inside the kernel. Activations and
accumulation stay float32, so the only change to the model is each weight
rounded to fp16. On the 2-core AMD EPYC (Zen 3, AVX2) used for
development, the 30 decoder layers of SmolLM2-135M took 17 ms per token this
way against 44 ms with float32 weights. Its 49152 x 576 LM head took 3.6 ms
against 13.4 ms.

The weights of the GGUF files are 4-bit values with fp16 scales. fp16
keeps each of them within one rounding: a relative error of at most
2**-11, except below 6.1e-5 (fp16's subnormal range, 0.05 % of the
gate/up weights of SmolLM2's first layer), where the absolute error is at
most 2**-25.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import structlog
import torch

log = structlog.get_logger(__name__)

WEIGHT_FORMATS = ("auto", "dense", "fp16-packed")


class WeightFormatError(ValueError):
    """A weight format that this device, dtype or torch build cannot run."""


def fp16_packing_available() -> bool:
    """Return True when this torch build has FBGEMM's fp16 linear kernels (x86 CPU builds do)."""
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" in engines and hasattr(torch.ops.quantized, "linear_dynamic_fp16")


@functools.cache
def _linear_op() -> Callable[[torch.Tensor, object], torch.Tensor]:
    """Return the C++ entry point of FBGEMM's fp16 linear.

    Calling the Python op object first searches the arguments for fake
    script objects, about 4 us per call, and a SmolLM2 decode step makes 121
    calls. The packed weight here is always a real one. The private `_op`
    attribute is used when present, the public op otherwise.
    """
    op = torch.ops.quantized.linear_dynamic_fp16
    return getattr(op.default, "_op", op)


class PackedFp16Linear(torch.nn.Module):
    """Drop-in for `nn.Linear` on CPU: y = x W^T + b with W stored as packed fp16.

    The float32 weight is not kept, so the module takes half the memory of
    the one it replaces. `unpacked()` returns the fp16-rounded weight and the
    bias in float32 for code that needs the matrices themselves.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise WeightFormatError(
                f"fp16-packed weights need a float32 linear on CPU, got {weight.dtype} on {weight.device}; "
                "use CHATPIPE_WEIGHT_FORMAT=dense"
            )
        self.out_features, self.in_features = weight.shape
        bias = None if bias is None else bias.detach().contiguous()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().contiguous(), bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "PackedFp16Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        y = _linear_op()(x.reshape(-1, self.in_features), self.packed)
        return y.view(*leading, self.out_features)

    def rows_function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return a function of x [rows, in_features] -> [rows, out_features] that skips module dispatch."""
        op, packed = _linear_op(), self.packed
        return lambda x: op(x, packed)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ops.quantized.linear_unpack_fp16(self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16-packed"


class PackedSlice(torch.nn.Module):
    """Output features [start, end) of a fused `PackedFp16Linear`.

    A packed weight cannot be viewed in parts, so once q/k/v (or gate/up)
    are fused into one packed product, each original module becomes a slice
    of it: calling one computes the whole fused product and keeps its part.
    That keeps code that calls the separate modules correct at the price of
    the extra columns, while a caller that knows the fusion runs the fused
    product once.
    """

    def __init__(self, fused: PackedFp16Linear, start: int, end: int) -> None:
        super().__init__()
        self.fused = fused
        self.start, self.end = start, end
        self.in_features, self.out_features = fused.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.end]


def fuse_packed(modules: list[PackedFp16Linear]) -> tuple[PackedFp16Linear, list[PackedSlice]]:
    """Pack the concatenation of several packed linears and return it with one slice module per part.

    fp16 to float32 and back is exact, so the fused weights contain the same
    values, and each output column is the same dot product as before
    (checked bit for bit against the separate products).
    """
    weights, biases = zip(*(module.unpacked() for module in modules))
    bias = None if any(b is None for b in biases) else torch.cat(biases)
    fused = PackedFp16Linear(torch.cat(weights), bias)
    slices, start = [], 0
    for weight in weights:
        slices.append(PackedSlice(fused, start, start + weight.shape[0]))
        start += weight.shape[0]
    return fused, slices


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every `nn.Linear` of a causal LM (decoder and LM head) in place and return the count.

    The input embedding stays a float32 table even when the LM head shares
    its weight: a lookup reads one row per token, so packing it gains nothing.
    """
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, PackedFp16Linear.from_linear(module))
    log.info("linear_layers_packed", count=len(targets), weights="fp16-packed")
    return len(targets)
