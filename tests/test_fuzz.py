"""Property tests with random mods.

Random ``score_mod`` / ``mask_mod`` / ``bias`` functions are generated as Python source from a
small grammar and exec'd, so a falsifying example prints as readable code. Each generated
expression carries static facts about its value: a bound on its magnitude, an estimate of how far
the fp32 kernel may drift from the float64 reference, and whether both compute it bit-exactly
(dyadic values that fit an fp32 significand). The generator uses them to keep logits finite and
moderate, and to apply discontinuous operations (floor, sign, comparisons in ``torch.where``,
float ``//`` and ``%``) only to exactly computed values, so that a comparison failure means a bug
rather than rounding noise.

Properties:
- kernel == float64 reference (out relative error < 1e-4, lse within 1e-4, -inf exactly where the
  reference has fully masked rows, no NaN), for random score mods, masks, biases and shapes;
- equivalent spellings of a mod (identities, commuted operands, flipped comparisons, double
  negations) give the same program key; mods that compute different values give different keys.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashgen as fg
from flashgen import ir

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
EPS = 2.0**-24  # fp32 unit roundoff
MAX_FLOAT = 64.0  # bound on |value| of inexact float subexpressions and of the final logits
MAX_EXACT = 2.0**12  # bound on |value| of exactly computed floats
MAX_INT = 2**20  # bound on |value| of integer subexpressions (kernels compute ints in int32)
MAX_ERR = 2e-6  # bound on the estimated kernel-vs-reference drift of a float subexpression
SCORE_BOUND = 8.0  # |scale * q.k| for randn inputs stays far below this at these sizes
SCORE_ERR = 3e-7  # fp32 q.k in the kernel against float64 in the reference

# FLASHGEN_FUZZ_SCALE=10 runs ten times as many examples (for a longer hunt than CI's)
_SCALE = float(os.environ.get("FLASHGEN_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, round(n * _SCALE))


FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

_COMPARISONS = (ir.Op.LT, ir.Op.LE, ir.Op.GT, ir.Op.GE, ir.Op.EQ, ir.Op.NE)
TENSORS = ("hs", "rel", "qd", "tab", "kvi", "qi", "kb")


# ---------------------------------------------------------------------------------------------
# expressions


@dataclass(frozen=True)
class Ex:
    """A generated expression: an op over child expressions (a leaf holds its source text)."""

    op: str
    args: tuple = ()
    kind: str = "float"  # "int", "float" or "bool"
    m: float = 0.0  # |value| <= m
    err: float = 0.0  # estimated |kernel - reference| (0 for ints, bools and exact floats)
    exact: bool = True  # kernel and reference compute the same value bit for bit
    frac: int = 0  # fractional bits of an exact float value
    const: bool = False  # a bare Python number (torch functions need a tensor argument)
    value: object = None  # the number, for constants
    tensors: frozenset = frozenset()  # captured tensors read
    score: bool = False  # depends on the score


def leaf(src: str, kind: str, m: float, *, exact: bool = True, frac: int = 0, err: float = 0.0,
         tensor: str | None = None, score: bool = False) -> Ex:
    return Ex("leaf", (src,), kind, float(m), err, exact, frac, tensors=frozenset([tensor] if tensor else []),
              score=score)


def const(v: bool | int | float) -> Ex:
    src = repr(v) if v >= 0 else f"({v!r})"
    kind = "float" if isinstance(v, float) else "int"
    frac = v.as_integer_ratio()[1].bit_length() - 1 if isinstance(v, float) else 0
    return Ex("leaf", (src,), kind, float(abs(v)), 0.0, True, frac, const=True, value=v)


NEG_INF = Ex("leaf", ('float("-inf")',), "float", math.inf, const=True, value=-math.inf)


def _fp32(ex: Ex) -> Ex:
    """Account for the rounding of one fp32 operation producing ``ex``."""
    if ex.kind != "float":
        return replace(ex, err=0.0, exact=True, frac=0)
    if ex.exact and ex.frac + math.log2(ex.m + 1) <= 22:
        return replace(ex, err=0.0)
    return replace(ex, exact=False, frac=0, err=ex.err + EPS * ex.m)


def _pow2_exponent(c: float) -> int | None:
    mant, exp = math.frexp(abs(c))
    return exp - 1 if mant == 0.5 else None


UNARY_FUNCS = ("tanh", "sigmoid", "sin", "cos", "exp", "floor", "sign")
COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
TEMPLATES = {
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
    "floordiv": "({0} // {1})", "mod": "({0} % {1})", "pow2": "({0} ** 2)", "neg": "(-{0})", "abs": "abs({0})",
    "where": "torch.where({0}, {1}, {2})", "minimum": "torch.minimum({0}, {1})",
    "maximum": "torch.maximum({0}, {1})", "clamp": "torch.clamp({0}, {1}, {2})", "float": "{0}.float()",
    "recip1p": "({0} / (1.0 + {1} ** 2))", "leaky": "torch.where({0} > 0.0, {0}, {0} * 0.25)",
    "boolmul": "({0} * {1})", "and": "({0} & {1})", "or": "({0} | {1})", "xor": "({0} ^ {1})", "not": "(~{0})",
    **{f: f"torch.{f}({{0}})" for f in UNARY_FUNCS},
    **{k: f"({{0}} {v} {{1}})" for k, v in COMPARE.items()},
}


def node(op: str, *args: Ex) -> Ex:
    """``op`` applied to ``args``, with the value facts worked out."""
    a = args[0]
    b = args[1] if len(args) > 1 else None
    num = "float" if any(x.kind == "float" for x in args) else "int"
    base = Ex(op, args, num, const=all(x.const for x in args),
              tensors=frozenset().union(*(x.tensors for x in args)), score=any(x.score for x in args),
              exact=all(x.exact for x in args), err=max(x.err for x in args))
    if op in ("add", "sub"):
        ex = replace(base, m=a.m + b.m, err=a.err + b.err, frac=max(a.frac, b.frac))
    elif op == "mul":
        ex = replace(base, m=a.m * b.m, err=a.err * b.m + b.err * a.m, frac=a.frac + b.frac)
    elif op == "div":  # by a non-zero constant
        c = b.value
        k = _pow2_exponent(c)
        ex = replace(base, kind="float", m=a.m / abs(c), err=a.err / abs(c), exact=a.exact and k is not None,
                     frac=max(a.frac + (k or 0), 0))  # dividing by 2**k adds k fractional bits
    elif op == "recip1p":  # a / (1 + b**2): b's error moves 1 / (1 + b**2) by at most 0.65 * err
        ex = replace(base, kind="float", m=a.m, err=a.err + a.m * (0.65 * b.err + 3 * EPS), exact=False)
    elif op in ("floordiv", "mod") and num == "float":  # exact dividend, power-of-two divisor
        c = abs(b.value)
        if op == "floordiv":
            ex = replace(base, m=a.m / c + 1, frac=0)
        else:
            ex = replace(base, m=c, frac=max(a.frac, b.frac))
    elif op == "floordiv":  # integers, non-zero divisor
        ex = replace(base, m=max(a.m, 1.0))
    elif op == "mod":
        ex = replace(base, m=max(b.m - 1, 0.0))
    elif op == "pow2":
        ex = replace(base, m=a.m * a.m, err=2 * a.m * a.err, frac=2 * a.frac)
    elif op in ("neg", "abs"):
        ex = replace(base, m=a.m, frac=a.frac)
    elif op in ("minimum", "maximum"):
        ex = replace(base, m=max(a.m, b.m), frac=max(a.frac, b.frac))
    elif op == "where":
        c, x, y = args
        ex = replace(base, kind="float" if "float" in (x.kind, y.kind) else "int", m=max(x.m, y.m),
                     err=max(x.err, y.err), exact=x.exact and y.exact, frac=max(x.frac, y.frac), const=False)
    elif op == "clamp":
        ex = replace(base, m=max(abs(args[1].value), abs(args[2].value)), frac=max(x.frac for x in args))
    elif op in ("tanh", "sigmoid"):
        ex = replace(base, kind="float", m=1.0, err=a.err + 4 * EPS, exact=False)
    elif op in ("sin", "cos"):
        ex = replace(base, kind="float", m=1.0, err=a.err + 4 * EPS, exact=False)
    elif op == "exp":
        ex = replace(base, kind="float", m=math.exp(a.m), err=math.exp(a.m) * (a.err + 4 * EPS), exact=False)
    elif op == "floor":
        ex = replace(base, m=a.m + 1)
    elif op == "sign":
        ex = replace(base, m=1.0)
    elif op == "float":
        ex = replace(base, kind="float", m=a.m, frac=a.frac)
    elif op == "leaky":
        ex = replace(base, m=a.m, err=a.err + EPS * a.m)
    elif op == "boolmul":
        ex = replace(base, kind=b.kind, m=abs(b.value), frac=b.frac)
    elif op in COMPARE or op in ("and", "or", "xor", "not"):
        return replace(base, kind="bool", m=1.0, err=0.0, exact=True, frac=0)
    else:  # pragma: no cover
        raise AssertionError(op)
    return _fp32(ex)


def ok(ex: Ex) -> bool:
    if ex.kind == "int":
        return ex.m <= MAX_INT
    if ex.kind == "float":
        return ex.m <= (MAX_EXACT if ex.exact else MAX_FLOAT) and ex.err <= MAX_ERR
    return True


# ---------------------------------------------------------------------------------------------
# rendering (optionally with semantics-preserving noise, for the program-key tests)

COMMUTATIVE = {"add", "mul", "minimum", "maximum", "and", "or", "xor", "eq", "ne"}
FLIPPED = {"lt": "gt", "gt": "lt", "le": "ge", "ge": "le"}
# each of these must simplify back to the wrapped expression (flashgen/rewrite.py)
NOISE = {
    "float": ("({} + 0)", "(0.0 + {})", "({} - 0)", "({} * 1)", "(1.0 * {})", "({} / 1)", "(-(-{}))",
              "torch.maximum({0}, {0})", "torch.minimum({0}, {0})", "torch.where(q_idx < kv_idx, {0}, {0})",
              "({} + (q_idx - q_idx))", "({} + (kv_idx - kv_idx) * 3)", "{}.float()"),
    "int": ("({} + 0)", "(0 + {})", "({} - 0)", "({} * 1)", "(1 * {})", "({} // 1)", "(-(-{}))",
            "torch.maximum({0}, {0})", "({} + (q_idx - q_idx))", "(({} + kv_idx) - kv_idx)", "(({} + h) - h)"),
    "bool": ("({} & True)", "(True & {})", "({} | False)", "(~(~{}))", "({0} & {0})", "({0} | {0})"),
}


def render(ex: Ex, noise: random.Random | None = None) -> str:
    if ex.op == "leaf":
        text = ex.args[0]
    else:
        op, parts = ex.op, [render(x, noise) for x in ex.args]
        if noise is not None and op in COMMUTATIVE and noise.random() < 0.5:
            parts.reverse()
        if noise is not None and op in FLIPPED and noise.random() < 0.5:
            op = FLIPPED[op]
            parts.reverse()
        text = TEMPLATES[op].format(*parts)
    if noise is not None and not ex.const and noise.random() < 0.3:
        text = noise.choice(NOISE[ex.kind]).format(text)
    return text


# ---------------------------------------------------------------------------------------------
# the grammar

FLOAT_CONSTS = (0.5, 1.5, -0.25, 2.0, -1.0, 0.75, 3.0, -2.5)
INT_CONSTS = (1, 2, 3, -1, 0, 5, -4, 7)
DIV_CONSTS = (2.0, 4.0, 0.5, -2.0, 3.0, -1.5)
POW2_DIVISORS = (2.0, 0.5, -4.0, 0.25)
INT_DIVISORS = (3, 2, 5, -3, 7, -2, 1, 4)

FLOAT_OPS = ("leaf", "add", "mul", "sub", "tanh", "where", "div", "pow2", "neg", "abs", "minimum", "maximum",
             "clamp", "sigmoid", "sin", "cos", "exp", "floor", "sign", "floordiv", "mod", "recip1p", "leaky",
             "boolmul")
INT_OPS = ("leaf", "add", "sub", "mul", "floordiv", "mod", "pow2", "neg", "abs", "sign", "where", "minimum",
           "maximum", "clamp", "boolmul")
COND_OPS = ("cmp_int", "cmp_const", "and", "or", "not", "xor", "cmp_float", "tensor")


class Gen:
    """Draws random expressions for one set of shapes (captured tensors are sized by them)."""

    def __init__(self, draw, dims: tuple[int, int, int, int], *, score: bool = False,
                 tensors: tuple[str, ...] = TENSORS):
        self.draw = draw
        B, H, Sq, Skv = dims
        self.score = score
        self.tensors = tensors
        self.idx = {"b": leaf("b", "int", B - 1), "h": leaf("h", "int", H - 1),
                    "q_idx": leaf("q_idx", "int", Sq - 1), "kv_idx": leaf("kv_idx", "int", Skv - 1)}
        self.float_leaves = []
        if score:
            self.float_leaves.append(leaf("score", "float", SCORE_BOUND, exact=False, err=SCORE_ERR, score=True))
        self.float_leaves += [
            leaf(src, "float", m, exact=exact, frac=frac, tensor=t)
            for t, src, m, exact, frac in (("hs", "hs[h]", 2, False, 0),
                                           ("rel", f"rel[q_idx - kv_idx + {Skv - 1}]", 2, False, 0),
                                           # a looked-up difference (render._staggered evaluates it on the host)
                                           ("rel", f"rel[torch.clamp((q_idx - kv_idx) // 3, {1 - Skv}, {Sq - 1}) "
                                                   f"+ {Skv - 1}]", 2, False, 0),
                                           ("qd", "qd[q_idx]", 2, True, 2),
                                           ("tab", "tab[h, kv_idx]", 2, False, 0))
            if t in tensors]
        q, kv = self.idx["q_idx"], self.idx["kv_idx"]
        self.int_leaves = list(self.idx.values()) + [node("sub", q, kv), node("sub", kv, q)] + [
            leaf(src, "int", m, tensor=t) for t, src, m in (("kvi", "kvi[kv_idx]", 4), ("qi", "qi[q_idx]", 3))
            if t in tensors]

    def pick(self, options):
        return self.draw(st.sampled_from(options))

    # -- leaves --------------------------------------------------------------------------------
    def float_leaf(self, nonconst: bool = False) -> Ex:
        choice = self.pick(("tensor", "const", "int", "cond") if not nonconst else ("tensor", "int", "cond"))
        if choice == "tensor" and self.float_leaves:
            return self.pick(self.float_leaves)
        if choice == "const":
            return const(self.pick(FLOAT_CONSTS))
        if choice == "cond":
            return node("float", self.cond(1))
        return node("float", self.int_leaf(nonconst=True))

    def int_leaf(self, nonconst: bool = False) -> Ex:
        if not nonconst and self.draw(st.integers(0, 3)) == 0:
            return const(self.pick(INT_CONSTS))
        return self.pick(self.int_leaves)

    def divisor(self) -> Ex:
        """A non-zero integer expression."""
        i, c = self.idx, const
        forms = [node("add", i["h"], c(1)), node("add", i["b"], c(2)),
                 node("add", node("mod", i["q_idx"], c(4)), c(1)),
                 node("neg", node("add", node("mod", i["kv_idx"], c(3)), c(1))),
                 node("sub", node("mod", i["kv_idx"], c(5)), c(5))]
        if "kvi" in self.tensors:
            forms.append(node("add", node("pow2", leaf("kvi[kv_idx]", "int", 4, tensor="kvi")), c(1)))
        if self.draw(st.booleans()):
            return c(self.pick(INT_DIVISORS))
        return self.pick(forms)

    # -- recursive -----------------------------------------------------------------------------
    def num(self, depth: int, nonconst: bool = False) -> Ex:
        return self.flt(depth, nonconst) if self.draw(st.booleans()) else self.int(depth, nonconst)

    def flt(self, depth: int, nonconst: bool = False) -> Ex:
        """A float expression."""
        op = self.pick(FLOAT_OPS) if depth > 0 else "leaf"
        if op == "leaf":
            return self.float_leaf(nonconst)
        d = depth - 1
        if op in ("add", "sub", "mul"):
            a, b = self.flt(d), self.num(d)
            ex = node(op, *((a, b) if self.draw(st.booleans()) else (b, a)))
            if ex.const and nonconst:
                return self.float_leaf(nonconst=True)
        elif op == "div":
            ex = node("div", self.num(d, nonconst=True), const(self.pick(DIV_CONSTS)))
        elif op == "recip1p":
            ex = node("recip1p", self.num(d, nonconst=True), self.flt(d, nonconst=True))
        elif op in ("floordiv", "mod"):
            a = self.flt(d, nonconst=True)
            if not a.exact:
                return a
            ex = node(op, a, const(self.pick(POW2_DIVISORS)))
        elif op in ("pow2", "neg", "abs", "leaky"):
            ex = node(op, self.flt(d, nonconst=True))
        elif op == "where":
            ex = node("where", self.cond(d), self.flt(d), self.num(d))
        elif op in ("minimum", "maximum"):
            ex = node(op, self.flt(d, nonconst=True), self.num(d, nonconst=True))
        elif op == "clamp":
            lo, hi = self.pick((-3.0, -1.5, -0.5, 0.0)), self.pick((0.25, 1.0, 2.5, 4.0))
            ex = node("clamp", self.flt(d, nonconst=True), const(lo), const(hi))
        elif op in ("tanh", "sigmoid", "sin", "cos"):
            ex = node(op, self.num(d, nonconst=True))
        elif op == "exp":  # of a bounded argument only
            ex = node("exp", node(self.pick(("tanh", "sin", "cos", "sigmoid")), self.flt(d, nonconst=True)))
        elif op in ("floor", "sign"):
            a = self.flt(d, nonconst=True)
            if not a.exact:
                return a
            ex = node(op, a)
        elif op == "boolmul":
            ex = node("boolmul", self.cond(d), const(self.pick(FLOAT_CONSTS)))
        else:  # pragma: no cover
            raise AssertionError(op)
        return ex if ok(ex) else self._fallback(ex, "float", nonconst)

    def _fallback(self, ex: Ex, kind: str, nonconst: bool) -> Ex:
        """Instead of an expression out of bounds: its first operand, or a leaf."""
        first = ex.args[0]
        if first.kind == kind and ok(first) and not (nonconst and first.const):
            return first
        return self.float_leaf(nonconst) if kind == "float" else self.int_leaf(nonconst)

    def int(self, depth: int, nonconst: bool = False) -> Ex:
        """An integer expression (exact in both the kernel and the reference)."""
        op = self.pick(INT_OPS) if depth > 0 else "leaf"
        if op == "leaf":
            return self.int_leaf(nonconst)
        d = depth - 1
        if op in ("add", "sub", "mul"):
            ex = node(op, self.int(d), self.int(d))
            if ex.const and nonconst:
                return self.int_leaf(nonconst=True)
        elif op in ("floordiv", "mod"):
            ex = node(op, self.int(d, nonconst=True), self.divisor())
        elif op in ("pow2", "neg", "abs", "sign"):
            ex = node(op, self.int(d, nonconst=True))
        elif op == "where":
            ex = node("where", self.cond(d), self.int(d), self.int(d))
        elif op in ("minimum", "maximum"):
            ex = node(op, self.int(d, nonconst=True), self.int(d, nonconst=True))
        elif op == "clamp":
            lo, hi = self.pick((0, -2, 3, -10)), self.pick((4, 20, 1, 50))
            ex = node("clamp", self.int(d, nonconst=True), const(min(lo, hi)), const(max(lo, hi)))
        elif op == "boolmul":
            ex = node("boolmul", self.cond(d), const(self.pick(INT_CONSTS)))
        else:  # pragma: no cover
            raise AssertionError(op)
        return ex if ok(ex) else self._fallback(ex, "int", nonconst)

    def cond(self, depth: int) -> Ex:
        """A boolean computed exactly (from integers and exact floats): never a traced constant."""
        op = self.pick(COND_OPS) if depth > 0 else "cmp_const"
        d = max(depth - 1, 0)
        cmp = self.pick(tuple(COMPARE))
        if op == "cmp_int":
            return node(cmp, self.int(d, nonconst=True), self.int(d))
        if op == "cmp_const":  # a threshold inside the operand's range, mostly
            a = self.int(d, nonconst=True)
            return node(cmp, a, const(self.draw(st.integers(-3, min(int(a.m) + 3, 70)))))
        if op == "cmp_float":
            a = self.flt(d, nonconst=True)
            return node(cmp, a, const(self.pick(FLOAT_CONSTS))) if a.exact else self.cond(0)
        if op == "not":
            return node("not", self.cond(d))
        if op == "tensor":
            return leaf("kb[kv_idx]", "bool", 1, tensor="kb") if "kb" in self.tensors else self.cond(0)
        return node(op, self.cond(d), self.cond(d))

    def mask_atom(self) -> Ex:
        i, c, ints = self.idx, const, self.draw
        q, kv, b, h = i["q_idx"], i["kv_idx"], i["b"], i["h"]
        kind = self.pick(("diagonal", "shifted", "band", "chunk", "stride", "kv_mod", "steep", "per_head",
                          "per_batch", "window", "rows", "cols", "document", "generic"))
        if kind == "diagonal":  # causal-like: (q - kv) cmp c
            return node(self.pick(("lt", "le", "gt", "ge")), node("sub", q, kv), c(ints(st.integers(-20, 40))))
        if kind == "shifted":  # kv cmp q + c
            return node(self.pick(("le", "lt", "ge", "gt")), kv, node("add", q, c(ints(st.integers(-40, 20)))))
        if kind == "band":  # one or more diagonal bounds anded at the top (closed-form KV loop bounds)
            band = self.band_clause()
            for _ in range(ints(st.integers(0, 2))):
                band = node("and", band, self.band_clause() if self.draw(st.booleans()) else self.mask(1))
            return band
        if kind == "chunk":
            n = c(ints(st.integers(1, 20)))
            return node("eq", node("floordiv", q, n), node("floordiv", kv, n))
        if kind == "stride":
            n = ints(st.integers(2, 5))
            return node("eq", node("mod", node("add", q, kv), c(n)), c(ints(st.integers(0, n - 1))))
        if kind == "kv_mod":
            n = ints(st.integers(2, 5))
            return node("ne", node("mod", kv, c(n)), c(ints(st.integers(0, n - 1))))
        if kind == "steep":  # not a unit diagonal: stays a residual mask
            return node("le", node("mul", c(2), kv), node("add", q, c(ints(st.integers(-10, 20)))))
        if kind == "per_head":
            return node("lt", kv, node("add", q, node("mul", h, c(ints(st.integers(-20, 20))))))
        if kind == "per_batch":
            return node("lt", node("sub", q, kv), node("add", b, c(ints(st.integers(-3, 10)))))
        if kind == "window":
            return node("le", node("abs", node("sub", q, kv)), c(ints(st.integers(0, 20))))
        if kind == "rows":  # leaves whole rows (or heads) fully masked
            return self.pick((node("ge", q, c(ints(st.integers(0, 40)))), node("eq", node("mod", q, c(3)), c(0)),
                              node("eq", h, c(0)), node("ne", node("add", b, h), c(1))))
        if kind == "cols":
            return node(self.pick(("lt", "ge")), kv, c(ints(st.integers(0, 50))))
        if kind == "document" and {"kvi", "qi"} <= set(self.tensors):
            kvi, qi = leaf("kvi[kv_idx]", "int", 4, tensor="kvi"), leaf("qi[q_idx]", "int", 3, tensor="qi")
            kb = leaf("kb[kv_idx]", "bool", 1, tensor="kb")
            return self.pick((node("eq", kvi, qi), node("ge", kvi, c(0)), node("le", kvi, qi), kb,
                              node("or", kb, node("ge", q, kv))))
        return self.cond(2)

    def band_clause(self) -> Ex:
        """``kv_idx - q_idx`` against a constant, in one of several spellings."""
        q, kv, c = self.idx["q_idx"], self.idx["kv_idx"], const(self.draw(st.integers(-40, 40)))
        rel = self.pick(("le", "lt", "ge", "gt", "eq"))
        form = self.pick(("q-kv", "kv-q", "kv|q+c", "q+c|kv", "kv+c|q"))
        if form == "q-kv":
            return node(rel, node("sub", q, kv), c)
        if form == "kv-q":
            return node(rel, node("sub", kv, q), c)
        if form == "kv|q+c":
            return node(rel, kv, node("add", q, c))
        if form == "q+c|kv":
            return node(rel, node("add", q, c), kv)
        return node(rel, node("add", kv, c), q)

    def mask(self, depth: int) -> Ex:
        op = self.pick(("atom", "and", "or", "not", "xor")) if depth > 0 else "atom"
        if op == "atom":
            return self.mask_atom()
        if op == "not":
            return node("not", self.mask(depth - 1))
        return node(op, self.mask(depth - 1), self.mask(depth - 1))

    # -- whole mods ----------------------------------------------------------------------------
    def score_mod(self, depth: int) -> Ex:
        ex = self.flt(depth) if self.draw(st.integers(0, 4)) else self.int(depth)
        if self.draw(st.integers(0, 3)):  # mostly score + something, as most real score mods are
            plus = node("add", leaf("score", "float", SCORE_BOUND, exact=False, err=SCORE_ERR, score=True), ex)
            ex = plus if ok(plus) and plus.m <= MAX_FLOAT else ex
        ex = self.bounded(ex)
        if self.draw(st.integers(0, 4)) == 0:  # masking inside the score mod: -inf entries (rows)
            ex = node("where", self.cond(2), ex, NEG_INF)
        return ex

    def bias(self, depth: int) -> Ex:
        return self.bounded(self.num(depth))

    def bounded(self, ex: Ex) -> Ex:
        """Logits of moderate size (fp32 lse is accurate to 1e-4 only for moderate values)."""
        if ex.m <= MAX_FLOAT:
            return ex
        if ex.const:
            return const(1.5)
        return node("clamp", ex, const(-30.0), const(30.0))


SIGNATURES = {"score_mod": "score, b, h, q_idx, kv_idx", "mask_mod": "b, h, q_idx, kv_idx",
              "bias": "b, h, q_idx, kv_idx"}


def mod_source(role: str, body: str) -> str:
    return f"def {role}({SIGNATURES[role]}):\n    return {body}\n"


def build_mod(role: str, body: str, namespace: dict):
    """The mod as a real Python function; its globals hold torch and the captured tensors."""
    exec(compile(mod_source(role, body), f"<fuzz {role}>", "exec"), namespace)
    return namespace[role]


def captured_tensors(B: int, H: int, Sq: int, Skv: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "hs": torch.randn(H, generator=gen).clamp(-2, 2),  # per head, indexed by h
        "rel": torch.randn(Sq + Skv - 1, generator=gen).clamp(-2, 2),  # by q_idx - kv_idx + Skv - 1
        "qd": torch.randint(-8, 9, (Sq,), generator=gen).float() / 4,  # dyadic floats, by q_idx
        "tab": torch.randn(Skv, H, generator=gen).clamp(-2, 2).t(),  # [H, Skv] (strided), by h, kv_idx
        "kvi": torch.randint(-4, 5, (Skv, 2), generator=gen)[:, 0],  # int64 (strided), by kv_idx
        "qi": torch.randint(0, 4, (Sq,), generator=gen, dtype=torch.int32),  # by q_idx
        "kb": torch.rand(Skv, generator=gen) < 0.7,  # bool, by kv_idx
    }


# ---------------------------------------------------------------------------------------------
# kernel against reference


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    Sq: int
    Skv: int
    D: int
    Dv: int
    gqa: bool
    scale: float | None
    bshd: bool  # q, k, v are [B, S, H, D] tensors transposed to [B, H, S, D] (non-contiguous)
    seed: int
    mods: tuple[tuple[str, str], ...]  # (role, body)

    def __repr__(self) -> str:
        lines = [f"Case(B={self.B}, H={self.H}, Sq={self.Sq}, Skv={self.Skv}, D={self.D}, Dv={self.Dv}, "
                 f"gqa={self.gqa}, scale={self.scale}, bshd={self.bshd}, seed={self.seed})"]
        lines += [f"  bias = torch.randn{body.removeprefix('dense')}" if body.startswith("dense") else
                  f"  {mod_source(role, body).rstrip()}".replace("\n", "\n  ") for role, body in self.mods]
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints falsifying examples with this
        p.text(repr(self))


SEQ_LENS = st.one_of(st.integers(1, 70), st.sampled_from((31, 32, 33, 63, 64, 65)))


def draw_shape(draw) -> tuple:
    """(B, H, Sq, Skv, D, Dv, gqa, scale, bshd, seed) of one example: everything but the mods."""
    B, H, Sq, Skv = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(SEQ_LENS), draw(SEQ_LENS)
    D, Dv = draw(st.sampled_from((16, 32, 48))), draw(st.sampled_from((16, 32)))
    gqa = H == 2 and draw(st.integers(0, 3)) == 0
    scale = draw(st.sampled_from((None, None, 0.25, 0.125)))
    bshd = draw(st.integers(0, 3)) == 0
    seed = draw(st.integers(0, 2**31 - 1))
    return B, H, Sq, Skv, D, Dv, gqa, scale, bshd, seed


@st.composite
def cases(draw, roles: tuple[str, ...], optional: tuple[str, ...] = ()) -> Case:
    B, H, Sq, Skv, D, Dv, gqa, scale, bshd, seed = draw_shape(draw)
    mods = []
    for role in roles:
        if role in optional and not draw(st.booleans()):
            continue
        if role == "bias" and draw(st.booleans()):  # a dense tensor, broadcast over some dims
            shape = tuple(n if draw(st.booleans()) else 1 for n in (B, H, Sq, Skv))
            mods.append((role, f"dense{shape}"))
            continue
        gen = Gen(draw, (B, H, Sq, Skv), score=role == "score_mod")
        ex = gen.score_mod(4) if role == "score_mod" else gen.mask(3) if role == "mask_mod" else gen.bias(3)
        mods.append((role, render(ex)))
    return Case(B, H, Sq, Skv, D, Dv, gqa, scale, bshd, seed, tuple(mods))


def _scalar_level(node: ir.Node) -> bool:
    """Computed once per program: depends on b and h only (a scalar, not a block, in the kernel)."""
    return not any(ir.depends_on(node, name) for name in ("q_idx", "kv_idx", "score"))


def dense(spec: str, gen: torch.Generator) -> torch.Tensor:
    """The dense bias tensor ``dense(B, H, Sq, Skv)`` (any of them may be 1: broadcast)."""
    shape = tuple(int(n) for n in spec.removeprefix("dense(").removesuffix(")").split(","))
    return torch.randn(shape, generator=gen).to(DEVICE)


def materialize(case: Case):
    """q, k, v, the mods (real functions, or a dense bias tensor) and their namespace."""
    gen = torch.Generator().manual_seed(case.seed)
    Hkv = 1 if case.gqa else case.H

    def randn(heads, seq, dim):
        if case.bshd:
            return torch.randn(case.B, seq, heads, dim, generator=gen).to(DEVICE).transpose(1, 2)
        return torch.randn(case.B, heads, seq, dim, generator=gen).to(DEVICE)

    q, k, v = randn(case.H, case.Sq, case.D), randn(Hkv, case.Skv, case.D), randn(Hkv, case.Skv, case.Dv)
    tensors = captured_tensors(case.B, case.H, case.Sq, case.Skv, gen)
    namespace = {"torch": torch, **{name: t.to(DEVICE) for name, t in tensors.items()}}
    mods = {role: dense(body, gen) if body.startswith("dense") else build_mod(role, body, namespace)
            for role, body in case.mods}
    return q, k, v, mods, namespace


def compare(out, lse, ref, ref_lse) -> None:
    """The kernel's out and lse against the float64 reference's."""
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert not out.isnan().any(), "NaN in out"
    assert not lse.isnan().any(), "NaN in lse"
    assert not lse.isposinf().any(), "+inf in lse"
    masked = ref_lse.isneginf()
    got_masked = lse.isneginf()
    assert torch.equal(got_masked, masked), (
        f"lse is -inf at {got_masked.nonzero().tolist()[:8]} (first 8), "
        f"the reference at {masked.nonzero().tolist()[:8]}")
    assert (out[masked] == 0).all(), "fully masked rows must give out = 0"
    ref_norm = ref.norm()
    if ref_norm == 0:
        assert (out == 0).all(), "every row is masked, but out is not 0"
    else:
        rel = ((out.double() - ref).norm() / ref_norm).item()
        worst = (out.double() - ref).norm(dim=-1).flatten().argmax().item()
        assert rel < 1e-4, f"relative error {rel:.3g}; worst row (flat b*h*q index) {worst}"
    live = ~masked
    if live.any():
        lse_err = (lse.double()[live] - ref_lse[live]).abs().max().item()
        assert lse_err <= 1e-4, f"lse error {lse_err:.3g}"


def check_case(case: Case) -> None:
    q, k, v, mods, _ = materialize(case)
    kwargs = dict(scale=case.scale, enable_gqa=case.gqa, return_lse=True)
    out, lse = fg.attention(q, k, v, **mods, **kwargs)
    compare(out, lse, *fg.attention_reference(q, k, v, **mods, **kwargs))


@pytest.fixture(autouse=True, scope="module")
def _private_kernel_cache(tmp_path_factory):
    """Random mods make one-off kernels: keep them out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHGEN_CACHE_DIR", str(tmp_path_factory.mktemp("flashgen-fuzz-cache")))
        yield


