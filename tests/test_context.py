"""Context trimming against the real SmolLM2 tokenizer and chat template.

SmolLM2's template adds no default system message when one is given. Token
counts of the conversations used below:

| messages                                                | tokens |
|---------------------------------------------------------|--------|
| system, user1, assistant1, user2, assistant2, user3     | 62     |
| system, user2, assistant2, user3                        | 42     |
| system, user3                                           | 25     |
"""

from __future__ import annotations

import pytest

from pipeline.context import trim_messages
from pipeline.models.loader import load_tokenizer
from pipeline.prompt import count_prompt_tokens

SYSTEM = {"role": "system", "content": "You are terse."}
USER_1 = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT_1 = {"role": "assistant", "content": "Paris."}
USER_2 = {"role": "user", "content": "And of Italy?"}
ASSISTANT_2 = {"role": "assistant", "content": "Rome."}
USER_3 = {"role": "user", "content": "Name a river in Rome."}
CONVERSATION = [SYSTEM, USER_1, ASSISTANT_1, USER_2, ASSISTANT_2, USER_3]


@pytest.fixture(scope="module")
def count_tokens(model_cache):
    tokenizer = load_tokenizer("smollm2-135m-instruct", model_cache)
    return lambda messages: count_prompt_tokens(tokenizer, messages)


def test_counts_used_below(count_tokens):
    assert count_tokens(CONVERSATION) == 62
    assert count_tokens([SYSTEM, USER_2, ASSISTANT_2, USER_3]) == 42
    assert count_tokens([SYSTEM, USER_3]) == 25


@pytest.mark.parametrize(
    ("budget_tokens", "expected_messages", "num_tokens", "num_dropped"),
    [
        (1000, CONVERSATION, 62, 0),
        (62, CONVERSATION, 62, 0),
        (61, [SYSTEM, USER_2, ASSISTANT_2, USER_3], 42, 2),
        (42, [SYSTEM, USER_2, ASSISTANT_2, USER_3], 42, 2),
        (41, [SYSTEM, USER_3], 25, 4),
        (25, [SYSTEM, USER_3], 25, 4),
        # Below the kept-always messages: they stay, and the count is honest.
        (24, [SYSTEM, USER_3], 25, 4),
        (1, [SYSTEM, USER_3], 25, 4),
    ],
)
def test_trim_budgets(count_tokens, budget_tokens, expected_messages, num_tokens, num_dropped):
    result = trim_messages(CONVERSATION, count_tokens, budget_tokens)
    assert result.messages == expected_messages
    assert result.num_tokens == num_tokens
    assert result.num_dropped == num_dropped


def test_trim_keeps_every_system_message(count_tokens):
    """A system message in the middle of the history must survive trimming, in its place."""
    late_system = {"role": "system", "content": "Answer in one word."}
    messages = [SYSTEM, USER_1, ASSISTANT_1, late_system, USER_2, ASSISTANT_2, USER_3]
    result = trim_messages(messages, count_tokens, 1)
    assert result.messages == [SYSTEM, late_system, USER_3]
    assert result.num_dropped == 4
    assert result.num_tokens == count_tokens([SYSTEM, late_system, USER_3])


def test_trim_drops_tool_result_with_its_call(count_tokens):
    """A tool message must be dropped together with the assistant turn that called it, never left alone."""
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+2"}}}],
    }
    tool = {"role": "tool", "content": "4"}
    answer = {"role": "assistant", "content": "4."}
    user = {"role": "user", "content": "What is 2+2?"}
    messages = [SYSTEM, user, call, tool, answer, USER_2, ASSISTANT_2, USER_3]
    budget = count_tokens([SYSTEM, USER_2, ASSISTANT_2, USER_3])

    result = trim_messages(messages, count_tokens, budget)

    assert result.messages == [SYSTEM, USER_2, ASSISTANT_2, USER_3]
    assert result.num_dropped == 4
    assert all(message["role"] != "tool" for message in result.messages)


def test_trim_keeps_turn_in_progress(count_tokens):
    """Tool calls and results after the newest user message belong to the current turn and must stay."""
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1"}}}]}
    tool = {"role": "tool", "content": "1"}
    messages = [SYSTEM, USER_1, ASSISTANT_1, USER_3, call, tool]
    result = trim_messages(messages, count_tokens, 1)
    assert result.messages == [SYSTEM, USER_3, call, tool]
    assert result.num_dropped == 2


def test_trim_without_system_message(count_tokens):
    messages = [USER_1, ASSISTANT_1, USER_3]
    result = trim_messages(messages, count_tokens, 1)
    assert result.messages == [USER_3]
    assert result.num_dropped == 2
    assert result.num_tokens == count_tokens([USER_3])


def test_trim_does_not_mutate_input(count_tokens):
    messages = list(CONVERSATION)
    trim_messages(messages, count_tokens, 30)
    assert messages == CONVERSATION


def test_trim_empty_conversation(count_tokens):
    result = trim_messages([], count_tokens, 100)
    assert result.messages == []
    assert result.num_tokens == 0
    assert result.num_dropped == 0


def test_trim_rejects_zero_budget(count_tokens):
    with pytest.raises(ValueError, match=r"budget_tokens=0 is invalid; it must be at least 1"):
        trim_messages(CONVERSATION, count_tokens, 0)


def test_trim_drops_oldest_turn_first_with_few_counts(count_tokens):
    """Long histories must be trimmed with a logarithmic number of renders, not one per turn."""
    messages = [SYSTEM]
    for number in range(64):
        messages += [{"role": "user", "content": f"question {number}"}, {"role": "assistant", "content": "ok"}]
    messages.append(USER_3)
    num_calls = 0

    def counting(kept):
        nonlocal num_calls
        num_calls += 1
        return count_tokens(kept)

    result = trim_messages(messages, counting, count_tokens([SYSTEM, *messages[-5:]]))

    assert result.messages == [SYSTEM, *messages[-5:]]
    assert result.messages[1]["content"] == "question 62"
    assert num_calls <= 9
