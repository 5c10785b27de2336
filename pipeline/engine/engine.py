"""The engine loop: admit requests, schedule a step, run the model, sample, check stops, report.

Context limit policy: a request whose prompt alone has >= max_model_len
tokens is rejected with ValueError at `add_request`. Otherwise max_tokens
(None means "up to the context limit") is clamped to max_model_len -
prompt_len, and a seq that reaches the clamp finishes with "length". The
last sampled token never needs KV, so the cache contains at most
max_model_len - 1 positions of a seq.

`LLMEngine` is single-threaded except for `abort`, which only records the
request id; the next `step` removes the seq and frees its blocks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from pipeline.detokenize import IncrementalDetokenizer, StopStringMatcher
from pipeline.engine.block_manager import BlockManager
from pipeline.engine.config import EngineConfig
from pipeline.engine.model_runner import ModelRunner
from pipeline.engine.sampler import Sampler, SamplingRow
from pipeline.engine.scheduler import Scheduler
from pipeline.engine.sequence import Sequence, SequenceStatus
from pipeline.job import SamplingParams

log = structlog.get_logger(__name__)


class ContextLengthExceededError(ValueError):
    """The prompt leaves no room for output within the model's context length."""

    code = "context_length_exceeded"


@dataclass
class RequestOutput:
    """What one step produced for one request.

    When a stop token id (EOS or one of stop_token_ids) ends the request, that
    token is the last entry of the token ids. A detokenizer that skips
    special tokens drops EOS. stop_reason is the matched stop string, the
    stop token id from stop_token_ids, or None (EOS, length, abort).
    """

    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[dict[str, Any]] | None
    metrics: dict[str, Any] = field(default_factory=dict)


