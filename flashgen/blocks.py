"""Block sparsity: which (query block, KV block) tiles of a mask are empty, full or partial.

The mask's IR is evaluated with interval arithmetic over whole *boxes* of indices (a range of
query positions times a range of KV positions, at one batch and head): a box whose mask interval
is ``{True}`` is FULL, ``{False}`` EMPTY, anything else undecided. Boxes start as the whole
``Sq x Skv`` square and undecided ones are split in four until they are single tiles, so the
work follows the mask's boundary (O(S/block · log) boxes for causal), never the number of tiles,
and no dense mask is ever built. Reads of captured tensors (``doc[q_idx]``) are bounded by
range-min/max summaries of the tensor (O(S) memory, built once per tensor version), which
generalises FlashMask's column intervals to any lookup. The classification is conservative
(a tile reported partial may really be empty or full) but never wrong: comparisons of floats
keep a margin for the kernel's fp32 rounding.

Kernels read the result as *runs*: for each query block, the intervals of KV blocks that are
partial and those that are full (and the transpose for the dK/dV pass). Masks that are a pure
diagonal band need none of this: their kernels use closed forms (see ``analysis.band_of``).
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from dataclasses import dataclass, field

import torch

from .ir import DType, Node, Op, depends_on, toposort

EMPTY, PARTIAL, FULL = 0, 1, 2
_INF = math.inf
_SUMMARY = 16  # positions per range summary entry: bounds are exact for ranges aligned to it
_ONE_PASS = 1 << 15  # maps with at most this many tiles are classified tile by tile, in one pass
_FLOAT_MARGIN = 1e-5  # relative widening of every float bound: closer calls stay undecided


# ---------------------------------------------------------------------------------------------
# range summaries of captured tensors


class _RangeTable:
    """min/max of a tensor over any index range along one dimension (the others fixed), from
    per-``_SUMMARY`` summaries and a sparse table over them: O(n / 16 · log n) memory."""

    def __init__(self, t: torch.Tensor, dim: int):
        x = t.detach().movedim(dim, -1).to(torch.float64)
        self.rest_shape = x.shape[:-1]
        n = x.shape[-1]
        x = x.reshape(-1, n)
        pad = (-n) % _SUMMARY
        lo = torch.nn.functional.pad(x, (0, pad), value=_INF).view(x.shape[0], -1, _SUMMARY).amin(-1)
        hi = torch.nn.functional.pad(x, (0, pad), value=-_INF).view(x.shape[0], -1, _SUMMARY).amax(-1)
        los, his = [lo], [hi]
        width = 1
        while 2 * width <= lo.shape[-1]:
            a, b = los[-1], his[-1]
            los.append(torch.minimum(a[:, :-width], a[:, width:]))
            his.append(torch.maximum(b[:, :-width], b[:, width:]))
            width *= 2
        # level j at [j]: min/max over 2**j summaries from each start (padding is never read)
        n = lo.shape[-1]
        self.lo = torch.stack([torch.nn.functional.pad(x, (0, n - x.shape[-1]), value=_INF) for x in los])
        self.hi = torch.stack([torch.nn.functional.pad(x, (0, n - x.shape[-1]), value=-_INF) for x in his])

    def query(self, row: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds over positions [start, stop] (inclusive, in range) of flattened row ``row``."""
        first, last = start // _SUMMARY, stop // _SUMMARY
        level = torch.floor(torch.log2((last - first + 1).to(torch.float64))).long()
        second = last - torch.bitwise_left_shift(torch.ones_like(level), level) + 1
        lo = torch.minimum(self.lo[level, row, first], self.lo[level, row, second])
        hi = torch.maximum(self.hi[level, row, first], self.hi[level, row, second])
        return lo, hi


@dataclass
class _Summaries:
    """Range tables of the captured tensors, built on first use, per (slot, dim)."""

    tensors: list[torch.Tensor]
    tables: dict[tuple[int, int], _RangeTable] = field(default_factory=dict)
    extrema: dict[int, tuple[float, float]] = field(default_factory=dict)

    def table(self, slot: int, dim: int) -> _RangeTable:
        if (slot, dim) not in self.tables:
            self.tables[slot, dim] = _RangeTable(self.tensors[slot], dim)
        return self.tables[slot, dim]

    def bounds(self, slot: int) -> tuple[float, float]:
        if slot not in self.extrema:
            t = self.tensors[slot].detach()
            self.extrema[slot] = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
        return self.extrema[slot]


# ---------------------------------------------------------------------------------------------
# interval evaluation of a mask over boxes


