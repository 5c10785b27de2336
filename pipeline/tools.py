"""Server-side tools: their specs for the chat template, tool-call parsing and execution.

Models write tool calls in several shapes. Qwen2.5 is trained on
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, but the 0.5B
model often writes the same JSON bare or inside a ```json fence, so all
three are accepted. Mistakes the model makes (unknown tool, bad arguments)
become an error string that goes back to the model as the tool result,
so run_tool does not raise for them.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from dataclasses import dataclass
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FENCE = "```"


@dataclass
class ToolCall:
    name: str
    arguments: dict
    raw: str  # the text the call was parsed from, kept for the job record


def tool_specs() -> list[dict]:
    """Return OpenAI-style function specs, the form chat templates take as `tools=`."""
    calculator = {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression exactly. Supports + - * / // % ** (or ^ for power), "
            "parentheses and the functions sqrt, abs, round, min, max."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "for example \"(37 * 91 + 12) / 4\" or \"2 ** 20\""},
            },
            "required": ["expression"],
        },
    }
    return [{"type": "function", "function": calculator}]


# ---- parsing -------------------------------------------------------------

_FENCE_BLOCK = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_decoder = json.JSONDecoder()


def parse_tool_call(text: str) -> ToolCall | None:
    """Parse a tool call from model output; return None when the text is not one.

    Accepted shapes: `<tool_call>{...}</tool_call>` anywhere in the text (the
    closing tag may be missing when generation stopped on it), or text that
    starts with a bare JSON object or a ```json fence. The object needs a
    string "name"; "arguments" (or "parameters") may be an object or a JSON
    string. The OpenAI form {"function": {"name": ..., "arguments": ...}} is
    accepted too. NOTE: only the first call is returned when the text
    contains several.
    """
    body = _tool_call_body(text)
    if body is None:
        return None
    try:
        obj, _ = _decoder.raw_decode(body.strip())
    except json.JSONDecodeError:
        return None
    return _tool_call_from_object(obj, text)


def _tool_call_body(text: str) -> str | None:
    start = text.find(TOOL_CALL_OPEN)
    if start >= 0:
        body = text[start + len(TOOL_CALL_OPEN):]
        end = body.find(TOOL_CALL_CLOSE)
        return body if end < 0 else body[:end]

    stripped = text.lstrip()
    if stripped.startswith("{"):
        return stripped
    if stripped.startswith(FENCE):
        match = _FENCE_BLOCK.match(stripped)
        return match.group(1) if match else None
    return None


def _tool_call_from_object(obj: object, raw: str) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None

    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        # Still a tool call: run_tool reports the bad arguments to the model.
        arguments = {}
    return ToolCall(name=name.strip(), arguments=arguments, raw=raw)


def could_be_tool_call(text: str) -> bool:
    """Return True while a partial answer may still turn into a tool call.

    The answer may become one while, after leading whitespace, it is a prefix
    of "<tool_call>", "{" or "```", or starts with one of them and is not yet
    settled. It is settled as prose once a fence opens with a language other
    than json, once "{" is followed by something other than a key, or once a
    complete JSON object or fenced block fails to parse as a tool call.
    """
    stripped = text.lstrip()
    if not stripped:
        return True
    if TOOL_CALL_OPEN.startswith(stripped) or stripped.startswith(TOOL_CALL_OPEN):
        return True
    if stripped.startswith("{"):
        return _is_open_or_tool_call(stripped)
    if FENCE.startswith(stripped):
        return True
    if stripped.startswith(FENCE):
        return _fence_could_be_tool_call(stripped)
    return False


def _is_open_or_tool_call(text: str) -> bool:
    after_brace = text[1:].lstrip()
    if after_brace and not after_brace.startswith('"'):
        return False  # a tool call object starts with a key; "{x}" or "{\n int" is prose or code
    try:
        _decoder.raw_decode(text)
    except json.JSONDecodeError:
        return True  # incomplete JSON: wait for more text
    return parse_tool_call(text) is not None


def _fence_could_be_tool_call(text: str) -> bool:
    first_line, newline, _ = text[len(FENCE):].partition("\n")
    if newline and first_line.strip().lower() not in ("", "json"):
        return False  # a fence for code in another language
    if _FENCE_BLOCK.match(text) is None:
        return True  # the fence is still open
    return parse_tool_call(text) is not None


# ---- execution -----------------------------------------------------------


def run_tool(call: ToolCall) -> str:
    """Run a tool call and return its result text, or an error text for the model."""
    tool = _TOOLS.get(call.name)
    if tool is None:
        log.info("tool_unknown", tool=call.name)
        return f"error: unknown tool {call.name!r}; available tools: {', '.join(sorted(_TOOLS))}"
    try:
        result = tool(call.arguments)
    except ValueError as exc:
        log.info("tool_failed", tool=call.name, error=str(exc))
        return f"error: {exc}"
    log.info("tool_finished", tool=call.name)
    return result


def _run_calculator(arguments: dict) -> str:
    unknown = sorted(set(arguments) - {"expression"})
    if unknown:
        raise ValueError(f"calculator got unknown arguments {unknown}; pass only {{\"expression\": \"...\"}}")
    expression = arguments.get("expression")
    if isinstance(expression, (int, float)) and not isinstance(expression, bool):
        expression = str(expression)
    if not isinstance(expression, str):
        raise ValueError(f"calculator needs a string argument 'expression', got {expression!r}")
    return format_number(evaluate_arithmetic(expression))


def format_number(value: int | float) -> str:
    """Format a calculator result: ints exactly, floats to 12 significant digits."""
    if isinstance(value, int):
        return str(value)
    return format(value, ".12g")


_TOOLS: dict[str, Callable[[dict], str]] = {"calculator": _run_calculator}


# ---- the calculator ------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
MAX_RESULT_BITS = 4096  # about 1233 decimal digits
MAX_EXPONENT = 10_000

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable] = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# Symbols people paste from Chinese and typeset text. "^" means power, as on
# a pocket calculator, because people and models write 2^10 for 1024 and never
# mean XOR. Rewriting it to "**" before parsing also gives it the precedence
# of a power, so 2^3+1 is 9.
_SYMBOLS = str.maketrans({"^": "**", "×": "*", "÷": "/", "（": "(", "）": ")", "−": "-", "，": ","})


def evaluate_arithmetic(expression: str) -> int | float:
    """Evaluate an arithmetic expression without eval: walk its `ast` and allow only arithmetic nodes.

    Raises ValueError naming the part that is not allowed or the limit that
    was exceeded.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression has {len(expression)} characters; the maximum is {MAX_EXPRESSION_CHARS}")
    text = expression.translate(_SYMBOLS).strip()
    if not text:
        raise ValueError("expression is empty; pass arithmetic such as \"2 * (3 + 4)\"")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"expression {expression!r} is not valid arithmetic: {exc.msg}") from exc
    except (RecursionError, MemoryError) as exc:
        raise ValueError("expression is nested too deeply") from exc
    try:
        return _check_result(_evaluate(tree.body))
    except RecursionError as exc:
        raise ValueError("expression is nested too deeply") from exc


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ValueError(f"unknown name {node.id!r}; only the constants {sorted(_CONSTANTS)} are defined")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        return _binary(node.op, _evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.Call):
        return _call(node)
    raise ValueError(f"{_describe(node)} is not allowed; use numbers, + - * / // % **, parentheses "
                     f"and the functions {sorted(_FUNCTIONS)}")


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number; the calculator accepts only int and float literals")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return value


