"""The IR: hash-consing, stable keys, simplification, views."""

import subprocess
import sys

import networkx as nx
import pytest
import sympy as sp

from flashgen import ir
from flashgen.ir import DType, Op
from flashgen.rewrite import simplify

q, kv, h = ir.index("q_idx"), ir.index("kv_idx"), ir.index("h")


def test_hash_consing_identical_subexpressions_are_one_object():
    a = ir.binary(Op.SUB, q, kv)
    b = ir.binary(Op.SUB, ir.index("q_idx"), ir.index("kv_idx"))
    assert a is b
    assert ir.binary(Op.ADD, q, kv) is ir.binary(Op.ADD, kv, q)  # commutative ops are canonically ordered
    assert ir.binary(Op.SUB, q, kv) is not ir.binary(Op.SUB, kv, q)


def test_constants_of_different_types_do_not_alias():
    assert ir.const(1) is not ir.const(1.0)
    assert ir.const(True) is not ir.const(1)
    assert ir.const(0.0) is not ir.const(-0.0)
    assert ir.const(1).dtype is DType.INT and ir.const(1.0).dtype is DType.FLOAT


def test_nodes_are_immutable():
    with pytest.raises(AttributeError):
        q.arg = "kv_idx"


def test_key_is_stable_across_processes():
    expr = ir.binary(Op.LE, ir.binary(Op.SUB, q, kv), ir.const(3))
    code = ("from flashgen import ir; from flashgen.ir import Op; q, kv = ir.index('q_idx'), ir.index('kv_idx');"
            "print(ir.binary(Op.LE, ir.binary(Op.SUB, q, kv), ir.const(3)).key)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == expr.key


def test_simplify_folds_and_cancels():
    assert simplify(ir.binary(Op.SUB, q, q)) is ir.const(0)
    assert simplify(ir.binary(Op.ADD, ir.binary(Op.SUB, q, q), kv)) is kv
    assert simplify(ir.binary(Op.MUL, kv, ir.const(1))) is kv
    assert simplify(ir.binary(Op.ADD, ir.const(2), ir.const(3))) is ir.const(5)
    assert simplify(ir.binary(Op.FLOORDIV, ir.const(-7), ir.const(2))) is ir.const(-4)  # floor, not truncation
    assert simplify(ir.binary(Op.MOD, ir.const(-7), ir.const(3))) is ir.const(2)
    assert simplify(ir.where(ir.const(True), q, kv)) is q
    assert simplify(ir.where(ir.binary(Op.LT, q, kv), h, h)) is h
    assert simplify(ir.unary(Op.NOT, ir.unary(Op.NOT, ir.binary(Op.LT, q, kv)))) is ir.binary(Op.LT, q, kv)


def test_simplify_normalises_comparisons():
    assert simplify(ir.binary(Op.GE, q, kv)) is ir.binary(Op.LE, kv, q)
    assert simplify(ir.unary(Op.NOT, ir.binary(Op.LT, q, kv))) is ir.binary(Op.LE, kv, q)


def test_simplify_keeps_float_identities_that_nan_would_break():
    s = ir.score()
    assert simplify(ir.binary(Op.MUL, s, ir.const(0.0))) is not ir.const(0.0)
    assert simplify(ir.binary(Op.SUB, s, s)) is not ir.const(0.0)


def test_simplify_leaves_division_by_zero_to_run_time():
    expr = ir.binary(Op.FLOORDIV, ir.const(1), ir.const(0))
    assert simplify(expr) is expr


def test_networkx_view_is_the_dag():
    shared = ir.binary(Op.SUB, q, kv)
    root = ir.binary(Op.MUL, shared, shared)
    graph = ir.to_networkx([root])
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.number_of_nodes() == 4  # q, kv, q - kv (once), the product
    assert list(nx.topological_sort(graph))[-1] == root.key


def test_sympy_bridge():
    expr = ir.binary(Op.ADD, ir.binary(Op.MUL, ir.const(2), q), kv)
    qs, kvs = sp.Symbol("q_idx", integer=True, nonnegative=True), sp.Symbol("kv_idx", integer=True, nonnegative=True)
    assert sp.simplify(ir.to_sympy(expr) - (2 * qs + kvs)) == 0


def test_format_program_names_shared_subexpressions():
    shared = ir.binary(Op.SUB, q, kv)
    text = ir.format_program({"a": ir.binary(Op.MUL, shared, shared)})
    assert "t0 = (q_idx - kv_idx)" in text and "a = (t0 * t0)" in text


def test_bitwise_ops_on_floats_are_rejected():
    with pytest.raises(ir.IRError, match="float"):
        ir.binary(Op.AND, ir.score(), q)


def test_boolean_chains_are_deduplicated_and_ordered():
    a, b = ir.binary(Op.LE, kv, q), ir.binary(Op.LT, ir.binary(Op.SUB, q, kv), ir.const(8))
    left = simplify(ir.binary(Op.AND, ir.binary(Op.AND, a, b), a))
    right = simplify(ir.binary(Op.AND, b, a))
    assert left is right
