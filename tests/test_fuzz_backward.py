"""Property tests for the backward kernels with random mods.

The mods come from the grammar of ``test_fuzz.py`` (its ``Gen``, with the same value facts, bounds
and captured tensors), tilted towards the score (score mods always depend on it) and, in the
learnable test, the captured float tensors, and extended with discontinuous operations on
inexact, score-dependent values (``GradGen``). For each example, flashgen's gradients of
``sum(out * dout)`` (``dout`` a fresh random float64 tensor) are compared with torch.autograd
through ``fg.attention_reference`` on float64 copies of q, k, v: relative error < 1e-4 for dq, dk
and dv and, in the learnable test, for the captured float tensors made learnable
(requires_grad=True); no NaN; dq exactly 0 in the rows of fully masked queries, and every gradient
exactly 0 when all rows are masked.

Non-differentiable points. Away from them kernel and reference agree on every derivative; at
them the fp32 kernel and the float64 reference may take different sides. The grammar keeps the
operations that have such points, and each example is checked before anything runs
(``margins_ok``): wherever the mask keeps an entry, each inexactly computed operand of such an
operation must be farther from the point than ``1e-6 + 10 * (its estimated fp32 drift)``, else
hypothesis rejects the example. The points: ``abs``, ``sign`` and ``leaky`` (a ``where`` on
``x > 0``) at 0; ``floor`` at integers; float ``%`` where ``x / c`` is an integer; ``minimum`` /
``maximum`` at ties (unless both operands are the same expression: then they tie bit for bit in
both, and both split the gradient); ``clamp`` at either bound (also ``bounded``'s +-30 clamp);
comparisons of inexact floats (the ``where`` conditions on the score that ``GradGen`` adds) at
equality. Exactly computed operands (integers, the dyadic ``qd``, never the score) are not checked:
they are bit-identical in kernel and reference, so both take the same side and the subgradient
conventions are compared too (torch's: ``abs``/``sign``/``floor`` 0, ties of ``minimum``/``maximum``
split, ``clamp`` at a bound the whole gradient, float ``%`` 1), which flashgen documents to follow.
Float ``//`` is kept off gradients: torch has no derivative for it ("derivative for
aten::floor_divide is not implemented"), so ``GradGen`` never applies it to score-dependent values
and a captured tensor read under a float ``//`` is never made learnable.

Tolerances. A gradient may be 0 in exact arithmetic while any fp32 kernel leaves rounding noise:
a row with a single unmasked entry has dL/dlogit = 0, and a captured read constant along a row
(``hs[h]`` added to the logits) gets a gradient of 0, as softmax ignores a constant along a row. So
the errors of dq, dk and the captured gradients are relative to the larger of the reference
gradient's norm and ``gradient_scales`` (the same gradient summed with absolute terms); dv's to the
reference's. Captured gradients accumulate through atomics (not bitwise deterministic): the
tolerance covers the order of the additions. ``_NoGradInDeadRows`` works around a NaN in the
reference's backward (fully masked rows, see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from helpers import rel_err
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_fuzz import (
    COMPARE,
    DEVICE,
    FLOAT_CONSTS,
    FUZZ,
    MAX_FLOAT,
    NEG_INF,
    POW2_DIVISORS,
    Case,
    Ex,
    Gen,
    const,
    draw_shape,
    examples,
    materialize,
    node,
    ok,
    render,
)

import flashgen as fg

TOL = 1e-4
FLOAT_TENSORS = ("hs", "rel", "qd", "tab")  # test_fuzz's captured float tensors ("qd" is dyadic: exact)


@pytest.fixture(autouse=True, scope="module")
def _private_kernel_cache(tmp_path_factory):
    """Random mods make one-off kernels: keep them out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHGEN_CACHE_DIR", str(tmp_path_factory.mktemp("flashgen-fuzz-backward-cache")))
        yield


# ---------------------------------------------------------------------------------------------
# the grammar: test_fuzz's, with more score, and discontinuities of inexact values


# operations applied to a score-dependent value, to cover every derivative rule ("any": Gen's flt)
SCORE_OPS = ("tanh", "sigmoid", "sin", "cos", "exp", "pow2", "recip1p", "div", "mul", "neg", "abs", "leaky",
             "minimum", "maximum", "clamp", "floor", "sign", "mod", "where", "any")


