"""Tools a model may call while it reasons (DeepSeek-R1-style tool use), and the parsing of its calls.

A call is JSON between the reserved tokens, in the layout of Qwen's and Hermes' chat templates (the one TRL renders
tool calls in)::

    <tool_call>{"name": "calculator", "arguments": {"expression": "347*582"}}</tool_call>

and the runtime answers it right after, with the tool's output string::

    <tool_response>201954</tool_response>

`parse_tool_call` reads the JSON, `run_tool_call` runs it and returns the response text. Nothing here raises on
what a model writes: a malformed call, an unknown tool, bad arguments or a failing tool give an ``"error: ..."``
string, which goes back to the model inside ``<tool_response>`` like any output. Tools never use ``eval``,
``exec`` or ``compile``.

`calculator`: arithmetic on numbers, parsed with ``ast.parse(mode="eval")`` and evaluated by walking the tree here.
Accepted: int and float literals (decimal, and Python's other int forms ``0x10``, ``1_000``), unary ``+ -``,
binary ``+ - * /`` (true division), ``//`` and ``%`` (Python's floor division and modulo), ``**``, and
parentheses. Its work is bounded: at most `MAX_LENGTH` characters, `MAX_DEPTH` nested operations, exponents up to
`MAX_EXPONENT` in size, and every literal, intermediate and result within ``+-MAX_VALUE`` (1e15: floats hold every
integer up to 2**53, so an integral result prints exactly). Output: an integer result (or an integral float, ``6/2``)
prints as an integer (``"3"``); any other float as ``format(x, ".15g")``, 15 significant digits without trailing
zeros (``0.1+0.2`` -> ``"0.3"``, ``1/3`` -> ``"0.333333333333333"``, ``2**-20`` -> ``"9.5367431640625e-07"``:
scientific notation below 1e-4 only).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
from collections.abc import Callable

TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
MAX_LENGTH = 200  # characters of an expression
MAX_DEPTH = 64  # nested operations (unary and binary) of an expression; a flat sum of n terms nests n - 1
MAX_EXPONENT = 1000  # |exponent| of **
MAX_VALUE = 10**15  # |literal|, |intermediate| and |result|
MAX_CALL_LENGTH = 2000  # characters of a tool call's JSON


class _Refused(Exception):
    """An expression the calculator does not evaluate; the message is the error text (without ``"error: "``)."""


_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


def _check(x):
    """``x`` if it is a finite real within ``MAX_VALUE``; else `_Refused`."""
    if isinstance(x, complex):
        raise _Refused("complex result")
    if isinstance(x, float) and not math.isfinite(x):
        raise _Refused("result is not a finite number")
    if abs(x) > MAX_VALUE:
        raise _Refused(f"number too large (the limit is 1e{len(str(MAX_VALUE)) - 1} in size)")
    return x


def _power(a, b):
    if abs(b) > MAX_EXPONENT:
        raise _Refused(f"exponent too large (the limit is {MAX_EXPONENT} in size)")
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b * math.log10(abs(a)) > 16:
        raise _Refused(f"number too large (the limit is 1e{len(str(MAX_VALUE)) - 1} in size)")
    return a**b


def _eval(node: ast.AST, depth: int):
    if depth > MAX_DEPTH:
        raise _Refused(f"expression nested too deeply (more than {MAX_DEPTH} operations)")
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool, str, complex, bytes, None, Ellipsis
            raise _Refused(f"unsupported value {node.value!r}"[:80])
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        op = type(node.op)
        try:
            if op is ast.Add:
                v = a + b
            elif op is ast.Sub:
                v = a - b
            elif op is ast.Mult:
                v = a * b
            elif op is ast.Div:
                v = a / b
            elif op is ast.FloorDiv:
                v = a // b
            elif op is ast.Mod:
                v = a % b
            else:
                v = _power(a, b)
        except ZeroDivisionError:
            raise _Refused("division by zero") from None
        except OverflowError:
            raise _Refused(f"number too large (the limit is 1e{len(str(MAX_VALUE)) - 1} in size)") from None
        return _check(v)
    what = {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attributes", ast.Subscript: "subscripts",
            ast.Compare: "comparisons", ast.BoolOp: "and/or", ast.UnaryOp: "this unary operator"}
    kind = what.get(type(node), type(node).__name__)
    if isinstance(node, ast.BinOp):
        kind = f"the operator {type(node.op).__name__}"
    raise _Refused(f"unsupported: {kind} (only numbers, + - * / // % ** and parentheses)")


def format_number(x: int | float) -> str:
    """The calculator's output for a value: an int, or an integral float, as an integer (``"201954"``, ``-0.0`` ->
    ``"0"``); another float as ``format(x, ".15g")`` (``"0.3"``, ``"0.333333333333333"``)."""
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return str(x) if isinstance(x, int) else format(x, ".15g")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (module docstring: the grammar, the bounds and the output format):
    ``calculator("347*582")`` -> ``"201954"``. Never raises and never runs long: anything it does not evaluate
    (malformed input, names, calls, strings, non-ASCII characters, division by zero, too long, too deep, a number
    over ``MAX_VALUE``) returns ``"error: <reason>"``."""
    if not isinstance(expression, str):
        return "error: the expression must be a string"
    if len(expression) > MAX_LENGTH:
        return f"error: expression longer than {MAX_LENGTH} characters"
    if not expression.strip():
        return "error: empty expression"
    bad = next((c for c in expression if not (c.isascii() and (c.isprintable() or c in " \t"))), None)
    if bad is not None:
        return f"error: unsupported character {bad!r}"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "error: malformed expression"
    try:
        return format_number(_eval(tree.body, 0))
    except _Refused as e:
        return f"error: {e}"
    except (RecursionError, MemoryError, OverflowError, ArithmeticError, TypeError, ValueError):  # belt and braces
        return "error: cannot evaluate the expression"


