"""Tracing user mods (plain Python functions) into IR.

A mod is called once with :class:`Proxy` arguments. Python operators on proxies, torch functions
(through ``__torch_function__``) and indexing of captured tensors (``slopes[h]``) build IR nodes.
Any tensor the mod reads, from a closure, a global or a default argument, is recorded in a
:class:`Captures` table and becomes a kernel input: changing its values never retraces.
Python control flow on a traced value raises :class:`TraceError` pointing at the user's line.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ir
from .ir import DType, Node, Op
from .rewrite import simplify

ROLES = {
    "score_mod": ("score", "b", "h", "q_idx", "kv_idx"),
    "mask_mod": ("b", "h", "q_idx", "kv_idx"),
    "bias": ("b", "h", "q_idx", "kv_idx"),
}


class TraceError(TypeError):
    """A mod that flashgen cannot trace; the message names the mod, its file and line, and the fix."""


class _ControlFlow(Exception):
    """Raised inside a trace by ``Proxy.__bool__``; turned into a TraceError with the user's line."""


def _torch_dtype_kind(dtype: torch.dtype) -> DType:
    if dtype == torch.bool:
        return DType.BOOL
    if dtype.is_floating_point:
        return DType.FLOAT
    if dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return DType.INT
    raise TraceError(f"captured tensors must be bool, integer or floating point, got {dtype}")


@dataclass
class Captures:
    """The tensors a set of mods reads, in order of first use; one slot per distinct tensor."""

    tensors: list[torch.Tensor] = field(default_factory=list)

    def slot(self, tensor: torch.Tensor) -> int:
        for i, t in enumerate(self.tensors):
            if t is tensor:
                return i
        self.tensors.append(tensor)
        return len(self.tensors) - 1


_CAST_NAMES = {
    torch.bool: "bool", torch.int32: "int32", torch.int64: "int64", torch.float16: "float16",
    torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64",
}


