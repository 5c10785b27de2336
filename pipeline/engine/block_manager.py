"""Paged KV cache bookkeeping: fixed-size blocks, ref counts and prefix caching.

A block holds the keys and values of `block_size` consecutive positions of
one or more seqs. Prefix caching shares a full block between seqs whose
token ids agree up to the end of that block: each full, computed block is
registered under a hash that chains the hash of the block before it, so a
hit on block i implies the whole prefix up to block i matches.

A freed block keeps its hash and contents until it is reused, so a later
request with the same prefix can still hit it. Free blocks are reused in
least-recently-freed order.
"""

from __future__ import annotations

from collections import OrderedDict

from pipeline.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        # Set once the block is full and computed; cleared when the block is reused.
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Blocks with ref_count 0, oldest first; the front is evicted first.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_hit_tokens_total = 0

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    # Admission: prefix lookup plus blocks for every token the seq has.

    def can_allocate(self, seq: Sequence) -> bool:
        cached_ids = self._find_cached_block_ids(seq)
        num_cached_free = sum(1 for block_id in cached_ids if self.blocks[block_id].ref_count == 0)
        num_new = cdiv(seq.num_tokens, self.block_size) - len(cached_ids)
        return num_new <= self.num_free_blocks - num_cached_free

    def allocate(self, seq: Sequence) -> int:
        """Give a waiting seq its blocks; return the number of tokens served from the prefix cache."""
        assert not seq.block_table, f"seq {seq.request_id} already holds blocks"
        cached_ids = self._find_cached_block_ids(seq)
        for block_id in cached_ids:
            self._take_cached(block_id)
        seq.block_table = list(cached_ids)

        for _ in range(cdiv(seq.num_tokens, self.block_size) - len(cached_ids)):
            seq.block_table.append(self._allocate_block())

        num_cached_tokens = len(cached_ids) * self.block_size
        seq.num_computed_tokens = num_cached_tokens
        self.num_hit_tokens_total += num_cached_tokens
        return num_cached_tokens

    def deallocate(self, seq: Sequence) -> None:
        # Release the tail first so that, among these blocks, the tail is evicted first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    # Growth: slots for the tokens a running seq computes this step.

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self._num_blocks_to_append(seq, num_new_tokens)):
            seq.block_table.append(self._allocate_block())

    def mark_computed(self, seq: Sequence) -> None:
        """Register every full block whose tokens now all have KV in the cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        first = num_full
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1

        for index in range(first, num_full):
            block = self.blocks[seq.block_table[index]]
            prev_hash = self.blocks[seq.block_table[index - 1]].hash if index else None
            tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            block.hash = hash((prev_hash, tokens))
            block.token_ids = tokens
            # Two seqs may compute the same content at once; the first registration stays.
            self.hash_to_block_id.setdefault(block.hash, block.block_id)

    def _num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        num_needed = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, num_needed - len(seq.block_table))

    def _find_cached_block_ids(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix, leaving the last token uncomputed so it can be sampled from."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        prev_hash = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            block_hash = hash((prev_hash, tokens))
            block_id = self.hash_to_block_id.get(block_hash)
            # Python hashes can collide, so the stored token ids must also match.
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
            prev_hash = block_hash
        return found

    def _take_cached(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _allocate_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"free block {block_id} has ref_count {block.ref_count}"
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash = None
        block.token_ids = ()
        block.ref_count = 1
        return block_id