@settings(FUZZ, max_examples=examples(50))
@given(case=cases(("score_mod",)))
def test_random_score_mod_matches_reference(case):
    check_case(case)


@settings(FUZZ, max_examples=examples(50))
@given(case=cases(("mask_mod",)))
def test_random_mask_mod_matches_reference(case):
    check_case(case)


@settings(FUZZ, max_examples=examples(30))
@given(case=cases(("mask_mod",)), lo=st.one_of(st.none(), st.integers(-60, 5)), width=st.integers(0, 80))
def test_random_mask_mod_within_a_band_with_the_band_split_forced_matches_reference(case, lo, width):
    """A band lo <= kv - q <= hi (one side open where ``lo`` is None) and a random mask: the Triton
    forward's band split (the band's clauses only on tiles across its edges), forced on wherever
    the program is a band and a rest, matches the reference."""
    q, k, v, mods, _ = materialize(case)
    rest = mods["mask_mod"]
    if lo is None:
        mods["mask_mod"] = fg.mask_mod(lambda b, h, qi, ki: (ki - qi <= width) & rest(b, h, qi, ki))
    else:
        mods["mask_mod"] = fg.mask_mod(lambda b, h, qi, ki: (ki - qi >= lo) & (ki - qi <= lo + width)
                                       & rest(b, h, qi, ki))
    kwargs = dict(scale=case.scale, enable_gqa=case.gqa, return_lse=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fg.Attention, "_split_band", lambda self, *a: True)
        out, lse = fg.attention(q, k, v, **mods, **kwargs)
    compare(out, lse, *fg.attention_reference(q, k, v, **mods, **kwargs))


