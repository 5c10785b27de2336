"""A lean decoder forward for Llama- and Qwen2-style models that reuses the transformers weights.

Each transformers decoder layer costs a few dozen small Python-level calls
per step on top of its matmuls, which is a visible share of a decode step
on a CPU. This path runs the same arithmetic directly and fuses
projections: q/k/v become one matmul and gate/up another, so a layer does
four matmuls instead of seven. The fused weights are allocated once and
the transformers modules' weights become views into them, so memory does
not grow and the transformers path keeps working on the same model.

Supported: model_type "llama" or "qwen2" with SiLU MLP, RMSNorm, rotary
embeddings, optional q/k/v bias (Qwen2) and only full-attention layers.
Every other model runs through transformers with the paged attention
function registered in attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.engine.attention import AttentionMetadata, paged_attention_packed

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def is_supported(model) -> bool:
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES or config.hidden_act != "silu":
        return False
    if getattr(config, "mlp_bias", False) or getattr(config, "use_sliding_window", False):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(layer_type == "full_attention" for layer_type in layer_types)


@dataclass
class LayerWeights:
    qkv_weight: torch.Tensor  # [(num_q_heads + 2 * num_kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    gate_up_weight: torch.Tensor  # [2 * intermediate, hidden]
    down_weight: torch.Tensor
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor


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

    def __init__(self, model) -> None:
        base = model.model
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
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        return LayerWeights(
            qkv_weight=_fuse(projections, "weight"),
            qkv_bias=_fuse(projections, "bias"),
            o_weight=attn.o_proj.weight,
            gate_up_weight=_fuse([mlp.gate_proj, mlp.up_proj], "weight"),
            down_weight=mlp.down_proj.weight,
            input_norm=layer.input_layernorm.weight,
            post_attention_norm=layer.post_attention_layernorm.weight,
        )

    def rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers' RMSNorm: statistics in float32.
        x = hidden.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(hidden.dtype)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        cos, sin = self.rotary_emb(hidden, positions[None, :])  # [1, num_tokens, head_dim] each
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # broadcast over heads
        q_size = self.num_q_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        num_tokens = input_ids.shape[0]

        for layer_idx, weights in enumerate(self.layers):
            x = self.rms_norm(hidden, weights.input_norm)
            qkv = F.linear(x, weights.qkv_weight, weights.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = _rotate(q.view(num_tokens, self.num_q_heads, self.head_dim), cos, sin)
            k = _rotate(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            attn = paged_attention_packed(metadata, layer_idx, q, k, v, self.scaling)
            hidden = hidden + F.linear(attn.view(num_tokens, q_size), weights.o_weight)

            x = self.rms_norm(hidden, weights.post_attention_norm)
            gate, up = F.linear(x, weights.gate_up_weight).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, weights.down_weight)
        return self.rms_norm(hidden, self.final_norm)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout that Llama and Qwen2 use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