class GradGen(Gen):
    """``Gen`` for derivatives. Score mods are a sum of one to three terms, each an operation of
    ``SCORE_OPS`` on a score-dependent value (Gen puts the score in one float leaf in twenty, and
    its logits are mostly ``score + (something constant in the score)``); float expressions are
    more often operations with non-differentiable points, including ``floor``, ``sign``, ``%`` and
    a ``where`` on a comparison of inexact (e.g. score-dependent) values, which test_fuzz applies
    to exact values only as it cannot tell whether the sample points are near a jump (here
    ``margins_ok`` does); in the learnable test, half of the float leaves are captured tensors."""

    def __init__(self, draw, dims: tuple[int, int, int, int], *, score: bool, learnable: bool):
        super().__init__(draw, dims, score=score)
        self.favoured = [x for x in self.float_leaves if learnable and x.tensors]

    def float_leaf(self, nonconst: bool = False) -> Ex:
        if self.favoured and self.draw(st.booleans()):
            return self.pick(self.favoured)
        return super().float_leaf(nonconst)

    def score_mod(self, depth: int) -> Ex:
        ex = self.score_term(depth)
        for _ in range(self.draw(st.integers(0, 2))):
            term = self.score_term(depth) if self.draw(st.integers(0, 3)) else self.num(depth - 1)
            total = node("add", ex, term)
            if ok(total) and total.m <= MAX_FLOAT:
                ex = total
        ex = self.bounded(ex)
        if self.draw(st.integers(0, 4)) == 0:  # masking inside the score mod: -inf entries (rows)
            ex = node("where", self.cond(2), ex, NEG_INF)
        return ex

    def score_expr(self, depth: int) -> Ex:
        """A float expression of the score."""
        if depth <= 0 or self.draw(st.booleans()):
            return self.float_leaves[0]
        return self.score_term(depth)

    def score_term(self, depth: int) -> Ex:
        d = depth - 1
        x = self.score_expr(d)
        op = self.pick(SCORE_OPS)
        if op in ("tanh", "sigmoid", "sin", "cos"):
            ex = node(op, x)
        elif op == "exp":  # of a bounded argument only
            ex = node("exp", node(self.pick(("tanh", "sin", "cos", "sigmoid")), x))
        elif op in ("recip1p", "mul", "minimum", "maximum"):
            other = self.num(d, nonconst=True) if op != "recip1p" else self.flt(d, nonconst=True)
            ex = node(op, *((x, other) if self.draw(st.booleans()) else (other, x)))
        elif op == "div":
            ex = node("div", x, const(self.pick((2.0, 4.0, 0.5, -2.0, 3.0, -1.5))))
        elif op == "any":
            ex = self.flt(depth)
        else:
            ex = self.nonsmooth(d, op, x)
        return ex if ok(ex) else x

    def flt(self, depth: int, nonconst: bool = False) -> Ex:
        if depth > 0 and self.draw(st.integers(0, 4)) == 0:
            ex = self.nonsmooth(depth - 1)
            if ok(ex):
                return ex
        return super().flt(depth, nonconst)

    def nonsmooth(self, d: int, op: str | None = None, a: Ex | None = None) -> Ex:
        """``op`` (an operation with non-differentiable points, or a smooth unary one) of ``a``
        (by default a non-constant float, often inexact)."""
        a = a if a is not None else self.flt(d, nonconst=True)
        op = op or self.pick(("floor", "sign", "mod", "where", "minimum", "maximum", "abs", "clamp", "leaky"))
        if op == "where":  # == and != of an inexact value are (almost) never true: orderings only
            cond = node(self.pick(("lt", "le", "gt", "ge")), a, const(self.pick(FLOAT_CONSTS)))
            return node("where", cond, *((a, self.num(d)) if self.draw(st.booleans()) else (self.flt(d), a)))
        if op == "mod":
            return node("mod", a, const(self.pick(POW2_DIVISORS)))
        if op in ("minimum", "maximum"):
            return node(op, a, self.num(d, nonconst=True))
        if op == "clamp":
            return node("clamp", a, const(self.pick((-3.0, -1.5, -0.5, 0.0))), const(self.pick((0.25, 1.0, 2.5))))
        ex = node(op, a)
        # clear of the jumps (margins_ok), floor and sign come out the same in kernel and reference
        return replace(ex, err=0.0) if op in ("floor", "sign") and not a.exact else ex


