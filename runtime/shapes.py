"""Shape expressions of the manifest ("N", "3*S", "S*32", "P+T"), shared by export and runtime.

The one parser: an expression is axis names and non-negative integers joined by + and *. Anything
else (a division, a call, an attribute, a bool) raises ValueError saying what was found.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")

# a polynomial in the axes: {monomial: coefficient}; a monomial is its sorted axis names, () the constant
Polynomial = dict[tuple[str, ...], int]
_MAX_TERMS = 1024  # a dim from an untrusted file like "(a+b)*(c+d)*..." would double per factor


def _fold(expr: str, name: Callable[[str], T], const: Callable[[int], T], add: Callable, mul: Callable) -> T:
    """Walk the expression bottom-up: leaves through `name`/`const`, operators through `add`/`mul`."""

    def walk(node: ast.AST) -> T:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return const(node.value)
        if isinstance(node, ast.Name):
            return name(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            a, b = walk(node.left), walk(node.right)
            return add(a, b) if isinstance(node.op, ast.Add) else mul(a, b)
        raise ValueError(f"unsupported shape expression {expr[:40]!r} (axis names, integers, + and * only)")

    try:
        return walk(ast.parse(expr, mode="eval").body)
    except SyntaxError:
        raise ValueError(f"{expr[:40]!r} is no expression") from None
    except RecursionError:  # an untrusted dim_param nested thousands deep
        raise ValueError(f"{expr[:40]!r}... is nested too deeply") from None


def evaluate(expr: str, sizes: Mapping[str, int]) -> int:
    """Evaluate an expression over axis sizes; KeyError for an unknown axis, ValueError for no expression."""

    def size(axis: str) -> int:
        if axis not in sizes:
            raise KeyError(f"unknown axis {axis!r} in shape {expr!r}")
        return int(sizes[axis])

    return _fold(expr, size, int, lambda a, b: a + b, lambda a, b: a * b)


def axis_names(expr: str) -> set[str]:
    """The axes an expression names ("P+T" -> {"P", "T"}); ValueError for no shape expression."""
    return _fold(expr, lambda n: {n}, lambda _: set(), set.union, set.union)


def dim_axes(dim: str) -> set[str]:
    """An ONNX dim_param's axes: those of its expression, or the whole string as one opaque axis
    when it is none (an exporter's "batch_size" is a name; "unk__3/2" names one unknown axis)."""
    try:
        return axis_names(dim)
    except ValueError:
        return {dim}


def polynomial(expr: str) -> Polynomial:
    """The expression multiplied out: "2*(S+1)" -> {("S",): 2, (): 2}; zero terms dropped."""

    def add(a: Polynomial, b: Polynomial) -> Polynomial:
        out = Counter(a)
        out.update(b)
        return {m: c for m, c in out.items() if c}

    def mul(a: Polynomial, b: Polynomial) -> Polynomial:
        out: Counter = Counter()
        for ma, ca in a.items():
            for mb, cb in b.items():
                out[tuple(sorted(ma + mb))] += ca * cb
        if len(out) > _MAX_TERMS:
            raise ValueError(f"{expr[:40]!r} multiplies out to more than {_MAX_TERMS} terms")
        return {m: c for m, c in out.items() if c}

    return _fold(expr, lambda n: {(n,): 1}, lambda v: {(): v} if v else {}, add, mul)


def linear(expr: str) -> tuple[str, int, int] | None:
    """ "S*32" -> ("S", 32, 0), "N" -> ("N", 1, 0), "2*T+1" -> ("T", 2, 1); None for a constant,
    or an expression over several axes or of higher degree ("P+T", "S*S")."""
    terms = polynomial(expr)
    axes = [m for m in terms if m]
    if len(axes) != 1 or len(axes[0]) != 1:
        return None
    return axes[0][0], terms[axes[0]], terms.get((), 0)


def same(a: str, b: str) -> bool:
    """Whether two dims are the same expression ("S*32" and "32*S" are; "P+T" and "T+P" are).
    Dims that are no expression are the same only when spelled alike (spaces aside)."""
    a, b = a.replace(" ", ""), b.replace(" ", "")
    if a == b:
        return True
    try:
        return polynomial(a) == polynomial(b)
    except ValueError:
        return False
