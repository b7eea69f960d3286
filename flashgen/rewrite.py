"""Simplification of IR expressions as a list of rewrite rules run bottom-up to a fixpoint.

Each rule takes a node whose children are already simplified and returns a replacement or None.
The point is canonical forms: equivalent mods (``q - q + kv`` and ``kv``, ``where(True, a, b)``
and ``a``) simplify to the same node, hence the same key, hence one compiled kernel.
Rules only ever rewrite to something equal for every input (float rules avoid identities that
NaN or infinity would break, such as ``x * 0 -> 0``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

from .ir import CONST_EVAL, TILE_ORIGIN, DType, Node, Op, binary, const, depends_on, index, unary

Rule = Callable[[Node], Node | None]


def _is_const(node: Node, value: object = None) -> bool:
    if node.op is not Op.CONST:
        return False
    return value is None or (node.arg == value and isinstance(node.arg, bool) == isinstance(value, bool))


def _coerce(value: object, dtype: DType) -> object:
    if dtype is DType.BOOL:
        return bool(value)
    if dtype is DType.INT:
        return int(value)
    return float(value)


def _round_float(value: float, target: str) -> float:
    """``value`` rounded to a float16/bfloat16/float32 (round to nearest even), as a Python float."""
    if target == "float16":
        return struct.unpack("<e", struct.pack("<e", value))[0]
    as32 = struct.unpack("<f", struct.pack("<f", value))[0]
    if target != "bfloat16" or not math.isfinite(as32):
        return as32
    bits = struct.unpack("<I", struct.pack("<f", as32))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def fold_casts(node: Node) -> Node | None:
    if node.op is not Op.CAST or node.src[0].op is not Op.CONST:
        return None
    value = node.src[0].arg
    if node.dtype is DType.BOOL:
        return const(bool(value))
    if node.dtype is DType.INT:
        return const(int(value))  # truncation toward zero, as torch's float -> int cast
    try:
        return const(_round_float(float(value), node.arg) if node.arg != "float64" else float(value))
    except (OverflowError, struct.error):  # out of float16 range: torch gives inf
        return const(math.copysign(math.inf, float(value)))


def fold_constants(node: Node) -> Node | None:
    if node.op not in CONST_EVAL or not node.src or not all(s.op is Op.CONST for s in node.src):
        return None
    args = [s.arg for s in node.src]
    try:
        value = CONST_EVAL[node.op](*args)
    except (ArithmeticError, ValueError):
        return None  # division by zero, log of a negative, ...: leave it to run time, as torch does
    return const(_coerce(value, node.dtype))


# not(x op y) on integers: (op', swap operands?)
_NEGATED = {Op.LT: (Op.LE, True), Op.LE: (Op.LT, True), Op.GT: (Op.LE, False), Op.GE: (Op.LT, False),
            Op.EQ: (Op.NE, False), Op.NE: (Op.EQ, False)}


def identities(node: Node) -> Node | None:
    op, src = node.op, node.src
    if op is Op.ADD:
        a, b = src
        if _is_const(a, 0) and b.dtype is node.dtype:
            return b
        if _is_const(b, 0) and a.dtype is node.dtype:
            return a
    if op is Op.SUB:
        a, b = src
        if _is_const(b, 0) and a.dtype is node.dtype:
            return a
        if a is b and node.dtype is DType.INT:
            return const(0)
        # (x + y) - y  ->  x   (integers only: exact)
        if node.dtype is DType.INT and a.op is Op.ADD and b in a.src:
            return a.src[1] if a.src[0] is b else a.src[0]
    if op is Op.MUL:
        a, b = src
        if _is_const(a, 1) and b.dtype is node.dtype:
            return b
        if _is_const(b, 1) and a.dtype is node.dtype:
            return a
        if node.dtype is DType.INT and (_is_const(a, 0) or _is_const(b, 0)):
            return const(0)
    if op is Op.TRUEDIV and _is_const(src[1], 1) and src[0].dtype is DType.FLOAT:
        return src[0]
    if op in (Op.FLOORDIV,) and _is_const(src[1], 1) and src[0].dtype is DType.INT:
        return src[0]
    if op is Op.MOD and _is_const(src[1], 1) and src[0].dtype is DType.INT:
        return const(0)
    if op in (Op.MIN, Op.MAX) and src[0] is src[1]:
        return src[0]
    if op is Op.NEG and src[0].op is Op.NEG:
        return src[0].src[0]
    if op is Op.NOT and src[0].op is Op.NOT:
        return src[0].src[0]
    if op is Op.NOT and src[0].op in _NEGATED and DType.FLOAT not in (src[0].src[0].dtype, src[0].src[1].dtype):
        x, y = src[0].src
        negated, swap = _NEGATED[src[0].op]
        return binary(negated, y, x) if swap else binary(negated, x, y)
    if op is Op.NOT and src[0].op is Op.CONST and node.dtype is DType.BOOL:
        return const(not src[0].arg)
    if op is Op.CAST and src[0].dtype is node.dtype and node.arg in ("bool", "int32", "int64", "float32"):
        return src[0]
    return None


def boolean_logic(node: Node) -> Node | None:
    if node.dtype is not DType.BOOL or node.op not in (Op.AND, Op.OR):
        return None
    a, b = node.src
    absorbing, neutral = (False, True) if node.op is Op.AND else (True, False)
    for x, y in ((a, b), (b, a)):
        if _is_const(x, absorbing):
            return const(absorbing)
        if _is_const(x, neutral):
            return y
    if a is b:
        return a
    # x & ~x -> False, x | ~x -> True
    if (a.op is Op.NOT and a.src[0] is b) or (b.op is Op.NOT and b.src[0] is a):
        return const(absorbing)
    # chains of one operator: drop repeated terms and order them canonically, so that
    # `causal & window & causal` and `window & causal` are one node
    terms = _chain(node, node.op)
    unique = sorted({t.key: t for t in terms}.values(), key=lambda t: t.key)
    rebuilt = unique[0]
    for term in unique[1:]:
        rebuilt = Node(node.op, DType.BOOL, None, (rebuilt, term))
    return rebuilt if rebuilt is not node else None


def _chain(node: Node, op: Op) -> list[Node]:
    if node.op is op and node.dtype is DType.BOOL:
        return _chain(node.src[0], op) + _chain(node.src[1], op)
    return [node]


def comparisons(node: Node) -> Node | None:
    if node.op not in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
        return None
    a, b = node.src
    if a is b and a.dtype is not DType.FLOAT:
        return const(node.op in (Op.LE, Op.GE, Op.EQ))

    # a > b  ->  b < a,  a >= b  ->  b <= a: one spelling per relation
    if node.op is Op.GT:
        return binary(Op.LT, b, a)
    if node.op is Op.GE:
        return binary(Op.LE, b, a)
    return None


def selects(node: Node) -> Node | None:
    if node.op is not Op.WHERE:
        return None
    cond, a, b = node.src
    if _is_const(cond):
        chosen = a if cond.arg else b
        return chosen if chosen.dtype is node.dtype else unary(Op.CAST, chosen, _cast_name(node.dtype))
    if a is b:
        return a
    if cond.op is Op.NOT:
        return Node(Op.WHERE, node.dtype, None, (cond.src[0], b, a))
    if node.dtype is DType.BOOL and _is_const(a, True) and _is_const(b, False):
        return cond
    return None


def _mixed(node: Node) -> bool:
    """Whether ``node`` reads both q_idx and kv_idx (so that a kernel computes it on whole tiles,
    not on a row or column vector)."""
    return depends_on(node, "q_idx") and depends_on(node, "kv_idx")


def _as_float(node: Node) -> Node:
    """An integer index expression as float32, converted at the operands of its sums where it reads
    both q_idx and kv_idx: ``float(kv) - float(q)`` converts row and column vectors, ``float(kv - q)``
    every tile entry. Exact while the integers stay below 2**24 (``x**2`` of a sum rounds once either way)."""
    if _mixed(node):
        if node.op in (Op.ADD, Op.SUB):
            return binary(node.op, _as_float(node.src[0]), _as_float(node.src[1]))
        if node.op is Op.NEG:
            return unary(Op.NEG, _as_float(node.src[0]))
        if node.op is Op.POW and _is_const(node.src[1], 2) and node.src[0].op in (Op.ADD, Op.SUB, Op.NEG):
            return binary(Op.POW, _as_float(node.src[0]), node.src[1])
    return unary(Op.CAST, node, "float32")


def float_index_arithmetic(node: Node) -> Node | None:
    """Lowering (not among :data:`RULES`: it changes how a value is computed, not which): integer tile
    expressions a float operation reads (ALiBi's ``slope * (kv_idx - q_idx)``) go through :func:`_as_float`."""
    if node.dtype is not DType.FLOAT or node.op not in (Op.CAST, Op.ADD, Op.SUB, Op.MUL, Op.TRUEDIV, Op.MIN, Op.MAX):
        return None
    if node.op is Op.CAST and node.arg not in ("float32", "float64"):
        return None
    src = []
    for x in node.src:
        converted = _as_float(x) if x.dtype is DType.INT else x
        src.append(x if converted.op is Op.CAST else converted)  # a plain conversion gains nothing
    if tuple(src) == node.src:
        return None
    return src[0] if node.op is Op.CAST else binary(node.op, *src)


_FP32_NORMAL = (1.1754943508222875e-38, 3.4028234663852886e38)  # the kernels compute in float32


def _normal32(x: float) -> bool:
    """Whether ``x`` is a normal float32 magnitude (folding a constant into one that is not, a
    subnormal or an overflow, could change results beyond a rounding)."""
    return _FP32_NORMAL[0] <= abs(x) <= _FP32_NORMAL[1]


def reciprocal_constants(node: Node) -> Node | None:
    """Lowering: ``x / c`` -> ``x * (1 / c)`` for a float constant ``c`` (a multiply instead of an
    IEEE division sequence per entry; at most one rounding apart)."""
    if node.op is Op.TRUEDIV and _is_const(node.src[1]) and not isinstance(node.src[1].arg, bool):
        c = float(node.src[1].arg)
        if _normal32(c) and _normal32(1.0 / c):
            return binary(Op.MUL, node.src[0], const(1.0 / c))
    return None


def constant_products(node: Node) -> Node | None:
    """Lowering: ``a * (b * x)`` -> ``(a * b) * x`` for float constants ``a`` and ``b`` (as in the
    gradient of a soft-cap, ``30 * (1 - t*t) * (1/30)``; one rounding apart)."""
    if node.op is not Op.MUL or node.dtype is not DType.FLOAT:
        return None
    for a, inner in (node.src, node.src[::-1]):
        if _is_const(a) and inner.op is Op.MUL:
            for b, x in (inner.src, inner.src[::-1]):
                if _is_const(b) and not isinstance(a.arg, bool) and not isinstance(b.arg, bool):
                    product = float(a.arg) * float(b.arg)
                    if _normal32(product):
                        return binary(Op.MUL, const(product), x)
    return None


def _split_difference(node: Node) -> tuple[Node, Node] | None:
    """``(plus, minus)``, a column and a row vector (or a row and a column) with ``node == plus -
    minus``, for ``node`` an index difference ``float(kv_idx) - float(q_idx)`` (either way round)
    times factors computed per row, column or head; each index is measured from the kernel's
    tile origin (``TILE_ORIGIN``), so that both stay small near the diagonal."""
    if node.op is Op.SUB and all(x.op is Op.CAST and x.src[0].op is Op.INDEX for x in node.src):
        i, j = (x.src[0] for x in node.src)
        if {i.arg, j.arg} == {"q_idx", "kv_idx"}:
            origin = index(TILE_ORIGIN)
            return tuple(unary(Op.CAST, binary(Op.SUB, x, origin), "float32") for x in (i, j))
    if node.op is Op.NEG and (split := _split_difference(node.src[0])) is not None:
        return split[1], split[0]
    if node.op is Op.MUL and node.dtype is DType.FLOAT:
        for f, d in (node.src, node.src[::-1]):
            if not _per_entry(f) and (split := _split_difference(d)) is not None:
                return binary(Op.MUL, f, split[0]), binary(Op.MUL, f, split[1])
    return None


def recentred_differences(node: Node) -> Node | None:
    """Lowering: ``x + f * (kv_idx - q_idx)`` with ``x`` computed per entry (it reads the score) ->
    ``(x + f * (kv_idx - o)) - f * (q_idx - o)``, ``o`` the kernel's tile origin. The products are
    a column and a row vector; the row term then leaves the per-entry logits for the log-sum-exp
    (codegen's ``_row_terms``), so each entry costs one fused multiply-add instead of a
    subtraction, a multiply and an add (ALiBi). Measuring both indices from ``o`` keeps the terms
    as small as the difference near the diagonal, where the weights are: adding ``f * kv`` and
    subtracting ``f * q`` would cancel and lose ~ulp(f * S) there. A few roundings apart."""
    if node.op not in (Op.ADD, Op.SUB) or node.dtype is not DType.FLOAT:
        return None
    pairs = [(node.src[0], node.src[1])] + ([(node.src[1], node.src[0])] if node.op is Op.ADD else [])
    for x, y in pairs:
        if depends_on(x, "score") and (split := _split_difference(y)) is not None:
            plus, minus = split if node.op is Op.ADD else split[::-1]
            return binary(Op.SUB, binary(Op.ADD, x, plus), minus)
    return None


LOWERING_RULES: list[Rule] = [float_index_arithmetic, reciprocal_constants, constant_products, recentred_differences]


def _per_entry(node: Node) -> bool:
    """Whether a kernel computes ``node`` per tile entry (it reads the score, or both indices)."""
    return depends_on(node, "score") or _mixed(node)


def _per_head(node: Node) -> bool:
    """Whether ``node`` is the same for every entry of a tile (it reads no index but b and h)."""
    return not any(depends_on(node, name) for name in ("score", "q_idx", "kv_idx", TILE_ORIGIN))


def _pushed(node: Node, c: float) -> Node | None:
    """``c * node`` with the factor pushed to where it costs no per-entry multiply (the score, whose
    scaling it joins, or operands computed per row, column or head), or None where it would have
    to multiply a per-entry value."""
    op, src = node.op, node.src
    if node.dtype is not DType.FLOAT or not _per_entry(node) or op is Op.SCORE:
        if op is Op.MUL and node.dtype is DType.FLOAT and any(_per_head(x) for x in src):
            a, b = src if _per_head(src[0]) else src[::-1]  # into a row's or column's per-head factor
            return binary(Op.MUL, simplify(binary(Op.MUL, a, const(c))), b)
        return simplify(binary(Op.MUL, node, const(c)))
    if op is Op.MUL and not (_per_entry(src[0]) and _per_entry(src[1])):
        a, b = src if not _per_entry(src[0]) else src[::-1]  # a: the factor computed per row/column
        return binary(Op.MUL, simplify(binary(Op.MUL, a, const(c))), b)
    if op not in (Op.ADD, Op.SUB, Op.NEG, Op.WHERE) and not (op is Op.TRUEDIV and not _per_entry(src[1])):
        return None
    first = 1 if op is Op.WHERE else 0  # (a select's condition is not scaled)
    last = 1 if op is Op.TRUEDIV else len(src)  # (nor a divisor)
    scaled = [_pushed(x, c) for x in src[first:last]]
    if any(x is None for x in scaled):
        return None
    return _rebuild(node, src[:first] + tuple(scaled) + src[last:])


def times(node: Node, c: float) -> Node:
    """``c * node`` with the factor pushed through sums, negations, selects and products down to
    the score or to operands computed per row, column or head, where it costs nothing per tile
    entry: ``c * (score + slope * d)`` becomes ``c·score + (c·slope) * d``. Where pushing would
    multiply a per-entry value (``score + table[q - kv]``: the table's read), the product is taken
    once, of the whole. The kernels scale logits by log2(e) for ``exp2`` this way. Equal up to
    float rounding (one rounding per pushed product instead of one for the whole)."""
    pushed = _pushed(node, c)
    return pushed if pushed is not None else simplify(binary(Op.MUL, node, const(c)))


def _cast_name(dtype: DType) -> str:
    return {DType.BOOL: "bool", DType.INT: "int32", DType.FLOAT: "float32"}[dtype]


RULES: list[Rule] = [fold_constants, fold_casts, identities, boolean_logic, comparisons, selects]


def _rebuild(node: Node, src: tuple[Node, ...]) -> Node:
    if src == node.src:
        return node
    if node.op in (Op.ADD, Op.SUB, Op.MUL, Op.TRUEDIV, Op.FLOORDIV, Op.MOD, Op.POW, Op.MIN, Op.MAX,
                   Op.AND, Op.OR, Op.XOR, Op.SHL, Op.SHR, Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
        return binary(node.op, *src)
    return Node(node.op, node.dtype, node.arg, src)


def simplify(root: Node, rules: list[Rule] = RULES) -> Node:
    """Apply ``rules`` bottom-up until nothing changes."""
    memo: dict[int, Node] = {}

    def visit(node: Node) -> Node:
        done = memo.get(id(node))
        if done is not None:
            return done
        current = _rebuild(node, tuple(visit(c) for c in node.src))
        for _ in range(64):
            for rule in rules:
                replacement = rule(current)
                if replacement is not None and replacement is not current:
                    current = visit(replacement)
                    break
            else:
                break
        memo[id(node)] = current
        return current

    return visit(root)