# ---------------------------------------------------------------------------------------------
# non-differentiable points


@dataclass(frozen=True)
class Hazard:
    """The operands of an operation with non-differentiable points, and how far they must stay."""

    kind: str  # "points" (x at consts), "int" (x at integers), "mod" (x / consts[0] at integers), "tie" (a == b)
    srcs: tuple[str, ...]  # the operands, as Python expressions over the mod's arguments
    consts: tuple[float, ...]
    delta: float  # the distance required
    exact: bool  # every operand is computed exactly (bit for bit the same in kernel and reference)


def hazards(ex: Ex) -> list[Hazard]:
    """Every operation in ``ex`` that has non-differentiable points and a float operand."""
    out = []

    def add(kind, operands, consts=()):
        if all(x.kind != "float" or x.const for x in operands):
            return
        out.append(Hazard(kind, tuple(render(x) for x in operands), tuple(float(c) for c in consts),
                          1e-6 + 10 * sum(x.err for x in operands), all(x.exact for x in operands)))

    def walk(e: Ex) -> None:
        if e.op == "leaf":
            return
        for x in e.args:
            walk(x)
        a, b = e.args[0], e.args[-1]
        if e.op in ("abs", "sign", "leaky"):
            add("points", [a], (0.0,))
        elif e.op == "floor":
            add("int", [a])
        elif e.op == "mod" and e.kind == "float":
            add("mod", [a], (b.value,))
        elif e.op == "clamp":
            add("points", [a], (e.args[1].value, e.args[2].value))
        elif e.op in ("minimum", "maximum") or e.op in COMPARE:
            if b.const:
                add("points", [a], (b.value,))
            elif a.const:
                add("points", [b], (a.value,))
            elif render(a) != render(b):
                add("tie", [a, b])

    walk(ex)
    return out


def _distance(h: Hazard, values: list[torch.Tensor]) -> torch.Tensor:
    x = values[0]
    if h.kind == "points":
        return torch.stack([(x - c).abs() for c in h.consts]).amin(0)
    if h.kind == "int":
        return (x - x.round()).abs()
    if h.kind == "mod":
        y = x / h.consts[0]
        return (y - y.round()).abs() * abs(h.consts[0])
    return (x - values[1]).abs()


