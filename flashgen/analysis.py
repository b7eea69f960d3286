"""Analyses of a traced attention program.

- :func:`int_bounds`: interval (min/max) bounds of integer expressions, knowing only that the
  index variables are non-negative. The renderer uses it to emit plain ``//`` and ``%`` where
  the dividend is provably non-negative (Triton's operators truncate; floor is only needed for
  negative dividends).
- :func:`band_of`: splits a mask into ``lo <= kv_idx - q_idx <= hi`` (a diagonal band, e.g.
  causal or a sliding window) and a residual mask. Kernels turn the band into closed-form KV loop
  bounds per query block: blocks outside the band are never visited, blocks inside it skip the
  mask code, and only blocks on the band's edges evaluate the mask.
- :func:`diagonal_of`: reads indexed by ``q_idx - kv_idx`` alone (relative-position tables).
- :func:`analyze`: everything above gathered in one frozen :class:`Analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from .ir import TILE_ORIGIN, DType, Node, Op, binary, const, depends_on, format_expr, toposort
from .lowrank import BiasStructure, bias_structure
from .rewrite import simplify

Bound = Optional[int]  # noqa: UP045 - None means unbounded on that side (a runtime alias)


def int_bounds(node: Node, index: dict[str, tuple[int, int]] | None = None) -> tuple[Bound, Bound]:
    """Bounds (lo, hi), inclusive, of an integer or boolean expression; None where unknown.
    ``index`` gives bounds of the index variables; those it leaves out are only non-negative."""
    return _all_bounds([node], index or {})[id(node)]


def _all_bounds(roots: list[Node], index: dict[str, tuple[int, int]]) -> dict[int, tuple[Bound, Bound]]:
    memo: dict[int, tuple[Bound, Bound]] = {}
    for n in toposort(roots):
        memo[id(n)] = index.get(n.arg, (0, None)) if n.op is Op.INDEX else \
            _bounds_step(n, [memo[id(c)] for c in n.src])
    return memo


def reads_in_range(roots: list[Node], shapes: list[tuple[int, ...]], B: int, H: int, Sq: int, Skv: int) -> bool:
    """Whether every captured-tensor read under ``roots`` provably indexes inside its tensor for all
    b < B, h < H, q_idx < Sq, kv_idx < Skv (indices computed from loaded values are never proved).
    Kernels then read without bounds masks; otherwise an index out of range reads 0."""
    memo = _all_bounds(roots, {"b": (0, B - 1), "h": (0, H - 1), "q_idx": (0, Sq - 1), "kv_idx": (0, Skv - 1)})
    for n in toposort(roots):
        if n.op is Op.LOAD:
            for d, i in enumerate(n.src):
                lo, hi = memo[id(i)]
                if lo is None or hi is None or lo < 0 or hi > shapes[n.arg][d] - 1:
                    return False
    return True


def _bounds_step(n: Node, s: list[tuple[Bound, Bound]]) -> tuple[Bound, Bound]:
    if n.dtype is DType.FLOAT:
        return (None, None)
    if n.dtype is DType.BOOL:
        return (0, 1)
    op = n.op
    if op is Op.CONST:
        return (int(n.arg), int(n.arg))
    if op is Op.INDEX:
        return (0, None)

    def add(x: Bound, y: Bound) -> Bound:
        return None if x is None or y is None else x + y

    def neg(x: Bound) -> Bound:
        return None if x is None else -x

    if op is Op.ADD:
        return (add(s[0][0], s[1][0]), add(s[0][1], s[1][1]))
    if op is Op.SUB:
        return (add(s[0][0], neg(s[1][1])), add(s[0][1], neg(s[1][0])))
    if op is Op.NEG:
        return (neg(s[0][1]), neg(s[0][0]))
    if op is Op.MUL and n.src[1].op is Op.CONST or op is Op.MUL and n.src[0].op is Op.CONST:
        c = n.src[1].arg if n.src[1].op is Op.CONST else n.src[0].arg
        lo, hi = s[0] if n.src[1].op is Op.CONST else s[1]
        scaled = (None if lo is None else lo * c, None if hi is None else hi * c)
        return scaled if c >= 0 else (scaled[1], scaled[0])
    if op in (Op.FLOORDIV, Op.MOD) and n.src[1].op is Op.CONST and n.src[1].arg > 0:
        c = n.src[1].arg
        lo, hi = s[0]
        if op is Op.MOD:
            return (0, c - 1)
        return (None if lo is None else lo // c, None if hi is None else hi // c)
    if op is Op.MIN:
        return (_min(s[0][0], s[1][0]), _min_hi(s[0][1], s[1][1]))
    if op is Op.MAX:
        return (_max_lo(s[0][0], s[1][0]), _max(s[0][1], s[1][1]))
    if op is Op.ABS:
        lo, hi = s[0]
        if lo is not None and lo >= 0:
            return (lo, hi)
        return (0, None if lo is None or hi is None else max(-lo, hi))
    if op is Op.WHERE:
        (alo, ahi), (blo, bhi) = s[1], s[2]
        return (_min(alo, blo), _max(ahi, bhi))
    if op is Op.CAST:
        return s[0]
    return (None, None)


def _min(x: Bound, y: Bound) -> Bound:  # lower bound of min(x, y) / of a union
    return None if x is None or y is None else min(x, y)


def _max(x: Bound, y: Bound) -> Bound:  # upper bound of max(x, y) / of a union
    return None if x is None or y is None else max(x, y)


def _min_hi(x: Bound, y: Bound) -> Bound:  # upper bound of min(x, y)
    return y if x is None else x if y is None else min(x, y)


def _max_lo(x: Bound, y: Bound) -> Bound:  # lower bound of max(x, y)
    return y if x is None else x if y is None else max(x, y)


# ---------------------------------------------------------------------------------------------
# affine forms and the diagonal band


def affine_form(node: Node) -> dict[str, int] | None:
    """``node`` as {variable: coefficient, "": constant} if it is an affine integer expression
    of the index variables, else None."""
    if node.dtype is not DType.INT:
        return None
    if node.op is Op.CONST:
        return {"": node.arg}
    if node.op is Op.INDEX:
        return {node.arg: 1, "": 0}
    if node.op in (Op.ADD, Op.SUB):
        a, b = affine_form(node.src[0]), affine_form(node.src[1])
        if a is None or b is None:
            return None
        sign = 1 if node.op is Op.ADD else -1
        out = dict(a)
        for k, v in b.items():
            out[k] = out.get(k, 0) + sign * v
        return out
    if node.op is Op.NEG:
        a = affine_form(node.src[0])
        return None if a is None else {k: -v for k, v in a.items()}
    if node.op is Op.MUL:
        a, b = affine_form(node.src[0]), affine_form(node.src[1])
        if a is None or b is None:
            return None
        if set(a) == {""}:
            a, b = b, a
        if set(b) != {""}:
            return None
        return {k: v * b[""] for k, v in a.items()}
    return None


@dataclass(frozen=True)
class Band:
    """``lo <= kv_idx - q_idx <= hi`` (None: unbounded). Causal is ``Band(None, 0)``."""

    lo: int | None = None
    hi: int | None = None

    @property
    def is_trivial(self) -> bool:
        return self.lo is None and self.hi is None

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else str(self.lo)
        hi = "+inf" if self.hi is None else str(self.hi)
        return f"{lo} <= kv_idx - q_idx <= {hi}"


def _conjuncts(mask: Node) -> list[Node]:
    if mask.op is Op.AND and mask.dtype is DType.BOOL:
        return _conjuncts(mask.src[0]) + _conjuncts(mask.src[1])
    return [mask]


def _clause_band(clause: Node) -> Band | None:
    """The band a single comparison clause states, or None if it is not of that form."""
    if clause.op not in (Op.LT, Op.LE, Op.EQ):
        return None
    a, b = affine_form(clause.src[0]), affine_form(clause.src[1])
    if a is None or b is None:
        return None
    diff = dict(a)  # a - b  (op)  0
    for k, v in b.items():
        diff[k] = diff.get(k, 0) - v
    diff = {k: v for k, v in diff.items() if v != 0 or k == ""}
    variables = {k: v for k, v in diff.items() if k != ""}
    if set(variables) != {"q_idx", "kv_idx"} or variables["kv_idx"] != -variables["q_idx"]:
        return None
    sign, c = variables["kv_idx"], diff.get("", 0)
    if abs(sign) != 1:
        return None
    # sign * d + c  (op)  0,  with d = kv_idx - q_idx
    if clause.op is Op.EQ:
        return Band(-c * sign, -c * sign)
    limit = -c - (1 if clause.op is Op.LT else 0)  # sign * d <= limit
    return Band(None, limit) if sign == 1 else Band(-limit, None)


def band_of(mask: Node) -> tuple[Band, Node]:
    """Split ``mask`` into a band and the residual mask (``True`` if the band says it all)."""
    lo: int | None = None
    hi: int | None = None
    residual: list[Node] = []
    for clause in _conjuncts(mask):
        band = _clause_band(clause)
        if band is None:
            residual.append(clause)
            continue
        if band.lo is not None:
            lo = band.lo if lo is None else max(lo, band.lo)
        if band.hi is not None:
            hi = band.hi if hi is None else min(hi, band.hi)
    rest = const(True)
    for clause in residual:
        rest = simplify(binary(Op.AND, rest, clause))
    return Band(lo, hi), rest


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """Every analysis result for one attention program (see ``Attention.explain()``)."""

    has_mask: bool  # a mask_mod that is not always True
    band: Band  # the diagonal band the mask implies (closed-form KV loop bounds)
    residual_mask: Node  # the part of the mask the band does not cover (True if none)
    plain_logits: bool  # no score_mod and no bias: the scale folds into exp2
    block_runs: bool  # the band does not say all: kernels visit the tiles of a block map (flashgen.blocks)
    row_level: tuple[str, ...]  # subexpressions hoisted out of the KV loop (depend on b, h, q only)
    logits: Node = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @cached_property
    def bias(self) -> BiasStructure:
        """The additive bias part of the logits and its exact separation rank (sympy; computed on
        first access)."""
        return bias_structure(self.logits)

    @property
    def band_split(self) -> bool:
        """A band and a rest over a block map: kernels may test the rest on every partial tile and
        the band's clauses only on tiles across the band's edges."""
        return self.block_runs and not self.band.is_trivial

    @property
    def bias_rank(self) -> int | None:
        """Exact rank of ``logits - score`` as Σ_r f_r(b, h, q_idx)·g_r(b, h, kv_idx), or None."""
        return self.bias.rank

    def report(self) -> str:
        lines = [f"  mask:           {'yes' if self.has_mask else 'none'}"]
        if self.has_mask:
            lines.append(f"  diagonal band:  {self.band if not self.band.is_trivial else 'none found'}")
            residual = "none" if self.residual_mask.op is Op.CONST else format_expr(self.residual_mask)
            lines.append("  residual mask:  none (blocks inside the band skip the mask code; closed-form loop bounds)"
                         if residual == "none" else f"  residual mask:  {residual}")
            if self.block_runs:
                reads = any(n.op is Op.LOAD for n in toposort([self.residual_mask]))
                how = ("interval bounds per tile on the GPU, the mask evaluated on the entries of the tiles they "
                       "leave open, again when the tensors it reads change" if reads else
                       "interval analysis of the mask per tile, cached per shape")
                lines.append(f"  block sparsity: {how} (empty tiles skipped, full tiles without mask code)")
                if side := side_reads(self.residual_mask):
                    lines.append("  bounded per block (once per refill, not per tile): "
                                 + ", ".join(format_expr(n) for n, _ in side))
        lines.append(f"  logits:         {'plain (scale folded into exp2)' if self.plain_logits else 'modified'}")
        if self.row_level:
            lines.append(f"  hoisted out of the KV loop: {', '.join(self.row_level)}")
        if not self.plain_logits and self.logits is not None:
            lines.append(f"  additive bias:  {self.bias.report()}")
        return "\n".join(lines)


def tile_reads(roots: list[Node]) -> list[Node]:
    """Reads of a captured tensor in 2-D tiles, one index by q_idx alone, one by kv_idx alone (a dense bias)."""
    sides = {(True, False), (False, True)}  # (an index's dependence on q_idx, on kv_idx)
    return [n for n in toposort(roots) if n.op is Op.LOAD
            and sides <= {(depends_on(i, "q_idx"), depends_on(i, "kv_idx")) for i in n.src}]


@dataclass(frozen=True)
class TileRead:
    """A read of ``captured[slot]`` whose dimensions ``q_dim`` and ``kv_dim`` are indexed by q_idx and
    kv_idx themselves, and the others by b, h or constants (``others``: (dimension, index name or
    constant)): a dense bias. A [q, kv] tile of it is a rectangle of the tensor, which a TMA
    descriptor over its [q, kv] plane copies in one operation where the layout allows."""

    slot: int
    q_dim: int
    kv_dim: int
    others: tuple[tuple[int, str | int], ...]


def _plain_index(n: Node) -> list[str | int] | None:
    """A read's index per dimension as an index name or an integer constant, or None where one is
    computed (or a boolean, or the tile origin)."""
    kinds = [i.arg if i.op in (Op.INDEX, Op.CONST) else None for i in n.src]
    return None if None in kinds or TILE_ORIGIN in kinds or any(isinstance(k, bool) for k in kinds) else kinds


def tile_read_of(n: Node) -> TileRead | None:
    """The :class:`TileRead` that the read ``n`` is, or None."""
    if n.op is not Op.LOAD or not isinstance(n.arg, int) or n.dtype is not DType.FLOAT:
        return None
    kinds = _plain_index(n)
    if kinds is None or kinds.count("q_idx") != 1 or kinds.count("kv_idx") != 1:
        return None
    return TileRead(n.arg, kinds.index("q_idx"), kinds.index("kv_idx"),
                    tuple((d, k) for d, k in enumerate(kinds) if k not in ("q_idx", "kv_idx")))


@dataclass(frozen=True)
class AxisRead:
    """A read of ``captured[slot]`` whose dimension ``dim`` is indexed by ``axis`` (q_idx or kv_idx)
    itself, the other axis not at all, and the other dimensions by b, h or constants (``others``, as
    :class:`TileRead`'s): a document mask's ids along the keys or the queries. A tile's keys (or
    queries) read one contiguous run of it where that dimension is the innermost, which a 1-D TMA
    copy stages in shared memory with K (or Q)."""

    slot: int
    axis: str
    dim: int
    others: tuple[tuple[int, str | int], ...]


def axis_read_of(n: Node) -> AxisRead | None:
    """The :class:`AxisRead` that the read ``n`` is, or None (reads of booleans stay gathers)."""
    if n.op is not Op.LOAD or not isinstance(n.arg, int) or not n.src or n.dtype is DType.BOOL:
        return None
    kinds = _plain_index(n)
    axes = [a for a in ("q_idx", "kv_idx") if kinds is not None and a in kinds]
    if len(axes) != 1 or kinds.count(axes[0]) != 1:
        return None
    return AxisRead(n.arg, axes[0], kinds.index(axes[0]), tuple((d, k) for d, k in enumerate(kinds) if k != axes[0]))


def entrywise_reads(logits: Node) -> dict[int, tuple[str | int, ...]]:
    """Captured tensors the logits read once in [q, kv] tiles (:func:`tile_read_of`), their other
    dimensions indexed by b, h (each at most once) or constants: a dense bias [B, H, Sq, Skv], or
    [H, Sq, Skv] shared by the batch. Per batch entry and head, every score entry reads an entry of
    its own, so a gradient pass that visits each tile once can write the gradient there instead of
    adding into it: once per entry where the index names b and h, else into a buffer with the ones
    it leaves out (:func:`shared_by`) as leading dimensions, summed over them after. Maps each such
    slot to its index, dimension by dimension (an index name, or a constant)."""
    loads = [n for n in toposort([logits]) if n.op is Op.LOAD and isinstance(n.arg, int)]
    found = {}
    for n in loads:
        tile = tile_read_of(n)  # (q_idx and kv_idx themselves; b, h or constants elsewhere)
        named = [k for _, k in tile.others if isinstance(k, str)] if tile is not None else []
        if tile is not None and len(set(named)) == len(named) and sum(m.arg == n.arg for m in loads) == 1:
            found[n.arg] = tuple(i.arg for i in n.src)
    return found


def shared_by(index: tuple[str | int, ...]) -> tuple[str, ...]:
    """Those of b and h that an entry-wise read's ``index`` (:func:`entrywise_reads`) does not name:
    its entries are shared along them, and a gradient stored per score entry has them as leading
    dimensions, to sum over."""
    return tuple(name for name in ("b", "h") if name not in index)


def side_reads(mask: Node) -> list[tuple[Node, str]]:
    """Reads of ``mask`` ranged along one dimension by ``q_idx`` alone or ``kv_idx`` alone (``doc[q_idx]``),
    with that index: bounded per row or column block, once per refill (``block_summaries``)."""
    def side(n: Node) -> str | None:
        by = [x for x in ("q_idx", "kv_idx", TILE_ORIGIN) if depends_on(n, x)]
        ranged = [c for c in n.src if depends_on(c, "q_idx") or depends_on(c, "kv_idx")]
        return by[0] if len(by) == 1 and by[0] != TILE_ORIGIN and len(ranged) == 1 else None
    return [(n, side(n)) for n in toposort([mask]) if n.op is Op.LOAD and n.src and side(n)]


# the integer operations an index may apply to q_idx - kv_idx for a diagonal read (runtime.staggered
# evaluates them on the host, exactly as the kernels would)
DIAGONAL_OPS = frozenset({Op.CONST, Op.LOAD, Op.NEG, Op.NOT, Op.ABS, Op.SIGN, Op.CAST, Op.ADD, Op.SUB, Op.MUL,
                          Op.FLOORDIV, Op.MOD, Op.MIN, Op.MAX, Op.AND, Op.OR, Op.XOR, Op.SHL, Op.SHR, Op.LT, Op.LE,
                          Op.GT, Op.GE, Op.EQ, Op.NE, Op.WHERE})


@dataclass(frozen=True)
class Diagonal:
    """A read of ``captured[slot]`` whose index along ``dim`` is an integer function of
    ``q_idx - kv_idx`` alone (``index``: ``q_idx - kv_idx + L - 1``, or a bucket looked up in a
    tensor), and whose other indices read neither: a relative-position table. Its values are
    constant along each diagonal of the score matrix, so the kernels read them from staggered
    copies whose rows run along a tile's fast axis (``runtime.staggered``), as contiguous vectors."""

    slot: int
    dim: int
    index: Node