class StopChecker:
    """Stop-string state of one seq: the same detokenizer and matcher the detokenize stage runs."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.matcher = StopStringMatcher(stops)

    def push(self, token_id: int) -> str | None:
        """Feed one sampled token; return the stop string it completes, if any."""
        _, matched = self.matcher.push(self.detokenizer.push([token_id]))
        return matched


class LLMEngine:
    def __init__(self, loaded, config: EngineConfig, seed: int | None = None) -> None:
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.runner = ModelRunner(loaded.model, loaded.device, loaded.dtype, config.block_size, config.kv_cache_bytes,
                                  config.enable_fast_path, config.native_kernels)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler(loaded.device, seed)
        self.max_model_len = self._resolve_max_model_len(loaded.model.config)
        self.eos_token_ids = _eos_token_ids(loaded.model, loaded.tokenizer)

        self.seqs: dict[str, Sequence] = {}
        self.generators: dict[str, torch.Generator] = {}
        self._abort_lock = threading.Lock()
        self._pending_aborts: set[str] = set()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.weight_format = getattr(loaded, "weight_format", "dense")
        log.info("engine_started", model=getattr(loaded, "name", None), device=str(loaded.device),
                 dtype=str(loaded.dtype), weight_format=self.weight_format,
                 forward_path=self.runner.forward_path, native_kernels=self.runner.native_kernels,
                 num_blocks=self.runner.num_blocks, block_size=config.block_size,
                 kv_cache_bytes=config.kv_cache_bytes, max_model_len=self.max_model_len,
                 max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens)

    def _resolve_max_model_len(self, model_config) -> int:
        limit = self.config.max_model_len or model_config.max_position_embeddings
        pool_tokens = self.runner.num_blocks * self.config.block_size
        if pool_tokens < limit:
            # One seq must always fit into the whole pool, or it could never be admitted.
            log.warning("max_model_len_lowered", requested=limit, max_model_len=pool_tokens,
                        reason="kv_cache_bytes holds fewer tokens than max_model_len")
            limit = pool_tokens
        return limit

    def validate_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> int:
        """Check a request against the context limit; return its clamped max_tokens."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("prompt_token_ids is empty; a request needs at least one prompt token")
        if num_prompt >= self.max_model_len:
            raise ContextLengthExceededError(
                f"prompt has {num_prompt} tokens but the context limit is {self.max_model_len} tokens "
                "(prompt plus at least one output token); shorten the prompt"
            )
        room = self.max_model_len - num_prompt
        return room if sampling.max_tokens is None else min(sampling.max_tokens, room)

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request_id {request_id!r} is already in the engine; use a unique id")
        max_tokens = self.validate_request(prompt_token_ids, sampling)
        seq = Sequence(request_id, prompt_token_ids, sampling, max_tokens, arrival_time)
        if sampling.stop:
            seq.stop_checker = StopChecker(self.tokenizer, sampling.stop)
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed)
            self.generators[request_id] = generator
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens_total += seq.num_prompt_tokens

    def abort(self, request_id: str) -> None:
        """Ask for a request to leave the batch; the next step frees its blocks and reports it."""
        with self._abort_lock:
            self._pending_aborts.add(request_id)

    def has_unfinished(self) -> bool:
        """True while any request is queued or running, or an abort still has to be processed."""
        return self.scheduler.has_unfinished() or bool(self._pending_aborts)

    def step(self) -> list[RequestOutput]:
        outputs = self._process_aborts()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return outputs

        sample_seqs, logits = self.runner.execute(batch)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.mark_computed(seq)

        if sample_seqs:
            rows = [SamplingRow(s.sampling, s.token_ids, s.num_prompt_tokens, self.generators.get(s.request_id))
                    for s in sample_seqs]
            sampled = self.sampler(logits, rows)
            now = time.time()
            for seq, token_id, logprob in zip(sample_seqs, sampled.token_ids, sampled.logprobs):
                seq.append_token(token_id, now)
                if logprob is not None:
                    seq.pending_logprobs.append(logprob)
                self._check_stop(seq, token_id)
                outputs.append(self._make_output(seq))
        return outputs

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        self.generation_tokens_total += 1
        params = seq.sampling
        if token_id in params.stop_token_ids:
            seq.stop_reason = token_id
            self._finish(seq, SequenceStatus.FINISHED_STOPPED)
        elif not params.ignore_eos and token_id in self.eos_token_ids:
            self._finish(seq, SequenceStatus.FINISHED_STOPPED)
        elif seq.stop_checker is not None and (matched := seq.stop_checker.push(token_id)) is not None:
            seq.stop_reason = matched
            self._finish(seq, SequenceStatus.FINISHED_STOPPED)
        elif seq.num_output_tokens >= seq.max_tokens:
            self._finish(seq, SequenceStatus.FINISHED_LENGTH)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self.scheduler.finish(seq, status)
        self.seqs.pop(seq.request_id, None)
        self.generators.pop(seq.request_id, None)
        metrics = seq.metrics()
        log.info("seq_finished", request_id=seq.request_id, finish_reason=status.finish_reason,
                 num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
                 num_output_tokens=seq.num_output_tokens, preemptions=seq.num_preemptions,
                 ttft_s=_round(metrics["ttft_s"]), tpot_s=_round(metrics["tpot_s"]))

    def _process_aborts(self) -> list[RequestOutput]:
        with self._abort_lock:
            pending, self._pending_aborts = self._pending_aborts, set()
        outputs = []
        for request_id in pending:
            seq = self.seqs.get(request_id)
            if seq is None:
                continue  # finished already or never added
            self._finish(seq, SequenceStatus.FINISHED_ABORTED)
            outputs.append(self._make_output(seq))
        return outputs

    def _make_output(self, seq: Sequence) -> RequestOutput:
        num_new = seq.num_new_tokens_unreported
        seq.num_new_tokens_unreported = 0
        logprobs = seq.pending_logprobs if seq.sampling.logprobs else None
        seq.pending_logprobs = []
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=seq.token_ids[len(seq.token_ids) - num_new:] if num_new else [],
            output_token_ids=seq.output_token_ids,
            finished=seq.is_finished,
            finish_reason=seq.status.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
            metrics=seq.metrics(),
        )

    def stats(self) -> dict[str, Any]:
        num_total = self.block_manager.num_total_blocks
        num_free = self.block_manager.num_free_blocks
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preempted_total": self.scheduler.num_preempted_total,
            "num_total_blocks": num_total,
            "num_free_blocks": num_free,
            "block_size": self.config.block_size,
            "kv_cache_bytes": self.runner.num_blocks * self.runner.block_bytes,
            "cache_usage": (num_total - num_free) / num_total,
            "prefix_cache_hit_tokens_total": self.block_manager.num_hit_tokens_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "max_model_len": self.max_model_len,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "weight_format": self.weight_format,
            "native_kernels": self.runner.native_kernels,
        }


def _eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the generation config (which may list several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
