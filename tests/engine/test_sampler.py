"""Sampler behaviour on hand-made logits."""

import math

import pytest
import torch

from pipeline.engine.sampler import Sampler, SamplingRow, apply_penalties, apply_top_k_top_p_min_p
from pipeline.job import SamplingParams

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def row(generator: torch.Generator | None = None, token_ids: list[int] | None = None,
        num_prompt_tokens: int = 0, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), token_ids or [], num_prompt_tokens, generator)


def seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def test_temperature_zero_equals_top_k_one():
    logits = torch.randn(4, 50, generator=seeded(0))
    sampler = Sampler(CPU, seed=1)

    greedy = sampler(logits, [row(temperature=0.0)] * 4).token_ids
    top_one = sampler(logits, [row(temperature=1.0, top_k=1)] * 4).token_ids
    assert greedy == logits.argmax(dim=-1).tolist()
    assert top_one == greedy


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_no_limit_is_not_greedy(top_k):
    """top_k 0 or -1 means no limit; treating it as k=1 would make sampling greedy."""
    logits = torch.zeros(1, 8)  # flat: every token equally likely
    sampler = Sampler(CPU, seed=3)

    draws = {sampler(logits, [row(temperature=1.0, top_k=top_k)]).token_ids[0] for _ in range(20)}
    assert len(draws) >= 2


def test_top_k_masks_all_but_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    masked = apply_top_k_top_p_min_p(logits, [row(top_k=2)])
    assert masked.tolist() == [[NEG_INF, 4.0, 3.0, NEG_INF]]


def test_top_p_keeps_smallest_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: mass before each token is 0, 0.5, 0.8, 0.95.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    masked = apply_top_k_top_p_min_p(logits, [row(top_p=0.8)])
    # 0.5 + 0.3 reaches 0.8, so the third token is dropped.
    assert torch.isfinite(masked).tolist() == [[True, True, False, False]]

    masked = apply_top_k_top_p_min_p(logits, [row(top_p=0.81)])
    assert torch.isfinite(masked).tolist() == [[True, True, True, False]]


def test_top_p_always_keeps_top_token():
    logits = torch.tensor([[0.9, 0.1]]).log()
    masked = apply_top_k_top_p_min_p(logits, [row(top_p=0.01)])
    assert torch.isfinite(masked).tolist() == [[True, False]]


def test_min_p_masks_below_scaled_max():
    # probs 0.6, 0.25, 0.1, 0.05; min_p 0.2 -> floor 0.12.
    logits = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()
    masked = apply_top_k_top_p_min_p(logits, [row(min_p=0.2)])
    assert torch.isfinite(masked).tolist() == [[True, True, False, False]]


def test_rows_keep_their_own_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    masked = apply_top_k_top_p_min_p(logits, [row(top_k=1), row(top_k=0)])
    assert masked[0].tolist() == [NEG_INF, 4.0, NEG_INF, NEG_INF]
    assert masked[1].tolist() == [1.0, 4.0, 3.0, 2.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    # prompt token 0, output token 1; token 2 and 3 never appeared.
    penalized = apply_penalties(logits, [row(token_ids=[0, 1], num_prompt_tokens=1, repetition_penalty=2.0)])
    assert penalized.tolist() == [[1.0, -4.0, 1.0, 3.0]]


def test_presence_and_frequency_penalties_use_output_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # prompt [3]; output [0, 0, 1]: counts 2, 1, 0, 0 (prompt token 3 not counted).
    penalties = row(token_ids=[3, 0, 0, 1], num_prompt_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)
    penalized = apply_penalties(logits, [penalties])
    assert penalized.tolist() == [[1.0 - 0.5 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0]]


def test_penalties_leave_other_rows_unchanged():
    logits = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    penalized = apply_penalties(logits, [row(token_ids=[0], num_prompt_tokens=1, repetition_penalty=2.0), row()])
    assert penalized.tolist() == [[1.0, 2.0], [2.0, 2.0]]


def test_seeded_row_independent_of_batch():
    logits = torch.randn(3, 64, generator=seeded(5))
    alone = Sampler(CPU, seed=10)
    crowd = Sampler(CPU, seed=20)
    solo_generator, crowd_generator = seeded(42), seeded(42)

    solo_tokens, crowd_tokens = [], []
    for _ in range(10):
        solo_tokens.append(alone(logits[1:2], [row(solo_generator, temperature=1.0)]).token_ids[0])
        rows = [row(temperature=1.0), row(crowd_generator, temperature=1.0), row(temperature=0.7, top_p=0.9)]
        crowd_tokens.append(crowd(logits, rows).token_ids[1])
    assert solo_tokens == crowd_tokens
    assert len(set(solo_tokens)) >= 2


def test_logprobs_report_model_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    output = Sampler(CPU, seed=0)(logits, [row(temperature=0.0, logprobs=True, top_logprobs=2)])
    entry = output.logprobs[0]
    assert entry["token_id"] == 0
    assert entry["logprob"] == pytest.approx(math.log(0.5))
    assert [t["token_id"] for t in entry["top_logprobs"]] == [0, 1]
    assert entry["top_logprobs"][1]["logprob"] == pytest.approx(math.log(0.3))


def test_logprobs_none_when_not_requested():
    output = Sampler(CPU, seed=0)(torch.zeros(2, 4), [row(temperature=0.0), row(temperature=0.0, logprobs=True)])
    assert output.logprobs[0] is None
    assert output.logprobs[1]["top_logprobs"] == []