def grid(case: Case, q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference's float64 scores and broadcast indices, as the mods see them."""
    B, H, Sq, Skv = case.B, case.H, case.Sq, case.Skv
    kd = k.double()
    if case.gqa:
        kd = kd.repeat_interleave(H // k.shape[1], dim=1)
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.D)
    dev = q.device
    return {"score": torch.einsum("bhqd,bhkd->bhqk", q.double(), kd) * scale,
            "b": torch.arange(B, device=dev).view(B, 1, 1, 1), "h": torch.arange(H, device=dev).view(1, H, 1, 1),
            "q_idx": torch.arange(Sq, device=dev).view(1, 1, Sq, 1),
            "kv_idx": torch.arange(Skv, device=dev).view(1, 1, 1, Skv)}


def margins_ok(gc: GradCase, q, k, mods, namespace) -> bool:
    """Whether every inexact operand of every hazard is clear of its non-differentiable points
    wherever the mask keeps the entry (the operands evaluated as the reference evaluates the mods)."""
    case = gc.case
    env = {**namespace, **grid(case, q, k)}
    shape = (case.B, case.H, case.Sq, case.Skv)
    keep = torch.ones(shape, dtype=torch.bool, device=q.device)
    if "mask_mod" in mods:
        keep = torch.as_tensor(mods["mask_mod"](*(env[n] for n in ("b", "h", "q_idx", "kv_idx"))),
                               device=q.device).expand(shape)
    for h in gc.hazards:
        if h.exact or not keep.any():
            continue
        values = [torch.as_tensor(eval(src, env), dtype=torch.float64, device=q.device).expand(shape)
                  for src in h.srcs]
        if not (_distance(h, values)[keep] > h.delta).all():
            return False
    return True


# ---------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class GradCase:
    case: Case  # shapes, seed and the mods' source: test_fuzz.materialize builds it
    hazards: tuple[Hazard, ...]
    learnable: tuple[str, ...] = ()  # captured float tensors (or "bias", a dense one) to make learnable

    def __repr__(self) -> str:
        return repr(self.case) + (f"\n  learnable: {', '.join(self.learnable)}" if self.learnable else "")

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints falsifying examples with this
        p.text(repr(self))


def _under_float_floordiv(ex: Ex) -> set[str]:
    """Captured tensors read under a float ``//`` (torch has no derivative for it)."""
    if ex.op == "leaf":
        return set()
    out = set().union(*(_under_float_floordiv(x) for x in ex.args))
    if ex.op == "floordiv" and ex.kind == "float":
        out |= ex.args[0].tensors
    return out


@st.composite
def grad_cases(draw, roles: tuple[str, ...], optional: tuple[str, ...] = (), learnable: bool = False) -> GradCase:
    B, H, Sq, Skv, D, Dv, gqa, scale, bshd, seed = draw_shape(draw)
    mods, found, reads, no_grad = [], [], set(), set()
    for role in roles:
        if role in optional and not draw(st.booleans()):
            continue
        if role == "bias" and draw(st.booleans()):  # a dense tensor, broadcast over some dims
            shape = tuple(n if draw(st.booleans()) else 1 for n in (B, H, Sq, Skv))
            mods.append((role, f"dense{shape}"))
            reads.add("bias")
            continue
        gen = GradGen(draw, (B, H, Sq, Skv), score=role == "score_mod", learnable=learnable)
        ex = gen.score_mod(4) if role == "score_mod" else gen.mask(3) if role == "mask_mod" else gen.bias(3)
        mods.append((role, render(ex)))
        found += hazards(ex)
        reads |= ex.tensors
        no_grad |= _under_float_floordiv(ex)
    chosen = ()
    if learnable:
        chosen = tuple(t for t in (*FLOAT_TENSORS, "bias") if t in reads and t not in no_grad and draw(st.booleans()))
    return GradCase(Case(B, H, Sq, Skv, D, Dv, gqa, scale, bshd, seed, tuple(mods)), tuple(found), chosen)


# ---------------------------------------------------------------------------------------------
# kernel gradients against autograd through the reference


class _NoGradInDeadRows(torch.autograd.Function):
    """Identity; its backward zeroes the gradient in fully masked rows, whose true gradient is 0
    (their output is the constant 0). attention_reference's backward is NaN there for what is added
    to the logits after a score_mod's -inf (a bias, a learnable read in the bias): the backward of
    torch.logsumexp computes 0 * exp(-inf - (-inf))."""

    @staticmethod
    def forward(ctx, x, dead):
        ctx.save_for_backward(dead)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (dead,) = ctx.saved_tensors
        return torch.where(dead, 0.0, grad), None


def _reference_mods(mods: dict, dead: torch.Tensor) -> dict:
    """The mods for the reference: score_mod's and bias's values pass through _NoGradInDeadRows."""
    out = dict(mods)

    def safe(x):
        x = torch.as_tensor(x, device=dead.device)
        return _NoGradInDeadRows.apply(x.expand(torch.broadcast_shapes(x.shape, dead.shape)), dead)

    if "score_mod" in mods:
        out["score_mod"] = lambda score, *idx: safe(mods["score_mod"](score, *idx))
    if "bias" in mods:
        bias = mods["bias"]
        out["bias"] = lambda *idx: safe(bias if isinstance(bias, torch.Tensor) else bias(*idx))
    return out


def gradient_scales(case: Case, q, k, v, mods, learnable: list[torch.Tensor], dout) -> list[float]:
    """For q, k, v and each learnable tensor: the norm of its gradient with dL/dlogit = P * (dP - delta)
    replaced by P * (|dP| + |delta|), the size of the terms fp32 sums for it, hence of their rounding.
    Gradients may cancel to 0 in exact arithmetic while fp32 leaves that noise: a row with a single
    unmasked entry has dL/dlogit = 0, and the rows of dL/dlogit sum to 0, so a read constant along a row
    (``hs[h]`` or ``qd[q_idx]`` added to the logits, a (B, H, Sq, 1) bias) gets a gradient of 0."""
    q, k = (t.detach().double().requires_grad_() for t in (q, k))
    env = grid(case, q, k)
    idx = [env[n] for n in ("b", "h", "q_idx", "kv_idx")]
    shape = (case.B, case.H, case.Sq, case.Skv)
    logits = env["score"]
    if "score_mod" in mods:
        logits = torch.as_tensor(mods["score_mod"](logits, *idx), dtype=torch.float64).expand(shape)
    if "bias" in mods:
        bias = mods["bias"]
        logits = logits + torch.as_tensor(bias if isinstance(bias, torch.Tensor) else bias(*idx)).to(torch.float64)
    if "mask_mod" in mods:
        logits = logits.masked_fill(~torch.as_tensor(mods["mask_mod"](*idx)).expand(shape), -math.inf)
    vd = v.detach().double()
    if case.gqa:
        vd = vd.repeat_interleave(case.H // v.shape[1], dim=1)
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        p = torch.exp(logits - torch.where(lse.isinf(), 0.0, lse))
        dp = dout @ vd.transpose(-1, -2)
        delta = (dout * (p @ vd)).sum(-1, keepdim=True)
        weights = p * (dp.abs() + delta.abs())
    weighted = (weights * torch.where(logits.isfinite(), logits, 0.0)).sum()
    wrt = [q, k, *learnable]
    grads = torch.autograd.grad(weighted, wrt, allow_unused=True) if weighted.requires_grad else [None] * len(wrt)
    norms = [0.0 if g is None else g.norm().item() for g in grads]
    return norms[:2] + [0.0] + norms[2:]  # dv = P^T dO sums positive weights: no cancellation


def _grads(fn, q, k, v, learnable: list[torch.Tensor], dout: torch.Tensor):
    for t in (q, k, v, *learnable):
        t.grad = None
    out, lse = fn(q, k, v)
    (out.double() * dout).sum().backward()
    return [None if t.grad is None else t.grad.detach().clone() for t in (q, k, v, *learnable)], lse.detach()


def check_gradients(gc: GradCase, *, use_compile: bool = False, pinned: bool = False) -> None:
    case = gc.case
    q, k, v, mods, namespace = materialize(case)
    if pinned:
        assert margins_ok(gc, q, k, mods, namespace), "the pinned example is near a non-differentiable point"
    else:
        assume(margins_ok(gc, q, k, mods, namespace))
    tensors = {t: namespace[t] for t in FLOAT_TENSORS}
    if isinstance(mods.get("bias"), torch.Tensor):
        tensors["bias"] = mods["bias"]
    learnable = [tensors[n].requires_grad_() for n in gc.learnable]

    kwargs = dict(scale=case.scale, enable_gqa=case.gqa, return_lse=True)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # detach keeps the (bshd) strides
    dout = torch.randn(*q.shape[:3], case.Dv, generator=torch.Generator().manual_seed(case.seed + 1),
                       dtype=torch.float64).to(DEVICE)
    if use_compile:
        attn = fg.compile(**mods)
        got, _ = _grads(lambda a, b, c: attn(a, b, c, **kwargs), q, k, v, learnable, dout)
    else:
        got, _ = _grads(lambda a, b, c: fg.attention(a, b, c, **mods, **kwargs), q, k, v, learnable, dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        dead = fg.attention_reference(qd, kd, vd, **mods, **kwargs)[1].isneginf()[..., None]
    ref_mods = _reference_mods(mods, dead)
    want, ref_lse = _grads(lambda a, b, c: fg.attention_reference(a, b, c, **ref_mods, **kwargs), qd, kd, vd,
                           learnable, dout)

    scales = gradient_scales(case, qd, kd, vd, mods, learnable, dout)
    labels = ["dq", "dk", "dv"] + [f"d{n}" for n in gc.learnable]
    for label, g, w, t, scale in zip(labels, got, want, (q, k, v, *learnable), scales):
        # None: no gradient path (e.g. a tensor that only the mask reads), in flashgen or in torch
        g = torch.zeros_like(t) if g is None else g
        w = torch.zeros_like(t, dtype=torch.float64) if w is None else w
        assert not w.isnan().any(), f"{label}: NaN in the reference (a bad test case)"
        assert g.shape == t.shape, f"{label}: shape {tuple(g.shape)}, want {tuple(t.shape)}"
        assert not g.isnan().any(), f"{label}: NaN in flashgen's gradient"
        err = (g.double() - w).norm().item() / max(w.norm().item(), scale) if scale else rel_err(g, w)
        worst = (g.double() - w).abs().flatten().argmax().item()
        assert err < TOL, f"{label}: relative error {err:.3g} (worst flat index {worst})"
    masked = ref_lse.isneginf()
    assert (got[0][masked] == 0).all(), "dq must be exactly 0 in fully masked rows"
    if masked.all():
        for label, g in zip(labels, got):
            assert g is None or (g == 0).all(), f"every row is masked, but {label} is not exactly 0"


# ---------------------------------------------------------------------------------------------
# properties


@settings(FUZZ, max_examples=examples(30))
@given(gc=grad_cases(("score_mod",)))
def test_random_score_mod_gradients_match_autograd(gc):
    check_gradients(gc)


@settings(FUZZ, max_examples=examples(30))
@given(gc=grad_cases(("score_mod", "bias", "mask_mod"), optional=("score_mod", "bias")))
def test_random_mods_together_gradients_match_autograd(gc):
    check_gradients(gc)


@settings(FUZZ, max_examples=examples(30))
@given(gc=grad_cases(("score_mod", "bias", "mask_mod"), optional=("bias", "mask_mod"), learnable=True))
def test_random_learnable_captured_gradients_match_autograd(gc):
    check_gradients(gc, use_compile=True)


# ---------------------------------------------------------------------------------------------
# regressions of bugs this fuzzer found (fixed in flashgen)


@pytest.mark.parametrize("mods, learnable", [
    # torch.maximum's rule sent the gradient to the operand it did not pick (so did clamp's lower bound)
    pytest.param({"score_mod": "torch.maximum(score, hs[h])"}, ("hs",), id="maximum"),
    pytest.param({"score_mod": "torch.clamp(score, -0.5, 1.0)"}, (), id="clamp"),
    # float % had no gradient (torch: d(x % c)/dx = 1)
    pytest.param({"score_mod": "(score % 2.0)"}, (), id="float-remainder-of-score"),
    pytest.param({"score_mod": "(score + (rel[q_idx - kv_idx + 44] % 0.5))"}, ("rel",), id="float-remainder-of-read"),
    # a learnable read indexed by only one of q_idx / kv_idx: atomic_add could not broadcast its mask
    pytest.param({"score_mod": "(score + tab[h, kv_idx])"}, ("tab",), id="learnable-read-of-kv_idx-only"),
    pytest.param({"bias": "(qd[q_idx] * 1.5)"}, ("qd",), id="learnable-read-of-q_idx-only"),
    # (a test bug: its true gradient is 0, so only the scale of the rounding noise can judge it)
    pytest.param({"score_mod": "(score + (hs[h] * qd[q_idx]))"}, ("hs",), id="learnable-row-constant-read"),
])
def test_fuzz_found_backward_bugs(mods, learnable):
    case = Case(2, 2, 37, 45, 16, 16, False, None, False, 0, tuple(mods.items()))
    check_gradients(GradCase(case, (), learnable), use_compile=True, pinned=True)


def test_clamp_at_its_bound_passes_the_whole_gradient_like_torch():
    """Exact learnable values sit on clamp bounds; flashgen's min/max tie rule used to halve it."""
    gate = torch.tensor([0.5, -0.25], device=DEVICE, requires_grad=True)  # head 0 sits on the upper bound

    def mod(score, b, h, q_idx, kv_idx):
        return score + torch.clamp(gate[h], min=-0.25, max=0.5) * (q_idx - kv_idx).float()

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE) for _ in range(3))
    out = fg.attention(q, k, v, score_mod=mod)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    (out * dout).sum().backward()
    got, gate.grad = gate.grad.clone(), None
    (fg.attention_reference(q, k, v, score_mod=mod) * dout.double()).sum().backward()
    assert rel_err(got, gate.grad) < TOL, f"flashgen {got.tolist()}, torch {gate.grad.tolist()}"
