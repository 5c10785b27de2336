"""Continuous batching: which seqs run in the next step and how many tokens each computes.

Every step has a token budget (`max_num_batched_tokens`). Running seqs are
served first, oldest first, so decodes are never stalled by a long prompt:
a prompt that does not fit into what is left of the budget is prefilled in
chunks over several steps. Waiting seqs are admitted in arrival order while
there is budget, a free batch slot and KV blocks for all of their tokens.

When a running seq needs a block and none is free, the newest running seq
is preempted: its blocks are freed and it goes back to the front of the
waiting queue, to be recomputed on resume (the prefix cache usually still
holds most of its blocks). The KV pool is fixed, so memory never grows.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from pipeline.engine.block_manager import BlockManager
from pipeline.engine.config import EngineConfig
from pipeline.engine.sequence import Sequence, SequenceStatus

log = structlog.get_logger(__name__)


@dataclass
class ScheduledBatch:
    """The seqs of one step, running seqs first, with the tokens each computes."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admission first
        self.num_preempted_total = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        self._schedule_waiting(batch, budget)
        return batch

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark a seq finished and free its blocks; it leaves whichever queue holds it."""
        assert status.is_finished, f"{status} is not a finished status"
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = status

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_new):
                break  # seq itself was the newest and got preempted
            self.block_manager.may_append(seq, num_new)
            batch.add(seq, num_new)
            budget -= num_new
            index += 1
        return budget

    def _make_room(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Preempt the newest running seqs until `seq` can grow; False if `seq` itself was preempted."""
        while not self.block_manager.can_append(seq, num_new_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preempted_total += 1
        self.waiting.appendleft(seq)
        log.debug("seq_preempted", request_id=seq.request_id, num_tokens=seq.num_tokens,
                  num_free_blocks=self.block_manager.num_free_blocks)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            num_cached_tokens = self.block_manager.allocate(seq)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.time()
                seq.num_cached_tokens = num_cached_tokens

            num_new = min(seq.num_uncomputed_tokens, budget)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
