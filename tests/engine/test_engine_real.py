"""LLMEngine and EngineService on the real SmolLM2 model.

The model runs in float32 here: greedy equality with transformers `generate`
is checked token for token, and in bfloat16 the different summation order of
packed versus single-request matmuls can flip a near-tie argmax. Most tests
use dense weights, and the fp16-packed weight format has its own equality
tests, against `generate` on the same packed weights.
"""

import pytest
import torch

from pipeline.detokenize import IncrementalDetokenizer, StopStringMatcher
from pipeline.engine import EngineConfig, EngineService, LLMEngine, native_kernels
from pipeline.job import SamplingParams
from pipeline.models.loader import load_model
from pipeline.models.packed_linear import PackedSlice, fp16_packing_available

pytestmark = pytest.mark.slow
needs_fbgemm = pytest.mark.skipif(not fp16_packing_available(), reason="this torch build has no FBGEMM fp16 kernels")
needs_native = pytest.mark.skipif(native_kernels.unavailable_reason() is not None,
                                  reason=str(native_kernels.unavailable_reason()))
NATIVE_ON_AND_OFF = [pytest.param("on", marks=needs_native), "off"]

NEW_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea, the wind and a small boat that sails home at night:",
    "1, 2, 3, 4,",
    "You are a careful assistant who writes clean code. Here is a Python function that returns the sum "
    "of a list of numbers, with a docstring, type hints and a short example of how to call it:\n",
]


@pytest.fixture(scope="module")
def loaded(model_cache):
    return load_model("smollm2-135m-instruct", model_cache, dtype="float32", weight_format="dense")


