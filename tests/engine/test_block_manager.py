"""Block arithmetic of the paged KV cache, with block_size 4 throughout."""

from pipeline.engine.block_manager import BlockManager
from pipeline.engine.sequence import Sequence
from pipeline.job import SamplingParams

BLOCK_SIZE = 4


def make_seq(request_id: str, token_ids: list[int]) -> Sequence:
    return Sequence(request_id, token_ids, SamplingParams(temperature=0), max_tokens=16)


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed every token of seq, as the engine does after a step."""
    seq.num_computed_tokens = seq.num_tokens
    manager.mark_computed(seq)


def test_allocate_rounds_up_to_whole_blocks():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq("a", list(range(10)))

    # 10 tokens -> ceil(10 / 4) = 3 blocks
    assert manager.can_allocate(seq)
    assert manager.allocate(seq) == 0
    assert seq.block_table == [0, 1, 2]
    assert manager.num_free_blocks == 5


def test_append_grows_across_block_boundary():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq("a", list(range(8)))
    manager.allocate(seq)
    compute_all(manager, seq)

    # 8 computed tokens fill blocks 0 and 1; token 9 needs a third block.
    seq.token_ids.append(100)
    assert manager.can_append(seq, 1)
    manager.may_append(seq, 1)
    assert seq.block_table == [0, 1, 2]
    assert manager.num_free_blocks == 5

    # Tokens 10..12 still fit in block 2: no new block.
    seq.num_computed_tokens = 9
    manager.may_append(seq, 1)
    assert seq.block_table == [0, 1, 2]


def test_can_append_false_when_pool_is_full():
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq("a", list(range(8)))
    manager.allocate(seq)
    compute_all(manager, seq)

    assert manager.num_free_blocks == 0
    assert not manager.can_append(seq, 1)
    assert manager.can_append(seq, 0)


def test_deallocate_returns_every_block():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq("a", list(range(10)))
    manager.allocate(seq)
    manager.deallocate(seq)

    assert seq.block_table == []
    assert seq.num_computed_tokens == 0
    assert manager.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in manager.blocks)


def test_prefix_hit_shares_blocks_and_counts_refs():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq("a", list(range(10)))
    manager.allocate(first)
    compute_all(manager, first)

    # Blocks 0 and 1 are full and computed (tokens 0..7); block 2 holds 8, 9.
    second = make_seq("b", list(range(8)) + [50, 51, 52])
    assert manager.allocate(second) == 8
    assert second.block_table[:2] == [0, 1]
    assert second.num_computed_tokens == 8
    assert manager.blocks[0].ref_count == 2
    assert manager.blocks[1].ref_count == 2
    # 11 tokens need 3 blocks, 2 shared -> 1 new block (3); pool 8 - 3 - 1 = 4.
    assert second.block_table[2] == 3
    assert manager.num_free_blocks == 4
    assert manager.num_hit_tokens_total == 8


def test_prefix_hit_keeps_last_token_uncomputed():
    """A prompt of exactly two full cached blocks must still compute its last token, or nothing could be sampled."""
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq("a", list(range(8)))
    manager.allocate(first)
    compute_all(manager, first)

    # (8 - 1) // 4 = 1 block may hit; tokens 4..7 are recomputed.
    second = make_seq("b", list(range(8)))
    assert manager.allocate(second) == 4
    assert second.block_table[0] == 0
    assert second.block_table[1] != 1
    assert second.num_uncomputed_tokens == 4


def test_prefix_mismatch_in_first_block_stops_chain():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq("a", list(range(9)))
    manager.allocate(first)
    compute_all(manager, first)

    # Block 1 content (4..7) matches but block 0 differs, so the chained hash misses.
    second = make_seq("b", [99, 1, 2, 3, 4, 5, 6, 7, 8])
    assert manager.allocate(second) == 0


def test_freed_cached_block_is_hit_after_deallocate():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq("a", list(range(9)))
    manager.allocate(first)
    compute_all(manager, first)
    manager.deallocate(first)
    assert manager.num_free_blocks == 8

    # Free but still cached: the hit takes blocks 0 and 1 off the free list.
    second = make_seq("b", list(range(9)))
    assert manager.allocate(second) == 8
    assert second.block_table[:2] == [0, 1]
    assert manager.num_free_blocks == 8 - 3


def test_eviction_reuses_least_recently_freed_block():
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    old = make_seq("old", list(range(5)))  # blocks 0, 1
    manager.allocate(old)
    compute_all(manager, old)
    manager.deallocate(old)
    # Free order (front first): 2, then old's tail 1, then old's head 0.
    assert list(manager.free_block_ids) == [2, 1, 0]

    # A 9-token seq with another prefix needs 3 blocks and evicts block 0's hash too.
    other = make_seq("other", list(range(100, 109)))
    assert manager.allocate(other) == 0
    assert other.block_table == [2, 1, 0]
    assert manager.hash_to_block_id == {}


def test_can_allocate_counts_free_cached_blocks_once():
    """A free cached block that a seq hits cannot also serve as one of its new blocks."""
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_seq("a", list(range(5)))
    manager.allocate(first)
    compute_all(manager, first)
    manager.deallocate(first)

    # 13 tokens -> 4 blocks, 1 hit (block 0) -> 3 new, but only 2 non-hit blocks are free.
    second = make_seq("b", list(range(4)) + list(range(200, 209)))
    assert not manager.can_allocate(second)
    third = make_seq("c", list(range(4)) + list(range(200, 205)))  # 9 tokens -> 3 blocks, 1 hit, 2 new
    assert manager.can_allocate(third)


def test_prefix_caching_disabled_never_hits():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = make_seq("a", list(range(9)))
    manager.allocate(first)
    compute_all(manager, first)

    second = make_seq("b", list(range(9)))
    assert manager.allocate(second) == 0
    assert manager.hash_to_block_id == {}
