"""Shape expressions of the manifest ("N", "3*S", "S*32", "P+T"), shared by export and runtime."""

from __future__ import annotations

import ast
from collections.abc import Mapping


def axis_names(expr: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}


def evaluate(expr: str, sizes: Mapping[str, int]) -> int:
    """Evaluate an expression over axis sizes (only +, *, names and ints); KeyError for an unknown axis."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in sizes:
                raise KeyError(f"unknown axis {node.id!r} in shape {expr!r}")
            return int(sizes[node.id])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            a, b = walk(node.left), walk(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported shape expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))
