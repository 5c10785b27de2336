"""Incremental detokenization and stop-string hold-back on the real tokenizers."""

import pytest

from pipeline.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher
from pipeline.models.loader import load_tokenizer

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
TEXTS = [
    "我爱AI，也爱写代码。",
    "Rocket 🚀 launch, family 👨‍👩‍👧 and flags 🇨🇳🇺🇸!",
    "混合 text: 你好世界 👋🏽 done.",
    "  leading spaces, tabs\tand\nnewlines  ",
]


@pytest.fixture(scope="module", params=MODELS)
def tokenizer(request, model_cache):
    return load_tokenizer(request.param, model_cache)


def stream(tokenizer, token_ids: list[int], chunk: int) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_ids[i:i + chunk]) for i in range(0, len(token_ids), chunk)]
    deltas.append(detokenizer.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_join_to_full_decode(tokenizer, text, chunk):
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, token_ids, chunk)

    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert "".join(deltas) == text


def test_partial_character_is_held_back(tokenizer):
    """Decoding a token that carries only part of a character's UTF-8 bytes must not emit U+FFFD."""
    token_ids = tokenizer.encode("𝄞", add_special_tokens=False)
    assert len(token_ids) >= 2  # four UTF-8 bytes, split over several tokens by both tokenizers
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([token_id]) for token_id in token_ids]
    assert deltas[:-1] == [""] * (len(token_ids) - 1)
    assert deltas[-1] == "𝄞"


def test_special_tokens_are_skipped(tokenizer):
    eos = tokenizer.eos_token_id
    token_ids = tokenizer.encode("你好 👋", add_special_tokens=False) + [eos]
    assert "".join(stream(tokenizer, token_ids, 1)) == "你好 👋"


def test_flush_emits_incomplete_tail(tokenizer):
    token_ids = tokenizer.encode("龘", add_special_tokens=False)
    assert len(token_ids) >= 2  # both tokenizers split this rare character into byte tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(token_ids[:1]) == ""
    assert detokenizer.flush() == tokenizer.decode(token_ids[:1])


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stops)
    emitted, matched = [], None
    for piece in pieces:
        text, hit = matcher.push(piece)
        emitted.append(text)
        matched = matched or hit
    emitted.append(matcher.flush())
    return emitted, matched


def test_stop_split_across_pushes_never_leaks():
    emitted, matched = run_matcher(["</answer>"], ["The result", " is 4</", "ans", "wer> and more"])
    assert matched == "</answer>"
    assert "".join(emitted) == "The result is 4"
    assert emitted[1] == " is 4"  # "</" held back because it may start the stop string
    assert emitted[2] == ""


def test_held_prefix_released_when_stop_does_not_follow():
    emitted, matched = run_matcher(["STOP"], ["go ST", "ART now"])
    assert matched is None
    assert emitted == ["go ", "START now", ""]


def test_held_prefix_released_at_flush():
    emitted, matched = run_matcher(["STOP"], ["almost ST"])
    assert matched is None
    assert emitted == ["almost ", "ST"]


def test_earliest_stop_wins():
    emitted, matched = run_matcher(["world", "lo w"], ["hello world"])
    assert matched == "lo w"
    assert "".join(emitted) == "hel"


def test_push_after_match_emits_nothing():
    matcher = StopStringMatcher(["。"])
    assert matcher.push("第一句。第二句") == ("第一句", "。")
    assert matcher.push("更多") == ("", None)
    assert matcher.flush() == ""


def test_stop_on_tokens_with_detokenizer(tokenizer):
    """A multi-token stop string streamed token by token is cut before its first character."""
    text = "答案是 42 🎉 然后继续"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(["42 🎉"])
    emitted, matched = [], None
    for token_id in token_ids:
        text_piece, hit = matcher.push(detokenizer.push([token_id]))
        emitted.append(text_piece)
        if hit:
            matched = hit
            break
    assert matched == "42 🎉"
    assert "".join(emitted) == "答案是 "


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
