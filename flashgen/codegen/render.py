"""IR -> Triton source. The only module that knows Triton syntax.

:func:`render_forward` fills the forward template's hooks with the program's expressions:
row-level code (depends on b, h, q_idx only) goes before the KV loop, tile-level code inside it.
Every IR node becomes one named line, in dependency order, so shared subexpressions are computed
once and the generated kernel reads top to bottom.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import networkx as nx

from .. import ir
from .._version import __version__
from ..analysis import (
    Analysis,
    AxisRead,
    Diagonal,
    TileRead,
    affine_form,
    axis_read_of,
    diagonal_of,
    entrywise_reads,
    int_bounds,
    row_levels,
    shared_by,
    side_reads,
    tile_read_of,
    tile_reads,
)
from ..autodiff import float_reads, gradients
from ..ir import DType, Node, Op, const, format_expr, format_program, to_networkx
from ..rewrite import LOWERING_RULES, RULES, simplify, times

LOG2E = 1.4426950408889634  # the kernels' exp2 takes logits scaled by log2(e) (see rewrite.times)
_LEAF_NAMES = {"b": "b", "h": "h", "q_idx": "q_idx", "kv_idx": "kv_idx", ir.TILE_ORIGIN: "tile_origin"}

_FUNCS = {
    Op.EXP: "tl.exp", Op.EXP2: "tl.exp2", Op.LOG: "tl.log", Op.LOG2: "tl.log2", Op.SQRT: "tl.sqrt",
    Op.RSQRT: "tl.rsqrt", Op.SIN: "tl.sin", Op.COS: "tl.cos", Op.FLOOR: "tl.floor", Op.CEIL: "tl.ceil",
}
_FAST_MATH_FUNCS = {Op.TANH: "_tanh", Op.SIGMOID: "_sigmoid"}  # helpers with an approximate variant (FAST_MATH)
_INFIX = {
    Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.SHL: "<<", Op.SHR: ">>",
    Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
}
_COMPARE = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
_CASTS = {
    "float32": ".to(tl.float32)", "float64": ".to(tl.float32)", "float16": ".to(tl.float16).to(tl.float32)",
    "bfloat16": ".to(tl.bfloat16).to(tl.float32)", "int32": ".to(tl.int32)", "int64": ".to(tl.int64)",
}


@dataclass(frozen=True)
class CaptureArg:
    """How one captured tensor is passed: pointer ``cap{slot}``, then its sizes, then its strides."""

    slot: int
    ndim: int

    @property
    def params(self) -> list[str]:
        base = f"cap{self.slot}"
        return [base] + [f"{base}_size{d}" for d in range(self.ndim)] + [f"{base}_stride{d}" for d in range(self.ndim)]


@dataclass(frozen=True)
class KernelSource:
    """A generated kernel module: its source and how to call it."""

    name: str  # variant name, a valid identifier
    source: str
    kernel: str  # the @triton.jit entry point
    captures: tuple[CaptureArg, ...]
    key: str  # sha256 of the source
    # the diagonal reads it takes as staggered copies ``diag{k}`` after the captures (``runtime.staggered``)
    diagonals: tuple[Diagonal, ...] = ()
    # those whose gradient it accumulates in buffers indexed as their copies, ``gdiag{k}`` after the
    # captured tensors' gradient buffers (``runtime.fold_staggered`` adds them into the tables')
    staggered_grads: tuple[int, ...] = ()
    # captured tensors whose gradient the dQ pass stores, each entry once, in the tensor's dtype
    # (``analysis.entrywise_reads``: slot, and its index per dimension), ``gcap{slot}`` after the
    # captures in attn_bwd_dq's arguments; the dK/dV pass accumulates the other gradients
    stored_grads: tuple[tuple[int, tuple[str | int, ...]], ...] = ()
    # reads in [q, kv] tiles it can take through TMA descriptors (the TILE_TMA constexpr, which the
    # launch sets where the tensors' layouts allow: ``runtime.tile_tma_ok``)
    tile_reads: tuple[TileRead, ...] = ()
    # (the Gluon kernels) reads along the keys (the forward) or the queries (the backward) they stage
    # in shared memory with K or Q_i: ``side{k}``'s TMA descriptor and its leads after the runs
    # (``runtime.ws_axis_args``)
    axis_reads: tuple[AxisRead, ...] = ()


class _Emitter:
    """Turns IR nodes into named lines of Triton code. With ``tiles`` (a dict it fills), reads in
    [q, kv] tiles (``analysis.tile_read_of``: a dense bias) come from TMA descriptors ``tile{k}`` at
    the tile's first row and column (``tile_q0``, ``tile_kv0``) where the launch's TILE_TMA allows,
    transposed for the [kv, q] tiles of the dK/dV pass (``transposed``); with ``loaded``, from the
    tiles ``tile{k}`` themselves, in registers already (the Gluon kernels load them)."""

    def __init__(self, prefix: str, tiles: dict[TileRead, int] | None = None, transposed: bool = False,
                 loaded: bool = False):
        self.prefix = prefix
        self.names: dict[int, str] = {}
        self.lines: list[str] = []
        self.tiles, self.transposed, self.loaded = tiles, transposed, loaded

    def ref(self, node: Node) -> str:
        if id(node) in self.names:
            return self.names[id(node)]
        if node.op is Op.CONST:
            return _literal(node.arg)
        if node.op is Op.INDEX:
            return _LEAF_NAMES[node.arg]
        if node.op is Op.SCORE:
            return "score"
        raise KeyError(f"node {node!r} used before it was emitted")

    def emit(self, node: Node) -> None:
        if node.op in (Op.CONST, Op.INDEX, Op.SCORE) or id(node) in self.names:
            return
        name = f"{self.prefix}{len(self.names)}"
        self.lines.append(f"{name} = {self._expr(node)}")
        self.names[id(node)] = name

    def _f(self, node: Node) -> str:
        """Operand as float (ints converted), for float-valued operations."""
        r = self.ref(node)
        if node.dtype is DType.FLOAT:
            return r
        return _literal(float(node.arg)) if node.op is Op.CONST else f"{r}.to(tl.float32)"

    def _expr(self, n: Node) -> str:
        op, s = n.op, n.src
        r = [self.ref(c) for c in s]
        if op is Op.LOAD:
            tile = tile_read_of(n) if self.tiles is not None else None
            if tile is None:
                return _load(n, r)
            k = self.tiles.setdefault(tile, len(self.tiles))
            if self.loaded:
                return f"tile{k}.to(tl.float32)"
            block = f"tile{k}.load([tile_q0, tile_kv0])"
            block = f"tl.trans({block})" if self.transposed else block
            return f"({block}.to(tl.float32) if TILE_TMA else {_load(n, r)})"
        if op in (Op.AND, Op.OR, Op.XOR) and n.dtype is DType.BOOL:
            # `!= 0` on comparisons of floats: Triton 3.6's interpreter types their results as fp32,
            # and numpy refuses & | ^ on floats (a no-op once compiled)
            r = [f"({x} != 0)" if c.op in _COMPARE and DType.FLOAT in (c.src[0].dtype, c.src[1].dtype) else x
                 for x, c in zip(r, s)]
            return f"{r[0]} {_INFIX[op]} {r[1]}"
        if op in (Op.MUL, Op.TRUEDIV) and Op.SCORE in (s[0].op, s[1].op) and Op.CONST in (s[0].op, s[1].op) \
                and (op is Op.MUL or s[0].op is Op.SCORE):
            # a scaled score, in one multiply of the dot's result (score = qk * sm_scale)
            c = _literal(float(next(x for x in s if x.op is Op.CONST).arg))
            return f"qk * (sm_scale {_INFIX.get(op, '/')} {c})"
        if op in _INFIX:
            return f"{r[0]} {_INFIX[op]} {r[1]}"
        if op is Op.TRUEDIV:
            return f"{self._f(s[0])} / {self._f(s[1])}"
        if op in (Op.FLOORDIV, Op.MOD):
            if n.dtype is DType.FLOAT:
                floor = f"tl.floor({self._f(s[0])} / {self._f(s[1])})"
                return floor if op is Op.FLOORDIV else f"{self._f(s[0])} - {self._f(s[1])} * {floor}"
            lo = int_bounds(s[0])[0]
            divisor = s[1].arg if s[1].op is Op.CONST else None
            if lo is not None and lo >= 0 and divisor is not None and divisor > 0:
                return f"{r[0]} {'//' if op is Op.FLOORDIV else '%'} {r[1]}"  # truncation == floor here
            return f"{'_floordiv' if op is Op.FLOORDIV else '_floormod'}({r[0]}, {r[1]})"
        if op is Op.POW:
            return self._pow(n)
        if op is Op.MIN:
            return f"tl.minimum({r[0]}, {r[1]})"
        if op is Op.MAX:
            return f"tl.maximum({r[0]}, {r[1]})"
        if op is Op.NEG:
            return f"-{r[0]}"
        if op is Op.NOT:
            return f"{r[0]} == 0" if n.dtype is DType.BOOL else f"~{r[0]}"
        if op is Op.ABS:
            return f"tl.abs({r[0]})"
        if op is Op.SIGN:
            pos, neg = ("1.0", "-1.0") if n.dtype is DType.FLOAT else ("1", "-1")
            zero = "0.0" if n.dtype is DType.FLOAT else "0"
            return f"tl.where({r[0]} > 0, {pos}, tl.where({r[0]} < 0, {neg}, {zero}))"
        if op in _FUNCS:
            return f"{_FUNCS[op]}({self._f(s[0])})"
        if op in _FAST_MATH_FUNCS:
            return f"{_FAST_MATH_FUNCS[op]}({self._f(s[0])}, FAST_MATH)"
        if op is Op.CAST:
            if n.arg == "bool":
                return f"{r[0]} != 0"
            if s[0].dtype is DType.BOOL and n.dtype is DType.FLOAT:
                return f"{r[0]}.to(tl.int32).to(tl.float32)"
            return f"{r[0]}{_CASTS[n.arg]}"
        if op is Op.WHERE:
            a, b = (self._f(x) if n.dtype is DType.FLOAT else self.ref(x) for x in s[1:])
            return f"tl.where({r[0]}, {a}, {b})"
        raise NotImplementedError(f"no Triton rendering for IR op {op}")  # pragma: no cover

    def _pow(self, n: Node) -> str:
        base, exponent = n.src
        if exponent.op is Op.CONST and float(exponent.arg).is_integer() and abs(exponent.arg) <= 8:
            k = int(exponent.arg)
            if k == 0:
                return "1.0" if n.dtype is DType.FLOAT else "1"
            b = self._f(base) if n.dtype is DType.FLOAT else self.ref(base)
            product = " * ".join([b] * abs(k))
            return product if k > 0 else f"1.0 / ({product})"
        if exponent.op is Op.CONST and exponent.arg == 0.5:
            return f"tl.sqrt({self._f(base)})"
        # general power: exp2(y * log2(x)), NaN for negative bases as in torch with non-integer y
        return f"tl.exp2({self._f(exponent)} * tl.log2({self._f(base)}))"


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if value != value:
            return 'float("nan")'
        if value in (float("inf"), float("-inf")):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    return repr(value)


def _address(n: Node, idx: list[str], base: str) -> tuple[str, str]:
    """Offset expression and in-range condition of a captured-tensor read ``n`` (its index
    expressions rendered as ``idx``), with strides ``{base}_stride{d}`` and sizes ``cap{slot}_size{d}``."""
    terms, checks = [], []
    for d, (i, node) in enumerate(zip(idx, n.src)):
        if node.op is Op.CONST:
            if node.arg != 0:
                terms.append(f"{int(node.arg)} * {base}_stride{d}")
        else:
            terms.append(f"({i}).to(IDX_T) * {base}_stride{d}")
        lo, _ = int_bounds(node)
        if lo is None or lo < 0:
            checks.append(f"({i} >= 0)")
        checks.append(f"({i} < cap{n.arg}_size{d})")
    return " + ".join(terms) or "0", " & ".join(checks) or "True"


def _staggered_offset(n: Node, idx: list[str], strides: str = "diag{}_stride", unit_last: bool = True) -> str:
    """The offset of a read of staggered copies ``n`` (``_staggered``; its indices rendered as
    ``idx``), with strides ``strides.format(k) + d`` (the last 1 if ``unit_last``)."""
    strides = strides.format(n.arg[1])
    last = len(idx) - 1 if unit_last else len(idx)
    terms = [f"{i} * {strides}{d}" if x.op is Op.CONST else f"({i}).to(IDX_T) * {strides}{d}"
             for d, (i, x) in enumerate(zip(idx[:last], n.src)) if not (x.op is Op.CONST and x.arg == 0)]
    return " + ".join(terms + [f"({idx[-1]}).to(IDX_T)"] * unit_last)


def _load(n: Node, idx: list[str]) -> str:
    base = f"cap{n.arg}"
    if isinstance(n.arg, tuple):  # staggered copies of a diagonal read (_staggered): in range by construction
        value = f"tl.load(diag{n.arg[1]} + {_staggered_offset(n, idx)})"
    elif not idx:
        value = f"tl.load({base})"
    else:
        offset, in_range = _address(n, idx, base)
        # out-of-range reads give 0 instead of faulting or reading other memory (unless the launch
        # proved every index in range: CHECK_READS False)
        value = f"_read({base} + {offset}, {in_range}, CHECK_READS)"
    if n.dtype is DType.FLOAT:
        return f"{value}.to(tl.float32)"
    if n.dtype is DType.BOOL:
        return f"{value} != 0"
    return value


# the Gluon forward's registers per thread by its consumer groups: (each consumer group's past the
# first, the producer warp's), set by setmaxnreg within the SM's 64K
WS_GROUP_REGS = {2: (232, 40), 3: (160, 24)}
STAGGER = 8  # rows of a diagonal read's staggered copies: a column offset then moves in steps of 16 bytes


def _diagonals(roots: list[Node]) -> dict[Diagonal, int]:
    """The diagonal reads under ``roots`` (``analysis.diagonal_of``) that :func:`_staggered`
    rewrites (not those only inside another's index), numbered in a fixed order."""
    found: set[Diagonal] = set()
    seen: set[int] = set()

    def walk(n: Node) -> None:
        if id(n) not in seen:
            seen.add(id(n))
            d = diagonal_of(n)
            found.update([d] if d else [])
            for k, c in enumerate(n.src):
                if d is None or k != d.dim:
                    walk(c)
    for r in roots:
        walk(r)
    return {d: k for k, d in enumerate(sorted(found, key=lambda d: (d.slot, d.dim, d.index.key)))}


def _staggered(root: Node, numbers: dict[Diagonal, int], fast: str) -> Node:
    """Lowering for a loop whose tiles run along ``fast`` (``kv_idx`` in the forward and dQ loops,
    ``q_idx`` in the dK/dV loop): a diagonal read ``t[..., f(q_idx - kv_idx), ...]`` ->
    ``diag{k}[o, ..., i % STAGGER, j - i // STAGGER * STAGGER]`` with ``j`` the ``fast`` index and
    ``i`` the other (o = 0 for ``fast`` = ``kv_idx``, 1 for ``q_idx``; ``runtime.staggered``
    builds the copies). Entries along ``j`` then sit side by side in memory, with the row's first
    one a multiple of STAGGER entries from the pointer: one vector load per few entries, where the
    read itself gathers (its index falls along ``j``, starts at any entry, or is looked up)."""
    if not numbers:
        return root
    j, i = ir.index(fast), ir.index("q_idx" if fast == "kv_idx" else "kv_idx")
    step = const(STAGGER)
    row = ir.binary(Op.MOD, i, step)
    column = ir.binary(Op.SUB, j, ir.binary(Op.MUL, ir.binary(Op.FLOORDIV, i, step), step))
    memo: dict[int, Node] = {}

    def lower(n: Node) -> Node:
        if id(n) not in memo:
            d = diagonal_of(n)
            if d is not None:
                others = [lower(x) for k, x in enumerate(n.src) if k != d.dim]
                orientation = const(int(fast == "q_idx"))
                memo[id(n)] = ir.load(("diag", numbers[d]), n.dtype, [orientation, *others, row, column])
            else:
                memo[id(n)] = Node(n.op, n.dtype, n.arg, tuple(lower(c) for c in n.src))
        return memo[id(n)]
    return lower(root)


def _diagonal_listing(numbers: dict[Diagonal, int]) -> list[str]:
    """Comment lines naming each staggered copy a kernel reads."""
    return [f"diag{k} = captured{d.slot} at index {format_expr(d.index)} along dim {d.dim}, staggered "
            f"(runtime.staggered): read at [0, ..., q_idx % {STAGGER}, kv_idx - q_idx // {STAGGER} * {STAGGER}] "
            f"in loops over kv, [1, ..., kv_idx % {STAGGER}, q_idx - kv_idx // {STAGGER} * {STAGGER}] over q"
            for d, k in numbers.items()]


def _diagonal_params(numbers: dict[Diagonal, int], capture_ndims: tuple[int, ...]) -> list[str]:
    """The staggered copies' kernel parameters: pointer, then every stride but the last (which is 1)."""
    return [p for d, k in numbers.items()
            for p in [f"diag{k}"] + [f"diag{k}_stride{x}" for x in range(capture_ndims[d.slot] + 1)]]


def _lowered(root: Node) -> Node:
    """``root`` rewritten for the GPU by :data:`~flashgen.rewrite.LOWERING_RULES` (the same values,
    fewer per-entry instructions); program keys and the analysis use the canonical IR."""
    return simplify(root, RULES + LOWERING_RULES)


_POLYNOMIAL = {Op.CONST, Op.INDEX, Op.LOAD, Op.CAST, Op.NEG, Op.ADD, Op.SUB, Op.MUL}


def _summands(node: Node, sign: int = 1) -> list[tuple[int, Node]]:
    """The terms of a float sum, with their signs."""
    if node.dtype is DType.FLOAT and node.op in (Op.ADD, Op.SUB):
        return _summands(node.src[0], sign) + _summands(node.src[1], sign if node.op is Op.ADD else -sign)
    if node.dtype is DType.FLOAT and node.op is Op.NEG:
        return _summands(node.src[0], -sign)
    return [(sign, node)]


def _total(terms: list[tuple[int, Node]]) -> Node:
    first_sign, total = terms[0]
    total = total if first_sign > 0 else ir.unary(Op.NEG, total)
    for sign, term in terms[1:]:
        total = ir.binary(Op.ADD if sign > 0 else Op.SUB, total, term)
    return total


def _row_terms(logits: Node) -> tuple[Node, Node | None]:
    """``logits`` as ``(E, R)`` with ``logits == E + R``, where ``R`` collects the summands that
    read neither the score nor ``kv_idx``: constant along each row of scores, they cancel in the
    softmax, so kernels leave them out of the per-entry logits, add them to the log-sum-exp the
    forward stores and subtract them from the one the backward loads. Only finite-valued terms
    move (sums and products of indices, constants and reads: a row's ``-inf`` from a select must
    still mask it); ``R`` is None when there is nothing to move or ``E`` would not read the score."""
    terms = _summands(logits)

    def movable(t: Node) -> bool:
        return not (ir.depends_on(t, "score") or ir.depends_on(t, "kv_idx")) and all(
            n.dtype is not DType.FLOAT or (n.op in _POLYNOMIAL and (n.op is not Op.CONST or math.isfinite(n.arg)))
            for n in t.toposort())

    row = [(s, t) for s, t in terms if movable(t)]
    rest = [(s, t) for s, t in terms if not movable(t)]
    if not row or not any(ir.depends_on(t, "score") for _, t in rest):
        return logits, None
    return _total(rest), _total(row)


def lowering_notes(logits: Node, mask: Node) -> list[str]:
    """What the kernels compute differently from the IR, for ``explain()``: the per-entry logits
    where row terms leave them for the log-sum-exp (before the log2(e) scaling, which they share),
    and the launch order for a tensor the batch shares."""
    low, row = _row_terms(_lowered(logits))
    notes = []
    if row is not None:
        notes += [f"per entry:  {format_expr(low)}",
                  f"per row:    {format_expr(row)}  (added to the lse the forward stores, not computed per entry;"
                  " tile_origin: the first index of the kernel's query or key block)"]
    for d in _diagonals([low, mask]):
        notes.append(f"diagonal read of captured{d.slot} (index {format_expr(d.index)} along dim {d.dim}): from "
                     "copies staggered along each tile's fast axis, read as contiguous vectors "
                     "(runtime.staggered: 32 x max(Sq, Skv) entries per entry of its other dims)")
    if _reads_batch_shared_tiles([low, mask]):
        notes.append("launch order: the batch entries of each (head, query block) side by side (their shared "
                     "tiles of a captured tensor come from L2 after the first)")
    return notes


def _reads_batch_shared_tiles(roots: list[Node]) -> bool:
    """Whether a tensor read in 2-D tiles (``analysis.tile_reads``: a dense bias) is shared by the batch."""
    return any(not ir.depends_on(n, "b") for n in tile_reads(roots))


def _tile_descriptors(tiles: dict[TileRead, int]) -> list[str]:
    """The lines that make the TMA descriptors ``tile{k}`` of ``tiles`` (see :class:`_Emitter`), each
    over its tensor's [q, kv] plane at the program's b and h, in [BLOCK_M, BLOCK_N] blocks (TILE_TMA:
    the launch checked the layout; else the names stand for the tensors and the reads use pointers)."""
    lines = []
    for t, k in tiles.items():
        base = f"cap{t.slot}"
        at = "".join(f" + {x}.to(tl.int64) * {base}_stride{d}" if isinstance(x, str) else f" + {x} * {base}_stride{d}"
                     for d, x in t.others if x != 0)
        lines += [f"tile{k} = tl.make_tensor_descriptor({base}{at}, [{base}_size{t.q_dim}, {base}_size{t.kv_dim}],",
                  f"                                    [{base}_stride{t.q_dim}, 1], [BLOCK_M, BLOCK_N]) "
                  f"if TILE_TMA else {base}"]
    return lines


def _reads_tile_origin(roots: list[Node]) -> bool:
    """Whether lowered code reads ``tile_origin`` (see :func:`~flashgen.rewrite.recentred_differences`)."""
    return any(ir.uses(r, lambda n: n.op is Op.INDEX and n.arg == ir.TILE_ORIGIN) for r in roots)


def _ordered(roots: list[Node]) -> list[Node]:
    """Nodes in a deterministic dependency order, from the networkx view of the DAG."""
    graph = to_networkx(roots)
    order = nx.lexicographical_topological_sort(graph, key=lambda k: (graph.nodes[k]["label"], k))
    return [graph.nodes[k]["node"] for k in order]


_template_cache: list[str] = []  # where compiled templates are kept, once set (use_template_cache)


def use_template_cache(path: str) -> None:
    """Keep the templates compiled (Jinja's bytecode cache, checked against their text) in
    ``path``, so that a fresh process skips compiling them: ~0.1 s of its first call."""
    if _template_cache != [path]:
        _template_cache[:] = [path]
        _environment.cache_clear()


@cache
def _environment():
    import jinja2

    def load(name: str) -> str:
        return resources.files("flashgen.codegen").joinpath("templates", name).read_text()

    bytecode = jinja2.FileSystemBytecodeCache(_template_cache[0]) if _template_cache else None
    return jinja2.Environment(loader=jinja2.FunctionLoader(load), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, bytecode_cache=bytecode)


def _template(name: str):
    return _environment().get_template(name)


def render_forward(name: str, program_key: str, logits: Node, mask: Node, analysis: Analysis,
                   capture_ndims: tuple[int, ...]) -> KernelSource:
    """The forward kernel module for one attention program (``name`` must be an identifier)."""
    listing = format_program({"logits": logits, "mask": mask}).splitlines()
    logits, mask = _lowered(logits), _lowered(mask)
    # logits that ``times`` cannot scale by log2(e) for free (a bias read per entry) stay in natural
    # units: the kernel scales their row max once per row, and each entry in the exp2's FFMA
    logits, row_term = _row_terms(times(logits, LOG2E))
    unscaled = logits.op is Op.MUL and logits.src[1].op is Op.CONST and logits.src[1].arg == LOG2E
    logits = logits.src[0] if unscaled else logits
    numbers = _diagonals([logits, mask])
    listing += _diagonal_listing(numbers)
    logits, mask = (_staggered(r, numbers, "kv_idx") for r in (logits, mask))
    # a band and a rest over a block map: the rest alone too, for launches that take the split
    residual = _staggered(_lowered(analysis.residual_mask), numbers, "kv_idx") if analysis.band_split else None
    roots = [logits, mask] + ([row_term] if row_term is not None else []) + ([residual] if residual is not None else [])
    level = row_levels(roots)
    row = _Emitter("r")
    tile = _Emitter("t", tiles={})
    tile.names = row.names  # tile code can read row-level names
    for node in _ordered(roots):
        if node.op in (Op.CONST, Op.INDEX, Op.SCORE):
            continue
        if level[id(node)]:
            row.emit(node)
    # tile-level code: the logits in one block and the mask in another (the mask only runs in
    # blocks that need it), each emitting what it needs that is not computed yet
    rest = _Emitter("u")  # (its own names: its lines run where the mask's do not)
    rest.names = dict(row.names)
    logit_lines = _emit_tile(tile, logits, level)
    mask_lines = _emit_tile(tile, mask, level)
    rest_lines = _emit_tile(rest, residual, level) if residual is not None else []
    row_params = [row.names[id(n)] for n in _ordered(roots) if id(n) in row.names and row.names[id(n)].startswith("r")]
    if _reads_tile_origin([logits, mask]):
        row_params.append(_LEAF_NAMES[ir.TILE_ORIGIN])  # (the KV loop's tiles measure from it too)
    captures = tuple(CaptureArg(slot, nd) for slot, nd in enumerate(capture_ndims))
    capture_params = [p for c in captures for p in c.params] + _diagonal_params(numbers, capture_ndims)
    context = dict(
        version=__version__,
        name=name,
        ir_key=program_key[:16],
        program_listing=listing,
        band=analysis.band,
        has_mask=analysis.has_mask,
        block_runs=analysis.block_runs,
        plain_logits=analysis.plain_logits,
        # the factor exp2 takes s by (s: the raw q·kᵀ of plain logits; sm_scale > 0, see Attention.__call__)
        exp2_scale="(sm_scale * LOG2E)" if analysis.plain_logits else "LOG2E" if unscaled else "",
        logits_broadcast=not ir.depends_on(logits, "score"),  # row-level or constant logits
        tile_origin=_reads_tile_origin(roots),
        batch_inner=_reads_batch_shared_tiles(roots),
        row_term=row.ref(row_term) if row_term is not None else "",
        row_lines=row.lines,
        row_params=row_params,
        tile_logit_lines=logit_lines,
        logit_expr=tile.ref(logits) if not analysis.plain_logits else "",
        tile_mask_lines=mask_lines,
        mask_expr=tile.ref(mask),
        mask_band=analysis.band if residual is not None else None,
        rest_lines=rest_lines,
        rest_expr=rest.ref(residual) if residual is not None else "",
        capture_params=capture_params,
        tile_params=["tile_q0"] + [f"tile{k}" for k in tile.tiles.values()] if tile.tiles else [],
        tile_descriptors=_tile_descriptors(tile.tiles),
    )
    source = _template("attention_fwd.py.jinja").render(**context)
    return KernelSource(name, source, "attn_fwd", captures, hashlib.sha256(source.encode()).hexdigest(),
                        tuple(numbers), tile_reads=tuple(tile.tiles))


def _ws_band(analysis: Analysis):
    """The band of a program's mask that the warp-specialised kernels cover, or None: no mask or a
    band of constant offsets that holds the diagonal (full, causal, sliding windows), so that every
    row sees at least its own key, and no block map. The launch checks the rest (``runtime.ws_fits``)."""
    band = analysis.band
    if analysis.block_runs or analysis.has_mask and band.is_trivial:
        return None
    if (band.lo is not None and band.lo > 0) or (band.hi is not None and band.hi < 0):
        return None
    return band


def _ws_logits(logits: Node) -> bool:
    """Whether the Gluon kernels evaluate these (not plain) logits themselves: elementwise code of the
    score and the indices whose captured-tensor reads do not depend on q_idx or kv_idx (a value per
    batch entry or head, as ALiBi's slopes or a temperature), and at most one read in [q, kv] tiles
    (``analysis.tile_read_of``: a dense bias), which their producers load by TMA. Other reads per
    entry (a relative-position table) stay with the Triton kernels."""
    per_entry = [n for n in logits.toposort()
                 if n.op is Op.LOAD and (ir.depends_on(n, "q_idx") or ir.depends_on(n, "kv_idx"))]
    return not per_entry or len(per_entry) == 1 and tile_read_of(per_entry[0]) is not None


def render_ws(name: str, program_key: str, analysis: Analysis, backward: bool = False, logits: Node | None = None,
              capture_ndims: tuple[int, ...] = (), fast_math: bool = True, mask: Node | None = None,
              extra_qk: bool = False, check_reads: bool = True,
              axis_slots: frozenset[int] = frozenset(), groups: int = 2) -> KernelSource | None:
    """The warp-specialised forward (or backward) for Hopper GPUs (Gluon), or None where the program is
    outside what they cover (``_ws_band``, ``_ws_logits``). Logits other than plain are evaluated per
    tile, and in the backward their derivative in the score (``autodiff.gradients``); gradients of
    captured tensors stay with the Triton kernels (the caller's rule). A mask beyond a band (given
    ``mask``, the program's) takes the tiles of a block map's hulls (``blocks.hulls``, 64 x 64 tiles by
    queries, or by keys in the backward, combined into the kernels' tiles), evaluated on tiles outside
    their full span. ``fast_math``: tanh and sigmoid by the approximate instruction (the kernels are
    bf16 and fp16 only, where ``fast_math=None`` means it).
    ``extra_qk``: for q and k with columns past v's head dim (a low-rank bias's factors, FlashBias): a
    second product over them per S tile (the backward computes no gradients for them).
    ``check_reads``: captured-tensor reads masked by their bounds (False: a launch proved them in range).
    ``axis_slots``: captured tensors the kernels may stage in shared memory where their mask reads them
    along the keys in the forward, along the queries in the backward (``analysis.AxisRead``, that axis
    innermost; the caller's rule: contiguous, aligned, four bytes or fewer per entry), with reads
    proved in range: a tile's values then come by TMA with K or Q_i instead of a gather per entry.
    ``groups``: the forward's consumer warp groups, 64 query rows each (``WS_GROUP_REGS``; 3 in persistent
    programs, where q and k have no extra columns and no tensor is read in tiles, and the mask's reads are
    gathered per entry, none staged: those come with the 128-row blocks of two groups)."""
    band = _ws_band(analysis)
    maps = analysis.block_runs and mask is not None
    if band is None and not maps or not analysis.plain_logits and (logits is None or not _ws_logits(logits)):
        return None
    evaluated = maps or not analysis.plain_logits
    captures = tuple(CaptureArg(slot, nd) for slot, nd in enumerate(capture_ndims)) if evaluated else ()
    tile = _Emitter("t", tiles={}, loaded=True)
    tile_lines, logit_expr, dscore_expr, mask_lines, mask_expr, batch_inner = [], "", "", [], "", False
    staged: list = []
    row_lines, row_expr = [], ""
    if not analysis.plain_logits:
        # the forward's summands constant along each row leave its per-entry logits for the lse it
        # stores (see _row_terms: ALiBi's 4976 -> 4728 instructions). Not the backward's: its row
        # terms would be per tile (tile_origin is each query block's), and cost what they save there
        lowered, row_term = _row_terms(_lowered(logits)) if not backward else (_lowered(logits), None)
        if row_term is not None:
            rows = _Emitter("r")
            row_lines = [_gluon(x) for x in _emit_tile(rows, row_term, {id(n): False for n in _ordered([row_term])})]
            row_expr = rows.ref(row_term)
        tile_lines = _emit_tile(tile, lowered, {id(n): False for n in _ordered([lowered])})
        logit_expr = tile.ref(lowered)
        batch_inner = bool(tile.tiles) and _reads_batch_shared_tiles([lowered])  # (launched batch-inner)
        if backward:
            score = next((n for n in lowered.toposort() if n.op is Op.SCORE), None)
            dscore = _lowered(gradients(lowered, [score])[id(score)]) if score is not None else const(0.0)
            tile_lines += _emit_tile(tile, dscore, {id(n): False for n in _ordered([dscore])})
            dscore_expr = tile.ref(dscore)
    # a block map's mask with band clauses: the rest per entry, the band's only on tiles across its edges
    split = maps and analysis.band_split
    mask_band = analysis.band if split else None
    if maps:  # (its own names: a float read in it is no tile)
        lowered_mask, masks = _lowered(analysis.residual_mask if split else mask), _Emitter("m")
        axis, along = ("q_idx", "gl.SliceLayout(0, st_layout)") if backward else ("kv_idx", "s_cols")
        staged = [] if check_reads or groups != 2 else [  # (persistent programs gather them per entry)
            (n, read) for n in _ordered([lowered_mask]) if (read := axis_read_of(n)) is not None
            and read.axis == axis and read.slot in axis_slots and read.dim == capture_ndims[read.slot] - 1]
        for k, (n, _) in enumerate(staged):  # (named before the mask's lines: they take the staged values)
            masks.names[id(n)] = f"side{k}"
        mask_lines = [f"side{k} = sides[{k}].load({along})[None, :]" for k in range(len(staged))]
        mask_lines += [_gluon(line) for line in _emit_tile(masks, lowered_mask,
                                                           {id(n): False for n in _ordered([lowered_mask])})]
        mask_expr = masks.ref(lowered_mask)
    if groups not in WS_GROUP_REGS or groups != 2 and (backward or tile.tiles or extra_qk):
        raise ValueError(f"groups={groups}: the forward takes {sorted(WS_GROUP_REGS)} consumer groups, and 2 only "
                         "in the backward, with a read tensor's tiles or extra q and k columns")
    template, kernel = ("attention_bwd_ws.py.jinja", "attn_bwd_ws") if backward else ("attention_fwd_ws.py.jinja",
                                                                                      "attn_fwd_ws")
    program = {"logits": logits if logits is not None else ir.score()} | ({"mask": mask} if maps else {})
    listing = [x.strip() for x in format_program(program).splitlines()]
    source = _template(template).render(
        version=__version__, name=name, program_key=program_key[:16], gluon=True, listing=listing,
        band=band if band is not None else analysis.band, plain_logits=analysis.plain_logits, block_runs=maps,
        mask_band=mask_band,
        tile_mask_lines=mask_lines, mask_expr=mask_expr, tile_logit_lines=[_gluon(line) for line in tile_lines],
        logit_expr=logit_expr, dscore_expr=dscore_expr, capture_params=[p for c in captures for p in c.params],
        fast_math=fast_math, logits_broadcast=logits is not None and not ir.depends_on(logits, "score"),
        tile_read=bool(tile.tiles), batch_inner=batch_inner, extra_qk=extra_qk, check_reads=check_reads,
        sides=len(staged), row_lines=row_lines, row_expr=row_expr, groups=groups,
        consumer_regs=WS_GROUP_REGS[groups][0], producer_regs=WS_GROUP_REGS[groups][1])
    return KernelSource(name, source, kernel, captures, hashlib.sha256(source.encode()).hexdigest(),
                        tile_reads=tuple(tile.tiles), axis_reads=tuple(read for _, read in staged))


def _gluon(line: str) -> str:
    """A line of the emitter's Triton code in Gluon: the same elementwise functions under ``gl``."""
    return re.sub(r"\btl\.", "gl.", line)


def _all(*conditions: str) -> str:
    """``&`` of conditions, each as ``(... != 0)``: Triton 3.6's interpreter refuses ``&`` and ``|``
    between a scalar comparison of floats and a vector one (the compiled kernel drops the ``!= 0``)."""
    return " & ".join(f"(({c}) != 0)" for c in conditions) if conditions else ""


def _any(*conditions: str) -> str:
    return " | ".join(f"(({c}) != 0)" for c in conditions)


class _IntervalEmitter:
    """Interval bounds of a mask over a block of tiles of the map, as float64 Triton code (the rules
    of ``blocks._Evaluator``, which states them; float64 holds every index and id exactly): node
    ``n`` gets ``lo{i}``/``hi{i}``, booleans as 0/1; a [ROWS, 1] column where the node depends on
    ``q_idx``, a [1, CHUNK] row where it depends on ``kv_idx``, [ROWS, CHUNK] where on both, else
    scalars. A captured tensor read along one ranged dimension loads up to ``RANGE_M`` entries
    (``RANGE_N`` where the dimension depends on ``kv_idx``) per tile and takes their min/max. What
    has no rule here is unknown, so the bounds are conservative and the tile is then evaluated
    entry by entry. Reads in ``summaries`` (``analysis.side_reads``) load their blocks' bounds instead."""

    def __init__(self, summaries: dict[int, tuple[str, int]] | None = None):
        self.names: dict[int, tuple[str, str]] = {}
        self.lines: list[str] = []
        self.summaries = summaries or {}  # id(read) -> (its side, its slot)

    def emit(self, n: Node) -> tuple[str, str]:
        if id(n) in self.names:
            return self.names[id(n)]
        if id(n) in self.summaries:  # (its index bounds are not needed here)
            i, (side, slot) = len(self.names), self.summaries[id(n)]
            at, axis = ("rows", "[:, None]") if side == "q_idx" else ("cols", "[None, :]")
            at_slot = f"SUMS + (tl.program_id(2) * SLOTS + {slot}) * 2 * NB + {at}"  # ([map, slot, lo/hi, block])
            self.lines += [f"{x}{i} = tl.load({at_slot} + {k} * NB, mask={at} < NB, other=0.0){axis}"
                           for k, x in enumerate(("lo", "hi"))]
            self.names[id(n)] = (f"lo{i}", f"hi{i}")
            return self.names[id(n)]
        src = [self.emit(c) for c in n.src]
        i = len(self.names)
        lo, hi = self._rule(n, src, i)
        if n.dtype is DType.FLOAT and n.op is not Op.CONST:  # the kernel computes in fp32: widen
            lo, hi = f"({lo}) - 1e-5 * tl.abs({lo})", f"({hi}) + 1e-5 * tl.abs({hi})"
        self.lines += [f"lo{i} = zero64 + ({lo})", f"hi{i} = zero64 + ({hi})"]  # (ints, constants: float64)
        if n.dtype is not DType.BOOL and n.op not in (Op.CONST, Op.INDEX, Op.LOAD):  # inf - inf: unknown
            self.lines += [f"lo{i} = tl.where(lo{i} != lo{i}, -_INF64, lo{i})",
                           f"hi{i} = tl.where(hi{i} != hi{i}, _INF64, hi{i})"]
        self.names[id(n)] = (f"lo{i}", f"hi{i}")
        return self.names[id(n)]

    @staticmethod
    def _unknown(n: Node) -> tuple[str, str]:
        return ("0.0", "1.0") if n.dtype is DType.BOOL else ("-_INF64", "_INF64")

    def _rule(self, n: Node, s: list[tuple[str, str]], i: int) -> tuple[str, str]:
        op = n.op
        if op is Op.CONST:
            v = _literal(float(n.arg))
            return v, v
        if op is Op.INDEX:
            return {"q_idx": ("q_lo", "q_hi - 1"), "kv_idx": ("kv_lo", "kv_hi - 1"), "b": ("b", "b"), "h": ("h", "h"),
                    ir.TILE_ORIGIN: ("q_lo", "q_lo")}[n.arg]
        if op is Op.LOAD:
            return self._load(n, s, i)
        if op is Op.ADD:
            return f"{s[0][0]} + {s[1][0]}", f"{s[0][1]} + {s[1][1]}"
        if op is Op.SUB:
            return f"{s[0][0]} - {s[1][1]}", f"{s[0][1]} - {s[1][0]}"
        if op is Op.NEG:
            return f"-{s[0][1]}", f"-{s[0][0]}"
        if op is Op.MUL and n.dtype is not DType.BOOL:
            (a, b), (c, d) = s
            self.lines += [f"p{i}_{j} = tl.where({x} * {y} != {x} * {y}, 0.0, {x} * {y})"  # 0 * inf: 0
                           for j, (x, y) in enumerate(((a, c), (a, d), (b, c), (b, d)))]
            return (f"tl.minimum(tl.minimum(p{i}_0, p{i}_1), tl.minimum(p{i}_2, p{i}_3))",
                    f"tl.maximum(tl.maximum(p{i}_0, p{i}_1), tl.maximum(p{i}_2, p{i}_3))")
        if op in (Op.FLOORDIV, Op.MOD) and n.src[1].op is Op.CONST and n.src[1].arg > 0:
            c = _literal(float(n.src[1].arg))
            (lo, hi), q0, q1 = s[0], f"tl.floor({s[0][0]} / {c})", f"tl.floor({s[0][1]} / {c})"
            if op is Op.FLOORDIV:
                return q0, q1
            top = f"{c} - 1.0" if n.dtype is DType.INT else c
            return (f"tl.where({q0} == {q1}, {lo} - {c} * {q0}, 0.0)",
                    f"tl.where({q0} == {q1}, {hi} - {c} * {q1}, {top})")
        if op in (Op.MIN, Op.MAX):
            f = "tl.minimum" if op is Op.MIN else "tl.maximum"
            return f"{f}({s[0][0]}, {s[1][0]})", f"{f}({s[0][1]}, {s[1][1]})"
        if op is Op.ABS:
            (lo, hi), = s
            return (f"tl.where({lo} >= 0, {lo}, tl.where({hi} <= 0, -{hi}, 0.0))",
                    f"tl.maximum(tl.abs({lo}), tl.abs({hi}))")
        if op in _COMPARE:
            return self._compare(n, s)
        if n.dtype is DType.BOOL and op is Op.XOR:  # decided where both sides are
            (alo, ahi), (blo, bhi) = s
            known = _all(f"{alo} == {ahi}", f"{blo} == {bhi}")
            return f"tl.where({known}, tl.abs({alo} - {blo}), 0.0)", f"tl.where({known}, tl.abs({alo} - {blo}), 1.0)"
        if n.dtype is DType.BOOL and op in (Op.AND, Op.OR, Op.NOT):
            if op is Op.NOT:
                return f"1.0 - {s[0][1]}", f"1.0 - {s[0][0]}"
            f = "tl.minimum" if op is Op.AND else "tl.maximum"
            return f"{f}({s[0][0]}, {s[1][0]})", f"{f}({s[0][1]}, {s[1][1]})"
        if op is Op.WHERE:
            (clo, chi), (alo, ahi), (blo, bhi) = s
            return (f"tl.where({clo} > 0, {alo}, tl.where({chi} < 1, {blo}, tl.minimum({alo}, {blo})))",
                    f"tl.where({clo} > 0, {ahi}, tl.where({chi} < 1, {bhi}, tl.maximum({ahi}, {bhi})))")
        if op is Op.CAST and n.dtype is DType.BOOL:
            (lo, hi), = s
            return (f"tl.where({_any(f'{lo} > 0', f'{hi} < 0')}, 1.0, 0.0)",
                    f"tl.where({_all(f'{lo} == 0', f'{hi} == 0')}, 0.0, 1.0)")
        if op is Op.CAST and n.dtype is DType.INT and n.src[0].dtype is DType.FLOAT:
            return f"tl.where({s[0][0]} < 0, tl.ceil({s[0][0]}), tl.floor({s[0][0]}))", \
                f"tl.where({s[0][1]} < 0, tl.ceil({s[0][1]}), tl.floor({s[0][1]}))"  # (truncation)
        if op is Op.CAST:
            return s[0]
        if op in (Op.FLOOR, Op.CEIL):
            f = "tl.floor" if op is Op.FLOOR else "tl.ceil"
            return f"{f}({s[0][0]})", f"{f}({s[0][1]})"
        return self._unknown(n)

    def _compare(self, n: Node, s: list[tuple[str, str]]) -> tuple[str, str]:
        (alo, ahi), (blo, bhi) = s
        if DType.FLOAT in (n.src[0].dtype, n.src[1].dtype):  # the kernel compares fp32 values: a margin
            alo, ahi, blo, bhi = (f"({x}) {sign} 1e-5 * tl.abs({x})" for x, sign in
                                  ((alo, "-"), (ahi, "+"), (blo, "-"), (bhi, "+")))
        op = n.op
        if op in (Op.GT, Op.GE):
            op = Op.LT if op is Op.GT else Op.LE
            (alo, ahi), (blo, bhi) = (blo, bhi), (alo, ahi)
        if op is Op.LT:
            true, false = f"{ahi} < {blo}", f"{alo} >= {bhi}"
        elif op is Op.LE:
            true, false = f"{ahi} <= {blo}", f"{alo} > {bhi}"
        else:
            true = _all(f"{alo} == {ahi}", f"{blo} == {bhi}", f"{alo} == {blo}", f"{alo} > -_INF64", f"{alo} < _INF64")
            false = _any(f"{ahi} < {blo}", f"{bhi} < {alo}")
            if op is Op.NE:
                true, false = false, true
        return f"tl.where({true}, 1.0, 0.0)", f"tl.where({false}, 0.0, 1.0)"

    def _load(self, n: Node, s: list[tuple[str, str]], i: int) -> tuple[str, str]:
        base = f"cap{n.arg}"
        if not s:
            return f"tl.load({base}).to(tl.float64)", f"tl.load({base}).to(tl.float64)"
        ranged = [d for d, c in enumerate(n.src) if any(ir.depends_on(c, x) for x in ("q_idx", "kv_idx"))]
        if len(ranged) > 1:
            return self._unknown(n)
        points = [d for d in range(len(s)) if d not in ranged]  # (one value: the low bound)
        fixed = " + ".join(f"{s[d][0]}.to(tl.int64) * {base}_stride{d}" for d in points)
        inside = _all(*(c for d in points for c in (f"{s[d][0]} >= 0", f"{s[d][0]} < {base}_size{d}")))
        offset = f"tl.where({inside}, {fixed}, 0)" if inside else (fixed or "0")  # (never outside the tensor)
        inside = inside or "True"
        if not ranged:  # one entry
            self.lines.append(f"v{i} = tl.load({base} + {offset}).to(tl.float64)")
            return f"tl.where({inside}, v{i}, 0.0)", f"tl.where({inside}, v{i}, 0.0)"
        d = ranged[0]
        lo, hi = s[d]
        # per tile (along a third axis), the entries first..last
        width = "RANGE_N" if ir.depends_on(n.src[d], "kv_idx") else "RANGE_M"
        first, last, axis = f"first{i}[:, :, None]", f"last{i}[:, :, None]", 2
        window = f"tl.arange(0, {width})[None, None, :]"
        self.lines += [
            f"span{i} = {_all(f'{hi} - {lo} < {width}', f'{lo} > -_INF64', f'{hi} < _INF64', inside)}",
            f"first{i} = tl.where(span{i}, tl.maximum({lo}, 0.0), 0.0).to(tl.int64)",
            f"last{i} = tl.where(span{i}, tl.minimum({hi}, {base}_size{d} - 1.0), -1.0).to(tl.int64)",
            f"at{i} = {first} + {window}",
            f"vals{i} = tl.load({base} + {offset} + at{i} * {base}_stride{d}, mask=at{i} <= {last}, "
            "other=0).to(tl.float64)",
            f"outside{i} = {_any(f'{lo} < 0', f'{hi} > {base}_size{d} - 1.0')}",  # the kernel reads 0 there
            f"vlo{i} = tl.min(tl.where(at{i} <= {last}, vals{i}, _INF64), {axis})",
            f"vhi{i} = tl.max(tl.where(at{i} <= {last}, vals{i}, -_INF64), {axis})",
            f"vlo{i} = tl.where(outside{i}, tl.minimum(vlo{i}, 0.0), vlo{i})",
            f"vhi{i} = tl.where(outside{i}, tl.maximum(vhi{i}, 0.0), vhi{i})",
        ]
        return f"tl.where(span{i}, vlo{i}, -_INF64)", f"tl.where(span{i}, vhi{i}, _INF64)"


def render_block_map(name: str, program_key: str, mask: Node, capture_ndims: tuple[int, ...]) -> KernelSource:
    """The block-map module of a mask (``block_states``, ``block_runs``): its tiles classified on the
    GPU by evaluating the mask as the attention kernels do on partial tiles, and their runs."""
    listing = format_program({"mask": mask}).splitlines()
    mask = _lowered(mask)
    tile = _Emitter("t")
    for node in _ordered([mask]):
        tile.emit(node)
    captures = tuple(CaptureArg(slot, nd) for slot, nd in enumerate(capture_ndims))
    reads = side_reads(mask)
    summary = _IntervalEmitter()
    summary_stores = [(slot, side, *summary.emit(n)) for slot, (n, side) in enumerate(reads)]
    bounds = _IntervalEmitter({id(n): (side, slot) for slot, (n, side) in enumerate(reads)})
    bounds_lo, bounds_hi = bounds.emit(mask)
    expr = tile.ref(mask)
    if mask.op in _COMPARE and DType.FLOAT in (mask.src[0].dtype, mask.src[1].dtype):
        expr = f"({expr} != 0)"  # (Triton 3.6's interpreter types comparisons of floats as fp32, which & refuses)
    source = _template("block_map.py.jinja").render(
        version=__version__, name=name, ir_key=program_key[:16], program_listing=listing,
        tile_origin=_reads_tile_origin([mask]), mask_lines=tile.lines, mask_expr=expr,
        bound_lines=bounds.lines, bounds=(bounds_lo, bounds_hi), summary_lines=summary.lines,
        summary_stores=summary_stores,
        capture_params=[p for c in captures for p in c.params])
    return KernelSource(name, source, "block_states", captures, hashlib.sha256(source.encode()).hexdigest())


def _emit_tile(tile: _Emitter, root: Node, level: dict[int, bool]) -> list[str]:
    start = len(tile.lines)
    for node in _ordered([root]):
        if not level[id(node)]:
            tile.emit(node)
    return tile.lines[start:]


def _gradient_on_copies(d: Diagonal) -> bool:
    """Whether the gradient of the diagonal read ``d`` accumulates on its staggered copies (see
    ``render_backward``): where its index is not affine in q_idx - kv_idx."""
    return affine_form(d.index) is None


@dataclass(frozen=True)
class _GradRead:
    label: str  # the read, for the comment
    expr: str  # dL/d(read), rendered
    pointer: str  # where its gradient accumulates
    mask: str  # in-range condition (per-element reads)
    uniform: bool  # the read is the same for the whole tile: reduce, then one atomic
    buffer: str = ""  # the gradient's buffer (for stores in its dtype)


def render_backward(name: str, program_key: str, logits: Node, mask: Node, analysis: Analysis,
                    capture_ndims: tuple[int, ...], grad_slots: tuple[int, ...],
                    stored: tuple[int, ...] = ()) -> KernelSource:
    """The backward kernel module (dK/dV pass and dQ pass) for one attention program.

    ``grad_slots``: captured tensors whose gradient is wanted; each gets a buffer ``gcap{slot}``
    (with strides ``gcap{slot}_stride{d}``): a float32 one that the dK/dV pass accumulates into, or,
    for the slots in ``stored`` (of ``analysis.entrywise_reads``: a dense bias), one in the tensor's
    dtype that the dQ pass stores into, once per entry. That pass's [q, kv] tiles run along such a
    tensor's rows. Where the read does not name b or h (``analysis.shared_by``: a bias [H, Sq, Skv]),
    the buffer has them as leading dimensions (strides ``gcap{slot}_lead{i}``), for the caller to sum."""
    listed = {"logits": logits, "mask": mask}
    logits, mask = _lowered(logits), _lowered(mask)
    score = next((n for n in logits.toposort() if n.op is Op.SCORE), None)
    reads = [r for r in float_reads(logits) if r.arg in grad_slots]
    entrywise = {slot: index for slot, index in entrywise_reads(logits).items() if slot in stored}
    stored = [r for r in reads if r.arg in entrywise]
    wrt = ([score] if score is not None else []) + reads
    grads = {k: _lowered(g) for k, g in gradients(logits, wrt).items()}
    dscore = grads[id(score)] if score is not None else const(0.0)
    mask_roots = [mask] if analysis.has_mask else []
    numbers = _diagonals([logits, mask] + [i for r in reads for i in r.src])  # (gradients' addresses too)

    def loop_code(roots: list[Node], varying: str) -> tuple[_Emitter, list[str], list[str], list[str]]:
        """For a loop over ``varying``'s blocks: the emitter, the lines before the loop (what does
        not depend on ``varying``), the tile lines, and the mask's own tile lines (which only
        partial tiles run). Diagonal reads come from copies staggered along ``varying``; the
        emitter's names answer for the roots as given."""
        given = roots + mask_roots
        roots, masks = ([_staggered(r, numbers, varying) for r in rs] for rs in (roots, mask_roots))
        level = row_levels(roots + masks, varying)
        emitter = _Emitter("t", tiles={}, transposed=varying == "q_idx")  # (the dK/dV pass's tiles are [kv, q])
        for node in _ordered(roots + masks):
            if level[id(node)]:
                emitter.emit(node)
        outer = list(emitter.lines)
        tile = [line for root in roots for line in _emit_tile(emitter, root, level)]
        mask_lines = _emit_tile(emitter, masks[0], level) if masks else []
        for g, r in zip(given, roots + masks):
            if id(r) in emitter.names:
                emitter.names.setdefault(id(g), emitter.names[id(r)])
        return emitter, outer, tile, mask_lines

    scaled, row_term = _row_terms(times(logits, LOG2E))  # what exp2 takes, less the row terms
    rows = [row_term] if row_term is not None else []
    dq, dq_outer, dq_tile, dq_mask = loop_code(
        [scaled, dscore, *rows] + [grads[id(r)] for r in stored] + [i for r in stored for i in r.src], "kv_idx")
    stored_reads = []
    for r in stored:
        offset, in_range = _address(r, [dq.ref(i) for i in r.src], f"gcap{r.arg}")
        offset = "".join(f"({name}).to(IDX_T) * gcap{r.arg}_lead{i} + "
                         for i, name in enumerate(shared_by(entrywise[r.arg]))) + offset
        stored_reads.append(_GradRead(format_expr(r), dq._f(grads[id(r)]), f"gcap{r.arg} + {offset}", in_range,
                                      False, f"gcap{r.arg}"))
    reads = [r for r in reads if r.arg not in entrywise]  # (the dK/dV pass adds the others' gradients)
    # the gradient of a diagonal read whose index is looked up or clamped (T5's buckets: many
    # diagonals share a table entry, whose atomics would queue) accumulates where its staggered copy
    # was read (``gdiag{k}``, indexed as ``diag{k}``: 16 x the table's entries; ``runtime.gradient_buffer``
    # lays it out with the copies' row index fastest, so a warp's adds stay in a few cache lines), and
    # ``runtime.fold_staggered`` adds it into the table's gradient after the pass. Other reads'
    # accumulate at their own index: an affine index keeps a table entry to one diagonal, and its
    # neighbours in one cache line (H200: T5 2558 -> 109 ms, the plain table 96 -> 109 ms on copies).
    staggered = {id(r): _staggered(r, numbers, "q_idx") for r in reads
                 if (d := diagonal_of(r)) is not None and _gradient_on_copies(d)}
    dkdv, dkdv_outer, dkdv_tile, dkdv_mask = loop_code(
        [scaled, dscore, *rows] + [grads[id(r)] for r in reads]
        + [i for r in reads for i in (staggered[id(r)].src if id(r) in staggered else r.src)], "q_idx")
    grad_reads = []
    for r in reads:
        if id(r) in staggered:
            sr = staggered[id(r)]
            offset = _staggered_offset(sr, [dkdv.ref(i) for i in sr.src], "gdiag{}_stride", unit_last=False)
            pointer, in_range = f"gdiag{sr.arg[1]} + {offset}", "True"
        else:
            offset, in_range = _address(r, [dkdv.ref(i) for i in r.src], f"gcap{r.arg}")
            pointer = f"gcap{r.arg} + {offset}"
        uniform = not (ir.depends_on(r, "q_idx") or ir.depends_on(r, "kv_idx"))
        grad_reads.append(_GradRead(format_expr(r), dkdv._f(grads[id(r)]), pointer, in_range, uniform))
    captures = tuple(CaptureArg(slot, nd) for slot, nd in enumerate(capture_ndims))
    staggered_grads = tuple(sorted({sr.arg[1] for sr in staggered.values()}))
    numbers_by = {k: d for d, k in numbers.items()}
    added_slots = sorted({r.arg for r in reads})
    grad_params = [p for slot in added_slots
                   for p in [f"gcap{slot}"] + [f"gcap{slot}_stride{d}" for d in range(capture_ndims[slot])]]
    grad_params += [p for k in staggered_grads for d in [numbers_by[k]]
                    for p in [f"gdiag{k}"] + [f"gdiag{k}_stride{x}" for x in range(capture_ndims[d.slot] + 2)]]
    if added_slots:
        grad_params += ["GMAX", "GSCALE"]  # deterministic mode's max |contribution| and fixed-point scale
    context = dict(
        version=__version__,
        name=name,
        ir_key=program_key[:16],
        program_listing=format_program({**listed, "dL/dscore": dscore}).splitlines() + _diagonal_listing(numbers),
        # every masked backward reads a block map (for bands too: full tiles then skip the mask code)
        block_runs=analysis.has_mask,
        # dL/dscore is 1 (plain logits, or the score plus terms that do not read it): ds = dl
        unit_dscore=dscore.op is Op.CONST and dscore.arg == 1.0,
        logits_broadcast=not ir.depends_on(logits, "score"),
        tile_origin=_reads_tile_origin([scaled, dscore, *rows, *grads.values(), mask]),
        # the loaded log-sum-exp, less the row terms left out of the logits (see _row_terms)
        lse_expr=f"(lse[None, :] - {dkdv.ref(row_term)})" if rows else "lse[None, :]",
        dq_lse_expr=f"(lse[:, None] - {dq.ref(row_term)})" if rows else "lse[:, None]",
        capture_params=[p for c in captures for p in c.params] + _diagonal_params(numbers, capture_ndims),
        grad_params=grad_params,
        # code before each loop, its tiles', and the mask's (partial tiles only)
        outer_lines=dkdv_outer,
        tile_lines=dkdv_tile,
        mask_lines=dkdv_mask,
        dq_outer_lines=dq_outer,
        dq_lines=dq_tile,
        dq_mask_lines=dq_mask,
        logit_expr=dkdv.ref(scaled),
        mask_expr=dkdv.ref(mask),
        dscore_expr=dkdv._f(dscore),
        grad_reads=grad_reads,
        stored_reads=stored_reads,
        tile_tma=bool(dq.tiles or dkdv.tiles),
        dq_tile_descriptors=_tile_descriptors(dq.tiles),
        dkdv_tile_descriptors=_tile_descriptors(dkdv.tiles),
        stored_params=[p for r in stored for p in [f"gcap{r.arg}"]
                       + [f"gcap{r.arg}_lead{i}" for i in range(len(shared_by(entrywise[r.arg])))]
                       + [f"gcap{r.arg}_stride{d}" for d in range(len(r.src))]],
        # learnable tensors read in 2-D tiles that the batch shares (a dense bias): batch entries side by side
        batch_inner=_reads_batch_shared_tiles(reads),
        # the dQ pass has its own (smaller) tile code, so its own names
        dq_logit_expr=dq.ref(scaled),
        dq_mask_expr=dq.ref(mask),
        dq_dscore_expr=dq._f(dscore),
    )
    source = _template("attention_bwd.py.jinja").render(**context)
    return KernelSource(name, source, "attn_bwd_dkdv", captures, hashlib.sha256(source.encode()).hexdigest(),
                        tuple(numbers), staggered_grads, tuple((r.arg, entrywise[r.arg]) for r in stored),
                        tuple(dict.fromkeys([*dq.tiles, *dkdv.tiles])))
