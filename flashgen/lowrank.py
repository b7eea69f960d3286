"""Low-rank structure of additive biases (FlashBias): is ``logits - score`` a short sum of
products ``f_r(b, h, q_idx) · g_r(b, h, kv_idx)``?

The logits are split as ``score + A`` when the score is one top-level summand of them and no
other summand reads it (``score_mod(score) = score + ...`` plus any ``bias``). ``A`` goes to sympy; its maximal
non-polynomial subexpressions become atoms, classified by the indices they read: query-side
(``q_idx`` and possibly ``b``, ``h``: ``slopes[h] * q_idx``, ``q_idx % W``), key-side, or
coefficient (``b``, ``h`` only). An atom that reads both ``q_idx`` and ``kv_idx`` (a table
indexed by ``q_idx - kv_idx``, ``exp(q_idx * kv_idx)``) is not separable. What remains is a
polynomial in the query-side and key-side atoms; with its coefficients arranged as a matrix
``M[query monomial, key monomial]``, ``A = Σ M_ij F_i G_j`` and the rank of ``M`` (generic in the
coefficients) is the exact separation rank. Terms without any key-side factor are constant along
a row, so softmax ignores them: ``softmax_rank`` drops them (they still count when the
log-sum-exp is returned, which ``rank`` includes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Node, Op, depends_on, to_sympy


@dataclass(frozen=True)
class BiasStructure:
    """The additive bias part of a program's logits, and how it separates."""

    additive: bool  # logits == score + A with A independent of the score
    rank: int | None  # exact separation rank of A (None: not separable, or not additive)
    softmax_rank: int | None  # rank without the query-only terms (which cancel in the softmax)
    factors: tuple[tuple[str, str], ...]  # (query-side monomial, key-side monomial) terms, for explain()
    reason: str  # why rank is None, or "" when it is not

    def report(self) -> str:
        if self.rank is None:
            return f"not low-rank ({self.reason})"
        terms = " + ".join(f"[{f}]·[{g}]" for f, g in self.factors[:8]) + (" + ..." if len(self.factors) > 8 else "")
        return (f"rank {self.rank} ({self.softmax_rank} without query-only terms): "
                f"bias = Σ coefficient(b, h) × {terms}")


_NONE = BiasStructure(False, None, None, (), "")


def bias_structure(logits: Node) -> BiasStructure:
    """Separate ``logits = score + A`` and find the exact rank of ``A`` (see the module doc)."""
    import sympy as sp

    terms = _summands(logits, 1)
    with_score = [(sign, t) for sign, t in terms if depends_on(t, "score")]
    if not with_score:
        return BiasStructure(False, None, None, (), "the logits do not contain the score")
    if len(with_score) != 1 or with_score[0][0] != 1 or with_score[0][1].op is not Op.SCORE:
        return BiasStructure(False, None, None, (), "the logits are not score + a bias (the score_mod is not additive)")
    bias = sp.Integer(0)
    for sign, t in terms:
        if t.op is not Op.SCORE:
            bias += sign * to_sympy(t)
    bias = sp.expand(bias)
    if bias == 0:
        return BiasStructure(True, 0, 0, (), "")
    q = sp.Symbol("q_idx", integer=True, nonnegative=True)
    kv = sp.Symbol("kv_idx", integer=True, nonnegative=True)
    atoms: dict[object, sp.Symbol] = {}
    sides: dict[sp.Symbol, str] = {q: "q", kv: "kv"}

    def side(e) -> str:
        free = e.free_symbols
        return "mixed" if q in free and kv in free else "q" if q in free else "kv" if kv in free else "coef"

    def polynomial_part(e):
        """``e`` with maximal non-polynomial subexpressions replaced by atom symbols."""
        if e.is_Symbol or e.is_Number:
            return e
        if e.is_Add or e.is_Mul:
            return e.func(*(polynomial_part(a) for a in e.args))
        if e.is_Pow and e.exp.is_Integer and e.exp > 0:
            return polynomial_part(e.base) ** e.exp
        where = side(e)
        if where == "mixed":
            raise _Mixed(e)
        if where == "coef":
            return e
        if e not in atoms:
            sym = sp.Symbol(f"{where}_atom{len(atoms)}")
            atoms[e] = sym
            sides[sym] = where
        return atoms[e]

    try:
        poly_expr = sp.expand(polynomial_part(bias))
    except _Mixed as mixed:
        return BiasStructure(True, None, None, (), f"{mixed.args[0]} reads q_idx and kv_idx together")
    qs = [s for s in poly_expr.free_symbols if sides.get(s) == "q"]
    ks = [s for s in poly_expr.free_symbols if sides.get(s) == "kv"]
    if not qs and not ks:
        return BiasStructure(True, 1, 0, (("1", "1"),), "")
    poly = sp.Poly(poly_expr, *qs, *ks)
    rows: dict[tuple, int] = {}
    cols: dict[tuple, int] = {}
    entries: dict[tuple[int, int], object] = {}
    for monomial, coeff in poly.terms():
        fm, gm = monomial[: len(qs)], monomial[len(qs):]
        i = rows.setdefault(fm, len(rows))
        j = cols.setdefault(gm, len(cols))
        entries[i, j] = coeff
    matrix = sp.zeros(len(rows), len(cols))
    for (i, j), c in entries.items():
        matrix[i, j] = c
    rank = matrix.rank(simplify=True)
    constant_key = cols.get(tuple(0 for _ in ks))
    keep = [j for j in range(len(cols)) if j != constant_key]
    softmax_rank = matrix[:, keep].rank(simplify=True) if keep else 0
    inverse = {v: k for k, v in atoms.items()}

    def show(syms, monomial) -> str:
        parts = [f"{inverse.get(s, s)}" + (f"^{p}" if p > 1 else "") for s, p in zip(syms, monomial) if p]
        return "·".join(parts) or "1"

    by_index_r = {v: k for k, v in rows.items()}
    by_index_c = {v: k for k, v in cols.items()}
    factors = tuple((show(qs, by_index_r[i]), show(ks, by_index_c[j])) for (i, j) in sorted(entries))
    return BiasStructure(True, int(rank), int(softmax_rank), factors, "")


