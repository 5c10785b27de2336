"""Scheduler scenarios with block_size 4; the engine's post-step bookkeeping is replayed by `run_step`."""

from pipeline.engine.block_manager import BlockManager
from pipeline.engine.config import EngineConfig
from pipeline.engine.scheduler import Scheduler
from pipeline.engine.sequence import Sequence, SequenceStatus
from pipeline.job import SamplingParams

BLOCK_SIZE = 4


def make_scheduler(num_blocks: int, max_num_seqs: int = 4, max_num_batched_tokens: int = 64) -> Scheduler:
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          block_size=BLOCK_SIZE)
    return Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE))


def make_seq(request_id: str, num_prompt_tokens: int, first_token: int = 0) -> Sequence:
    prompt = list(range(first_token, first_token + num_prompt_tokens))
    return Sequence(request_id, prompt, SamplingParams(temperature=0), max_tokens=64)


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule one step, mark its tokens computed, append token 7 to each seq that sampled."""
    batch = scheduler.schedule()
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += num_new
        scheduler.block_manager.mark_computed(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    return {seq.request_id: num_new for seq, num_new in zip(batch.seqs, batch.num_new_tokens)}


def test_admit_then_decode_one_token_each():
    scheduler = make_scheduler(num_blocks=8)
    a, b = make_seq("a", 5), make_seq("b", 3, first_token=100)
    scheduler.add(a)
    scheduler.add(b)

    # a: 5 tokens -> 2 blocks; b: 3 tokens -> 1 block; 8 - 3 = 5 free.
    assert run_step(scheduler) == {"a": 5, "b": 3}
    assert scheduler.block_manager.num_free_blocks == 5
    assert a.status is SequenceStatus.RUNNING

    # Decode: a computes token 6 (block 1 has room), b computes token 4 (block 0 has room).
    assert run_step(scheduler) == {"a": 1, "b": 1}
    assert scheduler.block_manager.num_free_blocks == 5

    # b's 5th token crosses into a second block; a's 7th still fits in block 1.
    assert run_step(scheduler) == {"a": 1, "b": 1}
    assert len(b.block_table) == 2
    assert len(a.block_table) == 2
    assert scheduler.block_manager.num_free_blocks == 4


def test_max_num_seqs_limits_admission():
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=2)
    for name in "abc":
        scheduler.add(make_seq(name, 2, first_token=ord(name) * 10))

    assert run_step(scheduler) == {"a": 2, "b": 2}
    assert [seq.request_id for seq in scheduler.waiting] == ["c"]


def test_long_prompt_is_chunked_behind_decodes():
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=4, max_num_batched_tokens=6)
    short = make_seq("short", 2)
    scheduler.add(short)
    assert run_step(scheduler) == {"short": 2}

    long = make_seq("long", 13, first_token=100)
    scheduler.add(long)
    # Budget 6: the running decode goes first (1), the prompt gets the other 5.
    assert run_step(scheduler) == {"short": 1, "long": 5}
    assert run_step(scheduler) == {"short": 1, "long": 5}
    # 13 - 10 = 3 tokens left; only this step samples a token for "long".
    assert long.num_tokens == 13
    assert run_step(scheduler) == {"short": 1, "long": 3}
    assert long.num_tokens == 14
    # All 13 prompt tokens -> 4 blocks were reserved at admission.
    assert len(long.block_table) == 4


def test_finish_frees_blocks():
    scheduler = make_scheduler(num_blocks=8)
    seq = make_seq("a", 6)
    scheduler.add(seq)
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 6

    scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
    assert scheduler.block_manager.num_free_blocks == 8
    assert scheduler.running == []
    assert not scheduler.has_unfinished()


def test_abort_waiting_and_running_frees_every_block():
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    running, waiting = make_seq("run", 6), make_seq("wait", 3, first_token=50)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)

    scheduler.finish(running, SequenceStatus.FINISHED_ABORTED)
    scheduler.finish(waiting, SequenceStatus.FINISHED_ABORTED)
    assert scheduler.block_manager.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in scheduler.block_manager.blocks)
    assert not scheduler.has_unfinished()


def test_preempt_newest_when_blocks_run_out_then_resume():
    scheduler = make_scheduler(num_blocks=4)
    old, new = make_seq("old", 4), make_seq("new", 4, first_token=100)
    scheduler.add(old)
    scheduler.add(new)
    # old 4 tokens -> 1 block, new 4 tokens -> 1 block; 2 free.
    assert run_step(scheduler) == {"old": 4, "new": 4}
    # Each decode of token 5 needs a second block: 2 free -> both fit.
    assert run_step(scheduler) == {"old": 1, "new": 1}
    assert scheduler.block_manager.num_free_blocks == 0

    # Tokens 6..8 fit in the second blocks.
    for _ in range(3):
        assert run_step(scheduler) == {"old": 1, "new": 1}
    # Token 9 of "old" needs a third block; none is free, so "new" (newest) is preempted.
    assert run_step(scheduler) == {"old": 1}
    assert new.status is SequenceStatus.WAITING
    assert new.num_preemptions == 1
    assert scheduler.num_preempted_total == 1
    assert list(scheduler.waiting) == [new]
    assert scheduler.block_manager.num_free_blocks == 1  # 4 - old's 3 blocks

    # Preemption freed new's tail block first, and old's growth reused it, so
    # only new's head block (tokens 0..3) is still cached: resume recomputes 9 - 4 = 5.
    scheduler.finish(old, SequenceStatus.FINISHED_STOPPED)
    assert run_step(scheduler) == {"new": 5}
    assert new.num_computed_tokens == 9
    assert new.num_tokens == 10
    assert new.num_cached_tokens == 0  # counted at the first admission only


def test_single_seq_preempts_itself_when_pool_is_exhausted():
    """A running seq that cannot grow and is the only one must be preempted, not loop forever."""
    scheduler = make_scheduler(num_blocks=1)
    seq = make_seq("a", 4)
    scheduler.add(seq)
    assert run_step(scheduler) == {"a": 4}

    # Token 5 needs a second block and the pool has one block in total.
    assert run_step(scheduler) == {}
    assert seq.status is SequenceStatus.WAITING
    assert scheduler.block_manager.num_free_blocks == 1
