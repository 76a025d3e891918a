"""The safe expression language: what it computes and everything it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from magg_core.expressions import MAX_DEPTH, Expression, ExpressionError

H = np.array([1.5, -2.0, 4.0, 0.0], dtype=np.float32)
S = np.array([0.5, 2.0, 0.25, 8.0], dtype=np.float32)
H64, S64 = H.astype(np.float64), S.astype(np.float64)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 / s**2", 1.0 / S64**2),
        ("h + s * 2 - 1", H64 + S64 * 2 - 1),
        ("(h + s) * 2", (H64 + S64) * 2),
        ("-h", -H64),
        ("+h", H64),
        ("h // 1.5", np.floor_divide(H64, 1.5)),
        ("h % 1.5", np.mod(H64, 1.5)),
        ("2 ** 3 ** 2", np.float64(512.0)),  # right-associative, as in Python
        ("-2 ** 2", np.float64(-4.0)),  # unary minus binds looser than **
        ("sqrt(abs(h))", np.sqrt(np.abs(H64))),
        ("exp(s) + log(s + 1) + log10(s + 1)", np.exp(S64) + np.log(S64 + 1) + np.log10(S64 + 1)),
        ("square(h)", H64**2),
        ("minimum(h, s) + maximum(h, 0)", np.minimum(H64, S64) + np.maximum(H64, 0)),
        ("  1 / sqrt(s)  ", 1.0 / np.sqrt(S64)),
        ("3", np.float64(3.0)),
    ],
)
def test_accepted_expressions_evaluate_like_numpy(text, expected):
    result = Expression.parse(text).evaluate({"h": H, "s": S})
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, expected)


def test_names_are_the_free_variables_without_functions():
    expr = Expression.parse("sqrt(h_li_sigma) * weight + h_li_sigma")
    assert expr.names == frozenset({"h_li_sigma", "weight"})
    assert Expression.parse("2 * 3").names == frozenset()


def test_arithmetic_is_float64_even_for_float32_and_integer_inputs():
    # float32 would round 16777217 to 16777216; int arithmetic would floor-divide.
    result = Expression.parse("a + 1").evaluate({"a": np.array([16777216], dtype=np.float32)})
    assert result[0] == 16777217.0
    assert Expression.parse("a / 2").evaluate({"a": np.array([3], dtype=np.int32)})[0] == 1.5
    assert Expression.parse("a ** 64").evaluate({"a": 2})[()] == 2.0**64  # no int64 wrap


def test_division_by_zero_follows_numpy_silently():
    with np.testing.assert_no_warnings():
        result = Expression.parse("1 / s - 0 / s").evaluate({"s": np.array([0.0, 2.0])})
    assert np.isnan(result[0]) and result[1] == 0.5
    with np.testing.assert_no_warnings():
        assert np.isposinf(Expression.parse("1 / s").evaluate({"s": 0.0}))
        assert np.isnan(Expression.parse("log(s)").evaluate({"s": -1.0}))


def test_missing_name_is_reported():
    expr = Expression.parse("h_li * weight")
    with pytest.raises(ExpressionError, match=r"needs \['weight'\]"):
        expr.evaluate({"h_li": H})


def test_equality_and_repr_ignore_the_tree():
    a, b = Expression.parse("1 / s**2"), Expression.parse("1 / s**2")
    assert a == b and hash(a) == hash(b)
    assert "tree" not in repr(a)
    assert a != Expression.parse("1/s**2")  # the config text is the identity


def test_the_tree_is_reused_not_reparsed(monkeypatch):
    expr = Expression.parse("h + 1")
    monkeypatch.setattr("ast.parse", lambda *a, **k: pytest.fail("reparsed"))
    np.testing.assert_array_equal(expr.evaluate({"h": H}), H64 + 1)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("__import__('os').system('x')", "calling \"__import__('os').system\" not allowed"),
        ("__import__('os')", "function '__import__' not allowed"),
        ("__builtins__", "dunder name '__builtins__' not allowed"),
        ("().__class__", "attribute access not allowed"),
        ("h.__class__", "attribute access not allowed"),
        ("h.real", "attribute access not allowed"),
        ("np.sqrt(h)", "calling 'np.sqrt' not allowed"),
        ("open('f')", "function 'open' not allowed"),
        ("eval('1')", "function 'eval' not allowed"),
        ("h[0]", "subscripts not allowed"),
        ("h[0:2]", "subscripts not allowed"),
        ("lambda: 1", "lambda functions not allowed"),
        ("[x for x in h]", "comprehensions not allowed"),
        ("(x for x in h)", "generator expressions not allowed"),
        ("'a'", "constant 'a' not allowed"),
        ("b'a'", "constant b'a' not allowed"),
        ("f'{h}'", "f-strings not allowed"),
        ("True", "constant True not allowed"),
        ("None", "constant None not allowed"),
        ("1j", "constant 1j not allowed"),
        ("...", "constant Ellipsis not allowed"),
        ("sqrt(x=h)", "keyword arguments to 'sqrt' not allowed"),
        ("sqrt(*h)", "starred arguments not allowed"),
        ("sqrt(h, h)", "'sqrt' with 2 argument(s) not allowed"),
        ("minimum(h)", "'minimum' with 1 argument(s) not allowed"),
        ("sqrt", "function 'sqrt' used as a value not allowed"),
        ("sqrt(h)(1)", "calling 'sqrt(h)' not allowed"),
        ("h < 2", "comparisons not allowed"),
        ("h and s", "boolean operators"),
        ("not h", "operator Not not allowed"),
        ("~h", "operator Invert not allowed"),
        ("h @ s", "operator MatMult not allowed"),
        ("h << 1", "operator LShift not allowed"),
        ("1 if h else 2", "conditional expressions not allowed"),
        ("(y := 2)", "assignment expressions"),
        ("[h, s]", "lists not allowed"),
        ("{'a': h}", "dicts not allowed"),
        ("1" + "0" * 400, "too large for float64"),
        ("1 +", "not valid syntax"),
        ("h = 1", "not valid syntax"),
        ("import os", "not valid syntax"),
        ("1\x00", "not valid syntax"),
        ("", "not valid syntax"),
        ("1+" * (MAX_DEPTH + 1) + "1", f"nesting deeper than {MAX_DEPTH} levels"),
        ("(" * 1000 + "1" + ")" * 1000, "expression"),
    ],
)
def test_rejected_constructs_name_the_reason(text, reason):
    with pytest.raises(ExpressionError) as info:
        Expression.parse(text)
    message = str(info.value)
    assert reason in message
    assert message.startswith("expression ")


def test_rejection_points_at_the_offending_fragment():
    with pytest.raises(ExpressionError, match=r"\(in 'h\.real'\)"):
        Expression.parse("sqrt(s) + h.real * 2")


def test_huge_text_is_shortened_in_messages():
    with pytest.raises(ExpressionError) as info:
        Expression.parse("-" * 100_000 + "h")
    assert len(str(info.value)) < 400
