"""A lean decoder forward for Llama- and Qwen2-style models that reuses the transformers weights.

Each transformers decoder layer costs a few dozen small Python-level calls
per step on top of its matmuls, which is a visible share of a decode step
on a CPU. This path runs the same arithmetic directly and fuses
projections: q/k/v become one matmul and gate/up another, so a layer does
four matmuls instead of seven. The fused weights are allocated once and
the transformers modules' weights become views into them, so memory does
not grow and the transformers path keeps working on the same model.

With the fp16-packed weight format the projections are fused the same
way, but a packed weight cannot be viewed in parts: the transformers
modules become `PackedSlice`s of the fused product. They stay correct, and
cost the extra columns when something calls them separately (transformers'
own forward on the same model). Fused, the 30 layers of SmolLM2-135M took
11.7 ms per token against 14.6 ms unfused (2-core Zen 3).

With the native kernels (native_kernels.py), each residual add runs fused
into the next RMSNorm, SiLU into its multiply, and rotary into the write of
the step's keys and values to the paged cache.

Supported: model_type "llama" or "qwen2" with SiLU MLP, RMSNorm, rotary
embeddings, optional q/k/v bias (Qwen2) and only full-attention layers.
Every other model runs through transformers with the paged attention
function registered in attention.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.engine.attention import AttentionMetadata, paged_attention_packed
from pipeline.engine.native_kernels import NativeKernels
from pipeline.models.packed_linear import PackedFp16Linear, PackedSlice, fuse_packed

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def is_supported(model) -> bool:
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES or config.hidden_act != "silu":
        return False
    if getattr(config, "mlp_bias", False) or getattr(config, "use_sliding_window", False):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(layer_type == "full_attention" for layer_type in layer_types)


Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerWeights:
    qkv: Projection  # [num_tokens, hidden] -> [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim]
    o_proj: Projection
    gate_up: Projection  # [num_tokens, hidden] -> [num_tokens, 2 * intermediate], gate columns first
    down_proj: Projection
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor


def rows_function(module: torch.nn.Module) -> Projection:
    """Return a function of x [rows, in_features] for a linear module, without nn.Module call overhead."""
    if isinstance(module, PackedFp16Linear):
        return module.rows_function()
    if isinstance(module, torch.nn.Linear):
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _is_packed(*modules) -> bool:
    return all(isinstance(module, (PackedFp16Linear, PackedSlice)) for module in modules)


def _fuse_packed_into(parent: torch.nn.Module, names: list[str]) -> PackedFp16Linear:
    """Fuse the packed projections `parent.<name>` into one module, leave a slice of it under each name and return it.

    A model that an earlier engine fused already has slices of one fused
    module, and that module is reused as it is.
    """
    modules = [getattr(parent, name) for name in names]
    if all(isinstance(module, PackedSlice) for module in modules) and len({id(m.fused) for m in modules}) == 1:
        return modules[0].fused
    if not all(isinstance(module, PackedFp16Linear) for module in modules):
        found = ", ".join(type(module).__name__ for module in modules)
        raise TypeError(f"cannot fuse {found}; expected PackedFp16Linear modules")
    fused, slices = fuse_packed(modules)
    for name, piece in zip(names, slices):
        setattr(parent, name, piece)
    return fused


def _fuse(linears: list[torch.nn.Linear], attribute: str) -> torch.Tensor | None:
    """Concatenate the linears' weights (or biases) on dim 0 and point each module at its slice."""
    parts = [getattr(linear, attribute) for linear in linears]
    if any(part is None for part in parts):
        return None
    fused = torch.cat([part.detach() for part in parts], dim=0)
    start = 0
    for linear, part in zip(linears, parts):
        end = start + part.shape[0]
        setattr(linear, attribute, torch.nn.Parameter(fused[start:end], requires_grad=False))
        start = end
    return fused


