"""Block sparsity (flashgen/blocks.py): the per-tile classification of masks, against a dense
brute-force oracle, and the kernels that visit tiles through the block map's runs.

Invariants:
- never wrong: a tile reported EMPTY has no visible in-range entry, a tile reported FULL has no
  masked in-range entry (padding past Sq / Skv never counts); PARTIAL is always allowed;
- exact where interval arithmetic is exact: single affine inequalities (every index variable used
  once), ``q // c == kv // c``, the library's band / prefix / chunk masks, lookups of sorted
  document ids on 16-aligned tiles;
- the runs (and the hulls) the kernels read describe the same map; cached maps follow in-place changes of the
  captured tensors; kernels reading them match the float64 reference, forward and backward.
"""

from __future__ import annotations

import time

import pytest
import torch
from helpers import check_against_reference, rel_err, requires_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ, examples

import flashgen as fg
from flashgen import blocks, maps
from flashgen.codegen.render import render_block_map
from flashgen.runtime import default_backward_configs

EMPTY, PARTIAL, FULL = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# the oracle


def oracle(mask_mod, B, H, Sq, Skv, block_size):
    """Exact tile states [B, H, nq, nk] from the mask evaluated densely, as eager PyTorch does."""
    bq, bk = block_size
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q_idx = torch.arange(Sq).view(1, 1, Sq, 1)
    kv_idx = torch.arange(Skv).view(1, 1, 1, Skv)
    dense = torch.as_tensor(mask_mod(b, h, q_idx, kv_idx)).to(torch.bool).expand(B, H, Sq, Skv)
    nq, nk = -(-Sq // bq), -(-Skv // bk)
    pad = (0, nk * bk - Skv, 0, nq * bq - Sq)
    # padding is True for "all visible" and False for "any visible": it never decides a tile
    every = torch.nn.functional.pad(dense, pad, value=True).view(B, H, nq, bq, nk, bk).all(5).all(3)
    some = torch.nn.functional.pad(dense, pad, value=False).view(B, H, nq, bq, nk, bk).any(5).any(3)
    return torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.uint8)


def analyse(mask_mod, B, H, Sq, Skv, block_size):
    """(BlockMask, its state broadcast to [B, H, nq, nk], the oracle's states)."""
    bm = fg.block_mask(mask_mod, B, H, Sq, Skv, block_size=block_size)
    truth = oracle(mask_mod, B, H, Sq, Skv, block_size)
    state = bm.state
    assert state.dtype == torch.uint8
    assert state.shape[0] in (1, B) and state.shape[1] in (1, H) and state.shape[2:] == truth.shape[2:]
    return bm, state.expand(B, H, -1, -1), truth


def assert_never_wrong(state, truth, what=""):
    false_empty = (state == EMPTY) & (truth != EMPTY)
    false_full = (state == FULL) & (truth != FULL)
    assert not false_empty.any(), f"{what}: tiles reported EMPTY with visible entries at {false_empty.nonzero()[:5]}"
    assert not false_full.any(), f"{what}: tiles reported FULL with masked entries at {false_full.nonzero()[:5]}"


def decode_runs(runs, rows, cols):
    """The dense [nb, nh, rows, cols] map the kernel metadata describes (each tile at most once)."""
    nb, nh = runs.shape[:2]
    out = torch.zeros(nb, nh, rows, cols, dtype=torch.uint8)
    for b in range(nb):
        for h in range(nh):
            for r in range(rows):
                for kind, state in ((0, PARTIAL), (1, FULL)):
                    entry = runs[b, h, r, kind].tolist()
                    for i in range(entry[0]):
                        start, end = entry[1 + 2 * i], entry[2 + 2 * i]
                        assert 0 <= start < end <= cols, f"run [{start}, {end}) outside {cols} blocks"
                        assert (out[b, h, r, start:end] == EMPTY).all(), "runs overlap"
                        out[b, h, r, start:end] = state
    return out


def dense_hulls(state):
    """The hulls (``blocks.hulls``) of a dense [nb, nh, rows, cols] map, from its states directly."""
    cols = torch.arange(state.shape[-1])
    seen, full = state != EMPTY, state == FULL
    none = torch.full_like(cols, 1 << 30)
    fields = [torch.where(seen, cols, none).amin(-1), torch.where(seen, cols, -1).amax(-1),
              torch.where(full, cols, none).amin(-1), torch.where(full, cols, -1).amax(-1), full.sum(-1)]
    return torch.stack(fields + [torch.zeros_like(fields[0])] * 3, -1).to(torch.int32)


def assert_runs_match(bm):
    """Forward runs (with the ragged last KV block listed as partial) and transposed runs (dK/dV
    pass) encode exactly bm.state; so do its hulls, both ways."""
    state = bm.state
    nq, nk = state.shape[2:]
    ragged = bm.shape[3] % bm.block_size[1] != 0
    want = state.clone()
    if ragged:
        last = want[..., -1]
        last[last == FULL] = PARTIAL
    assert torch.equal(decode_runs(bm.runs(ragged_last=ragged).cpu(), nq, nk), want)
    assert torch.equal(decode_runs(bm.runs(transpose=True).cpu(), nk, nq), state.transpose(2, 3))
    assert torch.equal(bm.hulls().cpu(), dense_hulls(state))
    assert torch.equal(bm.hulls(transpose=True).cpu(), dense_hulls(state.transpose(2, 3)))


def counts_of(state):
    return {name: int((state == s).sum()) for s, name in ((EMPTY, "empty"), (PARTIAL, "partial"), (FULL, "full"))}


# ---------------------------------------------------------------------------------------------
# 1. literal maps of the library masks (derived by hand; the oracle agrees)


DOC80 = [0] * 20 + [1] * 44 + [2] * 16

LITERALS = {
    # name: (mask, Sq, Skv, block, expected map)
    "causal": (lambda: fg.mods.causal, 64, 64, (16, 16),
               [[1, 0, 0, 0],
                [2, 1, 0, 0],
                [2, 2, 1, 0],
                [2, 2, 2, 1]]),
    # 0 <= q - kv < 40: tile (i, j) spans q - kv in [16(i-j) - 15, 16(i-j) + 15]
    "sliding_window": (lambda: fg.mods.sliding_window(40), 64, 64, (16, 16),
                       [[1, 0, 0, 0],
                        [2, 1, 0, 0],
                        [1, 2, 1, 0],
                        [1, 1, 2, 1]]),
    # kv < 20 or q >= kv: the first KV block is all prefix, the second only partly
    "prefix_lm": (lambda: fg.mods.prefix_lm(20), 64, 64, (16, 16),
                  [[2, 1, 0, 0],
                   [2, 1, 0, 0],
                   [2, 2, 1, 0],
                   [2, 2, 2, 1]]),
    # chunks 0..23, 24..47, 48..63 over blocks 0..15 | 16..31 | 32..47 | 48..63
    "chunked": (lambda: fg.mods.chunked(24), 64, 64, (16, 16),
                [[2, 1, 0, 0],
                 [1, 1, 1, 0],
                 [0, 1, 2, 0],
                 [0, 0, 0, 2]]),
    # documents 0..19, 20..63, 64..79, causal: (3, 2) lies inside document 1 below the diagonal
    "causal_document": (lambda: fg.mods.causal & fg.mods.document(torch.tensor(DOC80)), 80, 80, (16, 16),
                        [[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 1, 2, 1, 0],
                         [0, 0, 0, 0, 1]]),
    # ragged: q blocks 0..15 | 16..31 | 32..47 | 48..49, KV blocks 0..15 | 16..31 | 32..39
    "causal_ragged": (lambda: fg.mods.causal, 50, 40, (16, 16),
                      [[1, 0, 0],
                       [2, 1, 0],
                       [2, 2, 1],
                       [2, 2, 2]]),
    "sliding_window_ragged": (lambda: fg.mods.sliding_window(20), 50, 40, (16, 16),
                              [[1, 0, 0],
                               [1, 1, 0],
                               [1, 1, 1],
                               [0, 1, 2]]),
    "prefix_lm_ragged": (lambda: fg.mods.prefix_lm(20), 50, 40, (16, 16),
                         [[2, 1, 0],
                          [2, 1, 0],
                          [2, 2, 1],
                          [2, 2, 2]]),
    # padding keys 40..47 would be in chunk 1: they must not make the last column partial
    "chunked_ragged_kv": (lambda: fg.mods.chunked(40), 50, 40, (16, 16),
                          [[2, 2, 2],
                           [2, 2, 2],
                           [1, 1, 1],
                           [0, 0, 0]]),
    # padding queries 40..47 would be in chunk 1: they must not make the last row partial
    "chunked_ragged_q": (lambda: fg.mods.chunked(40), 40, 50, (16, 16),
                         [[2, 2, 1, 0],
                          [2, 2, 1, 0],
                          [2, 2, 1, 0]]),
}