@pytest.fixture(scope="module")
def prompt_ids(loaded):
    return [loaded.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


def hf_greedy(loaded, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Reference tokens from transformers `generate`, one request, its own attention implementation."""
    model = loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                do_sample=False)
    finally:
        model.set_attn_implementation(previous)
    return output[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def reference(loaded, prompt_ids):
    return [hf_greedy(loaded, ids, NEW_TOKENS) for ids in prompt_ids]


def make_engine(loaded, **overrides) -> LLMEngine:
    options = {"max_num_seqs": 8, "max_num_batched_tokens": 32, "kv_cache_bytes": 64 * 1024 * 1024}
    options.update(overrides)
    return LLMEngine(loaded, EngineConfig(**options), seed=0)


def greedy(max_tokens: int | None = NEW_TOKENS, **params) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)


def engine_greedy(engine: LLMEngine, prompt_ids: list[list[int]]) -> list:
    """Submit every prompt at once, greedy, and return each request's final output in prompt order."""
    for index, ids in enumerate(prompt_ids):
        engine.add_request(f"g{index}", ids, greedy())
    finals = run_to_completion(engine)
    return [finals[f"g{index}"] for index in range(len(prompt_ids))]


def output_tokens(finals: list) -> list[list[int]]:
    return [final.output_token_ids for final in finals]


def run_to_completion(engine: LLMEngine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


@pytest.mark.parametrize("native", NATIVE_ON_AND_OFF)
def test_greedy_batch_matches_generate(loaded, prompt_ids, reference, native):
    engine = make_engine(loaded, native_kernels=native)
    assert engine.runner.forward_path == "fast"
    assert engine.stats()["native_kernels"] == native
    finals = engine_greedy(engine, prompt_ids)

    assert output_tokens(finals) == reference
    assert [final.finish_reason for final in finals] == ["length"] * len(prompt_ids)
    # A prompt of more than 32 tokens needed chunked prefill with a 32-token budget.
    assert max(len(ids) for ids in prompt_ids) > 32
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


@pytest.mark.parametrize("native", NATIVE_ON_AND_OFF)
def test_transformers_path_matches_generate(loaded, prompt_ids, reference, native):
    # With the kernels on, the transformers layers run the native decode attention.
    engine = make_engine(loaded, enable_fast_path=False, native_kernels=native)
    assert engine.runner.forward_path == "transformers"

    assert output_tokens(engine_greedy(engine, prompt_ids)) == reference


def test_streamed_tokens_add_up(loaded, prompt_ids):
    engine = make_engine(loaded)
    engine.add_request("a", prompt_ids[0], greedy(max_tokens=5, logprobs=True, top_logprobs=2))
    streamed, logprobs = [], []
    final = None
    while engine.has_unfinished():
        for output in engine.step():
            streamed.extend(output.new_token_ids)
            logprobs.extend(output.logprobs)
            final = output
    assert streamed == final.output_token_ids
    assert [entry["token_id"] for entry in logprobs] == streamed
    # Greedy picks the most likely token, so it heads its own top_logprobs list.
    assert [entry["top_logprobs"][0]["token_id"] for entry in logprobs] == streamed
    assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    assert len(streamed) == 5
    assert final.metrics["num_output_tokens"] == 5
    assert final.metrics["num_prompt_tokens"] == len(prompt_ids[0])
    assert final.metrics["ttft_s"] > 0


def test_seeded_sample_independent_of_batch(loaded, prompt_ids):
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)

    alone = make_engine(loaded)
    alone.add_request("seeded", prompt_ids[1], sampled)
    solo_tokens = run_to_completion(alone)["seeded"].output_token_ids

    mixed = make_engine(loaded)
    mixed.add_request("other0", prompt_ids[0], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True))
    mixed.add_request("seeded", prompt_ids[1], sampled)
    mixed.add_request("other2", prompt_ids[3], greedy(max_tokens=8))
    batch_tokens = run_to_completion(mixed)["seeded"].output_token_ids

    assert batch_tokens == solo_tokens


def test_multi_token_stop_string_never_leaks(loaded, prompt_ids, reference):
    tokenizer = loaded.tokenizer
    # A stop string made of reference output tokens 6..8, so it surely occurs.
    stop = tokenizer.decode(reference[1][6:9]).strip()
    assert len(tokenizer.encode(stop, add_special_tokens=False)) >= 2

    engine = make_engine(loaded)
    engine.add_request("s", prompt_ids[1], greedy(stop=[stop]))
    final = run_to_completion(engine)["s"]

    assert final.finish_reason == "stop"
    assert final.stop_reason == stop
    # The downstream stage runs the same classes over the same ids.
    detokenizer, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher([stop])
    emitted = []
    for token_id in final.output_token_ids:
        text, matched = matcher.push(detokenizer.push([token_id]))
        emitted.append(text)
    assert matched == stop
    full_text = tokenizer.decode(reference[1])
    assert "".join(emitted) == full_text[: full_text.index(stop)]
    assert stop not in "".join(emitted)
    assert final.output_token_ids == reference[1][: len(final.output_token_ids)]


def test_abort_mid_decode_frees_every_block(loaded, prompt_ids):
    engine = make_engine(loaded)
    engine.add_request("a", prompt_ids[0], greedy())
    engine.add_request("b", prompt_ids[1], greedy())
    for _ in range(6):
        engine.step()
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_total_blocks"]

    engine.abort("a")
    engine.abort("b")
    outputs = {output.request_id: output for output in engine.step()}

    assert set(outputs) == {"a", "b"}
    assert outputs["a"].finish_reason == "abort"
    assert outputs["a"].finished
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == 0


def test_prompt_at_context_limit_rejected(loaded):
    engine = make_engine(loaded, max_model_len=32)
    with pytest.raises(ValueError, match="prompt has 32 tokens but the context limit is 32 tokens"):
        engine.add_request("long", list(range(100, 132)), greedy())
    assert not engine.has_unfinished()


@pytest.mark.parametrize("max_tokens", [100, None])
def test_output_clamped_to_context_limit(loaded, prompt_ids, max_tokens):
    engine = make_engine(loaded, max_model_len=32)
    prompt = prompt_ids[1][:20]
    engine.add_request("c", prompt, greedy(max_tokens=max_tokens))
    final = run_to_completion(engine)["c"]

    assert final.finish_reason == "length"
    assert len(final.output_token_ids) == 32 - 20


def test_prefix_cache_hit_on_repeated_prompt(loaded, prompt_ids, reference):
    engine = make_engine(loaded, block_size=16)
    prompt = prompt_ids[3]  # more than 32 tokens
    engine.add_request("first", prompt, greedy())
    first = run_to_completion(engine)["first"]
    engine.add_request("second", prompt, greedy())
    second = run_to_completion(engine)["second"]

    expected_cached = (len(prompt) - 1) // 16 * 16
    assert first.metrics["num_cached_tokens"] == 0
    assert second.metrics["num_cached_tokens"] == expected_cached
    assert engine.stats()["prefix_cache_hit_tokens_total"] == expected_cached
    assert second.output_token_ids == first.output_token_ids == reference[3]


def test_preemption_under_tiny_cache_keeps_greedy_tokens(loaded, prompt_ids, reference):
    # SmolLM2 fp32: 2 (K, V) * 30 layers * 16 positions * 3 kv heads * 64 dims * 4 bytes = 737,280 bytes a block.
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4
    # 8 blocks = 128 token slots; the four requests need 3 + 5 + 3 + 5 = 16 blocks together.
    engine = make_engine(loaded, kv_cache_bytes=8 * block_bytes)
    assert engine.stats()["num_total_blocks"] == 8
    for index, ids in enumerate(prompt_ids):
        engine.add_request(f"r{index}", ids, greedy())
    finals = run_to_completion(engine)

    assert engine.stats()["num_preempted_total"] >= 1
    for index in range(len(prompt_ids)):
        assert finals[f"r{index}"].output_token_ids == reference[index], f"prompt {index}"
    assert engine.stats()["num_free_blocks"] == 8


def test_service_runs_requests_and_reports_steps(loaded, prompt_ids, reference):
    steps = []
    service = EngineService(make_engine(loaded), on_step=steps.append)
    try:
        handles = [service.submit(f"r{i}", ids, greedy()) for i, ids in enumerate(prompt_ids[:2])]
        finals = [handle.result(timeout=120) for handle in handles]
    finally:
        service.stop()

    assert [final.output_token_ids for final in finals] == reference[:2]
    streamed = [token for outputs in steps for output in outputs if output.request_id == "r0"
                for token in output.new_token_ids]
    assert streamed == reference[0]


def test_service_abort_and_invalid_request(loaded, prompt_ids):
    service = EngineService(make_engine(loaded, max_model_len=64))
    try:
        with pytest.raises(ValueError, match="context limit is 64 tokens"):
            service.submit("too-long", list(range(64)), greedy())
        handle = service.submit("a", prompt_ids[0], greedy(max_tokens=None))
        service.abort("a")
        final = handle.result(timeout=60)
    finally:
        service.stop()
    assert final.finish_reason == "abort"
    assert service.engine.stats()["num_free_blocks"] == service.engine.stats()["num_total_blocks"]


@pytest.mark.parametrize("weight_format,native", [("dense", "off"), pytest.param("fp16-packed", "off", marks=needs_fbgemm),
                                                  pytest.param("fp16-packed", "on", marks=[needs_fbgemm, needs_native])])
def test_qwen_greedy_matches_generate(model_cache, weight_format, native):
    """Qwen2 has q/k/v biases and 7 query heads per KV head, so the fast path must carry biases and GQA correctly."""
    qwen = load_model("qwen2.5-coder-0.5b-instruct", model_cache, dtype="float32", weight_format=weight_format)
    messages = [[{"role": "user", "content": "用中文介绍一下你自己。"}],
                [{"role": "user", "content": "Write a Python function to reverse a list."}]]
    prompts = [list(qwen.tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"])
               for m in messages]
    expected = [hf_greedy(qwen, ids, 8) for ids in prompts]

    engine = make_engine(qwen, native_kernels=native)
    assert engine.runner.forward_path == "fast"
    for index, ids in enumerate(prompts):
        engine.add_request(f"q{index}", ids, greedy(max_tokens=8))
    finals = run_to_completion(engine)

    assert finals["q0"].output_token_ids == expected[0]
    assert finals["q1"].output_token_ids == expected[1]


@pytest.fixture(scope="module")
def packed(model_cache):
    return load_model("smollm2-135m-instruct", model_cache, dtype="float32", weight_format="fp16-packed")


@needs_fbgemm
def test_packed_greedy_matches_generate(packed, prompt_ids):
    assert packed.weight_format == "fp16-packed"
    expected = [hf_greedy(packed, ids, NEW_TOKENS) for ids in prompt_ids]

    engine = make_engine(packed)
    assert engine.runner.forward_path == "fast"
    assert engine.stats()["weight_format"] == "fp16-packed"
    assert output_tokens(engine_greedy(engine, prompt_ids)) == expected
    # The engine fused q/k/v into one packed product, and the transformers modules are now slices of it.
    assert isinstance(packed.model.model.layers[0].self_attn.k_proj, PackedSlice)
    assert hf_greedy(packed, prompt_ids[1], NEW_TOKENS) == expected[1]
    # The transformers forward with paged attention runs through those slices.
    assert output_tokens(engine_greedy(make_engine(packed, enable_fast_path=False), prompt_ids)) == expected


@needs_fbgemm
def test_packed_weights_change_nothing_but_the_fp16_rounding(model_cache, packed, prompt_ids):
    """generate on dense weights rounded to fp16 gives the tokens that the packed engine gives."""
    rounded = load_model("smollm2-135m-instruct", model_cache, dtype="float32", weight_format="dense")
    for module in rounded.model.modules():
        if isinstance(module, torch.nn.Linear):
            # A new tensor, so the LM head no longer shares the embedding: the
            # packed model rounds the head and keeps a float32 embedding table.
            module.weight = torch.nn.Parameter(module.weight.detach().half().float(), requires_grad=False)
    expected = [hf_greedy(rounded, ids, NEW_TOKENS) for ids in prompt_ids]

    assert output_tokens(engine_greedy(make_engine(packed), prompt_ids)) == expected
