"""Batched per-request sampling: penalties, temperature, top-k, top-p, min-p, seeds and logprobs.

One call handles every row of a step. Rows differ in parameters, so each
parameter becomes a per-row tensor; a processing stage runs only when some
row uses it. Sampling uses the exponential race: argmax(probs / E) with
E ~ Exp(1) draws from `probs`. A seeded row draws E from its own
`torch.Generator`, so its tokens do not depend on which other requests share
the batch; unseeded rows share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.job import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs from one seq."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output, for the repetition penalty
    num_prompt_tokens: int
    generator: torch.Generator | None  # the seq's own generator when seeded


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {"token_id", "logprob", "top_logprobs": [...]} or None when the row did not ask for logprobs.
    logprobs: list[dict | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample one token per row from logits [num_rows, vocab] (float32)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs for r in rows) else None
        logits = apply_penalties(logits, rows)
        temperatures = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        is_greedy = temperatures == 0
        greedy_tokens = logits.argmax(dim=-1)

        if bool(is_greedy.all()):
            tokens = greedy_tokens
        else:
            scaled = logits / torch.where(is_greedy, 1.0, temperatures)[:, None]
            probs = torch.softmax(apply_top_k_top_p_min_p(scaled, rows), dim=-1)
            sampled = (probs / self._exponential_noise(rows, probs.shape[-1])).argmax(dim=-1)
            tokens = torch.where(is_greedy, greedy_tokens, sampled)

        token_list = tokens.tolist()
        return SamplerOutput(token_list, collect_logprobs(raw_logprobs, token_list, rows))

    def _exponential_noise(self, rows: list[SamplingRow], vocab_size: int) -> torch.Tensor:
        noise = torch.empty(len(rows), vocab_size, device=self.device)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            shared = torch.empty(len(unseeded), vocab_size, device=self.device).exponential_(generator=self.generator)
            noise[unseeded] = shared
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return noise


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Apply HF-style repetition penalty (prompt + output) and OpenAI presence/frequency penalties (output)."""
    repetition = [r.params.repetition_penalty for r in rows]
    presence = [r.params.presence_penalty for r in rows]
    frequency = [r.params.frequency_penalty for r in rows]
    uses_repetition = any(p != 1.0 for p in repetition)
    uses_openai = any(p != 0.0 for p in presence) or any(p != 0.0 for p in frequency)
    if not uses_repetition and not uses_openai:
        return logits

    logits = logits.clone()
    vocab_size = logits.shape[-1]
    if uses_repetition:
        seen = _token_counts(logits, [r.token_ids for r in rows], vocab_size) > 0  # [num_rows, vocab]
        penalty = torch.tensor(repetition, device=logits.device)[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if uses_openai:
        counts = _token_counts(logits, [r.token_ids[r.num_prompt_tokens:] for r in rows], vocab_size)
        presence_t = torch.tensor(presence, device=logits.device)[:, None]
        frequency_t = torch.tensor(frequency, device=logits.device)[:, None]
        logits = logits - frequency_t * counts - presence_t * (counts > 0).to(logits.dtype)
    return logits


def _token_counts(logits: torch.Tensor, token_lists: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Occurrences of each vocab id per row: [num_rows, vocab] float."""
    counts = torch.zeros(len(token_lists), vocab_size, device=logits.device)
    row_index = [i for i, tokens in enumerate(token_lists) for _ in tokens]
    if row_index:
        flat = [t for tokens in token_lists for t in tokens]
        rows_t = torch.tensor(row_index, device=logits.device)
        cols_t = torch.tensor(flat, device=logits.device)
        counts.index_put_((rows_t, cols_t), torch.ones(len(flat), device=logits.device), accumulate=True)
    return counts


def apply_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Set logits outside each row's top-k, top-p nucleus or min-p floor to -inf."""
    vocab_size = logits.shape[-1]
    top_k = [r.params.top_k if r.params.top_k > 0 else vocab_size for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]

    if any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _mask_top_k_top_p(logits, top_k, top_p)
    if any(p > 0.0 for p in min_p):
        probs = torch.softmax(logits, dim=-1)
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [num_rows, vocab]
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    remove = ranks >= torch.tensor(top_k, device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))

    # Keep the smallest prefix whose probability reaches top_p: drop a token when
    # the mass before it already reaches top_p. The top token always stays.
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove = mass_before >= torch.tensor(top_p, device=logits.device)[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def collect_logprobs(raw_logprobs: torch.Tensor | None, tokens: list[int], rows: list[SamplingRow]) -> list[dict | None]:
    """Logprobs of the model distribution (before penalties and temperature) for rows that asked."""
    if raw_logprobs is None:
        return [None] * len(rows)
    max_top = max(r.params.top_logprobs for r in rows)
    top_values, top_ids = raw_logprobs.topk(max(max_top, 1), dim=-1)
    chosen = raw_logprobs.gather(1, torch.tensor(tokens, device=raw_logprobs.device)[:, None])[:, 0].tolist()
    top_values, top_ids = top_values.tolist(), top_ids.tolist()

    entries: list[dict | None] = []
    for i, row in enumerate(rows):
        if not row.params.logprobs:
            entries.append(None)
            continue
        num_top = row.params.top_logprobs
        top = [{"token_id": top_ids[i][j], "logprob": top_values[i][j]} for j in range(num_top)]
        entries.append({"token_id": tokens[i], "logprob": chosen[i], "top_logprobs": top})
    return entries