def _of_difference(n: Node) -> bool:
    """Whether ``n`` is an integer or boolean expression that reads ``q_idx`` and ``kv_idx`` only
    as ``c * (q_idx - kv_idx) + c'`` (or not at all), through :data:`DIAGONAL_OPS`."""
    form = affine_form(n)
    if form is not None and {k for k, v in form.items() if v} <= {"q_idx", "kv_idx", ""}:
        return form.get("q_idx", 0) == -form.get("kv_idx", 0)
    return n.dtype is not DType.FLOAT and n.op in DIAGONAL_OPS and all(_of_difference(c) for c in n.src)


def diagonal_of(n: Node) -> Diagonal | None:
    """The :class:`Diagonal` that the read ``n`` is, or None."""
    if n.op is not Op.LOAD or not isinstance(n.arg, int):
        return None
    ranged = [d for d, i in enumerate(n.src) if any(depends_on(i, x) for x in ("q_idx", "kv_idx", TILE_ORIGIN))]
    if len(ranged) != 1 or not _of_difference(n.src[ranged[0]]):
        return None
    return Diagonal(n.arg, ranged[0], n.src[ranged[0]])


def analyze(logits: Node, mask: Node) -> Analysis:
    has_mask = not (mask.op is Op.CONST and mask.arg is True)
    band, residual = band_of(mask) if has_mask else (Band(), const(True))
    plain = logits.op is Op.SCORE
    block_runs = not (residual.op is Op.CONST and residual.arg is True)
    return Analysis(has_mask, band, residual, plain, block_runs,
                    tuple(format_expr(n) for n in hoisted([logits, mask])), logits)


