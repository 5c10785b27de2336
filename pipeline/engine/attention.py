"""Paged attention over packed tokens, plugged into transformers as an attention implementation.

One forward packs every scheduled token of every seq into a batch of one,
decode tokens first, then the prefill chunks. The metadata built by the
model runner says where each token's K/V goes in the paged cache (slot
mapping) and which cache slots each query attends to. With the native
kernels, decode queries read the cache in place through their block tables
(native_kernels.py); prefill chunks always run SDPA here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.engine.native_kernels import NativeKernels

ATTENTION_NAME = "chatpipe_paged"


@dataclass
class PrefillChunk:
    """One seq's prefill chunk: query tokens [start, end) of the packed batch."""

    start: int
    end: int
    # Cache blocks with positions 0..end of the chunk, and how many of those
    # positions there are. Blocks are None when the chunk starts at position 0,
    # because then the chunk's own keys are the whole context.
    context_blocks: torch.Tensor | None
    num_context: int
    # [num_query_tokens, num_context_tokens] bool, True = attend; None means plain causal.
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    # per layer: [num_blocks, block_size, 2, num_kv_heads, head_dim], keys at index 0 and values at 1
    kv_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [num_tokens] cache slot (block * block_size + offset) of each packed token
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks], padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [num_decode] positions each decode query attends to
    # C kernels. With them, decode attention reads the paged cache in place instead of gather + SDPA.
    kernels: NativeKernels | None = None
    # torch path only: [num_decode, 1, 1, max_blocks * block_size], 0 where a seq has a position, -inf elsewhere
    decode_bias: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)


def write_kv(metadata: AttentionMetadata, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store this step's keys and values ([num_tokens, num_kv_heads, head_dim]) into the paged cache."""
    cache = metadata.kv_caches[layer_idx]
    slots = cache.view(-1, *cache.shape[2:])  # [num_slots, 2, num_kv_heads, head_dim]
    slots.index_copy_(0, metadata.slot_mapping, torch.stack((key, value), dim=1))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Gather keys and values of the blocks in `block_tables` [..., num_blocks].

    Returns [..., num_blocks * block_size, 2, num_kv_heads, head_dim].

    Keys and values share one cache tensor, and whole blocks are copied, so
    one `index_select` moves block_size positions of both per index. Per-slot
    gathers of K and V separately took 527 us against 308 us for this and
    the attention together (16 seqs of 110 positions, 2-core Zen 3).
    """
    rows = cache.index_select(0, block_tables.reshape(-1))
    return rows.view(*block_tables.shape[:-1], block_tables.shape[-1] * cache.shape[1], *cache.shape[2:])


def paged_attention_packed(
    metadata: AttentionMetadata,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    kv_written: bool = False,
) -> torch.Tensor:
    """Attend packed queries to the paged cache after writing this step's K/V (unless `kv_written`).

    query [num_tokens, num_q_heads, head_dim], key/value [num_tokens,
    num_kv_heads, head_dim], all after rotary. Returns [num_tokens,
    num_q_heads, head_dim].
    """
    if not kv_written:
        write_kv(metadata, layer_idx, key, value)
    cache = metadata.kv_caches[layer_idx]
    num_decode = metadata.num_decode_tokens
    num_q_heads, head_dim = query.shape[1:]
    num_kv_heads = key.shape[1]
    decode_only = num_decode == query.shape[0]
    out = None if decode_only else query.new_empty(query.shape)

    if num_decode and metadata.kernels is not None:
        o = query.new_empty((num_decode, num_q_heads, head_dim)) if decode_only else out[:num_decode]
        metadata.kernels.paged_decode_attention(query[:num_decode], cache, metadata.decode_block_tables,
                                                metadata.decode_context_lens, scaling, o)
        if decode_only:
            return o
    # Decode: one query per seq. The query heads that share a KV head are
    # consecutive (transformers' repeat_kv layout), so they are laid out as
    # that KV head's query rows. Attention then needs no copy of K/V per
    # query head.
    elif num_decode:
        kv = gather_blocks(cache, metadata.decode_block_tables)  # [num_decode, context, 2, num_kv_heads, head_dim]
        k = kv[:, :, 0].transpose(1, 2)  # [num_decode, num_kv_heads, context, head_dim]
        v = kv[:, :, 1].transpose(1, 2)
        q = query[:num_decode].view(num_decode, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=metadata.decode_bias, scale=scaling)
        if decode_only:
            return o.view(num_decode, num_q_heads, head_dim)
        out[:num_decode] = o.view(num_decode, num_q_heads, head_dim)

    # prefill: one causal attention per chunk, offset by the cached prefix
    for chunk in metadata.prefills:
        q = query[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, num_q_heads, n, head_dim]
        if chunk.context_blocks is None:
            k = key[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
            v = value[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            kv = gather_blocks(cache, chunk.context_blocks)[:chunk.num_context]  # [context, 2, heads, head_dim]
            k = kv[:, 0].transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, context, head_dim]
            v = kv[:, 1].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask, scale=scaling, enable_gqa=True)
        out[chunk.start:chunk.end] = o[0].transpose(0, 1)
    return out


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, num_q_heads, num_tokens, head_dim] -> [1, num_tokens, heads, head_dim].

    The model runner passes `attn_metadata` as a forward kwarg; transformers
    hands it to every attention layer unchanged.
    """
    metadata: AttentionMetadata = kwargs["attn_metadata"]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = paged_attention_packed(
        metadata,
        module.layer_idx,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scaling,
    )
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Register the paged attention with transformers once; return its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