def _binary(op: ast.operator, left: int | float, right: int | float) -> int | float:
    if isinstance(op, ast.Pow):
        _check_power(left, right)
    try:
        result = _BINARY_OPS[type(op)](left, right)
    except ZeroDivisionError as exc:
        raise ValueError("division by zero") from exc
    except OverflowError as exc:
        raise ValueError("result is too large for a float") from exc
    if isinstance(result, complex):
        raise ValueError(f"({left!r}) ** {right!r} is a complex number; the calculator returns only real numbers")
    return _check_result(result)


def _check_power(base: int | float, exponent: int | float) -> None:
    """Reject powers whose result would exceed the size limit before computing them."""
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent {exponent!r} is too large; the maximum magnitude is {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        num_bits = exponent * math.log2(abs(base))
        if num_bits > MAX_RESULT_BITS:
            raise ValueError(f"{base} ** {exponent} has about {int(num_bits * 0.30103) + 1} digits; "
                             f"the maximum is about {int(MAX_RESULT_BITS * 0.30103)}")


def _check_result(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise ValueError(f"result has more than {int(MAX_RESULT_BITS * 0.30103)} digits, the maximum")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"result is {value!r}, not a finite number")
    return value


def _call(node: ast.Call) -> int | float:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _FUNCTIONS:
        raise ValueError(f"{_describe(node.func)} is not an allowed function; use one of {sorted(_FUNCTIONS)}")
    if node.keywords:
        raise ValueError(f"{name}() takes no keyword arguments in the calculator")
    args = [_evaluate(arg) for arg in node.args]
    try:
        return _number(_FUNCTIONS[name](*args))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name}() failed on {args}: {exc}") from exc


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    if isinstance(node, ast.Attribute):
        return f"attribute access {ast.unparse(node)!r}"
    return f"{type(node).__name__} {ast.unparse(node)!r}"