def row_levels(roots: list[Node], varying: str = "kv_idx") -> dict[int, bool]:
    """For every node under ``roots`` (by id): True if it depends on neither ``varying`` nor the
    score, so that a loop over ``varying``'s blocks can compute it once, before the loop: with
    ``kv_idx`` (the forward and dQ loops) once per query block instead of once per tile, with
    ``q_idx`` (the dK/dV loop) once per KV block."""
    out: dict[int, bool] = {}
    for n in toposort(roots):
        leaf_ok = not (n.op is Op.SCORE or (n.op is Op.INDEX and n.arg == varying))
        out[id(n)] = leaf_ok and all(out[id(c)] for c in n.src)
    return out


def hoisted(roots: list[Node]) -> list[Node]:
    """The row-level computations worth hoisting out of the KV loop: non-leaf row-level nodes
    that a tile-level node (or a root) uses."""
    level = row_levels(roots)
    chosen: dict[int, Node] = {}
    for n in toposort(roots):
        users_row = level[id(n)]
        for c in n.src:
            if level[id(c)] and not users_row and c.op not in (Op.CONST, Op.INDEX):
                chosen[id(c)] = c
    for r in roots:
        if level[id(r)] and r.op not in (Op.CONST, Op.INDEX):
            chosen[id(r)] = r
    return list(chosen.values())
