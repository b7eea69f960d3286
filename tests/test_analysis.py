"""Analyses: interval bounds and the diagonal band that gives closed-form KV loop bounds."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ, examples

import flashgen as fg
from flashgen import ir
from flashgen.analysis import Band, int_bounds, reads_in_range
from flashgen.ir import Op

q, kv = ir.index("q_idx"), ir.index("kv_idx")


def band(mask):
    return fg.compile(mask_mod=mask).analysis


@pytest.mark.parametrize("mask,expected,residual", [
    (fg.mods.causal, Band(None, 0), False),
    (fg.mods.sliding_window(128), Band(-127, 0), False),
    (lambda b, h, q_idx, kv_idx: kv_idx < q_idx + 5, Band(None, 4), False),
    (lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= 3, Band(-3, None), False),
    (lambda b, h, q_idx, kv_idx: kv_idx == q_idx, Band(0, 0), False),
    (fg.mods.causal & fg.mods.chunked(64), Band(None, 0), True),
    (fg.mods.prefix_lm(16), Band(), True),
    (lambda b, h, q_idx, kv_idx: 2 * q_idx >= kv_idx, Band(), True),
])
def test_band_of_library_and_affine_masks(mask, expected, residual):
    analysis = band(mask)
    assert analysis.band == expected
    has_residual = not (analysis.residual_mask.op is Op.CONST and analysis.residual_mask.arg is True)
    assert has_residual == residual


def test_band_brute_force_agrees_with_the_mask():
    # every (q, kv) the band excludes must be masked out: the kernel never visits those blocks
    for mask in (fg.mods.causal, fg.mods.sliding_window(7), lambda b, h, qi, ki: (ki <= qi + 3) & (qi - ki < 9)):
        analysis = band(mask)
        qi, ki = torch.arange(64)[:, None], torch.arange(64)[None, :]
        keep = torch.as_tensor(mask(0, 0, qi, ki))
        d = ki - qi
        lo = analysis.band.lo if analysis.band.lo is not None else -10**9
        hi = analysis.band.hi if analysis.band.hi is not None else 10**9
        assert not (keep & ((d < lo) | (d > hi))).any()


def test_int_bounds():
    assert int_bounds(q) == (0, None)
    assert int_bounds(ir.binary(Op.MOD, ir.binary(Op.SUB, q, kv), ir.const(5))) == (0, 4)
    assert int_bounds(ir.binary(Op.FLOORDIV, q, ir.const(4))) == (0, None)
    assert int_bounds(ir.binary(Op.SUB, q, kv)) == (None, None)
    assert int_bounds(ir.binary(Op.MUL, ir.const(-2), q)) == (None, 0)
    assert int_bounds(ir.binary(Op.MIN, q, ir.const(7))) == (0, 7)


def test_int_bounds_with_index_extents():
    extents = {"q_idx": (0, 9), "kv_idx": (0, 19)}
    assert int_bounds(ir.binary(Op.SUB, q, kv), extents) == (-19, 9)
    assert int_bounds(ir.binary(Op.FLOORDIV, kv, ir.const(4)), extents) == (0, 4)
    assert int_bounds(ir.index("h"), extents) == (0, None)  # not given: only non-negative


_IDS, _TABLE = torch.arange(64) // 16, torch.ones(8, dtype=torch.bool)


def _nested_read(b, h, q_idx, kv_idx):
    return _TABLE[_IDS[q_idx]]


def _roots(**mods):
    attn = fg.compile(**mods)
    return [attn.program.logits, attn.program.mask], [tuple(t.shape) for t in attn.captured]


@pytest.mark.parametrize("mods,shape,proved", [
    # a dense bias read at (0, h, q_idx, kv_idx): in range exactly when it covers the launch
    (dict(bias=torch.randn(1, 4, 16, 24)), (2, 4, 16, 24), True),
    (dict(bias=torch.randn(1, 4, 16, 24)), (2, 4, 16, 25), False),
    (dict(bias=torch.randn(1, 4, 16, 24)), (2, 5, 16, 24), False),
    # relative positions q - kv + L - 1 in [0, 2L - 2] while both lengths are at most L
    (dict(score_mod=fg.mods.relative_bias(torch.randn(2, 2 * 32 - 1))), (1, 2, 32, 32), True),
    (dict(score_mod=fg.mods.relative_bias(torch.randn(2, 2 * 32 - 1))), (1, 2, 33, 32), False),
    (dict(score_mod=fg.mods.alibi(torch.rand(4))), (3, 4, 100, 100), True),
    (dict(score_mod=fg.mods.alibi(torch.rand(4))), (3, 8, 100, 100), False),
    (dict(mask_mod=fg.mods.document(torch.arange(64) // 16)), (1, 1, 64, 64), True),
    # an index read from a tensor has no static bounds: the checks stay
    (dict(mask_mod=_nested_read), (1, 1, 64, 64), False),
])
def test_reads_in_range(mods, shape, proved):
    roots, shapes = _roots(**mods)
    assert reads_in_range(roots, shapes, *shape) is proved


@st.composite
def index_expressions(draw, depth: int = 3):
    """A random integer index expression over b, h, q_idx, kv_idx, as a function of index tensors."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        leaf = draw(st.sampled_from(("b", "h", "q_idx", "kv_idx", "const")))
        if leaf == "const":
            c = draw(st.integers(-5, 40))
            return lambda ix, c=c: c
        return lambda ix, leaf=leaf: ix[leaf]
    op = draw(st.sampled_from(("add", "sub", "mul", "floordiv", "mod", "min", "max", "abs")))
    a = draw(index_expressions(depth - 1))
    if op == "abs":
        return lambda ix: abs(a(ix))
    if op in ("mul", "floordiv", "mod"):
        c = draw(st.integers(-3, 3) if op == "mul" else st.integers(1, 7))
        return {"mul": lambda ix: a(ix) * c, "floordiv": lambda ix: a(ix) // c, "mod": lambda ix: a(ix) % c}[op]
    if op in ("min", "max"):  # with a constant bound (a traced value or a plain int)
        c = draw(st.integers(-5, 40))
        bound = {"max": c} if op == "min" else {"min": c}
        return lambda ix: (min if op == "min" else max)(a(ix), c) if isinstance(a(ix), int) \
            else torch.clamp(a(ix), **bound)
    b = draw(index_expressions(depth - 1))
    return {"add": lambda ix: a(ix) + b(ix), "sub": lambda ix: a(ix) - b(ix)}[op]


@settings(FUZZ, max_examples=examples(150))
@given(index_expressions(), st.integers(1, 80), st.integers(1, 3), st.integers(1, 4), st.integers(1, 40),
       st.integers(1, 40))
def test_reads_in_range_is_sound(expr, size, B, H, Sq, Skv):
    # whenever the launch-time proof drops the bounds masks, every index really is inside the tensor
    # (a wrong proof would read out of bounds on the GPU); checked against the indices evaluated densely
    ix = {"b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1),
          "q_idx": torch.arange(Sq).view(1, 1, Sq, 1), "kv_idx": torch.arange(Skv).view(1, 1, 1, Skv)}
    values = expr(ix)
    if isinstance(values, int):  # a constant index is checked by torch while tracing, not here
        return
    table = torch.randn(size)
    attn = fg.compile(score_mod=lambda score, b, h, q_idx, kv_idx: score + table[expr(
        {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx})])
    proved = reads_in_range([attn.program.logits, attn.program.mask], [(size,)], B, H, Sq, Skv)
    inside = bool(((values >= 0) & (values < size)).all())
    assert inside or not proved, "reads_in_range proved an index in range that is not"


def test_reads_in_range_fuzz_is_not_vacuous():
    # the property above must see proofs: plain and affine indices of a table that covers them
    table = torch.randn(64)
    for fn, proved in ((lambda q, kv: q, True), (lambda q, kv: (q + kv) // 2, True), (lambda q, kv: q - kv, False)):
        attn = fg.compile(score_mod=lambda score, b, h, q_idx, kv_idx, fn=fn: score + table[fn(q_idx, kv_idx)])
        assert reads_in_range([attn.program.logits, attn.program.mask], [(64,)], 1, 1, 40, 40) is proved


def test_floor_division_uses_the_fast_path_only_when_safe():
    # non-negative dividend and positive constant divisor: truncation equals floor, plain //
    fast = fg.compile(mask_mod=fg.mods.chunked(16)).source()
    assert re.search(r"r\d+ = q_idx // 16\n", fast) and re.search(r"t\d+ = kv_idx // 16\n", fast)
    # a dividend that can be negative needs the floor helper
    slow = fg.compile(mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) // 4 == 0).source()
    diff = re.search(r"(t\d+) = q_idx - kv_idx\n", slow)
    assert diff and f"_floordiv({diff.group(1)}, 4)" in slow


def test_row_level_code_is_hoisted_out_of_the_kv_loop():
    slopes = torch.rand(4)
    doc = torch.zeros(32, dtype=torch.long)
    attn = fg.compile(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.document(doc))
    assert "captured0[h]" in attn.explain() and "captured1[q_idx]" in attn.explain()


def test_backward_loops_compute_their_invariants_once():
    slopes = torch.rand(4)
    doc = torch.zeros(32, dtype=torch.long)
    src = fg.compile(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.document(doc)).source("bwd")
    dkdv, dq = src[src.index("def attn_bwd_dkdv("):src.index("def attn_bwd_dq(")], src[src.index("def attn_bwd_dq("):]

    def before_loop(kernel: str, loop: str, read: str) -> bool:
        """Whether a line reading ``read`` comes before the kernel's first tile loop, and none inside it."""
        head, _, body = kernel.partition(loop)
        return read in head and read not in body

    # dK/dV loops over query blocks: the slope and doc[kv_idx] are read once per KV block
    assert before_loop(dkdv, "for start_m in range", "cap0 + (h)")
    assert before_loop(dkdv, "for start_m in range", "cap1 + (kv_idx)")
    assert "cap1 + (q_idx)" in dkdv.partition("for start_m in range")[2]
    # dQ loops over KV blocks: the slope and doc[q_idx] once per query block
    assert before_loop(dq, "for start_n in range", "cap0 + (h)")
    assert before_loop(dq, "for start_n in range", "cap1 + (q_idx)")
    # the mask's lines only in partial tiles: its comparison appears once per kernel loop pair
    assert dq.count("cap1 + (kv_idx)") == 1 and dkdv.count("cap1 + (q_idx)") == 1


def test_side_reads_are_the_reads_ranged_by_one_index_alone():
    """``side_reads``: a read whose ranged index depends on q_idx alone (or kv_idx alone) has the
    same bounds for every tile of a row (column) block, so refills bound it once per block; reads
    ranged by both, or by neither, are not side reads. explain() names them."""
    from flashgen.analysis import side_reads

    doc, per_batch, table = torch.arange(64) // 8, torch.zeros(2, 64, dtype=torch.long), torch.randn(4, 127)

    def sides(fn):
        return [side for _, side in side_reads(fg.compile(mask_mod=fg.mask_mod(fn)).program.mask)]

    assert sides(lambda b, h, q, kv: doc[q] == doc[kv]) == ["q_idx", "kv_idx"]
    assert sides(lambda b, h, q, kv: (per_batch[b, q // 2] <= kv) & (kv <= q)) == ["q_idx"]
    assert sides(lambda b, h, q, kv: table[h, q - kv + 63] > 0) == []  # ranged by both
    assert sides(lambda b, h, q, kv: doc[h] > q) == []  # not ranged
    explained = fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal).explain()
    assert "bounded per block (once per refill, not per tile): captured0[q_idx], captured0[kv_idx]" in explained