Interval = tuple[torch.Tensor, torch.Tensor]


def _unknown(like: torch.Tensor, n: Node) -> Interval:
    if n.dtype is DType.BOOL:
        return torch.zeros_like(like), torch.ones_like(like)
    return torch.full_like(like, -_INF), torch.full_like(like, _INF)


def _nan_safe(lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    return torch.nan_to_num(lo, nan=-_INF), torch.nan_to_num(hi, nan=_INF)


def _compare(op: Op, a: Interval, b: Interval, inexact: bool) -> Interval:
    (alo, ahi), (blo, bhi) = a, b
    if inexact:  # the kernel compares fp32 values: decide only with a margin
        alo, ahi = alo - _FLOAT_MARGIN * alo.abs(), ahi + _FLOAT_MARGIN * ahi.abs()
        blo, bhi = blo - _FLOAT_MARGIN * blo.abs(), bhi + _FLOAT_MARGIN * bhi.abs()
    if op in (Op.GT, Op.GE):
        op = Op.LT if op is Op.GT else Op.LE
        (alo, ahi), (blo, bhi) = (blo, bhi), (alo, ahi)
    if op is Op.LT:
        true, false = ahi < blo, alo >= bhi
    elif op is Op.LE:
        true, false = ahi <= blo, alo > bhi
    else:  # EQ / NE
        true = (alo == ahi) & (blo == bhi) & (alo == blo) & ~torch.isinf(alo)
        false = (ahi < blo) | (bhi < alo)
        if op is Op.NE:
            true, false = false, true
    return true.to(torch.float64), (~false).to(torch.float64)


def _mul(a: Interval, b: Interval) -> Interval:
    products = torch.stack([a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]])
    products = torch.nan_to_num(products, nan=0.0)  # 0 * inf: the zero end of an unbounded factor
    return products.amin(0), products.amax(0)


_MONOTONE = {Op.EXP: torch.exp, Op.EXP2: torch.exp2, Op.LOG: torch.log, Op.LOG2: torch.log2, Op.SQRT: torch.sqrt,
             Op.TANH: torch.tanh, Op.SIGMOID: torch.sigmoid, Op.FLOOR: torch.floor, Op.CEIL: torch.ceil,
             Op.SIGN: torch.sign}