class Proxy:
    """A traced value inside a mod. Supports the operators and torch functions of the mod language."""

    __slots__ = ("node", "captures")

    def __init__(self, node: Node, captures: Captures):
        self.node = node
        self.captures = captures

    # -- conversions ------------------------------------------------------------------------
    def _lift(self, other: Any) -> Node:
        return lift(other, self.captures)

    def _wrap(self, node: Node) -> Proxy:
        return Proxy(node, self.captures)

    def __bool__(self):
        raise _ControlFlow("Python control flow (if/while/and/or/not) on a traced value")

    def __index__(self):
        raise _ControlFlow("a traced value used as a Python integer (range(), list index, slicing)")

    def __float__(self):
        raise _ControlFlow("a traced value converted to a Python float (math.* functions, float())")

    def __int__(self):
        raise _ControlFlow("a traced value converted to a Python int (int(), .item())")

    def item(self):
        raise _ControlFlow("a traced value converted to a Python number with .item()")

    def __iter__(self):
        raise _ControlFlow("iteration over a traced value")

    def __repr__(self) -> str:
        return f"Proxy({ir.format_expr(self.node)})"

    # -- operators -------------------------------------------------------------------------
    def _bin(self, op: Op, other: Any, reverse: bool = False) -> Proxy:
        a, b = self.node, self._lift(other)
        if reverse:
            a, b = b, a
        return self._wrap(binary(op, a, b))

    def __add__(self, o): return self._bin(Op.ADD, o)
    def __radd__(self, o): return self._bin(Op.ADD, o, True)
    def __sub__(self, o): return self._bin(Op.SUB, o)
    def __rsub__(self, o): return self._bin(Op.SUB, o, True)
    def __mul__(self, o): return self._bin(Op.MUL, o)
    def __rmul__(self, o): return self._bin(Op.MUL, o, True)
    def __truediv__(self, o): return self._bin(Op.TRUEDIV, o)
    def __rtruediv__(self, o): return self._bin(Op.TRUEDIV, o, True)
    def __floordiv__(self, o): return self._bin(Op.FLOORDIV, o)
    def __rfloordiv__(self, o): return self._bin(Op.FLOORDIV, o, True)
    def __mod__(self, o): return self._bin(Op.MOD, o)
    def __rmod__(self, o): return self._bin(Op.MOD, o, True)
    def __pow__(self, o): return self._bin(Op.POW, o)
    def __rpow__(self, o): return self._bin(Op.POW, o, True)
    def __and__(self, o): return self._bin(Op.AND, o)
    def __rand__(self, o): return self._bin(Op.AND, o, True)
    def __or__(self, o): return self._bin(Op.OR, o)
    def __ror__(self, o): return self._bin(Op.OR, o, True)
    def __xor__(self, o): return self._bin(Op.XOR, o)
    def __rxor__(self, o): return self._bin(Op.XOR, o, True)
    def __lshift__(self, o): return self._bin(Op.SHL, o)
    def __rlshift__(self, o): return self._bin(Op.SHL, o, True)
    def __rshift__(self, o): return self._bin(Op.SHR, o)
    def __rrshift__(self, o): return self._bin(Op.SHR, o, True)
    def __lt__(self, o): return self._bin(Op.LT, o)
    def __le__(self, o): return self._bin(Op.LE, o)
    def __gt__(self, o): return self._bin(Op.GT, o)
    def __ge__(self, o): return self._bin(Op.GE, o)
    def __eq__(self, o): return self._bin(Op.EQ, o)  # type: ignore[override]
    def __ne__(self, o): return self._bin(Op.NE, o)  # type: ignore[override]
    def __neg__(self): return self._wrap(ir.unary(Op.NEG, self.node))
    def __pos__(self): return self
    def __abs__(self): return self._wrap(ir.unary(Op.ABS, self.node))
    def __invert__(self): return self._wrap(ir.unary(Op.NOT, self.node))
    __hash__ = None  # type: ignore[assignment]

    # -- tensor-like methods ---------------------------------------------------------------
    def to(self, dtype=None, *args, **kwargs):
        if isinstance(dtype, torch.dtype):
            return self._wrap(_cast(self.node, dtype))
        dtype = kwargs.get("dtype")
        if isinstance(dtype, torch.dtype):
            return self._wrap(_cast(self.node, dtype))
        return self  # .to(device) and the like are no-ops on a traced scalar

    def float(self): return self._wrap(_cast(self.node, torch.float32))
    def int(self): return self._wrap(_cast(self.node, torch.int32))
    def long(self): return self._wrap(_cast(self.node, torch.int64))
    def bool(self): return self._wrap(_cast(self.node, torch.bool))
    def abs(self): return abs(self)
    def exp(self): return self._wrap(ir.unary(Op.EXP, self.node))
    def log(self): return self._wrap(ir.unary(Op.LOG, self.node))
    def sqrt(self): return self._wrap(ir.unary(Op.SQRT, self.node))
    def tanh(self): return self._wrap(ir.unary(Op.TANH, self.node))
    def sigmoid(self): return self._wrap(ir.unary(Op.SIGMOID, self.node))
    def floor(self): return self._wrap(_floor_ceil(Op.FLOOR, self.node))
    def ceil(self): return self._wrap(_floor_ceil(Op.CEIL, self.node))
    def clamp(self, min=None, max=None): return _clamp(self, min, max)
    def clip(self, min=None, max=None): return _clamp(self, min, max)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        handler = _TORCH_FUNCTIONS.get(name)
        if handler is None:
            raise _ControlFlow(f"torch function `{name}` is not part of the mod language "
                               f"(supported: {', '.join(sorted(n for n in _TORCH_FUNCTIONS if not n.startswith('_')))})")
        captures = next(a.captures for a in _flat(args, kwargs) if isinstance(a, Proxy))
        return handler(captures, *args, **kwargs)


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (tuple, list)):
            yield from a
        else:
            yield a


def binary(op: Op, a: Node, b: Node) -> Node:
    try:
        return ir.binary(op, a, b)
    except ir.IRError as e:
        raise _ControlFlow(str(e)) from None


def _cast(node: Node, dtype: torch.dtype) -> Node:
    if dtype not in _CAST_NAMES:
        raise _ControlFlow(f"cannot cast a traced value to {dtype}; supported: {sorted(map(str, _CAST_NAMES))}")
    return ir.unary(Op.CAST, node, _CAST_NAMES[dtype])


def _floor_ceil(op: Op, node: Node) -> Node:
    return node if node.dtype is not DType.FLOAT else ir.unary(op, node)


