"""`dsfs.tools`: the calculator evaluates arithmetic by walking the tree, bounded in work and size, and answers
anything else with an error string; tool calls parse in the Qwen / Hermes layout and never raise."""

from __future__ import annotations

import time

import pytest

from dsfs import tools as T
from dsfs.tools import calculator, parse_tool_call, run_tool_call


@pytest.mark.parametrize(("expression", "want"), [
    ("347*582", "201954"),
    ("47 + 38", "85"),
    ("38-47", "-9"),
    ("5-34+12", "-17"),
    ("-(3)", "-3"),
    ("+-+3", "-3"),
    ("2*(3+4)", "14"),
    ("6/2", "3"),  # an integral float prints as an integer
    ("7/2", "3.5"),
    ("1/3", "0.333333333333333"),
    ("0.1+0.2", "0.3"),  # 15 significant digits
    ("2**0.5", "1.4142135623731"),
    ("2**-20", "9.5367431640625e-07"),
    ("7//2", "3"),
    ("-7%3", "2"),
    ("5.5%2", "1.5"),
    ("2**49", "562949953421312"),
    ("10**15", "1000000000000000"),
    ("1e15", "1000000000000000"),
    ("-0.0", "0"),
    ("0x10", "16"),
    ("1_000", "1000"),
    (" ( ( 1 ) ) ", "1"),
    ("(" * 99 + "1" + ")" * 99, "1"),  # parentheses are no operations
    ("99999*99999*99999", "999970000299999"),
    ("1+" * 64 + "1", "65"),  # 64 operations deep: the most
])
def test_calculator_values(expression, want):
    assert calculator(expression) == want


@pytest.mark.parametrize(("expression", "error"), [
    ("9**9**9**9", "exponent too large"),
    ("10**10**10", "exponent too large"),
    ("2**-1001", "exponent too large"),
    ("2**50", "number too large"),
    ("10**15+1", "number too large"),
    ("1e308*10", "number too large"),
    ("1e16/10", "number too large"),
    ("9" * 20, "number too large"),
    ("(1+", "malformed expression"),
    ("1 +* 2", "malformed expression"),
    ("007", "malformed expression"),
    ("__import__('os')", "unsupported: function calls"),
    ("abs(-1)", "unsupported: function calls"),
    ("x", "unsupported: names"),
    ("(1).real", "unsupported: attributes"),
    ("'a'*10", "unsupported value 'a'"),
    ("True+1", "unsupported value True"),
    ("1j", "unsupported value 1j"),
    ("1<2", "unsupported: comparisons"),
    ("~1", "unsupported: this unary operator"),
    ("1 if 1 else 2", "unsupported: IfExp"),
    ("[1][0]", "unsupported: subscripts"),
    ("1@2", "unsupported: the operator MatMult"),
    ("(-8)**(1/3)", "complex result"),
    ("1/0", "division by zero"),
    ("1//0", "division by zero"),
    ("1%0", "division by zero"),
    ("0**-1", "division by zero"),
    ("١٢+1", "unsupported character '١'"),  # Arabic-Indic digits
    ("１２", "unsupported character '１'"),  # full-width digits
    ("1+\n2", "unsupported character '\\n'"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("1+" * 100 + "1", "expression longer than 200 characters"),
    ("(" * 10000 + "1" + ")" * 10000, "expression longer than 200 characters"),
    ("-" * 150 + "1", "expression nested too deeply (more than 64 operations)"),
    ("1+" * 70 + "1", "expression nested too deeply"),
    ("1+" * 65 + "1", "expression nested too deeply"),
])
def test_calculator_errors(expression, error):
    t = time.perf_counter()
    out = calculator(expression)
    assert out.startswith("error: ") and error in out, out
    assert time.perf_counter() - t < 0.5  # bounded work, never a hang


def test_calculator_never_raises_on_anything():
    for x in (None, 3, b"1+1", ["1"], "\x00", "1" * 100_000, "lambda: 1", "exec('1')", "import os", "1;2", "a=1"):
        out = calculator(x)
        assert isinstance(out, str) and out.startswith("error: "), (x, out)


def test_no_eval_in_the_module():
    import inspect

    src = inspect.getsource(T)
    assert "eval(" not in src.replace("_eval(", "") and "exec(" not in src and "compile(" not in src


CALL = '{"name": "calculator", "arguments": {"expression": "347*582"}}'


def test_tool_call_text_and_parse():
    assert T.tool_call_text("calculator", {"expression": "347*582"}) == f"<tool_call>{CALL}</tool_call>"
    assert T.tool_response_text("201954") == "<tool_response>201954</tool_response>"
    assert parse_tool_call(CALL) == ("calculator", {"expression": "347*582"})
    assert parse_tool_call(f" <tool_call>{CALL}</tool_call>\n") == ("calculator", {"expression": "347*582"})
    assert run_tool_call(CALL) == "201954" and T.TOOLS == {"calculator": calculator}
    assert run_tool_call('{"name": "calculator", "arguments": {"expression": "1/0"}}') == "error: division by zero"


@pytest.mark.parametrize(("text", "error"), [
    ("nope", "not valid JSON (Expecting value)"),
    ('{"name": "calculator", "arguments": {"expression": "1"}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('"calculator"', "must be a JSON object"),
    ('{"name": "calculator"}', "has no 'arguments' field"),
    ('{"arguments": {}}', "has no 'name' field"),
    ('{"name": "calculator", "arguments": {"expression": "1"}, "id": 7}', "unexpected field 'id'"),
    ('{"name": "python", "arguments": {"code": "1"}}', "unknown tool 'python'; known: calculator"),
    ('{"name": 3, "arguments": {}}', "unknown tool 3"),
    ('{"name": "calculator", "arguments": ["1+1"]}', "arguments of calculator must be a JSON object"),
    ('{"name": "calculator", "arguments": {"expr": "1"}}', "bad arguments for calculator: missing a required "
                                                           "argument: 'expression'"),
    ('{"name": "calculator", "arguments": {"expression": "1", "x": 2}}', "unexpected keyword argument 'x'"),
    ("[" * 100_000, "longer than 2000 characters"),
    ("[" * 1500 + "]" * 1500, "longer than 2000 characters"),
    ("[" * 900 + "]" * 900, "must be a JSON object"),
])
def test_bad_tool_calls_are_error_strings(text, error):
    got = parse_tool_call(text)
    assert isinstance(got, str) and got.startswith("error: ") and error in got, got
    assert run_tool_call(text) == got


def test_run_tool_call_catches_a_failing_tool():
    def broken(expression: str) -> str:
        raise KeyError(expression)

    tools = {"calculator": broken}
    assert run_tool_call(CALL, tools) == "error: calculator failed (KeyError)"
    assert run_tool_call('{"name": "calculator", "arguments": {"expression": 5}}') == \
        "error: the expression must be a string"
    assert run_tool_call(None) == "error: the tool call must be text"