@settings(FUZZ, max_examples=examples(50))
@given(case=cases(("score_mod", "bias", "mask_mod"), optional=("bias",)))
def test_random_mods_together_match_reference(case):
    check_case(case)


@settings(FUZZ, max_examples=examples(15))
@given(case=cases(("score_mod", "mask_mod")))
def test_new_captured_values_need_no_retrace(case):
    """Captured tensors are kernel inputs: a compiled Attention reads their current values."""
    q, k, v, mods, namespace = materialize(case)
    attn = fg.compile(**mods)
    kwargs = dict(scale=case.scale, enable_gqa=case.gqa, return_lse=True)
    for seed in (1, 2):
        compare(*attn(q, k, v, **kwargs), *fg.attention_reference(q, k, v, **mods, **kwargs))
        fresh = captured_tensors(case.B, case.H, case.Sq, case.Skv, torch.Generator().manual_seed(seed))
        for name, t in fresh.items():
            namespace[name].copy_(t)  # same tensor objects, new values


@pytest.mark.parametrize("mods", [
    # regressions of bugs this fuzzer found: logits that are not tile-shaped, casts of constants,
    # and the interpreter's fp32-typed float comparisons under & | ^
    pytest.param({"score_mod": "q_idx * 0.5"}, id="logits-of-q_idx-only"),
    pytest.param({"score_mod": "hs[h] * 2.0"}, id="logits-of-h-only"),
    pytest.param({"score_mod": "1.5"}, id="constant-logits"),
    pytest.param({"score_mod": "score + torch.where(q_idx == q_idx, 1, 0.5)"}, id="cast-of-constant"),
    pytest.param({"score_mod": "score + (b == b).float()"}, id="cast-of-constant-bool"),
    pytest.param({"mask_mod": "(q_idx >= kv_idx) | (hs[h] < 0.0)"}, id="block-or-scalar-float-comparison"),
])
def test_former_bugs(mods):
    check_case(Case(2, 2, 37, 45, 16, 16, False, None, False, 0, tuple(mods.items())))