def lift(value: Any, captures: Captures) -> Node:
    """A Python value, proxy or captured tensor as an IR node."""
    if isinstance(value, Proxy):
        return value.node
    if isinstance(value, (bool, int, float)):
        return ir.const(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise _ControlFlow(f"a captured tensor of shape {tuple(value.shape)} is used as a value; index it "
                               "with the traced indices (e.g. `table[h, q_idx]`) so each score reads one element")
        return ir.load(captures.slot(value), _torch_dtype_kind(value.dtype), ())
    raise _ControlFlow(f"cannot use a {type(value).__name__} ({value!r}) in a mod; use Python numbers, "
                       "traced values or captured tensors")


def _getitem(captures: Captures, tensor, index, *rest):
    if not isinstance(tensor, torch.Tensor):
        raise _ControlFlow("only captured tensors can be indexed in a mod")
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis or i is None or isinstance(i, slice) for i in index):
        raise _ControlFlow("captured tensors must be indexed by one integer expression per dimension "
                           "(no slices, None or ...)")
    if len(index) != tensor.dim():
        raise _ControlFlow(f"a captured tensor of shape {tuple(tensor.shape)} is indexed with {len(index)} "
                           f"indices; give exactly {tensor.dim()} (one per dimension)")
    nodes = [lift(i, captures) for i in index]
    for n in nodes:
        if n.dtype is DType.FLOAT:
            raise _ControlFlow("captured tensors must be indexed by integers; cast with .long() if needed")
    return Proxy(ir.load(captures.slot(tensor), _torch_dtype_kind(tensor.dtype), nodes), captures)


def _where(captures: Captures, cond, a, b):
    return Proxy(ir.where(lift(cond, captures), lift(a, captures), lift(b, captures)), captures)


def _clamp(x, lo=None, hi=None, captures: Captures | None = None):
    captures = captures or x.captures
    node = lift(x, captures)
    for bound, op in ((lo, Op.MAX), (hi, Op.MIN)):
        if bound is None:
            continue
        limit = lift(bound, captures)
        if DType.FLOAT in (node.dtype, limit.dtype):
            # as torch.clamp: a value exactly at a bound keeps its whole gradient (max/min would
            # split it), NaN stays NaN, and min > max gives max
            beyond = binary(Op.LT, node, limit) if op is Op.MAX else binary(Op.LT, limit, node)
            node = ir.where(beyond, limit, node)
        else:
            node = binary(op, node, limit)  # integers: min/max keep the interval analysis exact
    return Proxy(node, captures)


def _unary(op: Op):
    def handler(captures, x, *args, **kwargs):
        node = lift(x, captures)
        if op in (Op.FLOOR, Op.CEIL):
            return Proxy(_floor_ceil(op, node), captures)
        return Proxy(ir.unary(op, node), captures)
    return handler


def _binary(op: Op, reverse: bool = False):
    def handler(captures, a, b, *args, **kwargs):
        x, y = lift(a, captures), lift(b, captures)
        return Proxy(binary(op, y, x) if reverse else binary(op, x, y), captures)
    return handler


def _div(captures, a, b, *args, rounding_mode=None, **kwargs):
    op = {None: Op.TRUEDIV, "floor": Op.FLOORDIV}.get(rounding_mode)
    if op is None:
        raise _ControlFlow(f"torch.div(rounding_mode={rounding_mode!r}) is not supported; use None or 'floor'")
    return Proxy(binary(op, lift(a, captures), lift(b, captures)), captures)


def _method_to(captures, x, *args, **kwargs):
    dtype = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.dtype)), None)
    node = lift(x, captures)
    return Proxy(_cast(node, dtype) if dtype is not None else node, captures)


def _clamp_fn(captures, x, min=None, max=None, **kwargs):
    return _clamp(x, min, max, captures)