@pytest.mark.parametrize("name", list(LITERALS))
def test_library_mask_literal_maps(name):
    make, Sq, Skv, block, expected = LITERALS[name]
    mask = make()
    bm = fg.block_mask(mask, 1, 1, Sq, Skv, block_size=block)
    want = torch.tensor(expected, dtype=torch.uint8)[None, None]
    assert torch.equal(oracle(mask, 1, 1, Sq, Skv, block), want), "the literal disagrees with the oracle"
    assert torch.equal(bm.state, want), f"\n{bm.state[0, 0]}\n!=\n{want[0, 0]}"
    assert bm.counts() == counts_of(want)
    assert bm.method == ("runtime" if "document" in name else "static")
    assert_runs_match(bm)


EXACT_SHAPES = [(64, 64, (16, 16)), (50, 40, (16, 16)), (45, 70, (16, 32)), (100, 37, (8, 16)), (33, 97, (7, 5)),
                (1, 90, (1, 16)), (90, 1, (32, 1)), (130, 130, (128, 128)), (64, 64, (1, 1))]


@pytest.mark.parametrize("name, mask", [
    ("causal", fg.mods.causal), ("not_causal", ~fg.mods.causal), ("sliding_window(9)", fg.mods.sliding_window(9)),
    ("sliding_window(40)", fg.mods.sliding_window(40)), ("prefix_lm(20)", fg.mods.prefix_lm(20)),
    ("prefix_lm(1)", fg.mods.prefix_lm(1)), ("chunked(24)", fg.mods.chunked(24)), ("chunked(1)", fg.mods.chunked(1)),
    ("chunked(7)", fg.mods.chunked(7)),
])
def test_static_library_masks_are_exact(name, mask):
    """Single band / prefix / chunk masks: every variable occurs once per comparison, the tile's
    index ranges are contiguous, so interval bounds are attained: no conservative tile."""
    for Sq, Skv, block in EXACT_SHAPES:
        bm, state, truth = analyse(mask, 1, 1, Sq, Skv, block)
        assert bm.method == "static"
        assert torch.equal(state, truth), f"{name} at {Sq}x{Skv}, blocks {block}: not exact"
        assert bm.state.shape[:2] == (1, 1), "the map of a mask that ignores b and h has size-1 dims"


def test_band_masks_read_no_metadata_others_do():
    for mask in (fg.mods.causal, fg.mods.sliding_window(16)):
        assert fg.block_mask(mask, 2, 3, 100, 100, block_size=(16, 16)).nbytes == 0
    for mask in (fg.mods.prefix_lm(20), fg.mods.chunked(24), fg.mods.causal & fg.mods.chunked(24)):
        bm = fg.block_mask(mask, 2, 3, 100, 100, block_size=(16, 16))
        assert 0 < bm.nbytes < 10_000


# ---------------------------------------------------------------------------------------------
# 2. random static masks (hypothesis)


COMPARE = ["<", "<=", ">", ">=", "==", "!="]
INEQUALITY = ["<", "<=", ">", ">="]


def _affine(a, c, d, extra="", e=0):
    terms = [f"{a} * q_idx" if a else "", f"{c} * kv_idx" if c else "", f"{e} * {extra}" if extra and e else ""]
    return " + ".join([t for t in terms if t] + [str(d)])


@st.composite
def affine_inequalities(draw, ops=INEQUALITY):
    """``a*q_idx + c*kv_idx + e*(h or b) + d  op  0`` with at least one index coefficient."""
    a, c = draw(st.integers(-3, 3)), draw(st.integers(-3, 3))
    if a == 0 and c == 0:
        c = draw(st.sampled_from([-1, 1]))
    extra = draw(st.sampled_from(["", "h", "b"]))
    e = draw(st.integers(-8, 8)) if extra else 0
    return f"({_affine(a, c, draw(st.integers(-40, 40)), extra, e)} {draw(st.sampled_from(ops))} 0)"


@st.composite
def band_atoms(draw):
    """One index variable on each side (causal, windows, head-dependent windows)."""
    lhs, rhs = draw(st.sampled_from([("q_idx", "kv_idx"), ("kv_idx", "q_idx")]))
    shift = draw(st.sampled_from(["", " + h * {w}", " - h * {w}", " + b * {w}"])).format(w=draw(st.integers(1, 9)))
    return f"({lhs} {draw(st.sampled_from(COMPARE))} {rhs} + {draw(st.integers(-30, 30))}{shift})"


@st.composite
def chunk_atoms(draw):
    c = draw(st.integers(1, 24))
    return f"(q_idx // {c} == kv_idx // {c})"


@st.composite
def division_atoms(draw):
    kind = draw(st.integers(0, 2))
    m = draw(st.integers(1, 6))
    if kind == 0:
        return f"((kv_idx - q_idx) % {m} == {draw(st.integers(0, m - 1))})"
    if kind == 1:
        return f"(q_idx % {m} {draw(st.sampled_from(COMPARE))} kv_idx % {m})"
    a, c = draw(st.integers(-3, 3)), draw(st.integers(1, 3))
    expr = _affine(a, c, draw(st.integers(-20, 20)))
    return f"(({expr}) // {draw(st.integers(1, 20))} {draw(st.sampled_from(COMPARE))} {draw(st.integers(-4, 4))})"


STATIC_ATOMS = st.one_of(affine_inequalities(COMPARE), band_atoms(), chunk_atoms(), division_atoms())


def combined(atoms, max_leaves=5):
    return st.recursive(atoms, lambda child: st.one_of(
        child.map(lambda x: f"(~{x})"),
        st.tuples(child, st.sampled_from(["&", "|", "^"]), child).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    ), max_leaves=max_leaves)


BLOCKS = st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32])
SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 80), st.integers(1, 80), BLOCKS, BLOCKS)
LONG_BLOCKS = st.sampled_from([1, 3, 5, 8, 16, 32, 48, 64])
LONG_SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 160), st.integers(1, 160), LONG_BLOCKS,
                        LONG_BLOCKS)