@pytest.mark.parametrize("body", [
    pytest.param("score * W", id="global"),
    pytest.param("helper(score)", id="global-helper-function"),
    pytest.param("(lambda x: x * W)(score)", id="nested-lambda"),
    pytest.param("[score * W for _ in (0,)][0]", id="comprehension"),
])
def test_attention_retraces_when_a_global_changes(body):
    """fg.attention reuses traces across calls: never when a value the mod reads has changed."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen).to(DEVICE) for _ in range(3))
    namespace = {"torch": torch, "W": 1.0}
    exec("def helper(x):\n    return x * W\n", namespace)
    score_mod = build_mod("score_mod", body, namespace)
    for w in (1.0, 3.0):
        namespace["W"] = w
        out = fg.attention(q, k, v, score_mod)
        ref = fg.attention_reference(q, k, v, score_mod)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4, f"W = {w}"


# ---------------------------------------------------------------------------------------------
# program keys

KEY_DIMS = (2, 2, 9, 11)
_KEY_TENSORS = captured_tensors(*KEY_DIMS, torch.Generator().manual_seed(0))


def _key(mods: dict[str, str]) -> tuple[str, dict]:
    namespace = {"torch": torch, **_KEY_TENSORS}
    fns = {role: build_mod(role, body, namespace) for role, body in mods.items()}
    return fg.compile(**fns).program.key, fns


def _values(fns: dict) -> dict[str, torch.Tensor]:
    """Every mod evaluated eagerly on the KEY_DIMS grid, as dense float64 / bool tensors."""
    B, H, Sq, Skv = KEY_DIMS
    idx = (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
           torch.arange(Sq).view(1, 1, Sq, 1), torch.arange(Skv).view(1, 1, 1, Skv))
    score = torch.randn(KEY_DIMS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    for role, fn in fns.items():
        value = torch.as_tensor(fn(score, *idx) if role == "score_mod" else fn(*idx))
        out[role] = value.to(torch.bool if role == "mask_mod" else torch.float64).expand(KEY_DIMS)
    return out


@st.composite
def key_mods(draw, tensors: tuple[str, ...]) -> dict[str, str]:
    gen = Gen(draw, KEY_DIMS, score=True, tensors=tensors)
    return {"score_mod": render(gen.score_mod(3)), "mask_mod": render(gen.mask(2))}


@st.composite
def noisy_pair(draw) -> tuple[dict[str, str], dict[str, str]]:
    # at most one captured tensor: commuting operands may change the order in which tensors are
    # first read, hence their slots, which legitimately changes the key
    tensors = draw(st.sampled_from(((),) + tuple((t,) for t in TENSORS)))
    gen = Gen(draw, KEY_DIMS, score=True, tensors=tensors)
    exprs = {"score_mod": gen.score_mod(3), "mask_mod": gen.mask(2)}
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    return ({role: render(ex) for role, ex in exprs.items()},
            {role: render(ex, rnd) for role, ex in exprs.items()})


def _show(mods: dict[str, str]) -> str:
    return "".join(mod_source(role, body) for role, body in mods.items())


def test_equivalent_mods_share_a_key_examples():
    def k(score_mod=None, mask_mod=None):
        return fg.compile(score_mod, mask_mod).program.key

    assert k(lambda s, b, h, q, kv: s + (q - q)) == k(lambda s, b, h, q, kv: s)
    assert k(lambda s, b, h, q, kv: s * 1 + 0) == k(lambda s, b, h, q, kv: s)
    assert k(lambda s, b, h, q, kv: torch.where(q == q, s, s * 2.0)) == k(lambda s, b, h, q, kv: s)
    assert k(lambda s, b, h, q, kv: s + (q - kv) // 3) == k(lambda s, b, h, q, kv: (q - kv) // 3 + s)
    assert k(mask_mod=lambda b, h, q, kv: q >= kv) == k(mask_mod=lambda b, h, q, kv: kv <= q)
    assert k(mask_mod=lambda b, h, q, kv: ~(q < kv)) == k(mask_mod=lambda b, h, q, kv: q >= kv)
    assert k(mask_mod=lambda b, h, q, kv: (q >= kv) & (kv > 2)) == k(mask_mod=lambda b, h, q, kv: (kv > 2) & (kv <= q))
    assert k(lambda s, b, h, q, kv: s + 1.0) != k(lambda s, b, h, q, kv: s)
    assert k(lambda s, b, h, q, kv: s + (q - kv) // 3) != k(lambda s, b, h, q, kv: s + (q - kv) % 3)
    assert k(mask_mod=lambda b, h, q, kv: q >= kv) != k(mask_mod=lambda b, h, q, kv: q > kv)


@settings(FUZZ, max_examples=examples(150))
@given(pair=noisy_pair())
def test_equivalent_mods_share_a_key(pair):
    plain, noisy = pair
    (key_a, fns_a), (key_b, fns_b) = _key(plain), _key(noisy)
    if key_a != key_b:
        explain = "\n\n".join(fg.compile(**fns).explain() for fns in (fns_a, fns_b))
        pytest.fail(f"equivalent mods got different keys:\n{_show(plain)}\n{_show(noisy)}\n{explain}")


@settings(FUZZ, max_examples=examples(150))
@given(a=key_mods(TENSORS), b=key_mods(TENSORS))
def test_different_mods_get_different_keys(a, b):
    # b: an independent draw; then a with each mod changed (different values wherever finite)
    variants = [b, dict(a, score_mod=f"({a['score_mod']}) + 1.0"), dict(a, score_mod=f"({a['score_mod']}) * 2.0"),
                dict(a, mask_mod=f"~({a['mask_mod']})")]
    key_a, fns_a = _key(a)
    values_a = _values(fns_a)
    for other in variants:
        key_o, fns_o = _key(other)
        if key_o == key_a:
            values_o = _values(fns_o)
            same = all(torch.equal(values_a[role], values_o[role]) for role in a)
            assert same, f"mods that compute different values share a key:\n{_show(a)}\n{_show(other)}"