_TORCH_FUNCTIONS: dict[str, Callable] = {
    "__getitem__": _getitem,
    "where": _where,
    "minimum": _binary(Op.MIN), "maximum": _binary(Op.MAX), "clamp": _clamp_fn, "clip": _clamp_fn,
    "exp": _unary(Op.EXP), "exp2": _unary(Op.EXP2), "log": _unary(Op.LOG), "log2": _unary(Op.LOG2),
    "sqrt": _unary(Op.SQRT), "rsqrt": _unary(Op.RSQRT), "tanh": _unary(Op.TANH), "sigmoid": _unary(Op.SIGMOID),
    "sin": _unary(Op.SIN), "cos": _unary(Op.COS), "floor": _unary(Op.FLOOR), "ceil": _unary(Op.CEIL),
    "abs": _unary(Op.ABS), "sign": _unary(Op.SIGN), "neg": _unary(Op.NEG), "negative": _unary(Op.NEG),
    "logical_not": _unary(Op.NOT), "bitwise_not": _unary(Op.NOT),
    "add": _binary(Op.ADD), "__add__": _binary(Op.ADD), "__radd__": _binary(Op.ADD, True),
    "sub": _binary(Op.SUB), "__sub__": _binary(Op.SUB), "__rsub__": _binary(Op.SUB, True),
    "mul": _binary(Op.MUL), "__mul__": _binary(Op.MUL), "__rmul__": _binary(Op.MUL, True),
    "div": _div, "true_divide": _binary(Op.TRUEDIV), "__truediv__": _binary(Op.TRUEDIV),
    "__rtruediv__": _binary(Op.TRUEDIV, True), "__rdiv__": _binary(Op.TRUEDIV, True),
    "floor_divide": _binary(Op.FLOORDIV), "__floordiv__": _binary(Op.FLOORDIV),
    "__rfloordiv__": _binary(Op.FLOORDIV, True),
    "remainder": _binary(Op.MOD), "__mod__": _binary(Op.MOD), "__rmod__": _binary(Op.MOD, True),
    "pow": _binary(Op.POW), "__pow__": _binary(Op.POW), "__rpow__": _binary(Op.POW, True),
    "eq": _binary(Op.EQ), "ne": _binary(Op.NE), "lt": _binary(Op.LT), "le": _binary(Op.LE),
    "gt": _binary(Op.GT), "ge": _binary(Op.GE), "__eq__": _binary(Op.EQ), "__ne__": _binary(Op.NE),
    "__lt__": _binary(Op.LT), "__le__": _binary(Op.LE), "__gt__": _binary(Op.GT), "__ge__": _binary(Op.GE),
    "bitwise_and": _binary(Op.AND), "bitwise_or": _binary(Op.OR), "bitwise_xor": _binary(Op.XOR),
    "logical_and": _binary(Op.AND), "logical_or": _binary(Op.OR), "logical_xor": _binary(Op.XOR),
    "__and__": _binary(Op.AND), "__or__": _binary(Op.OR), "__xor__": _binary(Op.XOR),
    "__rand__": _binary(Op.AND, True), "__ror__": _binary(Op.OR, True), "__rxor__": _binary(Op.XOR, True),
    "bitwise_left_shift": _binary(Op.SHL), "bitwise_right_shift": _binary(Op.SHR),
    "__lshift__": _binary(Op.SHL), "__rshift__": _binary(Op.SHR),
    "to": _method_to,
}


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TracedMod:
    """One traced mod: its role, a display name, and its simplified expression."""

    role: str  # "score_mod", "mask_mod" or "bias"
    name: str
    expr: Node


def describe(fn: Callable) -> str:
    """``name (file:line)`` of a mod, for messages."""
    target = getattr(fn, "fn", fn)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    code = getattr(target, "__code__", None)
    if code is not None:
        return f"{name} ({code.co_filename}:{code.co_firstlineno})"
    return name


def _check_signature(fn: Callable, role: str) -> None:
    params = ROLES[role]
    target = getattr(fn, "fn", fn)  # a decorated mod: check the function it wraps
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call itself fail
    try:
        sig.bind(*params)
    except TypeError:
        have = ", ".join(sig.parameters)
        hint = ""
        if role == "score_mod" and len(sig.parameters) == 4:
            hint = " It looks like a mask_mod or bias: pass it as mask_mod= or bias=."
        elif role != "score_mod" and len(sig.parameters) == 5:
            hint = " It looks like a score_mod: pass it as score_mod=."
        raise TraceError(f"{role} {describe(fn)} takes ({have}), but a {role} is called as "
                         f"{role}({', '.join(params)}).{hint}") from None


def _user_frame(tb) -> str:
    """file:line and source of the innermost traceback frame outside flashgen, torch and triton."""
    here = os.path.dirname(os.path.abspath(__file__))
    skip = (here, os.path.dirname(torch.__file__))
    found = None
    for frame in traceback.extract_tb(tb):
        if not os.path.abspath(frame.filename).startswith(skip):
            found = frame
    if found is None:
        return "<unknown location>"
    line = (found.line or "").strip()
    return f"{found.filename}:{found.lineno}: `{line}`"