class FastDecoderForward:
    """Packed forward over [num_tokens] ids; returns the final hidden states [num_tokens, hidden]."""

    def __init__(self, model, kernels: NativeKernels | None = None) -> None:
        base = model.model
        self.kernels = kernels
        config = model.config
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.final_norm = base.norm.weight
        self.eps = config.rms_norm_eps
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.layers = [self._fuse_layer(layer) for layer in base.layers[: config.num_hidden_layers]]

    @staticmethod
    def _fuse_layer(layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        norms = {"input_norm": layer.input_layernorm.weight,
                 "post_attention_norm": layer.post_attention_layernorm.weight}
        if _is_packed(attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            qkv_fused = _fuse_packed_into(attn, ["q_proj", "k_proj", "v_proj"])
            gate_up_fused = _fuse_packed_into(mlp, ["gate_proj", "up_proj"])
            return LayerWeights(
                qkv=qkv_fused.rows_function(),
                o_proj=rows_function(attn.o_proj),
                gate_up=gate_up_fused.rows_function(),
                down_proj=rows_function(mlp.down_proj),
                **norms,
            )
        qkv_weight = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "weight")
        qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
        gate_up_weight = _fuse([mlp.gate_proj, mlp.up_proj], "weight")
        return LayerWeights(
            qkv=lambda x: F.linear(x, qkv_weight, qkv_bias),
            o_proj=rows_function(attn.o_proj),
            gate_up=lambda x: F.linear(x, gate_up_weight),
            down_proj=rows_function(mlp.down_proj),
            **norms,
        )

    def rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if hidden.dtype == torch.float32:
            # One fused kernel; it gave the same bits as the expression below in float32.
            return F.rms_norm(hidden, (hidden.shape[-1],), weight, self.eps)
        # Same order of operations as transformers' RMSNorm: statistics in float32.
        x = hidden.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(hidden.dtype)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        cos, sin = self.rotary_emb(hidden, positions[None, :])  # [1, num_tokens, head_dim] each
        if self.kernels is not None:
            return self._layers_native(hidden, cos[0].contiguous(), sin[0].contiguous(), metadata)
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # broadcast over heads

        for layer_idx, weights in enumerate(self.layers):
            x = self.rms_norm(hidden, weights.input_norm)
            hidden = hidden + self._attention(layer_idx, weights, x, cos, sin, metadata)

            x = self.rms_norm(hidden, weights.post_attention_norm)
            gate, up = weights.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + weights.down_proj(F.silu(gate) * up)
        return self.rms_norm(hidden, self.final_norm)

    def _layers_native(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       metadata: AttentionMetadata) -> torch.Tensor:
        """Run the same layers with each residual add fused into the next norm, and SiLU into its multiply.

        `hidden` is the embedding output, a fresh tensor, and accumulates the
        residual stream in place.
        """
        kernels, eps = self.kernels, self.eps
        next_norms = [weights.input_norm for weights in self.layers[1:]] + [self.final_norm]
        x = kernels.rms_norm(hidden, self.layers[0].input_norm, eps)
        for layer_idx, (weights, next_norm) in enumerate(zip(self.layers, next_norms)):
            attn = self._attention(layer_idx, weights, x, cos, sin, metadata)
            x = kernels.add_rms_norm(hidden, attn, weights.post_attention_norm, eps)
            mlp = weights.down_proj(kernels.silu_and_mul(weights.gate_up(x)))
            x = kernels.add_rms_norm(hidden, mlp, next_norm, eps)
        return x

    def _attention(self, layer_idx: int, weights: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Self-attention of normed x [num_tokens, hidden], through the output projection.

        cos and sin are [num_tokens, 1, head_dim] on the torch path and
        [num_tokens, head_dim] for the native kernels, which also store this
        step's keys and values while they rotate.
        """
        num_q, num_kv, head_dim = self.num_q_heads, self.num_kv_heads, self.head_dim
        num_tokens = x.shape[0]
        qkv = weights.qkv(x)
        if self.kernels is not None:
            qk = self.kernels.rotary_write_kv(qkv, cos, sin, metadata.kv_caches[layer_idx], metadata.slot_mapping,
                                              num_q, num_kv)
        else:
            # q and k are adjacent in the fused output, so one rotary call covers both.
            qk = _rotate(qkv[:, :(num_q + num_kv) * head_dim].view(num_tokens, num_q + num_kv, head_dim), cos, sin)
        q, k = qk[:, :num_q], qk[:, num_q:]
        v = qkv[:, (num_q + num_kv) * head_dim:].view(num_tokens, num_kv, head_dim)
        attn = paged_attention_packed(metadata, layer_idx, q, k, v, self.scaling,
                                      kv_written=self.kernels is not None)
        return weights.o_proj(attn.reshape(num_tokens, num_q * head_dim))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout that Llama and Qwen2 use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
