"""Per-request engine state: token ids, KV blocks, progress, stop state and timings."""

from __future__ import annotations

import enum
import time
from typing import Any

from pipeline.job import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason for a finished status, else None."""
        return FINISH_REASONS.get(self)


FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One request inside the engine.

    `token_ids` is the prompt followed by every sampled token. Tokens at
    positions >= `num_computed_tokens` have no KV in the cache yet; after a
    decode step the newest sampled token is always uncomputed, and after a
    preemption every token is.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.max_tokens = max_tokens  # already clamped to the context limit
        self.status = SequenceStatus.WAITING

        # KV state: block ids in position order; cleared on preemption and finish.
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at the first admission.
        self.num_cached_tokens = 0
        self.num_preemptions = 0

        self.stop_reason: str | int | None = None
        # Set by the engine when the request has stop strings; see engine.py.
        self.stop_checker: Any = None
        # Sampled-token logprob entries not yet handed out in a RequestOutput.
        self.pending_logprobs: list[dict[str, Any]] = []
        self.num_new_tokens_unreported = 0

        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int, now: float) -> None:
        self.token_ids.append(token_id)
        self.num_new_tokens_unreported += 1
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def metrics(self) -> dict[str, Any]:
        """Timings in seconds (wall clock) and token counts for this request so far."""
        queue_s = ttft_s = tpot_s = prefill_s = None
        if self.first_scheduled_time is not None:
            queue_s = self.first_scheduled_time - self.arrival_time
        if self.first_token_time is not None:
            ttft_s = self.first_token_time - self.arrival_time
            prefill_s = self.first_token_time - (self.first_scheduled_time or self.arrival_time)
        if self.num_output_tokens > 1 and self.first_token_time is not None:
            tpot_s = (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)
        return {
            "queue_s": queue_s,
            "ttft_s": ttft_s,
            "tpot_s": tpot_s,
            "prefill_s": prefill_s,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_cached_tokens": self.num_cached_tokens,
            "num_output_tokens": self.num_output_tokens,
            "preemptions": self.num_preemptions,
        }
