"""The user-facing mod objects: decorators and mask combinators.

``@fg.score_mod``, ``@fg.mask_mod`` and ``@fg.bias`` wrap a plain function in a small callable
object that remembers its role and name. Decorated masks combine with ``&``, ``|`` and ``~``
into new masks. Decoration is optional: the role of a function always comes from the argument it
is passed as, so existing FlexAttention mods work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class Mod:
    """A user function tagged with its role. Calling it calls the function."""

    fn: Callable
    name: str

    role = "mod"

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class ScoreMod(Mod):
    """``score_mod(score, b, h, q_idx, kv_idx) -> new score`` (``score`` is already scaled)."""

    role = "score_mod"


class Bias(Mod):
    """``bias(b, h, q_idx, kv_idx) -> value`` added to the (modified) scaled score."""

    role = "bias"


class MaskMod(Mod):
    """``mask_mod(b, h, q_idx, kv_idx) -> bool``; False removes the entry. Combine with & | ~."""

    role = "mask_mod"

    def __and__(self, other: Callable) -> MaskMod:
        a, b = self.fn, _fn(other)
        return MaskMod(lambda bi, h, q, kv: a(bi, h, q, kv) & b(bi, h, q, kv), f"({self.name} & {_name(other)})")

    def __or__(self, other: Callable) -> MaskMod:
        a, b = self.fn, _fn(other)
        return MaskMod(lambda bi, h, q, kv: a(bi, h, q, kv) | b(bi, h, q, kv), f"({self.name} | {_name(other)})")

    __rand__ = __and__
    __ror__ = __or__

    def __invert__(self) -> MaskMod:
        a = self.fn
        return MaskMod(lambda bi, h, q, kv: ~a(bi, h, q, kv), f"~{self.name}")


def _fn(obj: Callable) -> Callable:
    if not callable(obj):
        raise TypeError(f"masks combine with other mask functions, got {type(obj).__name__}")
    return obj.fn if isinstance(obj, Mod) else obj


def _name(obj: Callable) -> str:
    return obj.name if isinstance(obj, Mod) else getattr(obj, "__name__", "mask")


def _decorator(kind: type[Mod]):
    def decorate(fn: Callable | None = None, *, name: str | None = None):
        def wrap(f: Callable) -> Mod:
            if isinstance(f, Mod):
                f = f.fn
            if not callable(f):
                raise TypeError(f"@{kind.role} decorates a function, got {type(f).__name__}")
            return kind(f, name or getattr(f, "__name__", kind.role))
        return wrap(fn) if fn is not None else wrap
    decorate.__name__ = kind.role
    decorate.__doc__ = f"Decorator: mark a function as a {kind.role}. ``@{kind.role}`` or ``@{kind.role}(name=...)``."
    return decorate


score_mod = _decorator(ScoreMod)
mask_mod = _decorator(MaskMod)
bias = _decorator(Bias)