class _Evaluator:
    """Interval bounds of every node of a mask over a batch of boxes (float64 tensors; ints are
    exact below 2**53, which covers every index)."""

    def __init__(self, summaries: _Summaries, b, h, q0, q1, k0, k1):
        self.s = summaries
        self.leaf = {"b": (b, b), "h": (h, h), "q_idx": (q0, q1), "kv_idx": (k0, k1)}
        self.like = q0

    def bounds(self, root: Node) -> Interval:
        memo: dict[int, Interval] = {}
        for n in toposort([root]):
            lo, hi = self.step(n, [memo[id(c)] for c in n.src])
            if n.dtype is DType.FLOAT and n.op is not Op.CONST:
                # the kernel computes in fp32: widen, so that no later floor, cast or comparison
                # decides on a rounding that fp32 may take the other way (kv_idx * 0.7 at 90)
                lo, hi = lo - _FLOAT_MARGIN * lo.abs(), hi + _FLOAT_MARGIN * hi.abs()
            memo[id(n)] = _nan_safe(lo, hi)
        return memo[id(root)]

    def step(self, n: Node, s: list[Interval]) -> Interval:
        op, like = n.op, self.like
        if op is Op.CONST:
            v = torch.full_like(like, float(n.arg))
            return v, v
        if op is Op.INDEX:
            return self.leaf[n.arg]
        if op is Op.LOAD:
            return self.load(n, s)
        points = all(bool((lo == hi).all()) for lo, hi in s) and op is not Op.WHERE
        if op is Op.ADD:
            return s[0][0] + s[1][0], s[0][1] + s[1][1]
        if op is Op.SUB:
            return s[0][0] - s[1][1], s[0][1] - s[1][0]
        if op is Op.NEG:
            return -s[0][1], -s[0][0]
        if op is Op.MUL and n.dtype is not DType.BOOL:
            return _mul(s[0], s[1])
        if op in (Op.FLOORDIV, Op.MOD) and n.src[1].op is Op.CONST and n.src[1].arg > 0:
            c = float(n.src[1].arg)
            lo, hi = s[0]
            qlo, qhi = torch.floor(lo / c), torch.floor(hi / c)
            if op is Op.FLOORDIV:
                return qlo, qhi
            same = qlo == qhi  # no wrap-around inside the range
            top = c - 1 if n.dtype is DType.INT else c
            return torch.where(same, lo - c * qlo, 0.0), torch.where(same, hi - c * qhi, top)
        if op is Op.MIN:
            return torch.minimum(s[0][0], s[1][0]), torch.minimum(s[0][1], s[1][1])
        if op is Op.MAX:
            return torch.maximum(s[0][0], s[1][0]), torch.maximum(s[0][1], s[1][1])
        if op is Op.ABS:
            lo, hi = s[0]
            return (torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, 0.0)),
                    torch.maximum(lo.abs(), hi.abs()))
        if op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
            inexact = DType.FLOAT in (n.src[0].dtype, n.src[1].dtype)
            return _compare(op, s[0], s[1], inexact)
        if n.dtype is DType.BOOL and op in (Op.AND, Op.OR, Op.XOR, Op.NOT):
            if op is Op.AND:
                return torch.minimum(s[0][0], s[1][0]), torch.minimum(s[0][1], s[1][1])
            if op is Op.OR:
                return torch.maximum(s[0][0], s[1][0]), torch.maximum(s[0][1], s[1][1])
            if op is Op.NOT:
                return 1.0 - s[0][1], 1.0 - s[0][0]
            known = (s[0][0] == s[0][1]) & (s[1][0] == s[1][1])
            x = (s[0][0] != s[1][0]).to(torch.float64)
            return torch.where(known, x, 0.0), torch.where(known, x, 1.0)
        if op is Op.WHERE:
            (clo, chi), a, b = s
            lo = torch.where(clo > 0, a[0], torch.where(chi < 1, b[0], torch.minimum(a[0], b[0])))
            hi = torch.where(clo > 0, a[1], torch.where(chi < 1, b[1], torch.maximum(a[1], b[1])))
            return lo, hi
        if op is Op.CAST:
            lo, hi = s[0]
            if n.dtype is DType.BOOL:
                nonzero_surely = (lo > 0) | (hi < 0)
                zero_surely = (lo == 0) & (hi == 0)
                return nonzero_surely.to(torch.float64), (~zero_surely).to(torch.float64)
            if n.dtype is DType.INT and n.src[0].dtype is DType.FLOAT:
                return torch.trunc(lo), torch.trunc(hi)
            return lo, hi
        if op in _MONOTONE and not points:
            f = _MONOTONE[op]
            return f(s[0][0]), f(s[0][1])
        if op in (Op.SIN, Op.COS, Op.TANH, Op.SIGMOID) and not points:
            return torch.full_like(like, -1.0), torch.full_like(like, 1.0)
        if points:
            v = self.exact(n, [lo for lo, _ in s])
            if v is not None:
                return v, v
        return _unknown(like, n)

    @staticmethod
    def exact(n: Node, x: list[torch.Tensor]) -> torch.Tensor | None:
        """The value of ``n`` where every operand is a single value."""
        op = n.op
        ints = [v.long() for v in x]
        table = {Op.AND: torch.bitwise_and, Op.OR: torch.bitwise_or, Op.XOR: torch.bitwise_xor,
                 Op.SHL: torch.bitwise_left_shift, Op.SHR: torch.bitwise_right_shift}
        if op in table and n.dtype is DType.INT:
            return table[op](ints[0], ints[1]).to(torch.float64)
        if op is Op.NOT and n.dtype is DType.INT:
            return torch.bitwise_not(ints[0]).to(torch.float64)
        if op is Op.FLOORDIV:
            return torch.floor(x[0] / x[1])
        if op is Op.MOD:
            return torch.remainder(x[0], x[1])
        if op is Op.TRUEDIV:
            return x[0] / x[1]
        if op is Op.POW:
            return torch.pow(x[0], x[1])
        if op in _MONOTONE:
            return _MONOTONE[op](x[0])
        fns = {Op.SIN: torch.sin, Op.COS: torch.cos, Op.RSQRT: torch.rsqrt}
        return fns[op](x[0]) if op in fns else None

    def load(self, n: Node, s: list[Interval]) -> Interval:
        t = self.s.tensors[n.arg]
        like = self.like
        if not s:  # a 0-d tensor
            v = torch.full_like(like, float(t))
            return v, v
        inside = torch.ones_like(like, dtype=torch.bool)  # the whole index box is in range
        clipped = []
        for (lo, hi), size in zip(s, t.shape):
            inside &= (lo >= 0) & (hi <= size - 1)
            clipped.append((lo.clamp(0, size - 1).long(), hi.clamp(0, size - 1).long()))
        ranged = [d for d, (lo, hi) in enumerate(s) if not bool((lo == hi).all())]
        if not ranged:
            v = t.detach()[tuple(lo for lo, _ in clipped)].to(torch.float64)
            lo = hi = v
        elif len(ranged) == 1:
            d = ranged[0]
            table = self.s.table(n.arg, d)
            row = torch.zeros_like(like, dtype=torch.long)  # the other dims, flattened
            for idx, size in zip([lo for i, (lo, _) in enumerate(clipped) if i != d], table.rest_shape):
                row = row * size + idx
            lo, hi = table.query(row, clipped[d][0], clipped[d][1])
        else:
            a, b = self.s.bounds(n.arg)
            lo, hi = torch.full_like(like, a), torch.full_like(like, b)
        # an index out of range reads 0 in the kernel
        return torch.where(inside, lo, torch.minimum(lo, torch.zeros_like(lo))), \
            torch.where(inside, hi, torch.maximum(hi, torch.zeros_like(hi)))


