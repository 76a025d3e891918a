"""A tiny, safe expression language for derived columns and transforms.

Configs travel inside cell requests (a Lambda event, a Prefect parameter), so
an expression is untrusted text. It is parsed with :mod:`ast` and checked
against a whitelist -- numbers, column names, arithmetic and a handful of
numpy functions called by bare name -- and then *interpreted* by walking the
checked tree. Nothing is ever handed to ``eval`` or ``compile``: the
interpreter below can only do what its few node handlers do, so there is no
attribute access, no subscript and no import to escape through.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from magg_core.errors import InputError

FUNCTIONS: Mapping[str, tuple[Callable[..., np.ndarray], int]] = {
    "sqrt": (np.sqrt, 1),
    "exp": (np.exp, 1),
    "log": (np.log, 1),
    "log10": (np.log10, 1),
    "abs": (np.abs, 1),
    "square": (np.square, 1),
    "minimum": (np.minimum, 2),
    "maximum": (np.maximum, 2),
}
"""Callable functions by name: the numpy ufunc and how many arguments it takes."""

MAX_DEPTH = 50
"""Deepest nesting accepted; keeps the recursive checker and interpreter far
from Python's recursion limit, whatever stack depth they are called at."""

_BINARY: Mapping[type[ast.operator], Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}

_UNARY: Mapping[type[ast.unaryop], Callable[[np.ndarray], np.ndarray]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}

_DESCRIPTIONS: Mapping[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Slice: "slices",
    ast.Lambda: "lambda functions",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions",
    ast.Compare: "comparisons",
    ast.BoolOp: "boolean operators (and/or)",
    ast.IfExp: "conditional expressions",
    ast.JoinedStr: "f-strings",
    ast.NamedExpr: "assignment expressions (:=)",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.Starred: "starred arguments",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
"""Readable names for constructs users are likely to try, for error messages."""


class ExpressionError(InputError, ValueError):
    """An expression that is malformed, uses a forbidden construct, or lacks a name."""


@dataclass(frozen=True)
class Expression:
    """A validated arithmetic expression over named float64 columns.

    Build one with :meth:`parse`; the constructor trusts ``tree`` to be checked.

    Attributes
    ----------
    text
        The source text, as written in the config.
    names
        The free variable (column) names it reads; function names excluded.
    tree
        The checked syntax tree, kept so :meth:`evaluate` does not reparse.
    """

    text: str
    names: frozenset[str]
    tree: ast.expr = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> Expression:
        """Parse ``text`` and check every node against the whitelist.

        Raises
        ------
        ExpressionError
            On a syntax error, or naming the first forbidden construct found
            (and the fragment of ``text`` that contains it).
        """
        source = text.strip()  # eval mode rejects leading whitespace as an indent
        try:
            module = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(
                f"expression {_shorten(text)!r} is not valid syntax: {exc.msg}"
            ) from exc
        except (RecursionError, MemoryError) as exc:
            raise ExpressionError(f"expression {_shorten(text)!r} is nested too deeply") from exc
        names: set[str] = set()
        _check(module.body, source, names, depth=0)
        return cls(text=text, names=frozenset(names), tree=module.body)

    def evaluate(self, namespace: Mapping[str, np.ndarray | float]) -> np.ndarray:
        """Compute the expression in float64 with numpy broadcasting.

        Division by zero and the like give ``inf``/``nan`` as numpy defines
        them, silently: a derived column is data, and one bad point must not
        abort a whole cell.

        Raises
        ------
        ExpressionError
            If the expression reads a name missing from ``namespace``.
        """
        missing = sorted(self.names - set(namespace))
        if missing:
            raise ExpressionError(
                f"expression {self.text!r} needs {missing}, which are not available "
                f"(have: {sorted(namespace)})"
            )
        with np.errstate(all="ignore"):
            return np.asarray(_evaluate(self.tree, namespace), dtype=np.float64)


def _check(node: ast.expr, text: str, names: set[str], depth: int) -> None:
    """Reject anything but the whitelisted node types, collecting free names."""
    if depth > MAX_DEPTH:
        _reject(node, text, f"nesting deeper than {MAX_DEPTH} levels")
    depth += 1
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            _reject(node, text, f"constant {value!r}", "only numbers are")
        try:
            float(value)
        except OverflowError:
            _reject(node, text, f"number {value!r}", "it is too large for float64")
    elif isinstance(node, ast.Name):
        if node.id.startswith("__"):
            _reject(node, text, f"dunder name {node.id!r}")
        if node.id in FUNCTIONS:
            _reject(node, text, f"function {node.id!r} used as a value", "call it")
        names.add(node.id)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            _reject(node, text, f"operator {type(node.op).__name__}")
        _check(node.left, text, names, depth)
        _check(node.right, text, names, depth)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            _reject(node, text, f"operator {type(node.op).__name__}")
        _check(node.operand, text, names, depth)
    elif isinstance(node, ast.Call):
        _check_call(node, text, names, depth)
    else:
        what = _DESCRIPTIONS.get(type(node), type(node).__name__)
        _reject(node, text, what)


def _check_call(node: ast.Call, text: str, names: set[str], depth: int) -> None:
    allowed = f"functions callable by bare name: {', '.join(FUNCTIONS)}"
    if not isinstance(node.func, ast.Name):
        _reject(node, text, f"calling {_fragment(node.func, text)!r}", allowed)
    name = node.func.id
    if name not in FUNCTIONS:
        _reject(node, text, f"function {name!r}", allowed)
    if node.keywords:
        _reject(node, text, f"keyword arguments to {name!r}", "pass them by position")
    arity = FUNCTIONS[name][1]
    if len(node.args) != arity:
        _reject(node, text, f"{name!r} with {len(node.args)} argument(s)", f"it takes {arity}")
    for arg in node.args:
        _check(arg, text, names, depth)


def _reject(node: ast.AST, text: str, what: str, hint: str = "") -> NoReturn:
    hint = f"; {hint}" if hint else ""
    raise ExpressionError(
        f"expression {_shorten(text)!r}: {what} not allowed (in {_fragment(node, text)!r}){hint}"
    )


def _fragment(node: ast.AST, text: str) -> str:
    return _shorten(ast.get_source_segment(text, node) or "")


def _shorten(text: str, limit: int = 100) -> str:
    """Keep error messages readable when the offending text is huge."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _evaluate(node: ast.expr, namespace: Mapping[str, np.ndarray | float]) -> np.ndarray:
    """Interpret a tree that :func:`_check` accepted (no other node types occur)."""
    if isinstance(node, ast.Constant):
        return np.float64(node.value)
    if isinstance(node, ast.Name):
        return np.asarray(namespace[node.id], dtype=np.float64)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](
            _evaluate(node.left, namespace), _evaluate(node.right, namespace)
        )
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, namespace))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    function = FUNCTIONS[node.func.id][0]
    return function(*(_evaluate(arg, namespace) for arg in node.args))
