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


# ---------------------------------------------------------------------------------------------
# lowering rules (codegen's rewrites for the GPU: same values, fewer per-entry instructions)

def _lowered(node):
    from flashgen.rewrite import LOWERING_RULES, RULES

    return simplify(node, RULES + LOWERING_RULES)


def _eval32(node, env):
    """float32 / int64 numpy evaluation of the IR subset these tests use, as a kernel computes it."""
    import numpy as np

    if node.op is Op.CONST:
        return np.float32(node.arg) if node.dtype is DType.FLOAT else np.int64(node.arg)
    if node.op in (Op.INDEX, Op.SCORE):
        return env["score" if node.op is Op.SCORE else node.arg]
    if node.op is Op.LOAD:  # (a per-head value: its indices are not evaluated)
        return env[f"cap{node.arg}"]
    x = [_eval32(c, env) for c in node.src]
    if node.dtype is DType.FLOAT:
        x = [np.asarray(v).astype(np.float32) for v in x]
    out = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
           Op.POW: lambda a, b: a ** b, Op.NEG: lambda a: -a, Op.CAST: lambda a: a}[node.op](*x)
    return np.asarray(out).astype(np.float32 if node.dtype is DType.FLOAT else np.int64)


def test_index_differences_are_converted_to_float_at_their_operands():
    import numpy as np

    d = ir.binary(Op.SUB, kv, q)
    alibi = ir.binary(Op.MUL, ir.const(0.375), d)  # (next to the score, see the tile-origin test)
    gauss = ir.binary(Op.MUL, ir.const(-0.01), ir.binary(Op.POW, ir.binary(Op.SUB, q, kv), ir.const(2)))
    for expr in (alibi, gauss):
        low = _lowered(expr)
        converted = [n.src[0] for n in low.toposort() if n.op is Op.CAST]
        assert sorted(n.arg for n in converted) == ["kv_idx", "q_idx"]  # vectors, never a whole tile
        assert all(n.op is Op.INDEX for n in converted)
        # bitwise the same float32 values for indices below 2**24 (gauss's square rounds once either way)
        rng = np.random.default_rng(0)
        env = {"q_idx": rng.integers(0, 2**24, (64, 1)), "kv_idx": rng.integers(0, 2**24, (1, 64)),
               "score": rng.standard_normal((64, 64)).astype(np.float32)}
        if expr is gauss:
            env["kv_idx"] = env["q_idx"].T + rng.integers(-40000, 40000, (1, 64))  # d**2 inside int32
        assert np.array_equal(_eval32(low, env), _eval32(expr, env))
    # a conversion that cannot move to vectors is left to the kernel's promotion
    table_like = ir.binary(Op.MUL, ir.const(0.5), ir.binary(Op.MUL, q, kv))
    assert _lowered(table_like) is table_like


def test_index_differences_next_to_the_score_are_measured_from_the_tile_origin():
    import numpy as np

    from flashgen.ir import TILE_ORIGIN

    s, slope = ir.score(), ir.load(0, DType.FLOAT, [h])
    for alibi in (ir.binary(Op.ADD, s, ir.binary(Op.MUL, slope, ir.binary(Op.SUB, kv, q))),
                  ir.binary(Op.SUB, s, ir.binary(Op.MUL, ir.binary(Op.SUB, q, kv), slope))):
        low = _lowered(alibi)
        # (score + slope * float(kv - o)) - slope * float(q - o): a column and a row term
        assert low.op is Op.SUB and ir.depends_on(low.src[0], "score")
        assert not ir.depends_on(low.src[1], "kv_idx") and not ir.depends_on(low.src[1], "score")
        casts = [n.src[0] for n in low.toposort() if n.op is Op.CAST]
        assert all(c.op is Op.SUB and c.src[1] is ir.index(TILE_ORIGIN) for c in casts) and len(casts) == 2
        rng = np.random.default_rng(1)
        origin = np.int64(3_000_000)  # long sequences: q and kv near the origin, the diagonal's weights
        env = {"q_idx": origin + rng.integers(0, 128, (128, 1)), "kv_idx": origin + rng.integers(0, 64, (1, 64)),
               "score": rng.standard_normal((128, 64)).astype(np.float32), TILE_ORIGIN: origin}
        exact = env["score"].astype(np.float64) + 0.7 * (env["kv_idx"] - env["q_idx"]).astype(np.float64)
        err = np.abs(_eval32(low, {**env, "cap0": np.float32(0.7)}) - exact).max()
        assert err < 1e-5 * np.abs(exact).max(), err  # not ulp(0.7 * 3e6) ~ 0.25: no cancellation


