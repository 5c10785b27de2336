"""Tool turns folded into plain text for the answer round of the task route."""

from __future__ import annotations

from workers.inference_round import messages_for_answer


def tool_call(expression: str) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]}


def test_results_move_into_newest_user_turn():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 37 * 91 + 12?"},
                tool_call("37 * 91 + 12"),
                {"role": "tool", "name": "calculator", "content": "3379"}]

    folded = messages_for_answer(messages)

    assert folded == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": 'What is 37 * 91 + 12?\n\nA tool already ran: calculator with '
                                    '{"expression": "37 * 91 + 12"} returned 3379. Reply to my question in plain words.'},
    ]


def test_earlier_questions_lose_their_tool_turns():
    messages = [{"role": "user", "content": "2+2?"}, tool_call("2+2"), {"role": "tool", "name": "calculator", "content": "4"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "Thanks!"}]

    folded = messages_for_answer(messages)

    assert folded == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."},
                      {"role": "user", "content": "Thanks!"}]


def test_input_messages_stay_unchanged():
    messages = [{"role": "user", "content": "1+1?"}, tool_call("1+1"), {"role": "tool", "name": "calculator", "content": "2"}]

    messages_for_answer(messages)

    assert messages[0] == {"role": "user", "content": "1+1?"}
    assert len(messages) == 3
