"""Context budgeting: drop the oldest turns until the rendered conversation fits a token budget.

Always kept: every system message, the newest user message and whatever
follows it (the assistant tool calls and tool results of the turn in
progress). Older messages are dropped a whole turn at a time, oldest first.
A turn is a user message with the assistant and tool messages that follow
it. So a tool result is dropped with the assistant message that called it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import structlog

log = structlog.get_logger(__name__)


@dataclass
class TrimResult:
    messages: list[dict]
    num_tokens: int  # of the kept messages as rendered; may exceed the budget when only kept-always messages remain
    num_dropped: int  # messages dropped, not turns


def trim_messages(messages: list[dict], count_tokens: Callable[[list[dict]], int], budget_tokens: int) -> TrimResult:
    """Drop the oldest whole turns until count_tokens(kept) <= budget_tokens.

    When the kept-always messages alone exceed the budget they are returned
    anyway, with their true count, so the engine can clamp or reject.
    count_tokens must not grow when messages are removed, because the number
    of turns to drop is found by binary search.
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens={budget_tokens} is invalid; it must be at least 1")
    if not messages:
        return TrimResult([], 0, 0)

    turns = _droppable_turns(messages)

    def keep_after(num_turns: int) -> list[dict]:
        dropped = {index for turn in turns[:num_turns] for index in turn}
        return [message for index, message in enumerate(messages) if index not in dropped]

    num_tokens = count_tokens(messages)
    if num_tokens <= budget_tokens or not turns:
        return TrimResult(list(messages), num_tokens, 0)

    # Find the fewest dropped turns that fit; dropping all of them is the fallback.
    low, high = 1, len(turns)
    high_tokens = count_tokens(keep_after(high))
    while low < high:
        middle = (low + high) // 2
        middle_tokens = count_tokens(keep_after(middle))
        if middle_tokens <= budget_tokens:
            high, high_tokens = middle, middle_tokens
        else:
            low = middle + 1

    kept = keep_after(high)
    if high_tokens > budget_tokens:
        log.warning("context_over_budget", num_tokens=high_tokens, budget_tokens=budget_tokens)
    num_dropped = len(messages) - len(kept)
    log.info("context_trimmed", num_dropped=num_dropped, num_tokens=high_tokens, budget_tokens=budget_tokens)
    return TrimResult(kept, high_tokens, num_dropped)


def _droppable_turns(messages: list[dict]) -> list[list[int]]:
    """Group the indices of droppable messages into turns, oldest first.

    Droppable: not a system message, and before the newest user message. A
    new turn starts at each user message; assistant and tool messages join
    the turn they follow.
    """
    user_indices = [index for index, message in enumerate(messages) if message.get("role") == "user"]
    # Without a user message, the newest message is the one that must stay.
    protected_from = user_indices[-1] if user_indices else len(messages) - 1

    turns: list[list[int]] = []
    for index, message in enumerate(messages[:protected_from]):
        role = message.get("role")
        if role == "system":
            continue
        if role == "user" or not turns:
            turns.append([])
        turns[-1].append(index)
    return turns