def test_constants_fold_into_the_score_and_out_of_gradients():
    from flashgen.rewrite import times

    s = ir.score()
    slope = ir.load(0, DType.FLOAT, [h])  # slopes[h]
    alibi = ir.binary(Op.ADD, s, ir.binary(Op.MUL, slope, ir.binary(Op.SUB, kv, q)))
    scaled = _lowered(times(alibi, 2.0))
    # 2 * (score + slope * d) == score * 2 + (slope * 2) * d: the factor meets the score and the
    # head's slope, never the whole tile
    assert ir.binary(Op.MUL, s, ir.const(2.0)) in set(scaled.toposort())
    assert ir.binary(Op.MUL, slope, ir.const(2.0)) in set(scaled.toposort())
    assert not any(n.op is Op.MUL and n.src[1] is ir.const(2.0) and n.src[0].op is Op.ADD for n in scaled.toposort())
    # a soft-cap's gradient 30 * (1 - t*t) / 30: the constants cancel, the division goes
    t = ir.unary(Op.TANH, ir.binary(Op.TRUEDIV, s, ir.const(30.0)))
    dscore = ir.binary(Op.TRUEDIV, ir.binary(Op.MUL, ir.const(30.0), ir.binary(Op.SUB, ir.const(1.0),
                                                                                 ir.binary(Op.MUL, t, t))),
                       ir.const(30.0))
    low_t = _lowered(t)
    assert _lowered(dscore) is ir.binary(Op.SUB, ir.const(1.0), ir.binary(Op.MUL, low_t, low_t))
    assert not any(n.op is Op.TRUEDIV for n in _lowered(dscore).toposort())


def test_a_factor_is_pushed_only_where_it_costs_no_per_entry_multiply():
    from flashgen.rewrite import times

    s = ir.score()
    read = ir.load(0, DType.FLOAT, [ir.binary(Op.SUB, q, kv)])  # table[q - kv]: a per-entry value
    rel = ir.binary(Op.ADD, s, read)
    # pushing would multiply the read too (two products per entry instead of one): kept whole
    assert times(rel, 2.0) is ir.binary(Op.MUL, rel, ir.const(2.0))
    capped = ir.binary(Op.MUL, ir.const(30.0), ir.unary(Op.TANH, s))
    assert times(capped, 2.0) is ir.binary(Op.MUL, ir.const(60.0), ir.unary(Op.TANH, s))


def test_constant_folds_stay_inside_float32():
    s = ir.score()
    assert _lowered(ir.binary(Op.TRUEDIV, s, ir.const(4.0))) is ir.binary(Op.MUL, s, ir.const(0.25))
    for c in (1e39, 1e-39, 0.0, float("inf")):  # 1/c or c itself outside float32's normal range: kept
        expr = ir.binary(Op.TRUEDIV, s, ir.const(c))
        assert _lowered(expr).op is Op.TRUEDIV, c
    big = ir.binary(Op.MUL, ir.const(1e30), ir.binary(Op.MUL, ir.const(1e30), s))
    assert _lowered(big) is big  # 1e60 would overflow float32


def test_a_factor_meets_a_row_term_at_its_per_head_factor():
    from flashgen.ir import TILE_ORIGIN
    from flashgen.rewrite import times

    slope = ir.load(0, DType.FLOAT, [h])
    row = ir.unary(Op.CAST, ir.binary(Op.SUB, q, ir.index(TILE_ORIGIN)), "float32")
    # c * (slope * row): the factor joins slopes[h] (once per head), not the row vector
    assert times(ir.binary(Op.MUL, slope, row), 2.0) is ir.binary(Op.MUL, ir.binary(Op.MUL, slope, ir.const(2.0)), row)
    # a product of two row vectors has no per-head factor: multiplied whole
    both = ir.binary(Op.MUL, row, row)
    assert times(both, 2.0) is ir.binary(Op.MUL, both, ir.const(2.0))
