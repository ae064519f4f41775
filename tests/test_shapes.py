"""The one parser of shape expressions (vsal.runtime.shapes): what export, the manifest checks and
`vsal-export check` (vsal.export.check) ask of a dim."""

from __future__ import annotations

import pytest
from vsal.runtime.shapes import axis_names, dim_axes, evaluate, linear, polynomial, same


def test_axis_names_and_evaluate():
    assert axis_names("P+T") == {"P", "T"} and axis_names("3*S") == {"S"} and axis_names("7") == set()
    assert evaluate("2*(S+1)", {"S": 4}) == 10


@pytest.mark.parametrize("expr", ["T-1", "T**2", "f(T)", "(T", "S/2", "True", "x.y", "+".join(["1"] * 5000)])
def test_anything_but_names_integers_plus_and_times_is_a_value_error(expr):
    for read in (axis_names, polynomial, lambda e: evaluate(e, {"T": 1, "S": 1, "x": 1})):
        with pytest.raises(ValueError):
            read(expr)


def test_a_product_that_multiplies_out_past_the_bound_is_refused():
    with pytest.raises(ValueError, match="more than 1024 terms"):
        polynomial("*".join(f"(a{i}+b{i})" for i in range(11)))
    assert len(polynomial("*".join(f"(a{i}+b{i})" for i in range(10)))) == 1024


@pytest.mark.parametrize(
    ("expr", "form"),
    [("S*32", ("S", 32, 0)), ("N", ("N", 1, 0)), ("2*(T+1)", ("T", 2, 2)), ("3+0*S+S", ("S", 1, 3))],
)
def test_linear_form(expr, form):
    assert linear(expr) == form


@pytest.mark.parametrize("expr", ["P+T", "S*S", "3", "0*S"])
def test_no_linear_form_over_several_axes_higher_degrees_or_none(expr):
    assert linear(expr) is None


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("S*32", "32*S", True),
        ("P+T", "T+P", True),
        ("P + T", "P+T", True),
        ("2*(S+1)", "2*S+2", True),
        ("P+T", "P*T", False),
        ("S*32", "S*31", False),
        ("unk__3/2", "unk__3/2", True),  # no expression: the same only when spelled alike
        ("unk__3/2", "unk__3/3", False),
    ],
)
def test_same_expression(a, b, equal):
    assert same(a, b) is equal


def test_a_dim_param_that_is_no_expression_is_one_opaque_axis():
    assert dim_axes("batch_size") == {"batch_size"} and dim_axes("P+T") == {"P", "T"}
    assert dim_axes("unk__3/2") == {"unk__3/2"}