def mask_from(src, namespace=None):
    return eval(f"lambda b, h, q_idx, kv_idx: {src}", {"torch": torch, **(namespace or {})})


@settings(FUZZ, max_examples=examples(150))
@given(src=combined(STATIC_ATOMS), shape=SHAPES)
def test_random_static_masks_never_wrong(src, shape):
    B, H, Sq, Skv, bq, bk = shape
    mask = mask_from(src)
    bm, state, truth = analyse(mask, B, H, Sq, Skv, (bq, bk))
    assert bm.method == "static"
    assert_never_wrong(state, truth, src)
    assert bm.counts() == counts_of(bm.state)
    assert_runs_match(bm)


@settings(FUZZ, max_examples=examples(100))
@given(src=st.one_of(affine_inequalities(), band_atoms().filter(lambda s: "==" not in s and "!=" not in s),
                     chunk_atoms()),
       shape=SHAPES)
def test_single_affine_inequalities_are_exact(src, shape):
    """Interval arithmetic is exact on expressions that use each variable once: the range of
    ``a*q + c*kv + e*h + d`` over a tile is attained, so an inequality is decided exactly; so is
    ``q // c == kv // c`` (floor is monotone and the tile's chunk ranges are contiguous)."""
    B, H, Sq, Skv, bq, bk = shape
    bm, state, truth = analyse(mask_from(src), B, H, Sq, Skv, (bq, bk))
    assert torch.equal(state, truth), f"{src}: {int((state != truth).sum())} conservative tiles"


# ---------------------------------------------------------------------------------------------
# 3. masks that read captured tensors


def sorted_doc_ids(S, ndocs, generator):
    cuts = torch.randperm(S - 1, generator=generator)[: ndocs - 1] + 1
    ids = torch.zeros(S, dtype=torch.long)
    ids[cuts] = 1
    return ids.cumsum(0)


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 48), (5, 7), (64, 64)])
def test_document_masks_sorted_ids(block):
    g = torch.Generator().manual_seed(1)
    S = 150
    doc = sorted_doc_ids(S, 5, g)
    doc2 = torch.stack([sorted_doc_ids(S, 3, g), sorted_doc_ids(S, 7, g)])
    for mask, B, batched in [(fg.mods.document(doc), 2, False), (fg.mods.causal & fg.mods.document(doc), 2, False),
                             (fg.mods.document(doc2), 2, True), (fg.mods.causal & fg.mods.document(doc2), 2, True)]:
        bm, state, truth = analyse(mask, B, 2, S, S, block)
        assert bm.method == "runtime"
        assert bm.state.shape[:2] == ((2, 1) if batched else (1, 1))
        assert_never_wrong(state, truth, f"document {block}")
        assert_runs_match(bm)
    # sorted ids, tiles aligned to the 16-position range summaries: a pure document mask is exact
    if block[0] % 16 == 0 and block[1] % 16 == 0:
        for mask, B in [(fg.mods.document(doc), 1), (fg.mods.document(doc2), 2)]:
            bm, state, truth = analyse(mask, B, 1, S, S, block)
            assert torch.equal(state, truth)


def test_document_mask_per_batch_ids_differ_per_batch():
    doc2 = torch.tensor([[0] * 32 + [1] * 32, [0] * 64])
    bm, state, truth = analyse(fg.mods.document(doc2), 2, 1, 64, 64, (32, 32))
    assert bm.state[0, 0].tolist() == [[2, 0], [0, 2]]
    assert bm.state[1, 0].tolist() == [[2, 2], [2, 2]]
    assert torch.equal(state, truth)


def test_unsorted_ids_never_wrong():
    g = torch.Generator().manual_seed(2)
    for S, ndocs, block in [(100, 3, (16, 16)), (77, 2, (8, 32)), (128, 5, (4, 4))]:
        doc = torch.randint(0, ndocs, (S,), generator=g)
        doc[40:56] = 9  # one contiguous run, so some tiles are decidable
        doc2 = torch.randint(0, ndocs, (2, S), generator=g)
        for mask, B in [(fg.mods.document(doc), 1), (fg.mods.causal & fg.mods.document(doc), 1),
                        (fg.mods.document(doc2), 2), (~fg.mods.document(doc) | fg.mods.causal, 1)]:
            bm, state, truth = analyse(mask, B, 1, S, S, block)
            assert bm.method == "runtime"
            assert_never_wrong(state, truth, f"unsorted ids S={S}")
            assert_runs_match(bm)


def test_bool_and_float_captured_tensors():
    g = torch.Generator().manual_seed(3)
    S = 96
    keep = torch.rand(S, generator=g) < 0.5
    keep[16:32], keep[32:48] = False, True
    scores = torch.rand(S, generator=g)
    scores[0:16], scores[16:32] = 0.9, 0.1

    def keep_kv(b, h, q_idx, kv_idx):
        return keep[kv_idx]

    def score_rows(b, h, q_idx, kv_idx):
        return scores[q_idx] > 0.3

    bm, state, truth = analyse(keep_kv, 1, 1, S, S, (16, 16))
    assert bm.method == "runtime"
    assert_never_wrong(state, truth, "keep[kv_idx]")
    # 16-aligned ranges of a lookup are bounded exactly: an all-False column is skipped, an all-True one full
    assert (bm.state[0, 0, :, 1] == EMPTY).all() and (bm.state[0, 0, :, 2] == FULL).all()

    bm, state, truth = analyse(score_rows, 1, 1, S, S, (16, 16))
    assert bm.method == "runtime"
    assert_never_wrong(state, truth, "scores[q_idx] > 0.3")
    assert (bm.state[0, 0, 0] == FULL).all() and (bm.state[0, 0, 1] == EMPTY).all()

    for mask in (lambda b, h, q_idx, kv_idx: keep[kv_idx] & (scores[q_idx] > 0.3) & (q_idx >= kv_idx),
                 lambda b, h, q_idx, kv_idx: keep[q_idx] | (scores[kv_idx] * 2.0 < scores[q_idx]),
                 lambda b, h, q_idx, kv_idx: torch.where(keep[q_idx], scores[kv_idx], 0.5) >= 0.25):
        for block in [(16, 16), (8, 24), (3, 5)]:
            bm, state, truth = analyse(mask, 1, 1, S, S, block)
            assert bm.method == "runtime"
            assert_never_wrong(state, truth, f"captured bool/float, blocks {block}")


def test_float_comparison_at_the_threshold_is_not_decided():
    """fp32 0.3 is 0.30000001192... in float64: a float64-only analysis would call
    ``scores > 0.3`` always true, but eager fp32 (and the kernel) compare 0.3f > 0.3f: False."""
    scores = torch.full((64,), 0.3)

    def above(b, h, q_idx, kv_idx):
        return scores[kv_idx] > 0.3

    bm, state, truth = analyse(above, 1, 1, 64, 64, (16, 16))
    assert (truth == EMPTY).all()
    assert_never_wrong(state, truth, "scores > 0.3 at 0.3")


def test_dense_two_dimensional_lookup_never_wrong():
    g = torch.Generator().manual_seed(4)
    dense = torch.rand(2, 70, 60, generator=g) < 0.3
    dense[:, :, 30:] = False

    def lookup(b, h, q_idx, kv_idx):
        return dense[h, q_idx, kv_idx]

    bm, state, truth = analyse(lookup, 1, 2, 70, 60, (16, 16))
    assert bm.method == "runtime" and bm.state.shape[:2] == (1, 2)
    assert_never_wrong(state, truth, "dense[h, q_idx, kv_idx]")
    assert_runs_match(bm)