# ---------------------------------------------------------------------------------------------
# the block map


@dataclass(frozen=True)
class Boxes:
    """Decided boxes, in block units: row i covers batch b[i] (or all, if the mask ignores b),
    head h[i], query blocks [q0, q1), KV blocks [k0, k1), with one state."""

    b: torch.Tensor
    h: torch.Tensor
    q0: torch.Tensor
    q1: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor
    state: torch.Tensor


def classify(mask: Node, summaries: _Summaries, b, h, q0, q1, k0, k1) -> torch.Tensor:
    """State of each index box (inclusive element ranges; float64 tensors)."""
    lo, hi = _Evaluator(summaries, b, h, q0, q1, k0, k1).bounds(mask)
    return torch.where(lo > 0, FULL, torch.where(hi < 1, EMPTY, PARTIAL)).to(torch.uint8)


def decide(mask: Node, tensors: list[torch.Tensor], dims: tuple[int, int], lengths: tuple[int, int],
           block: tuple[int, int], device: torch.device | str = "cpu", summaries: _Summaries | None = None) -> Boxes:
    """Classify every tile of the ``dims`` (batches, heads the mask depends on) x ``lengths``
    (Sq, Skv) map with ``block`` (query, KV) tiles, by splitting undecided boxes in four."""
    (nb, nh), (sq, skv), (bq, bk) = dims, lengths, block
    nq, nk = -(-sq // bq), -(-skv // bk)
    summaries = summaries or _Summaries(tensors)
    # boxes as rows (b, h, q0, q1, k0, k1) of one int64 matrix: one boolean selection per step
    # picks whole boxes (a selection per column cost ~7x as much on the host)
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    if nb * nh * nq * nk <= _ONE_PASS:  # small maps: every tile in one pass beats the splitting's overheads
        bb, hh, qq, kk = (x.flatten() for x in torch.meshgrid(
            *(torch.arange(n, device=device) for n in (nb, nh, nq, nk)), indexing="ij"))
        cur = torch.stack([bb, hh, qq, qq + 1, kk, kk + 1], 1)
    else:
        bb, hh = torch.meshgrid(torch.arange(nb, device=device), torch.arange(nh, device=device), indexing="ij")
        cur = torch.stack([bb.flatten(), hh.flatten()] + [torch.full((nb * nh,), v, device=device)
                                                           for v in (0, nq, 0, nk)], 1)
    f = torch.float64
    while cur.shape[0]:
        b, h, q0, q1, k0, k1 = cur.unbind(1)
        state = classify(mask, summaries, b.to(f), h.to(f), (q0 * bq).to(f), (torch.clamp(q1 * bq, max=sq) - 1).to(f),
                         (k0 * bk).to(f), (torch.clamp(k1 * bk, max=skv) - 1).to(f))
        final = (state != PARTIAL) | ((q1 - q0 == 1) & (k1 - k0 == 1))
        done.append((cur[final], state[final]))
        b, h, q0, q1, k0, k1 = cur[~final].unbind(1)
        qm = torch.where(q1 - q0 > 1, (q0 + q1) // 2, q1)
        km = torch.where(k1 - k0 > 1, (k0 + k1) // 2, k1)
        cur = torch.cat([torch.stack([b, h, *c], 1) for c in
                         ((q0, qm, k0, km), (q0, qm, km, k1), (qm, q1, k0, km), (qm, q1, km, k1))])
        cur = cur[(cur[:, 3] > cur[:, 2]) & (cur[:, 5] > cur[:, 4])]  # drop empty halves of one-block-wide boxes
    rows = torch.cat([r for r, _ in done])
    return Boxes(*rows.unbind(1), torch.cat([st for _, st in done]))


def refine(mask: Node, tensors: list[torch.Tensor], boxes: Boxes, lengths: tuple[int, int],
           block: tuple[int, int], device: torch.device | str = "cpu", chunk: int = 1 << 22) -> Boxes:
    """The exact fallback: evaluate the mask on every element of each undecided single tile (on
    ``device``, ``chunk`` elements at a time, never the dense mask) and reclassify the tile. For
    masks that intervals cannot see through (unsorted ids, bitwise patterns)."""
    (sq, skv), (bq, bk) = lengths, block
    leaf = (boxes.state == PARTIAL) & (boxes.q1 - boxes.q0 == 1) & (boxes.k1 - boxes.k0 == 1)
    todo = torch.nonzero(leaf).flatten()
    if not todo.numel():
        return boxes
    state = boxes.state.clone()
    summaries = _Summaries([t.detach().to(device) for t in tensors])
    per = max(1, chunk // (bq * bk))
    dq, dk = torch.arange(bq, device=device), torch.arange(bk, device=device)
    f = torch.float64
    for start in range(0, todo.numel(), per):
        idx = todo[start:start + per]
        b, h, q0, k0 = (x[idx].to(device) for x in (boxes.b, boxes.h, boxes.q0, boxes.k0))
        q = (q0 * bq)[:, None, None] + dq[None, :, None]  # [tiles, bq, 1]
        k = (k0 * bk)[:, None, None] + dk[None, None, :]  # [tiles, 1, bk]
        shape = (idx.numel(), bq, bk)
        valid = ((q < sq) & (k < skv)).expand(shape)
        q, k = torch.clamp(q, max=sq - 1).expand(shape).to(f), torch.clamp(k, max=skv - 1).expand(shape).to(f)
        bb, hh = (x[:, None, None].expand(shape).to(f) for x in (b, h))
        lo, hi = _Evaluator(summaries, bb, hh, q, q, k, k).bounds(mask)
        full = ((lo > 0) | ~valid).flatten(1).all(1)
        empty = ((hi < 1) | ~valid).flatten(1).all(1)
        new = torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.uint8)
        state[idx] = new.to(state.device)
    return Boxes(boxes.b, boxes.h, boxes.q0, boxes.q1, boxes.k0, boxes.k1, state)


def paint(boxes: Boxes, dims: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The dense state map [batches, heads, query blocks, KV blocks] (for inspection and tests)."""
    out = torch.zeros((*dims, *grid), dtype=torch.uint8, device=boxes.b.device)
    for i in torch.nonzero(boxes.state != EMPTY).flatten().tolist():
        out[boxes.b[i], boxes.h[i], boxes.q0[i]:boxes.q1[i], boxes.k0[i]:boxes.k1[i]] = boxes.state[i]
    return out


def _row_entries(boxes: Boxes, grid: tuple[int, int], transpose: bool, ragged_last: bool) -> tuple:
    """The non-empty boxes cut into rows (query blocks, or KV blocks if ``transpose``): batch,
    head, row, columns [c0, c1) and state of each piece; with ``ragged_last``, a full box's last
    column cut off as partial where it reaches the padded last column block."""
    nrows, ncols = grid if not transpose else grid[::-1]
    keep = boxes.state != EMPTY
    r0, r1, c0, c1 = (boxes.q0, boxes.q1, boxes.k0, boxes.k1) if not transpose else \
        (boxes.k0, boxes.k1, boxes.q0, boxes.q1)
    b, h, r0, r1, c0, c1, s = torch.stack([boxes.b, boxes.h, r0, r1, c0, c1, boxes.state.long()], 1)[keep].unbind(1)
    if ragged_last:  # split full boxes that reach the last column: [c0, ncols - 1) full, the rest partial
        edge = (s == FULL) & (c1 == ncols)
        b, h, r0, r1 = (torch.cat([x, x[edge]]) for x in (b, h, r0, r1))
        s = torch.cat([s, torch.full_like(s[edge], PARTIAL)])
        c0 = torch.cat([c0, torch.full_like(c0[edge], ncols - 1)])
        c1 = torch.cat([torch.where(edge, ncols - 1, c1), c1[edge]])
        ok = c1 > c0
        b, h, r0, r1, c0, c1, s = (x[ok] for x in (b, h, r0, r1, c0, c1, s))
    # one entry per (row, box): boxes span several rows
    height = r1 - r0
    ends = torch.cumsum(height, 0)  # (entry i belongs to the first box whose end exceeds i)
    entries = torch.arange(int(ends[-1]) if ends.numel() else 0, device=height.device)
    idx = torch.searchsorted(ends, entries, right=True)
    offset = entries - (ends - height)[idx]
    row = r0[idx] + offset
    return b[idx], h[idx], row, c0[idx], c1[idx], s[idx]


def runs(boxes: Boxes, dims: tuple[int, int], grid: tuple[int, int], *, transpose: bool = False,
         ragged_last: bool = False) -> torch.Tensor:
    """Kernel metadata: int32 ``[batches, heads, rows, 2, 1 + 2R]``: for each row (query block, or
    KV block if ``transpose``) and kind (0 partial, 1 full), the number of runs, then R (start,
    end) pairs of column blocks. ``ragged_last``: the last column block is padded, so a full run
    there is listed as partial (the kernel masks padding on partial blocks only)."""
    nb, nh = dims
    nrows, ncols = grid if not transpose else grid[::-1]
    b, h, row, start, end, s = _row_entries(boxes, grid, transpose, ragged_last)
    key = ((b * nh + h) * nrows + row) * 2 + (s == FULL).long()
    order = torch.argsort(key * (ncols + 1) + start)
    key, start, end = key[order], start[order], end[order]
    # merge touching runs of one (row, kind)
    fresh = torch.ones_like(key, dtype=torch.bool)
    fresh[1:] = (key[1:] != key[:-1]) | (start[1:] != end[:-1])
    run = torch.cumsum(fresh.long(), 0) - 1
    nruns = int(run[-1]) + 1 if run.numel() else 0
    rkey = key[fresh]
    rstart = start[fresh]
    rend = torch.zeros(nruns, dtype=end.dtype, device=end.device).scatter_reduce(0, run, end, "amax")
    counts = torch.zeros(nb * nh * nrows * 2, dtype=torch.long, device=key.device)
    counts.scatter_add_(0, rkey, torch.ones_like(rkey))
    width = int(counts.max()) if counts.numel() and nruns else 0
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(nruns, device=key.device) - first[rkey]
    out = torch.zeros(nb * nh * nrows * 2, 1 + 2 * max(width, 1), dtype=torch.int32, device=key.device)
    out[:, 0] = counts.to(torch.int32)
    out[rkey, 1 + 2 * slot] = rstart.to(torch.int32)
    out[rkey, 2 + 2 * slot] = rend.to(torch.int32)
    return out.view(nb, nh, nrows, 2, -1)


# a hull row with no tile in it: least column, greatest, least full, greatest full, full count, 3 unused
EMPTY_HULL = (1 << 30, -1, 1 << 30, -1, 0, 0, 0, 0)


def hulls(boxes: Boxes, dims: tuple[int, int], grid: tuple[int, int], *, transpose: bool = False) -> torch.Tensor:
    """Kernel metadata for kernels that visit a row's tiles from its first non-empty one to its
    last: int32 ``[batches, heads, rows, 8]``, per row the least and greatest column block of a
    non-empty tile, the least and greatest of a full one, the number of full ones, 3 unused
    (``EMPTY_HULL`` where a row has none). The full tiles span [least, greatest] whole when their
    count is that span's width (the kernels that read them fold a padded last column themselves)."""
    nb, nh = dims
    nrows = grid[1] if transpose else grid[0]
    b, h, row, c0, c1, s = _row_entries(boxes, grid, transpose, False)
    at = (b * nh + h) * nrows + row
    out = torch.tensor(EMPTY_HULL, dtype=torch.long, device=at.device).repeat(nb * nh * nrows, 1)
    full = s == FULL
    for i, where, value, how in ((0, ..., c0, "amin"), (1, ..., c1 - 1, "amax"), (2, full, c0, "amin"),
                                     (3, full, c1 - 1, "amax"), (4, full, c1 - c0, "sum")):
        out[:, i].scatter_reduce_(0, at[where], value[where], how)
    return out.to(torch.int32).view(nb, nh, nrows, 8)


def mask_dims(mask: Node, batch: int, heads: int) -> tuple[int, int]:
    """(batches, heads) the block map needs: 1 where the mask does not depend on b or h."""
    return (batch if depends_on(mask, "b") else 1, heads if depends_on(mask, "h") else 1)


def reads(mask: Node) -> list[int]:
    """Captured-tensor slots the mask reads."""
    return sorted({n.arg for n in toposort([mask]) if n.op is Op.LOAD})


# ---------------------------------------------------------------------------------------------
# the public object


_PICTURE = {EMPTY: "·", PARTIAL: "░", FULL: "█"}
_PNG_COLOURS = [(255, 255, 255), (150, 150, 150), (20, 20, 20)]  # by state: empty, partial, full


class BlockMask:
    """Which tiles of a mask are empty (0), partial (1) or full (2) at one shape and tile size.

    Built by :func:`flashgen.block_mask` (and by every attention call, cached). ``state`` is the
    dense map ``[B or 1, H or 1, ceil(Sq/bq), ceil(Skv/bk)]`` (computed on first access); the
    kernels read only ``runs`` (or nothing, for closed-form band masks)."""

    def __init__(self, mask: Node, tensors: list[torch.Tensor], shape: tuple[int, int, int, int],
                 block_size: tuple[int, int], *, closed_form: bool, device: torch.device | str | None = None,
                 exact: bool | None = None):
        B, H, sq, skv = shape
        self.shape = shape
        self.block_size = block_size
        self.dims = mask_dims(mask, B, H)
        self.grid = (-(-sq // block_size[0]), -(-skv // block_size[1]))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        read = set(reads(mask))
        # the analysis runs on the host: a few thousand small tensor operations at most (kernels
        # launched again and again while the tensors change refill their runs on the GPU: maps.LiveRuns)
        cpu = [t.detach().to("cpu", copy=True) if i in read else t for i, t in enumerate(tensors)]
        self._summaries = _Summaries(cpu)
        where = next((cpu[i].device for i in sorted(read)), torch.device("cpu"))  # (where the analysis runs)
        self.method = "runtime" if read else "static"
        self.closed_form = closed_form  # the kernels use the band's closed form and read no metadata
        self.boxes = decide(mask, cpu, self.dims, (sq, skv), block_size, where, summaries=self._summaries)
        self._counts: dict[str, int] | None = None
        c = self.counts()
        if exact is None:  # masks reading tensors, with most tiles undecided: unsorted ids, say
            exact = self.method == "runtime" and 2 * c["partial"] > sum(c.values())
        self.exact = bool(exact)  # partial tiles were checked element by element
        if self.exact:
            originals = [t if i in read else cpu[i] for i, t in enumerate(tensors)]
            self.boxes = refine(mask, originals, self.boxes, (sq, skv), block_size, device=self.device)
            self._counts = None
        self._mask, self._tensors, self._where = mask, cpu, where
        self._state: torch.Tensor | None = None
        self._runs: dict[tuple[bool, bool], torch.Tensor] = {}

    @property
    def state(self) -> torch.Tensor:
        if self._state is None:
            self._state = paint(self.boxes, self.dims, self.grid)
        return self._state

    def runs(self, *, transpose: bool = False, ragged_last: bool = False) -> torch.Tensor:
        """Kernel metadata (see :func:`runs`), on the mask's device."""
        key = (transpose, ragged_last)
        if key not in self._runs:
            self._runs[key] = runs(self.boxes, self.dims, self.grid, transpose=transpose,
                                   ragged_last=ragged_last).to(self.device)
        return self._runs[key]

    def hulls(self, *, transpose: bool = False) -> torch.Tensor:
        """Kernel metadata (see :func:`hulls`), on the mask's device."""
        key = ("hull", transpose)
        if key not in self._runs:
            self._runs[key] = hulls(self.boxes, self.dims, self.grid, transpose=transpose).to(self.device)
        return self._runs[key]

    @property
    def nbytes(self) -> int:
        """Bytes of block metadata the forward kernel reads (0 for closed-form band masks)."""
        if self.closed_form:
            return 0
        return self.runs(ragged_last=self.shape[3] % self.block_size[1] != 0).nbytes

    def counts(self) -> dict[str, int]:
        """Number of tiles in each state (over all batches and heads the map has)."""
        if self._counts is None:
            area = (self.boxes.q1 - self.boxes.q0) * (self.boxes.k1 - self.boxes.k0)
            totals = torch.zeros(3, dtype=area.dtype, device=area.device).index_add_(
                0, self.boxes.state.long(), area).tolist()
            self._counts = {name: totals[s] for s, name in ((EMPTY, "empty"), (PARTIAL, "partial"), (FULL, "full"))}
        return dict(self._counts)

    def sparser_than(self, fraction: float) -> bool:
        """Whether fewer than ``fraction`` of its tiles are non-empty."""
        c = self.counts()
        return c["partial"] + c["full"] < fraction * sum(c.values())

    def _grouped(self, rows: int, cols: int, b: int, h: int) -> torch.Tensor:
        """States [rows, cols] of batch ``b``, head ``h``: the map itself when it has that size, else
        of groups of tiles (each group classified as one box: its own class)."""
        nq, nk = self.grid
        b, h = min(b, self.dims[0] - 1), min(h, self.dims[1] - 1)
        if (rows, cols) == (nq, nk):
            return self.state[b, h]
        qe = [i * nq // rows for i in range(rows + 1)]
        ke = [j * nk // cols for j in range(cols + 1)]
        f, at = torch.float64, self._where
        qq, kk = torch.meshgrid(torch.tensor(qe[:-1], device=at), torch.tensor(ke[:-1], device=at), indexing="ij")
        q1 = torch.tensor(qe[1:], device=at)[:, None].expand_as(qq)
        k1 = torch.tensor(ke[1:], device=at)[None, :].expand_as(kk)
        bq, bk = self.block_size
        _, _, sq, skv = self.shape
        bb, hh = torch.full(qq.shape, b, dtype=f, device=at), torch.full(qq.shape, h, dtype=f, device=at)
        state = classify(self._mask, self._summaries, bb.flatten(), hh.flatten(),
                         (qq * bq).to(f).flatten(), (torch.clamp(q1 * bq, max=sq) - 1).to(f).flatten(),
                         (kk * bk).to(f).flatten(), (torch.clamp(k1 * bk, max=skv) - 1).to(f).flatten())
        return state.view(rows, cols)

    def picture(self, size: int = 32, b: int = 0, h: int = 0) -> str:
        """A text picture of batch ``b``, head ``h``: ``·`` empty, ``░`` partial, ``█`` full; one
        character per tile, or per group of tiles on large maps (a group shows its own class)."""
        nq, nk = self.grid
        states = self._grouped(min(nq, size), min(nk, 2 * size), b, h).tolist()
        return "\n".join("".join(_PICTURE[t] for t in row) for row in states)

    def png(self, size: int = 512, b: int = 0, h: int = 0) -> bytes:
        """A PNG picture of batch ``b``, head ``h``: one pixel per tile (per group of tiles on maps
        wider than ``size``), white empty, grey partial, black full. Query blocks go down, KV
        blocks across."""
        nq, nk = self.grid
        states = self._grouped(min(nq, size), min(nk, size), b, h).long().cpu()
        rgb = torch.tensor(_PNG_COLOURS, dtype=torch.uint8)[states]  # [rows, cols, 3]
        rows, cols = states.shape
        scanlines = b"".join(b"\0" + bytes(row) for row in rgb.reshape(rows, 3 * cols).tolist())

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
                + chunk(b"IEND", b""))

    def __str__(self) -> str:
        B, H, sq, skv = self.shape
        c = self.counts()
        total = sum(c.values()) or 1
        source = "closed form in the kernel, no metadata" if self.closed_form else f"{self.nbytes} bytes of runs"
        if self.exact:
            source += "; partial tiles checked element by element"
        head = (f"BlockMask {sq}x{skv}, blocks {self.block_size[0]}x{self.block_size[1]}, map "
                f"{'x'.join(map(str, (*self.dims, *self.grid)))} ({self.method}; {source})\n"
                f"  tiles: {c['full']} full, {c['partial']} partial, {c['empty']} empty "
                f"({100 * c['empty'] / total:.0f}% skipped)")
        return head + "\n" + self.picture()

    def _repr_markdown_(self) -> str:
        """Jupyter's view: the summary and the picture."""
        return "**flashgen.BlockMask**\n\n```\n" + str(self) + "\n```"

    def _repr_html_(self) -> str:
        """Jupyter's richer view: the summary and the PNG picture (:meth:`png`), scaled up sharply."""
        image = base64.b64encode(self.png(256)).decode()
        width = max(128, min(512, 4 * min(self.grid[1], 256)))  # KV blocks across, a few pixels each
        summary = html.escape("\n".join(str(self).split("\n")[:2]))  # the text picture's header
        return (f"<div><b>flashgen.BlockMask</b><pre>{summary}</pre><img src='data:image/png;base64,{image}' "
                f"style='width:{width}px;image-rendering:pixelated;border:1px solid #888' "
                f"alt='block map: query blocks down, KV blocks across'/></div>")

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, method={self.method!r}, "
                f"nbytes={self.nbytes})")
