"""Diagonal reads (relative-position tables): found in the IR, read from staggered copies.

A read ``t[..., s * (q_idx - kv_idx) + c]`` is the same along each diagonal of the scores. The
kernels read it from copies whose rows run along a tile's fast axis (``runtime.staggered``,
``render._staggered``); these tests pin the analysis, the copies' contents and the kernels'
results against the float64 reference, forward and backward, for the forms a table can take.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_against_reference, rel_err, requires_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backward import check_backward

import flashgen as fg
from flashgen import ir
from flashgen.analysis import DIAGONAL_OPS, Diagonal, diagonal_of
from flashgen.codegen.render import STAGGER
from flashgen.runtime import diagonal_index, staggered

q, kv, h = ir.index("q_idx"), ir.index("kv_idx"), ir.index("h")


def _sub(a, b):
    return ir.binary(ir.Op.SUB, a, b)


def _add(a, c):
    return ir.binary(ir.Op.ADD, a, ir.const(c))


def _diff(scale=1, offset=0):
    return _add(ir.binary(ir.Op.MUL, ir.const(scale), _sub(q, kv)), offset)


bucket = ir.load(1, ir.DType.INT, [_add(ir.binary(ir.Op.MIN, ir.const(9), _sub(kv, q)), 9)])


@pytest.mark.parametrize("indices, dim", [
    ([h, _add(_sub(q, kv), 7)], 1),
    ([_add(_sub(kv, q), 3)], 0),
    ([_add(_sub(q, kv), 5), h], 0),
    ([_diff(2)], 0),
    ([h, bucket], 1),  # a bucket looked up in a tensor (T5)
    ([ir.binary(ir.Op.MUL, _sub(q, kv), _sub(q, kv))], 0),  # any integer function of the difference
    ([h, _add(q, 7)], None),  # one side only
    ([_sub(q, ir.binary(ir.Op.MUL, ir.const(2), kv))], None),  # not constant along a diagonal
    ([q, kv], None),  # a dense bias
    ([_sub(q, kv), _sub(q, kv)], None),  # two ranged indices
    ([h, _sub(_sub(q, kv), h)], None),  # varies with the head
    ([ir.unary(ir.Op.CAST, ir.unary(ir.Op.LOG, ir.to_dtype(_sub(q, kv), ir.DType.FLOAT)), "int32")], None),  # floats
])
def test_diagonal_of(indices, dim):
    d = diagonal_of(ir.load(0, ir.DType.FLOAT, indices))
    assert (d is None) if dim is None else (d == Diagonal(0, dim, indices[dim]))


def test_the_host_evaluates_every_operation_a_diagonal_index_may_use():
    from flashgen.runtime import _HOST_OPS
    assert DIAGONAL_OPS - set(_HOST_OPS) == {ir.Op.CONST, ir.Op.LOAD, ir.Op.CAST}  # (those three evaluated apart)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, -1, 2]), st.integers(-5, 90),
       st.integers(1, 3), st.booleans())
def test_staggered_copies_hold_the_diagonals(Sq, Skv, scale, offset, heads, head_first):
    n = 2 * max(Sq, Skv) + 3
    t = torch.randn(heads, n) if head_first else torch.randn(n, heads)
    d = Diagonal(0, 1 if head_first else 0, _diff(scale, offset))
    w = staggered(d, [t], diagonal_index(d, [t], Sq, Skv))
    reach = -(-max(Sq, Skv) // 16) * 16  # the columns before the view's first (x < 0)
    full = w.as_strided((*w.shape[:-1], 2 * reach), w.stride(), w.storage_offset() - reach)
    assert w.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in w.stride()[:-1]) and w.stride()[-1] == 1
    qi, ki = torch.arange(Sq)[:, None], torch.arange(Skv)[None, :]
    index = scale * (qi - ki) + offset
    inside = (index >= 0) & (index < n)
    for head in range(heads):
        row = t[head] if head_first else t[:, head]
        want = torch.where(inside, row[index.clamp(0, n - 1)], 0.0)
        # the forward's and dQ pass's reads: rows q % STAGGER, columns kv - q // STAGGER * STAGGER
        along_kv = full[0, head, qi % STAGGER, ki - qi // STAGGER * STAGGER + reach]
        # the dK/dV pass's: rows kv % STAGGER, columns q - kv // STAGGER * STAGGER
        along_q = full[1, head, ki % STAGGER, qi - ki // STAGGER * STAGGER + reach]
        assert torch.equal(along_kv, want) and torch.equal(along_q, want)


def _table_mods(table: torch.Tensor, L: int):
    return {
        "q - kv": lambda score, b, hh, qq, kk: score + table[hh, qq - kk + L - 1],
        "kv - q, table [2L-1, H]": lambda score, b, hh, qq, kk: score + table.T[kk - qq + L - 1, hh],
        "softcapped, twice": lambda score, b, hh, qq, kk: 5.0 * torch.tanh(
            (score + table[hh, qq - kk + L - 1]) / 5.0) + 0.5 * table[0, qq - kk + L - 1],
    }


@requires_interpreter
@pytest.mark.parametrize("form", ["q - kv", "kv - q, table [2L-1, H]", "softcapped, twice"])
@pytest.mark.parametrize("Sq, Skv", [(37, 21), (24, 64)])
def test_tables_forward(form, Sq, Skv):
    L = max(Sq, Skv)
    table = torch.randn(2, 2 * L - 1)
    mod = _table_mods(table, L)[form]
    args = (torch.randn(1, 2, Sq, 16), torch.randn(1, 2, Skv, 16), torch.randn(1, 2, Skv, 16))
    attn = fg.compile(score_mod=mod)
    check_against_reference(*args, mod, attn=attn)
    source = attn.source("fwd")
    assert "tl.load(diag0 + " in source and "cap0 +" not in source  # every table read comes from the copies
    assert "diagonal read of captured0" in attn.explain()


@requires_interpreter
@pytest.mark.parametrize("form", ["q - kv", "kv - q, table [2L-1, H]", "softcapped, twice"])
def test_tables_backward_and_their_gradient(form):
    Sq, Skv, L = 37, 29, 40  # ragged, and a table longer than the sequences
    table = (0.5 * torch.randn(2, 2 * L - 1)).requires_grad_()
    check_backward(torch.randn(1, 2, Sq, 16), torch.randn(1, 2, Skv, 16), torch.randn(1, 2, Skv, 16),
                   score_mod=_table_mods(table, L)[form], mask_mod=fg.mods.causal, captured=(table,))


@requires_interpreter
def test_bf16_table_and_a_new_table_value_rebuild_the_copies():
    S = 40
    table = torch.randn(2, 2 * S - 1, dtype=torch.bfloat16)
    mod = fg.mods.relative_bias(table)
    args = tuple(torch.randn(1, 2, S, 16, dtype=torch.bfloat16) for _ in range(3))
    attn = fg.compile(score_mod=mod)
    check_against_reference(*args, mod, attn=attn)
    with torch.no_grad():
        table.mul_(-3.0)  # in place: same pointer, new version
    ref = fg.attention_reference(*args, mod)
    assert rel_err(attn(*args), ref) < 2e-2


@requires_interpreter
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_forward_and_learnable_backward(bidirectional):
    table = (0.5 * torch.randn(2, 8)).requires_grad_()
    mod = fg.mods.t5_bias(table, max_distance=12, bidirectional=bidirectional)
    args = (torch.randn(1, 2, 45, 16), torch.randn(1, 2, 38, 16), torch.randn(1, 2, 38, 16))
    attn = fg.compile(score_mod=mod)
    with torch.no_grad():
        check_against_reference(*args, mod, attn=attn)
    assert "diagonal read of captured1" in attn.explain() and "cap1 +" not in attn.source("fwd")
    # the gradient's address in the dK/dV pass looks the bucket up in staggered copies as well
    assert "cap0 +" not in attn.source("bwd")
    check_backward(*args, score_mod=mod, mask_mod=fg.mods.causal, captured=(table,))


@requires_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_a_clamped_tables_gradient_accumulates_on_its_staggered_copies_then_folds(deterministic):
    L, Sq, Skv = 5, 29, 23
    table = (0.5 * torch.randn(2, 2 * L + 1)).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):  # far distances share the end entries
        return score + table[h, torch.clamp(q_idx - kv_idx, -L, L) + L]

    attn = fg.compile(score_mod=mod, mask_mod=fg.mods.causal, deterministic=deterministic)
    source = attn.source("bwd")
    assert "tl.atomic_add(gdiag0 + " in source and "gcap0 +" not in source
    # an affine index keeps one diagonal per entry: its gradient accumulates at the table's index
    assert "tl.atomic_add(gcap0 + " in fg.compile(score_mod=fg.mods.relative_bias(table)).source("bwd")
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (Sq, Skv, Skv))
    dout = torch.randn(1, 2, Sq, 16)
    got = torch.autograd.grad((attn(q, k, v) * dout).sum(), (table,))[0]
    want = torch.autograd.grad((fg.attention_reference(q.double(), k.double(), v.double(), mod, fg.mods.causal)
                                * dout.double()).sum(), (table,))[0]
    assert rel_err(got, want) < 1e-4
    if deterministic:
        again = torch.autograd.grad((attn(q, k, v) * dout).sum(), (table,))[0]
        assert torch.equal(got, again)


@pytest.mark.parametrize("table, kwargs, message", [
    (torch.randn(32), {}, "shape \\[H, num_buckets\\]"),
    (torch.randint(0, 3, (2, 32)), {}, "floating-point"),
    (torch.randn(2, 3), {}, "at least 4 buckets"),
    (torch.randn(2, 32), {"max_distance": 16}, "max_distance >= their number"),
    (torch.randn(2, 32), {"max_distance": 0}, "max_distance must be a positive int"),
])
def test_t5_bias_rejects_what_it_cannot_bucket(table, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fg.mods.t5_bias(table, **kwargs)