def _summands(node: Node, sign: int) -> list[tuple[int, Node]]:
    """``node`` as signed terms of its top-level sums and differences."""
    if node.op is Op.ADD:
        return _summands(node.src[0], sign) + _summands(node.src[1], sign)
    if node.op is Op.SUB:
        return _summands(node.src[0], sign) + _summands(node.src[1], -sign)
    if node.op is Op.NEG:
        return _summands(node.src[0], -sign)
    return [(sign, node)]


class _Mixed(Exception):
    """A subexpression that reads both q_idx and kv_idx and is not polynomial."""


# H200 (Hopper): ~990 TFLOP/s of bf16 tensor-core work against ~67 TFLOP/s of fp32 arithmetic
# elsewhere, so one elementwise operation per score costs about as much as 15 tensor-core FLOPs.
ELEMENTWISE_COST = 15
LOAD_COST = 4  # a read of a captured tensor per score, in elementwise operations
# a q·kᵀ column's tensor-core cost by input dtype, in bf16 FLOPs: fp32 runs as tf32x3, three tf32
# products at half bf16's rate
DOT_COST = {"bf16": 1, "fp16": 1, "fp32": 6}


def head_blocks(head_dim: int) -> tuple[int, int]:
    """The q·kᵀ head blocks the kernels use for a head dim: (BLOCK_D, BLOCK_D2), powers of two of
    at least 16, BLOCK_D2 = 0 for one block. A head that a second, narrower block covers with less
    padding than the next power of two runs as two dots: 144 -> (128, 16), 192 -> (128, 64),
    80 -> (64, 16); 128 -> (128, 0), 200 -> (256, 0)."""
    whole = max(16, 1 << (head_dim - 1).bit_length())
    first = whole // 2
    second = max(16, 1 << (head_dim - first - 1).bit_length()) if head_dim > first else 0
    return (first, second) if first >= 16 and second and first + second < whole else (whole, 0)


def lowering_cost(logits: Node, rank: int, head_dim: int, dtype: str = "bf16",
                  max_head_dim: int = 256) -> tuple[str, str]:
    """("loop" or "factors", why): evaluating the additive bias per score costs its operations;
    as factors it costs the extra q·kᵀ columns, padded to the head blocks the kernels use, at the
    tensor-core rate of ``dtype`` ("bf16", "fp16" or "fp32")."""
    terms = [t for _, t in _summands(logits, 1) if t.op is not Op.SCORE]
    nodes = {id(n): n for t in terms for n in t.toposort() if n.op not in (Op.CONST, Op.INDEX)}
    ops = sum(LOAD_COST if n.op is Op.LOAD else 1 for n in nodes.values()) + len(terms)
    if head_dim + rank > max_head_dim:
        return "loop", f"loop: head dim {head_dim} plus rank {rank} exceeds {max_head_dim}, the kernels' widest head"
    width, wider = sum(head_blocks(head_dim)), sum(head_blocks(head_dim + rank))
    factors, loop = 2 * (wider - width) * DOT_COST[dtype], ELEMENTWISE_COST * ops
    choice = "factors" if factors < loop else "loop"
    return choice, (f"{choice}: factors add {wider - width} q·k columns ({factors} bf16 tensor-core FLOPs per "
                    f"score at {dtype}), the loop {ops} operations (~{loop})")