RUNTIME_ATOMS = [
    "(doc[q_idx] == doc[kv_idx])", "(doc[q_idx] >= doc[kv_idx])", "(doc2[b, q_idx] == doc2[b, kv_idx])",
    "keep[kv_idx]", "keep[q_idx]", "(sc[q_idx] > 0.3)", "(sc[kv_idx] * 2.0 < sc[q_idx])", "(hs[h] > 0.0)",
    "(rel[kv_idx - q_idx + 159] > 0)", "(doc[q_idx // 2] == doc[kv_idx // 2])", "(doc[kv_idx] <= 1)",
    "(sc[kv_idx] + hs[h] > 0.5)", "(torch.where(keep[q_idx], doc[kv_idx], 2) == 2)", "(doc2[b, kv_idx] == doc[q_idx])",
    "(lim[b] > kv_idx)",
]


def piecewise(shape, values, p, generator):
    """Random runs along the last dim (a new run at each position with probability p), each run
    holding one value drawn from ``values`` (a 1-D tensor): runs make some tiles decidable, so a
    bound that is off by one position shows."""
    run = (torch.rand(shape, generator=generator) < p).long().cumsum(-1)  # run number: at most the length
    return values[run % values.numel()]


@st.composite
def runtime_masks(draw):
    """A lookup of a captured tensor, possibly negated, combined with up to two more atoms."""
    src = draw(st.sampled_from(RUNTIME_ATOMS))
    if draw(st.booleans()):
        src = f"(~{src})"
    for _ in range(draw(st.integers(0, 2))):
        other = draw(st.one_of(st.sampled_from(RUNTIME_ATOMS), STATIC_ATOMS))
        src = f"({src} {draw(st.sampled_from(['&', '|', '^']))} {other})"
    return src


@settings(FUZZ, max_examples=examples(100))
@given(src=runtime_masks(), shape=LONG_SHAPES,
       seed=st.integers(0, 2**16), ndocs=st.integers(1, 5), sort=st.booleans(), p=st.sampled_from([0.05, 0.2, 1.0]))
def test_random_runtime_masks_never_wrong(src, shape, seed, ndocs, sort, p):
    B, H, Sq, Skv, bq, bk = shape
    g = torch.Generator().manual_seed(seed)
    S = 160
    if sort:  # document ids that only grow
        doc = (torch.rand(S, generator=g) < p).long().cumsum(0)
        doc2 = (torch.rand(B, S, generator=g) < p).long().cumsum(-1)
    else:
        doc = piecewise((S,), torch.randint(0, ndocs, (97,), generator=g), p, g)
        doc2 = piecewise((B, S), torch.randint(0, ndocs, (97,), generator=g), p, g)
    namespace = dict(doc=doc, doc2=doc2, keep=piecewise((S,), torch.rand(97, generator=g) < 0.6, p, g),
                     sc=piecewise((S,), torch.rand(97, generator=g), p, g), hs=torch.randn(H, generator=g),
                     rel=torch.randint(-2, 3, (2 * S - 1,), generator=g), lim=torch.randint(0, S, (B,), generator=g))
    bm, state, truth = analyse(mask_from(src, namespace), B, H, Sq, Skv, (bq, bk))
    assert_never_wrong(state, truth, src)
    assert bm.counts() == counts_of(bm.state)
    assert_runs_match(bm)


@requires_interpreter
@settings(FUZZ, max_examples=examples(40))
@given(src=runtime_masks(), shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 160),
                                            st.integers(1, 160), st.sampled_from([16, 32, 48, 64]),
                                            st.sampled_from([16, 32, 48, 64])),
       seed=st.integers(0, 2**16), ndocs=st.integers(1, 5), p=st.sampled_from([0.05, 0.2, 1.0]),
       programs=st.sampled_from([maps._PROGRAMS, 1]), chunk=st.sampled_from([maps._CHUNK, 2]))
def test_random_runtime_masks_live_runs_are_exact(src, shape, seed, ndocs, p, programs, chunk):
    """The kernels' maps of masks that read tensors (``maps.LiveRuns``: interval bounds per tile,
    then the mask evaluated on the entries of the tiles they leave open) are the oracle's exact
    states, forward (ragged last block as partial) and transposed, through a change of the
    values. ``programs`` 1 packs up to 64 rows into one ``block_states`` program and ``chunk`` 2
    gives a row several programs, as long sequences do on the GPU."""
    defaults = maps._PROGRAMS, maps._CHUNK
    maps._PROGRAMS, maps._CHUNK = programs, chunk
    try:
        check_live_runs(src, shape, seed, ndocs, p)
    finally:
        maps._PROGRAMS, maps._CHUNK = defaults


