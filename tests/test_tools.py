"""The calculator, tool-call parsing, the streaming hold-back check and run_tool."""

from __future__ import annotations

import json

import pytest

from pipeline.tools import (
    ToolCall,
    could_be_tool_call,
    evaluate_arithmetic,
    parse_tool_call,
    run_tool,
    tool_specs,
)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("37 * 91 + 12", 3379),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("2 ^ 20", 1048576),
        ("2^3+1", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("-7 % 3", 2),
        ("+5 - -5", 10),
        ("0.5 + 0.25", 0.75),
        ("1e3", 1000.0),
        ("2 ** -2", 0.25),
        ("sqrt(16)", 4.0),
        ("abs(-3.5)", 3.5),
        ("round(2.675, 2)", 2.67),
        ("round(7.5)", 8),
        ("min(3, 1, 2)", 1),
        ("max(1.5, 2)", 2),
        ("3 × 4 ÷ 2", 6.0),
        ("（1 + 2）× 3", 9),
        ("2 ** 4000 // 2 ** 3999", 2),
    ],
)
def test_calculator_values(expression, expected):
    result = evaluate_arithmetic(expression)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "unknown name 'x'"),
        ("__import__('os')", "name '__import__' is not an allowed function"),
        ("open('f')", "name 'open' is not an allowed function"),
        ("math.sqrt(4)", "attribute access 'math.sqrt' is not an allowed function"),
        ("(1).real", "attribute access '1 .real' is not allowed"),
        ("'a' * 3", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("1j", "1j is not a number"),
        ("[1, 2]", "List '[1, 2]' is not allowed"),
        ("lambda: 1", "Lambda 'lambda: 1' is not allowed"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("9 ** 9 ** 9", "exponent 387420489 is too large"),
        ("10 ** 4000", "10 ** 4000 has about 4001 digits"),
        ("2 ** 4096", "result has more than 1233 digits"),
        ("10.0 ** 400", "result is too large for a float"),
        ("(-8) ** 0.5", "(-8) ** 0.5 is a complex number"),
        ("sqrt(-1)", "sqrt() failed on [-1]: math domain error"),
        ("sqrt(10 ** 1000)", "sqrt() failed on"),
        ("1e309", "inf is not a finite number"),
        ("1e308 * 10", "result is inf, not a finite number"),
        ("min()", "min() failed on []"),
        ("round(1.5, ndigits=1)", "round() takes no keyword arguments"),
        ("", "expression is empty"),
        ("2 +", "is not valid arithmetic"),
        ("1 + " * 200 + "1", "expression has 801 characters; the maximum is 500"),
    ],
)
def test_calculator_errors(expression, message):
    with pytest.raises(ValueError) as info:
        evaluate_arithmetic(expression)
    assert message in str(info.value)


def test_calculator_deep_nesting():
    """Deeply nested parentheses must raise ValueError, not RecursionError or a crash."""
    with pytest.raises(ValueError, match="nested too deeply|not valid arithmetic"):
        evaluate_arithmetic("(" * 240 + "1" + ")" * 240)


def test_tool_specs_calculator():
    specs = tool_specs()
    assert [spec["function"]["name"] for spec in specs] == ["calculator"]
    assert specs[0]["type"] == "function"
    assert specs[0]["function"]["parameters"]["required"] == ["expression"]
    assert json.loads(json.dumps(specs)) == specs


QWEN_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37 * 91 + 12"}}\n</tool_call>'


@pytest.mark.parametrize(
    "text",
    [
        QWEN_CALL,
        "Let me compute it.\n" + QWEN_CALL,
        '<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 91 + 12"}}',
        '{"name": "calculator", "arguments": {"expression": "37 * 91 + 12"}}',
        '  {"name": "calculator", "arguments": "{\\"expression\\": \\"37 * 91 + 12\\"}"}',
        '```json\n{"name": "calculator", "arguments": {"expression": "37 * 91 + 12"}}\n```',
        '```\n{"name": "calculator", "parameters": {"expression": "37 * 91 + 12"}}\n```',
        '{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 * 91 + 12"}}}',
    ],
)
def test_parse_tool_call_formats(text):
    call = parse_tool_call(text)
    assert call == ToolCall(name="calculator", arguments={"expression": "37 * 91 + 12"}, raw=text)


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 3379.",
        "",
        "```python\nprint(37 * 91 + 12)\n```",
        '{"answer": 3379}',
        '{"name": 3, "arguments": {}}',
        "[1, 2, 3]",
        "<tool_call>not json</tool_call>",
        "Use {curly} braces in format strings.",
    ],
)
def test_parse_tool_call_not_a_call(text):
    assert parse_tool_call(text) is None


def test_parse_tool_call_bad_arguments_kept_as_call():
    """A call whose arguments are not an object is still a call, so the model gets an error result."""
    call = parse_tool_call('{"name": "calculator", "arguments": "37 * 91"}')
    assert call is not None
    assert call.name == "calculator"
    assert call.arguments == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("  \n", True),
        ("<", True),
        ("<tool_", True),
        ("<tool_call>", True),
        ('<tool_call>\n{"name": "calcu', True),
        ("{", True),
        (' {"name": "calculator", "argu', True),
        ('{"name": "calculator", "arguments": {"expression": "1"}}', True),
        ("`", True),
        ("```", True),
        ("```js", True),
        ("```json\n{", True),
        ("```python\n", False),
        ("```\n{\"a\": 1}\n```", False),
        ('{"a": 1}', False),
        ("{x} is a set", False),
        ("Hello", False),
        ("`code`", False),
        ("<b>", False),
        ("The answer", False),
    ],
)
def test_could_be_tool_call(text, expected):
    assert could_be_tool_call(text) is expected


def test_could_be_tool_call_every_prefix_of_call():
    """Every prefix of a real call must be held back, or part of the call leaks to the client."""
    for end in range(len(QWEN_CALL) + 1):
        assert could_be_tool_call(QWEN_CALL[:end]), QWEN_CALL[:end]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (ToolCall("calculator", {"expression": "37 * 91 + 12"}, ""), "3379"),
        (ToolCall("calculator", {"expression": "0.1 + 0.2"}, ""), "0.3"),
        (ToolCall("calculator", {"expression": "10 / 3"}, ""), "3.33333333333"),
        (ToolCall("calculator", {"expression": 42}, ""), "42"),
        (ToolCall("calculator", {}, ""), "error: calculator needs a string argument 'expression', got None"),
        (ToolCall("calculator", {"expression": ["1"]}, ""),
         "error: calculator needs a string argument 'expression', got ['1']"),
        (ToolCall("calculator", {"expression": "1", "mode": "x"}, ""),
         "error: calculator got unknown arguments ['mode']; pass only {\"expression\": \"...\"}"),
        (ToolCall("calculator", {"expression": "1 / 0"}, ""), "error: division by zero"),
        (ToolCall("weather", {"city": "Paris"}, ""), "error: unknown tool 'weather'; available tools: calculator"),
    ],
)
def test_run_tool(call, expected):
    assert run_tool(call) == expected