def trace_mod(fn: Callable, role: str, captures: Captures) -> TracedMod:
    """Trace ``fn`` as a mod of ``role``; captured tensors are added to ``captures``."""
    if not callable(fn):
        raise TraceError(f"{role} must be a function {role}({', '.join(ROLES[role])}), got "
                         f"{type(fn).__name__}")
    _check_signature(fn, role)
    args = []
    for name in ROLES[role]:
        args.append(Proxy(ir.score() if name == "score" else ir.index(name), captures))
    try:
        result = fn(*args)
    except _ControlFlow as e:
        where = _user_frame(sys.exc_info()[2])
        raise TraceError(
            f"cannot trace {role} {describe(fn)}: {e}.\n  at {where}\n"
            "  Mods are traced once, symbolically: write conditions with torch.where(cond, a, b), "
            "combine booleans with & | ~ (not `and`/`or`/`not`), and keep tensor reads as indexing.") from None
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside user code is reported with its location
        where = _user_frame(sys.exc_info()[2])
        raise TraceError(f"{role} {describe(fn)} raised {type(e).__name__}: {e}\n  at {where}") from e
    node = _result_node(fn, role, result, captures)
    return TracedMod(role, _name_of(fn), simplify(node))


def _result_node(fn: Callable, role: str, result: Any, captures: Captures) -> Node:
    if isinstance(result, torch.Tensor) and result.dim() != 0:
        raise TraceError(f"{role} {describe(fn)} returned a tensor of shape {tuple(result.shape)}; it must return "
                         "one value per (b, h, q_idx, kv_idx) built from its arguments")
    try:
        node = lift(result, captures)
    except _ControlFlow as e:
        raise TraceError(f"{role} {describe(fn)} returned {type(result).__name__}: {e}") from None
    if role == "mask_mod":
        if node.dtype is not DType.BOOL:
            raise TraceError(f"mask_mod {describe(fn)} must return a boolean (True keeps the entry), got an "
                             f"{node.dtype.value} expression: {ir.format_expr(node)}. Compare values, e.g. "
                             "`q_idx >= kv_idx`.")
        if ir.depends_on(node, "score"):
            raise TraceError(f"mask_mod {describe(fn)} depends on the score")
        return node
    if node.dtype is DType.BOOL:
        raise TraceError(f"{role} {describe(fn)} returned a boolean expression {ir.format_expr(node)}; "
                         "a boolean keeps or drops entries, so pass it as mask_mod=")
    return ir.to_dtype(node, DType.FLOAT)


def _name_of(fn: Callable) -> str:
    name = getattr(fn, "name", None)  # decorated mods and library mods carry a name
    if not isinstance(name, str):
        name = getattr(fn, "__name__", "mod")
    return "lambda" if name == "<lambda>" else name


__all__ = ["TraceError", "Captures", "Proxy", "TracedMod", "trace_mod", "lift"]


@dataclass(frozen=True)
class CaptureInfo:
    """What a kernel needs to know of a captured tensor (its values are passed at call time)."""

    dtype: str
    ndim: int


@dataclass(frozen=True)
class Program:
    """An attention variant as IR: final logits (a function of the score) and a keep-mask.

    ``logits = score_mod(score) + bias`` where ``score = scale * q·k``; entries where ``mask`` is
    False are removed before the softmax."""

    logits: Node
    mask: Node
    name: str
    captures: tuple[CaptureInfo, ...]

    @functools.cached_property
    def key(self) -> str:
        """Structural key: equal for equivalent mods, stable across processes."""
        import hashlib

        parts = [self.logits.key, self.mask.key] + [f"{c.dtype}:{c.ndim}" for c in self.captures]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def trace_attention(score_mod: Callable | None, mask_mod: Callable | None,
                    bias: Callable | None) -> tuple[Program, list[torch.Tensor]]:
    """Trace the three mods of one attention call into a :class:`Program` and its captured tensors."""
    captures = Captures()
    logits = ir.score()
    names = []
    if score_mod is not None:
        traced = trace_mod(score_mod, "score_mod", captures)
        logits = traced.expr
        names.append(traced.name)
    if bias is not None:
        traced = trace_mod(bias, "bias", captures)
        if ir.depends_on(traced.expr, "score"):
            raise TraceError(f"bias {describe(bias)} must not depend on the score")
        logits = simplify(ir.binary(Op.ADD, logits, traced.expr))
        names.append(traced.name)
    mask = ir.const(True)
    if mask_mod is not None:
        traced = trace_mod(mask_mod, "mask_mod", captures)
        mask = traced.expr
        names.append(traced.name)
    infos = tuple(CaptureInfo(str(t.dtype).removeprefix("torch."), t.dim()) for t in captures.tensors)
    return Program(logits, mask, "_".join(names) or "full", infos), captures.tensors