def check_live_runs(src, shape, seed, ndocs, p):
    B, H, Sq, Skv, bq, bk = shape
    g = torch.Generator().manual_seed(seed)
    S = 160
    namespace = dict(doc=piecewise((S,), torch.randint(0, ndocs, (97,), generator=g), p, g),
                     doc2=piecewise((B, S), torch.randint(0, ndocs, (97,), generator=g), p, g),
                     keep=piecewise((S,), torch.rand(97, generator=g) < 0.6, p, g),
                     sc=piecewise((S,), torch.rand(97, generator=g), p, g), hs=torch.randn(H, generator=g),
                     rel=torch.randint(-2, 3, (2 * S - 1,), generator=g), lim=torch.randint(0, S, (B,), generator=g))
    mask = mask_from(src, namespace)
    live = fg.compile(mask_mod=mask)._live_runs((B, H, Sq, Skv), "cpu")
    nq, nk = -(-Sq // bq), -(-Skv // bk)
    for _ in range(2):
        truth = oracle(mask, B, H, Sq, Skv, (bq, bk))
        dims = (B, H, nq, nk)
        forward = decode_runs(live.runs((bq, bk), ragged_last=Skv % bk != 0).cpu(), nq, nk).expand(dims)
        want = truth.clone()
        if Skv % bk:
            want[..., -1][want[..., -1] == FULL] = PARTIAL
        assert torch.equal(forward, want), src
        transposed = decode_runs(live.runs((bq, bk), transpose=True).cpu(), nk, nq)
        assert torch.equal(transposed.expand(B, H, nk, nq), truth.transpose(2, 3)), src
        # the hulls of 64 x 64 tiles, both ways (asked for after the runs: the bounds run again to fill them)
        truth = oracle(mask, B, H, Sq, Skv, (64, 64))
        assert torch.equal(live.hulls().expand(B, H, -1, -1), dense_hulls(truth)), src
        assert torch.equal(live.hulls(transpose=True).expand(B, H, -1, -1), dense_hulls(truth.transpose(2, 3))), src
        namespace["doc"].copy_(namespace["doc"].flip(0))  # new values, in place
        namespace["sc"].mul_(0.5)
    # the interval bounds alone (the tiles they leave open stay partial) are never wrong, and decide
    # every tile the host's interval analysis decides (the same rules: a weaker kernel would only
    # show as slower refills)
    attn = fg.compile(mask_mod=mask)
    bounds = maps.LiveRuns(render_block_map("m", attn.program.key, attn.program.mask,
                                            tuple(c.ndim for c in attn.program.captures)),
                           attn.program.mask, attn.captured, (B, H, Sq, Skv), torch.device("cpu"), True, exact=False)
    state = decode_runs(bounds.runs((bq, bk)).cpu(), nq, nk).expand(B, H, nq, nk)
    assert_never_wrong(state, oracle(mask, B, H, Sq, Skv, (bq, bk)), src)
    host = blocks.BlockMask(attn.program.mask, attn.captured, (B, H, Sq, Skv), (bq, bk), closed_form=False,
                            exact=False).state.expand(B, H, nq, nk)
    weaker = (host != PARTIAL) & (state == PARTIAL)
    assert not weaker.any(), f"{src}: tiles the host decides left open at {weaker.nonzero()[:5]}"


# ---------------------------------------------------------------------------------------------
# 4. scale: the analysis follows the mask's boundary, not the number of tiles


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def test_scale_causal_a_million_tokens():
    bm, seconds = timed(lambda: fg.block_mask(fg.mods.causal, 1, 1, 2**20, 2**20))
    assert seconds < 1.0, f"{seconds:.2f} s"
    assert bm.nbytes == 0 and bm.method == "static"
    n = 2**20 // 128
    assert bm.counts() == {"empty": n * (n - 1) // 2, "partial": n, "full": n * (n - 1) // 2}


def test_scale_prefix_lm_a_million_tokens():
    bm, seconds = timed(lambda: fg.block_mask(fg.mods.prefix_lm(1024), 1, 1, 2**20, 2**20, block_size=(128, 128)))
    assert seconds < 1.0, f"{seconds:.2f} s"
    nbytes, seconds = timed(lambda: bm.nbytes)  # builds the runs: linear in query blocks, not tiles
    assert seconds < 1.0, f"{seconds:.2f} s"
    assert 0 < nbytes < 1_000_000
    n = 2**20 // 128
    # the prefix is 8 whole blocks: full below the diagonal and in the prefix, partial on the diagonal
    assert bm.counts()["partial"] == n - 8
    assert bm.counts()["full"] == 8 * n + (n - 8) * (n - 9) // 2


def test_scale_document_mask_256k_tokens():
    S = 2**18
    doc = sorted_doc_ids(S, 64, torch.Generator().manual_seed(5))
    assert doc.unique().numel() == 64
    mask = fg.mods.causal & fg.mods.document(doc)
    bm, seconds = timed(lambda: fg.block_mask(mask, 1, 1, S, S))
    nbytes, more = timed(lambda: bm.nbytes)
    assert seconds + more < 2.0, f"{seconds:.2f} + {more:.2f} s"
    assert bm.method == "runtime"
    assert 0 < nbytes < 2_000_000
    c = bm.counts()
    n = S // 128
    assert sum(c.values()) == n * n
    assert c["partial"] < 8 * n, "at most a few partial tiles per query block"
    assert c["empty"] > 0.9 * n * n


# ---------------------------------------------------------------------------------------------
# 5. caching through fg.compile


def test_block_mask_cache_follows_in_place_changes():
    doc = torch.tensor([0] * 30 + [1] * 34)
    mask = fg.mods.causal & fg.mods.document(doc)
    attn = fg.compile(mask_mod=mask)
    bm = attn.block_mask(2, 2, 64, 64, (16, 16))
    assert attn.block_mask(2, 2, 64, 64, (16, 16)) is bm
    assert attn.block_mask(2, 2, 64, 64, (16, 32)) is not bm  # another tile size
    assert attn.block_mask(2, 2, 64, 48, (16, 16)) is not bm  # another shape
    assert attn.block_mask(2, 2, 64, 64, (16, 16)) is bm  # still cached
    before = bm.state.clone()
    assert torch.equal(before.expand(2, 2, -1, -1), oracle(mask, 2, 2, 64, 64, (16, 16)))

    doc[30:] = 0  # one document: tiles below the diagonal become full
    bm2 = attn.block_mask(2, 2, 64, 64, (16, 16))
    assert bm2 is not bm
    assert torch.equal(bm2.state.expand(2, 2, -1, -1), oracle(mask, 2, 2, 64, 64, (16, 16)))
    assert not torch.equal(bm2.state, before)
    assert torch.equal(bm.state, before), "an existing map is a snapshot"
    assert attn.block_mask(2, 2, 64, 64, (16, 16)) is bm2

    doc.add_(0)  # same values, new version: recomputed, same map
    bm3 = attn.block_mask(2, 2, 64, 64, (16, 16))
    assert bm3 is not bm2 and torch.equal(bm3.state, bm2.state)


def test_block_mask_cache_ignores_tensors_the_mask_does_not_read():
    slopes = torch.ones(2)
    attn = fg.compile(score_mod=lambda s, b, h, q_idx, kv_idx: s + slopes[h], mask_mod=fg.mods.prefix_lm(8))
    bm = attn.block_mask(1, 2, 40, 40, (16, 16))
    slopes.add_(1.0)
    assert attn.block_mask(1, 2, 40, 40, (16, 16)) is bm


@requires_interpreter
def test_kernels_follow_in_place_changes_of_the_doc_ids():
    torch.manual_seed(0)
    S = 96
    doc = torch.zeros(S, dtype=torch.long)
    mask = fg.mods.causal & fg.mods.document(doc)
    attn = fg.compile(mask_mod=mask)
    q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
    check_against_reference(q, k, v, mask_mod=mask, attn=attn)  # one document: full tiles below the diagonal
    doc[40:] = 1  # those tiles now cross a document boundary: a stale map would skip their mask code
    check_against_reference(q, k, v, mask_mod=mask, attn=attn)
    doc[:] = torch.arange(S) // 32  # documents on the kernel's tiles: most tiles become empty
    check_against_reference(q, k, v, mask_mod=mask, attn=attn)
    doc[:] = 0  # back to one document: a stale map would skip tiles that are visible again
    check_against_reference(q, k, v, mask_mod=mask, attn=attn)
    # fg.attention keeps its traced Attention (and block maps) across calls: it must notice too
    fg.attention(q, k, v, mask_mod=mask)
    doc[50:] = 3
    out = fg.attention(q, k, v, mask_mod=mask)
    assert rel_err(out, fg.attention_reference(q, k, v, mask_mod=mask)) < 1e-4


@requires_interpreter
def test_repeated_signatures_reuse_their_launches_as_the_ids_change(monkeypatch):
    """A call signature's launches are kept (``Attention._plans``): a repeated training step does
    not choose tiles or look up block maps again, and an in-place change of the ids it reads
    reaches the kernels, forward and backward, through the kept launches' runs."""
    from flashgen import api

    S = 64
    doc = torch.zeros(S, dtype=torch.long)
    mask = fg.mods.causal & fg.mods.document(doc)
    attn = fg.compile(mask_mod=mask)
    q, k, v = qkv(1, 2, 2, S, S, seed=3)
    dout = torch.randn(1, 2, S, 16, generator=torch.Generator().manual_seed(4))
    launches = []
    original = api.launch
    monkeypatch.setattr(api, "launch", lambda *a, **kw: launches.append(a[2]) or original(*a, **kw))

    def step_errors() -> list[float]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attn(*leaves).backward(dout)
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        fg.attention_reference(*exact, mask_mod=mask).backward(dout.double())
        return [rel_err(got.grad, want.grad) for got, want in zip(leaves, exact)]

    assert max(step_errors()) < 1e-4 and len(launches) == 3  # forward, dQ, dK/dV
    assert max(step_errors()) < 1e-4 and len(launches) == 3  # the kept launches: nothing chosen again
    # new ids refill the kept launches' runs in place (LiveRuns): stale runs would cover the new
    # boundary's tiles without mask code
    doc[20:] = 1
    assert max(step_errors()) < 1e-4 and len(launches) == 3
    doc.copy_(torch.arange(S) // 7)  # many documents: more runs per row than the first ids had
    assert max(step_errors()) < 1e-4 and len(launches) == 3
    assert attn.last_tiles.keys() == {"forward", "dQ", "dK/dV"}
    assert "refill their block maps' runs on the device" in attn.explain()


@requires_interpreter
def test_unsorted_ids_refill_exact_runs(monkeypatch):
    """Unsorted ids, where intervals see nothing (every tile partial on the host), also keep their
    launches: the refilled runs come from the mask evaluated on every entry (``maps.LiveRuns``),
    so the map is exact and empty tiles are skipped."""
    from flashgen import api

    S = 64
    gen = torch.Generator().manual_seed(5)
    doc = torch.randint(0, 3, (S,), generator=gen)
    mask = fg.mods.document(doc)
    attn = fg.compile(mask_mod=mask)
    q, k, v = qkv(1, 2, 2, S, S, seed=6)
    launches = []
    original = api.launch
    monkeypatch.setattr(api, "launch", lambda *a, **kw: launches.append(a[2]) or original(*a, **kw))
    for _ in range(3):
        doc.copy_(torch.randint(0, 3, (S,), generator=gen))
        check_against_reference(q, k, v, mask_mod=mask, attn=attn)
    assert len(launches) == 1
    doc.copy_(torch.arange(S) // 32)  # two documents: the tiles between them are empty
    check_against_reference(q, k, v, mask_mod=mask, attn=attn)
    cfg = attn.last_tiles["forward"]
    live = attn._live_runs((1, 2, S, S), "cpu").runs((cfg.block_m, cfg.block_n))
    host = blocks.BlockMask(attn.program.mask, attn.captured, (1, 2, S, S), (cfg.block_m, cfg.block_n),
                            closed_form=False, exact=True)
    assert host.counts()["empty"] > 0
    assert_same_runs(live, host.runs())


def assert_same_runs(live: torch.Tensor, host: torch.Tensor) -> None:
    """The runs each row lists are the same (the live buffer is wider: R = ceil(columns / 2))."""
    width = host.shape[-1]
    assert torch.equal(live[..., 0], host[..., 0])
    listed = torch.arange(width - 1) < 2 * host[..., :1]
    assert torch.equal(torch.where(listed, live[..., 1:width], 0), torch.where(listed, host[..., 1:], 0))


@requires_interpreter
def test_live_runs_recorded_to_compile_ahead_are_filled_when_run(monkeypatch):
    """A first call records its launches to compile them side by side (``parallel.captured``):
    nothing runs then, so runs asked for while recording must be filled again when run."""
    doc = torch.arange(96) // 40
    attn = fg.compile(mask_mod=fg.mods.document(doc))
    live = attn._live_runs((1, 1, 96, 96), "cpu")
    launched = []
    original = maps.Launch.__call__
    monkeypatch.setattr(maps.Launch, "__call__", lambda self, *a: launched.append(self) or original(self, *a))
    monkeypatch.setattr(maps, "capturing", lambda: True)
    live.runs((32, 32))
    monkeypatch.setattr(maps, "capturing", lambda: False)
    runs = live.runs((32, 32))
    live.runs((32, 32))
    assert live._slots == 2  # doc[q_idx] and doc[kv_idx]: bounded once per block (block_summaries)
    assert len(launched) == 6  # summaries, states and runs while recording, then once more when run, then kept
    host = blocks.BlockMask(attn.program.mask, attn.captured, (1, 1, 96, 96), (32, 32), closed_form=False, exact=True)
    assert_same_runs(runs, host.runs())


@requires_interpreter
def test_live_runs_refill_only_the_maps_asked_for(monkeypatch):
    """A kept plan refills its own maps when the ids change, not every map the object holds (the
    tuner's candidates leave many): each map costs three launches (summaries, states, runs)."""
    doc = torch.arange(96) // 40
    attn = fg.compile(mask_mod=fg.mods.document(doc))
    live = attn._live_runs((1, 1, 96, 96), "cpu")
    for block in ((32, 32), (16, 32), (32, 16)):
        live.runs(block)
    launched = []
    original = maps.Launch.__call__
    monkeypatch.setattr(maps.Launch, "__call__", lambda self, *a: launched.append(self) or original(self, *a))
    wanted = live.keys_of([live.runs((32, 32))])
    assert not launched and wanted == (((32, 32), False, False),)
    doc.copy_(torch.arange(96) // 20)
    live.refresh(wanted)
    assert len(launched) == 3
    host = blocks.BlockMask(attn.program.mask, attn.captured, (1, 1, 96, 96), (32, 32), closed_form=False, exact=True)
    assert_same_runs(live.runs((32, 32)), host.runs())
    assert len(launched) == 3 and live.keys_of([torch.zeros(1)]) is None


LIVE_MASKS = {
    "document, causal": lambda doc: fg.mods.document(doc[0]) & fg.mods.causal,
    "per-batch documents": lambda doc: lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx],
    "document, window": lambda doc: fg.mods.document(doc[1]) & fg.mods.sliding_window(40),
    "unsorted, per head": lambda doc: lambda b, h, q_idx, kv_idx: (doc[1, q_idx] + h) % 3 == doc[0, kv_idx] % 3,
    # runs of 16 positions: a tile's ids span a few values, so its bounds overlap where no id is
    # shared (empty tiles the entries must decide)
    "unsorted runs": lambda doc: lambda b, h, q_idx, kv_idx: doc[0, q_idx // 16] == doc[1, kv_idx // 16],
}


@requires_interpreter
@pytest.mark.parametrize("name, packed", [(name, False) for name in LIVE_MASKS]
                         + [("document, causal", True), ("unsorted runs", True)])
def test_live_runs_match_the_exact_host_maps_as_the_ids_change(name, packed, monkeypatch):
    """``maps.LiveRuns`` lists the runs of the exact host map (partial tiles checked element by
    element) at every tile size, transposed and with a ragged last block, through several versions
    of the ids, in the same buffers; also at tile sizes whose maps combine the states of smaller
    tiles (128 x 64 of 64 x 64, 96 x 48 of 32 x 16), up to ragged ends. ``packed``: many rows per
    ``block_states`` program and several programs per row, as long sequences get on the GPU."""
    if packed:
        monkeypatch.setattr(maps, "_PROGRAMS", 1)
        monkeypatch.setattr(maps, "_CHUNK", 2)
    S, B, H = 176, 2, 3  # (not a multiple of 32: ragged last blocks)
    gen = torch.Generator().manual_seed(11)
    doc = torch.zeros(B, S, dtype=torch.long)
    attn = fg.compile(mask_mod=LIVE_MASKS[name](doc))
    live = attn._live_runs((B, H, S, S), "cpu")
    keys = [((64, 32), False, True), ((32, 64), True, False), ((64, 64), False, False), ((16, 32), False, False),
            ((128, 64), False, True), ((64, 128), True, False), ((96, 48), False, True)]  # (these of combined states)
    assert {live.base(block) for block, _, _ in keys[4:]} <= {(64, 64), (32, 16)}
    first = None
    for docs in (5, 17):
        ids = torch.randint(0, docs, (B, S), generator=gen)
        doc.copy_(ids if name.startswith("unsorted") else torch.sort(ids, -1).values)
        got = [live.runs(block, transpose=t, ragged_last=r) for block, t, r in keys]
        first = first or got
        assert all(a is b for a, b in zip(got, first))
        for (block, t, r), runs in zip(keys, got):
            host = blocks.BlockMask(attn.program.mask, attn.captured, (B, H, S, S), block, closed_form=False,
                                    exact=True)
            assert_same_runs(runs, host.runs(transpose=t, ragged_last=r))
        host = blocks.BlockMask(attn.program.mask, attn.captured, (B, H, S, S), (64, 64), closed_form=False, exact=True)
        for t in (False, True):
            hulls = live.hulls(transpose=t)
            assert torch.equal(hulls, host.hulls(transpose=t))
            dense = dense_hulls(host.state.transpose(2, 3) if t else host.state)
            assert torch.equal(hulls.expand(B, H, -1, -1), dense.expand(B, H, -1, -1))


@requires_interpreter
def test_live_runs_bounds_decide_the_tiles_of_sorted_documents():
    """``block_states`` decides tiles by interval bounds before evaluating entries: for sorted
    document ids whose boundaries fall on tile edges, the bounds alone (the open tiles left
    partial) give the exact map, with a ragged last block and per-batch ids too."""
    B, S, block = 2, 200, (32, 16)
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([64, 32, 96, 8])).expand(B, S).clone()
    doc[1] = torch.repeat_interleave(torch.arange(3), torch.tensor([16, 160, 24]))
    mask = fg.mods.causal & (lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx])
    attn = fg.compile(mask_mod=mask)
    source = render_block_map("m", attn.program.key, attn.program.mask, tuple(c.ndim for c in attn.program.captures))
    bounds = maps.LiveRuns(source, attn.program.mask, attn.captured, (B, 1, S, S), torch.device("cpu"), True,
                           exact=False)
    nq, nk = -(-S // block[0]), -(-S // block[1])
    state = decode_runs(bounds.runs(block).cpu(), nq, nk)
    truth = oracle(mask, B, 1, S, S, block)
    assert (truth == EMPTY).sum() > (truth == PARTIAL).sum() > 0
    assert torch.equal(state, truth)


# ---------------------------------------------------------------------------------------------
# 6. kernels through the block runs, forward and backward


def check_forward_backward(mask_mod, q, k, v, *, enable_gqa=False, tol=1e-4):
    attn = fg.compile(mask_mod=mask_mod)
    assert attn.analysis.block_runs, "this test is meant to exercise the block runs"
    check_against_reference(q, k, v, mask_mod=mask_mod, enable_gqa=enable_gqa, attn=attn)

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attn(qg, kg, vg, enable_gqa=enable_gqa)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    (out.double() * dout).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = fg.attention_reference(qd, kd, vd, mask_mod=mask_mod, enable_gqa=enable_gqa)
    (ref * dout).sum().backward()
    for name, got, want in (("dq", qg.grad, qd.grad), ("dk", kg.grad, kd.grad), ("dv", vg.grad, vd.grad)):
        assert not torch.isnan(got).any(), f"{name} has NaN"
        assert rel_err(got, want) < tol, f"{name}: relative error {rel_err(got, want):.2e}"

    # the (cached) maps the forward, dK/dV and dQ kernels read, at the tile sizes they launched with
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    configs = (attn.forward_config((B, Hq, Sq, Skv), D, v.shape[-1], q.dtype, q.device),
               *default_backward_configs(q.device, D, v.shape[-1], q.dtype))
    maps = []
    for cfg in configs:
        block = (cfg.block_m, cfg.block_n)
        bm = attn.block_mask(B, Hq, Sq, Skv, block, q.device)
        assert_never_wrong(bm.state.expand(B, Hq, -1, -1), oracle(mask_mod, B, Hq, Sq, Skv, block), f"{block}")
        assert_runs_match(bm)
        maps.append(bm)
    return maps[0]


def qkv(B, Hq, Hkv, Sq, Skv, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Sq, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g),
            torch.randn(B, Hkv, Skv, D, generator=g))


def dilated_window(b, h, q_idx, kv_idx):
    return ((kv_idx - q_idx) % 2 == 0) & (kv_idx <= q_idx) & (q_idx - kv_idx < 24)


def head_window(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx - h * 8


def chunked_or_tail(b, h, q_idx, kv_idx):
    # chunks of 32 (the kernel's tiles) within a window, and the ragged last KV block fully visible
    return ((q_idx // 32 == kv_idx // 32) & (kv_idx <= q_idx + 25)) | (kv_idx >= 64)


DOC_PER_BATCH = torch.tensor([[0] * 20 + [1] * 76, [0] * 40 + [1] * 10 + [2] * 46])

KERNEL_CASES = {
    # name: (mask, B, Hq, Hkv, Sq, Skv)
    "prefix_lm": (fg.mods.prefix_lm(20), 1, 2, 2, 70, 70),
    "chunked(24)": (fg.mods.chunked(24), 1, 2, 2, 96, 96),
    "chunked(32)_ragged": (fg.mods.chunked(32), 1, 2, 2, 70, 70),
    "causal_document_per_batch": (fg.mods.causal & fg.mods.document(DOC_PER_BATCH), 2, 2, 2, 96, 96),
    "dilated_window": (dilated_window, 1, 2, 2, 64, 64),
    "head_window": (head_window, 1, 2, 2, 64, 64),
    "head_window_gqa": (head_window, 1, 4, 2, 48, 48),
    "ragged_sq_ne_skv": (chunked_or_tail, 1, 2, 2, 45, 70),
}


@requires_interpreter
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernels_through_block_runs(name):
    mask, B, Hq, Hkv, Sq, Skv = KERNEL_CASES[name]
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv)
    bm = check_forward_backward(mask, q, k, v, enable_gqa=Hq != Hkv)
    c = bm.counts()
    if name not in ("chunked(24)", "dilated_window"):
        assert c["empty"] and c["full"], f"{name} should skip some tiles and run others without mask code: {c}"
    if name.startswith("head_window"):
        assert bm.state.shape[1] == Hq, "a head-dependent mask has one map per query head"
        ref = fg.attention_reference(q, k, v, mask_mod=mask, enable_gqa=Hq != Hkv)
        assert (ref[:, 1:, :8] == 0).all(), "rows of heads > 0 fully masked"


# ---------------------------------------------------------------------------------------------
# 7. text


def test_picture_and_str():
    bm = fg.block_mask(fg.mods.causal, 1, 1, 64, 64, block_size=(8, 8))
    assert bm.picture() == "\n".join("█" * i + "░" + "·" * (7 - i) for i in range(8))
    # on a coarser picture each character is a group of tiles (here 2 query blocks x 1 KV block)
    assert bm.picture(size=4) == "░░······\n██░░····\n████░░··\n██████░░"
    text = str(bm)
    assert "static" in text and bm.picture() in text
    assert all(ch in text for ch in "·░█")
    assert "8 partial" in text and "28 empty" in text and "28 full" in text

    doc = torch.tensor([0] * 24 + [1] * 40)
    bm = fg.block_mask(fg.mods.document(doc), 1, 1, 64, 64, block_size=(16, 16))
    assert "runtime" in str(bm) and "runtime" in repr(bm)
    assert bm.picture() == "█░··\n░░░░\n·░██\n·░██"


def test_picture_shows_the_requested_batch_and_head():
    bm = fg.block_mask(head_window, 1, 2, 32, 32, block_size=(8, 8))
    assert bm.picture(h=0) == "░···\n█░··\n██░·\n███░"
    assert bm.picture(h=1) == "····\n░···\n█░··\n██░·"


def _decode_png(data: bytes) -> torch.Tensor:
    """[rows, cols, 3] pixels of an 8-bit RGB PNG without filters (what BlockMask.png writes),
    checking its signature and every chunk's CRC."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    cols, rows, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    lines = [raw[i * (1 + 3 * cols):(i + 1) * (1 + 3 * cols)] for i in range(rows)]
    assert all(line[0] == 0 for line in lines)
    return torch.tensor([list(line[1:]) for line in lines], dtype=torch.uint8).view(rows, cols, 3)


def test_png_picture():
    from flashgen.blocks import _PNG_COLOURS

    doc = torch.tensor([0] * 24 + [1] * 40)
    bm = fg.block_mask(fg.mods.document(doc) & fg.mods.causal, 1, 1, 64, 64, block_size=(8, 8))
    pixels = _decode_png(bm.png())
    assert torch.equal(pixels, torch.tensor(_PNG_COLOURS, dtype=torch.uint8)[bm.state[0, 0].long()])
    # a large map is drawn in groups of tiles, each of its own class (as the text picture)
    big = fg.block_mask(fg.mods.causal, 1, 1, 1 << 16, 1 << 16, block_size=(64, 64))
    small = _decode_png(big.png(size=8))
    assert small.shape == (8, 8, 3)
    glyph = {"·": _PNG_COLOURS[0], "░": _PNG_COLOURS[1], "█": _PNG_COLOURS[2]}
    text = big.picture(size=8).split("\n")  # 8 rows of 16 groups: compare the matching halves
    assert text[0][0] == "░" and tuple(small[0, 0].tolist()) == glyph["░"]
    assert tuple(small[7, 0].tolist()) == glyph["█"] and tuple(small[0, 7].tolist()) == glyph["·"]
    view = bm._repr_html_()
    assert "data:image/png;base64," in view and "flashgen.BlockMask" in view and "pixelated" in view


# ---------------------------------------------------------------------------------------------
# 8. bad input


@pytest.mark.parametrize("kwargs, name", [
    (dict(B=0), "B"), (dict(H=-1), "H"), (dict(Sq=2.5), "Sq"), (dict(Skv=True), "Skv"),
    (dict(block_size=(0, 16)), "block_size"), (dict(block_size="x"), "block_size"),
    (dict(block_size=(16,)), "block_size"), (dict(block_size=(16.0, 16)), "block_size"),
])
def test_bad_arguments(kwargs, name):
    args = dict(B=1, H=1, Sq=64, Skv=64) | kwargs
    block = args.pop("block_size", (16, 16))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        fg.block_mask(fg.mods.causal, args["B"], args["H"], args["Sq"], args["Skv"], block_size=block)


# regressions: float rounding across floor(), and pictures that must stay snapshots


def test_floor_of_a_rounded_float_is_never_wrong():
    # 90 * 0.7 is 62.999... in float64 but 63.0000009 in the kernel's fp32
    def mask(b, h, q_idx, kv_idx):
        return torch.floor(kv_idx * 0.7) >= 63

    bm, state, truth = analyse(mask, 1, 1, 8, 91, (8, 7))
    assert_never_wrong(state, truth, "floor(kv_idx * 0.7) >= 63")


def test_picture_is_a_snapshot_like_state():
    doc = torch.tensor([0] * 16 + [1] * 16)
    bm = fg.block_mask(fg.mods.document(doc), 1, 1, 32, 32, block_size=(16, 16))
    assert bm.picture() == "█·\n·█"
    doc[:] = 0
    assert bm.state[0, 0].tolist() == [[2, 0], [0, 2]]
    assert bm.picture() == "█·\n·█"


# ---------------------------------------------------------------------------------------------
# tier 3: the exact fallback, element by element on the tiles intervals leave undecided


def _unsorted_ids(n, groups, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, groups, (n,), generator=g)


@pytest.mark.parametrize("case", ["unsorted_ids", "bitwise", "dilated", "per_batch_unsorted"])
def test_exact_fallback_matches_the_oracle(case):
    ids = _unsorted_ids(90, 3, seed=5)
    ids_b = torch.stack([_unsorted_ids(90, 2, seed=6), torch.sort(_unsorted_ids(90, 4, seed=7)).values])
    mask = {
        "unsorted_ids": lambda b, h, q, kv: ids[q] == ids[kv],
        "bitwise": lambda b, h, q, kv: ((kv & 8) == 0) | (q < kv),
        "dilated": lambda b, h, q, kv: ((kv - q) % 2 == 0) & (kv <= q),
        "per_batch_unsorted": lambda b, h, q, kv: ids_b[b, q] == ids_b[b, kv],
    }[case]
    B = 2 if case == "per_batch_unsorted" else 1
    bm = fg.block_mask(mask, B, 1, 90, 90, block_size=(4, 8), exact=True)
    truth = oracle(mask, B, 1, 90, 90, (4, 8))
    assert bm.exact
    assert torch.equal(bm.state.expand_as(truth), truth)
    assert_runs_match(bm)


def test_exact_fallback_finds_tiles_intervals_cannot():
    mask = lambda b, h, q, kv: (kv & 16) == 0  # noqa: E731
    rough = fg.block_mask(mask, 1, 1, 64, 64, block_size=(16, 16), exact=False)
    exact = fg.block_mask(mask, 1, 1, 64, 64, block_size=(16, 16), exact=True)
    assert rough.counts() == {"empty": 0, "partial": 16, "full": 0}
    assert exact.counts() == {"empty": 8, "partial": 0, "full": 8}
    assert "element by element" in str(exact)


def test_exact_fallback_is_chosen_for_unsorted_ids_only():
    unsorted = _unsorted_ids(256, 4, seed=8)
    ordered = torch.sort(unsorted).values
    a = fg.block_mask(lambda b, h, q, kv: unsorted[q] == unsorted[kv], 1, 1, 256, 256, block_size=(16, 16))
    s = fg.block_mask(lambda b, h, q, kv: ordered[q] == ordered[kv], 1, 1, 256, 256, block_size=(16, 16))
    st = fg.block_mask(lambda b, h, q, kv: ((kv - q) % 2 == 0) & (kv <= q), 1, 1, 256, 256, block_size=(16, 16))
    assert a.exact and not s.exact and not st.exact  # static masks are never refined by default


@requires_interpreter
def test_kernels_with_an_exact_block_map():
    torch.manual_seed(3)
    ids = torch.tensor([0, 1] * 8 + [2] * 24 + [0] * 16)[torch.randperm(56)]
    ids[:16] = 5  # a block of one group: some tiles are full, others empty once checked exactly

    def mask(b, h, q, kv):
        return (ids[q] == ids[kv]) & (kv <= q + 8)

    attn = fg.compile(mask_mod=mask)
    q, k, v = (torch.randn(1, 2, 56, 16, requires_grad=True) for _ in range(3))
    check_against_reference(q.detach(), k.detach(), v.detach(), mask_mod=mask, attn=attn)
    dout = torch.randn(1, 2, 56, 16)
    grads = torch.autograd.grad((attn(q, k, v) * dout).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = fg.attention_reference(q64, k64, v64, mask_mod=mask)
    want = torch.autograd.grad((ref * dout.double()).sum(), (q64, k64, v64))
    for g, w in zip(grads, want):
        assert rel_err(g, w) < 1e-4
    assert any(bm.exact for bm in attn._block_maps.values())
