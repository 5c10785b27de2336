"""Run one engine step on the model: pack inputs, own the KV cache, return logits of sampling positions.

The KV pool is allocated once, sized from `kv_cache_bytes`, so memory use is
fixed however many requests arrive. Tokens are packed without padding into
a batch of one ([1, num_tokens]) with explicit positions; decode tokens come
first, then prefill chunks. Only positions that sample go through the LM
head, so a long prompt never builds a [num_tokens, vocab] logits tensor.
"""

from __future__ import annotations

import structlog
import torch

from pipeline.engine import fast_forward
from pipeline.engine.attention import AttentionMetadata, PrefillChunk, register_attention
from pipeline.engine.native_kernels import choose_native_kernels
from pipeline.engine.scheduler import ScheduledBatch
from pipeline.engine.sequence import Sequence

log = structlog.get_logger(__name__)


def attention_shape(model_config) -> tuple[int, int, int, int]:
    """(num_layers, num_q_heads, num_kv_heads, head_dim) from a transformers config."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    return text_config.num_hidden_layers, num_heads, num_kv_heads, head_dim


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 block_size: int, kv_cache_bytes: int, enable_fast_path: bool = True,
                 native_kernels: str = "auto") -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_layers, num_q_heads, self.num_kv_heads, self.head_dim = attention_shape(model.config)
        kernels = choose_native_kernels(native_kernels, device, dtype, num_q_heads, self.num_kv_heads, self.head_dim)

        element_size = torch.empty((), dtype=dtype).element_size()
        # keys and values, every layer, block_size positions
        self.block_bytes = 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element_size
        self.num_blocks = kv_cache_bytes // self.block_bytes
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} is too small for one KV block; a block of {block_size} tokens needs "
                f"{self.block_bytes} bytes for this model, so raise kv_cache_bytes"
            )
        self.kv_caches = [
            torch.zeros(self.num_blocks, block_size, 2, self.num_kv_heads, self.head_dim, dtype=dtype, device=device)
            for _ in range(self.num_layers)
        ]
        self.model.set_attn_implementation(register_attention())
        self.base_model = getattr(model, model.base_model_prefix)
        self.lm_head = fast_forward.rows_function(model.get_output_embeddings())
        self.fast_forward = None
        if enable_fast_path and fast_forward.is_supported(model):
            self.fast_forward = fast_forward.FastDecoderForward(model, kernels)
        self.forward_path = "fast" if self.fast_forward is not None else "transformers"
        # The transformers path runs its own layers, so only the attention kernel plugs into it.
        self.kernels = kernels

    @property
    def native_kernels(self) -> str:
        """"on" when the native kernels run, "off" when the torch operations do."""
        return "on" if self.kernels is not None else "off"

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one forward; return the seqs that sample and their logits [num_sampling, vocab] in float32."""
        input_ids, positions, metadata, sample_indices, sample_seqs = self.prepare(batch)
        if self.fast_forward is not None:
            hidden = self.fast_forward(input_ids, positions, metadata)  # [num_tokens, hidden_size]
        else:
            output = self.base_model(input_ids=input_ids[None, :], position_ids=positions[None, :], use_cache=False,
                                     attn_metadata=metadata)
            hidden = output.last_hidden_state[0]
        # NOTE: final logit soft-capping or scaling (Gemma-style models) is not applied here.
        logits = self.lm_head(hidden[sample_indices]).float()  # [num_sampling, vocab]
        return sample_seqs, logits

    def prepare(self, batch: ScheduledBatch):
        """Build packed input ids, positions, attention metadata and the indices of sampling tokens."""
        # A one-token chunk of any seq takes the batched decode attention.
        pairs = list(zip(batch.seqs, batch.num_new_tokens))
        decodes = [seq for seq, num_new in pairs if num_new == 1]
        prefills = [(seq, num_new) for seq, num_new in pairs if num_new != 1]

        token_ids: list[int] = []
        positions: list[int] = []
        sample_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq, num_new in [(seq, 1) for seq in decodes] + prefills:
            start = seq.num_computed_tokens
            token_ids.extend(seq.token_ids[start:start + num_new])
            positions.extend(range(start, start + num_new))
            if start + num_new == seq.num_tokens:
                sample_indices.append(len(token_ids) - 1)
                sample_seqs.append(seq)

        metadata = self._build_metadata(decodes, prefills)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)  # [num_tokens]
        position_ids = torch.tensor(positions, dtype=torch.long, device=self.device)
        sample_index = torch.tensor(sample_indices, dtype=torch.long, device=self.device)
        return input_ids, position_ids, metadata, sample_index, sample_seqs

    def _build_metadata(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]]) -> AttentionMetadata:
        slot_mapping: list[int] = []
        for seq, num_new in [(seq, 1) for seq in decodes] + prefills:
            start = seq.num_computed_tokens
            for pos in range(start, start + num_new):
                slot_mapping.append(seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
        metadata = AttentionMetadata(
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decodes),
        )
        if decodes:
            self._add_decode_tables(metadata, decodes)

        start = len(decodes)
        for seq, num_new in prefills:
            metadata.prefills.append(self._prefill_chunk(seq, start, num_new))
            start += num_new
        return metadata

    def _add_decode_tables(self, metadata: AttentionMetadata, decodes: list[Sequence]) -> None:
        """Set block tables padded to the longest context [num_decode, max_blocks] and the context lengths.

        The torch path also gets an additive padding mask, built once per
        step and shared by every layer.
        """
        context_lens = [seq.num_computed_tokens + 1 for seq in decodes]
        max_blocks = -(-max(context_lens) // self.block_size)
        tables = [seq.block_table[:max_blocks] + [0] * (max_blocks - len(seq.block_table[:max_blocks]))
                  for seq in decodes]
        metadata.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=self.device)
        metadata.decode_context_lens = torch.tensor(context_lens, dtype=torch.long, device=self.device)
        metadata.kernels = self.kernels
        if self.kernels is not None:
            return
        padding = (torch.arange(max_blocks * self.block_size, device=self.device)[None, :]
                   >= metadata.decode_context_lens[:, None])
        bias = torch.zeros(padding.shape, dtype=self.dtype, device=self.device).masked_fill_(padding, float("-inf"))
        metadata.decode_bias = bias[:, None, None, :]

    def _prefill_chunk(self, seq: Sequence, start: int, num_new: int) -> PrefillChunk:
        num_context = seq.num_computed_tokens + num_new
        if seq.num_computed_tokens == 0:
            return PrefillChunk(start, start + num_new, None, num_context, None)
        num_blocks = -(-num_context // self.block_size)
        blocks = torch.tensor(seq.block_table[:num_blocks], dtype=torch.long, device=self.device)
        # query i is at position num_computed + i and attends to context positions <= its own
        query_pos = torch.arange(seq.num_computed_tokens, num_context, device=self.device)
        mask = torch.arange(num_context, device=self.device)[None, :] <= query_pos[:, None]
        return PrefillChunk(start, start + num_new, blocks, num_context, mask)