TOOLS: dict[str, Callable[..., str]] = {"calculator": calculator}


def tool_call_text(name: str, arguments: dict) -> str:
    """A call as a model writes it: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (``json.dumps``'
    default separators, as in the module docstring)."""
    return f"{TOOL_CALL}{json.dumps({'name': name, 'arguments': arguments})}{END_TOOL_CALL}"


def tool_response_text(response: str) -> str:
    """``<tool_response>{response}</tool_response>``."""
    return f"{TOOL_RESPONSE}{response}{END_TOOL_RESPONSE}"


def parse_tool_call(text: str, tools: dict[str, Callable] | None = None) -> tuple[str, dict] | str:
    """``(name, arguments)`` of a tool call, or an ``"error: ..."`` string for the model.

    ``text``: the JSON between ``<tool_call>`` and ``</tool_call>`` (the tags themselves, and whitespace around,
    are allowed), ``{"name": str, "arguments": {...}}`` with exactly these two fields. ``tools``: name -> callable
    (default `TOOLS`); the name must be one of them and the arguments must fit its signature. Errors: text over
    `MAX_CALL_LENGTH` characters, not JSON, not an object, a missing or extra field, a name that is not a known
    tool, arguments that are not an object or do not fit the tool."""
    tools = TOOLS if tools is None else tools
    if not isinstance(text, str):
        return "error: the tool call must be text"
    body = text.strip()
    if body.startswith(TOOL_CALL) and body.endswith(END_TOOL_CALL):
        body = body[len(TOOL_CALL):-len(END_TOOL_CALL)].strip()
    if len(body) > MAX_CALL_LENGTH:
        return f"error: tool call longer than {MAX_CALL_LENGTH} characters"
    try:
        call = json.loads(body)
    except (ValueError, RecursionError) as e:
        why = getattr(e, "msg", "too deeply nested")
        return f"error: the tool call is not valid JSON ({why})"
    if not isinstance(call, dict):
        return 'error: the tool call must be a JSON object {"name": ..., "arguments": {...}}'
    for key in ("name", "arguments"):
        if key not in call:
            return f"error: the tool call has no {key!r} field"
    extra = [k for k in call if k not in ("name", "arguments")]
    if extra:
        return f"error: the tool call has an unexpected field {extra[0]!r}"[:200]
    name, arguments = call["name"], call["arguments"]
    if not isinstance(name, str) or name not in tools:
        known = ", ".join(tools) or "none"
        return f"error: unknown tool {name!r}; known: {known}"[:200]
    if not isinstance(arguments, dict):
        return f"error: the arguments of {name} must be a JSON object"
    try:
        inspect.signature(tools[name]).bind(**arguments)
    except TypeError as e:
        return f"error: bad arguments for {name}: {e}"[:200]
    return name, arguments


def run_tool_call(text: str, tools: dict[str, Callable] | None = None) -> str:
    """The response to a tool call (`parse_tool_call`), the text to put between ``<tool_response>`` and
    ``</tool_response>``: the tool's output as a string, or an ``"error: ..."`` string for a bad call or a tool
    that raised. Never raises (a tool's exception becomes ``"error: <tool> failed (<exception type>)"``)."""
    tools = TOOLS if tools is None else tools
    parsed = parse_tool_call(text, tools)
    if isinstance(parsed, str):
        return parsed
    name, arguments = parsed
    try:
        return str(tools[name](**arguments))
    except Exception as e:  # a tool's failure is the model's information, not the trainer's crash
        return f"error: {name} failed ({type(e).__name__})"
