"""flashgen's intermediate representation: one immutable, hash-consed node type.

A mod is traced into a small expression DAG over four integer index variables (``b``, ``h``,
``q_idx``, ``kv_idx``), the attention ``score`` and reads of captured tensors. Nodes are
hash-consed: building the same expression twice returns the same object, so common
subexpressions are shared by construction and ``is`` is structural equality. Every node carries
a sha256 ``key`` that is stable across processes (it hashes names and values, never ids).

This module knows nothing of Triton or of torch: the tracer (``flashgen.trace``) builds nodes,
the analyses read them, and only ``flashgen.codegen`` turns them into kernel source.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable, Iterable
from enum import Enum


class DType(Enum):
    """The three value kinds of a mod expression (kernels compute ints in int32, floats in fp32)."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"


class Op(Enum):
    # leaves
    CONST = "const"  # arg: the Python value
    INDEX = "index"  # arg: one of INDEX_NAMES
    SCORE = "score"  # the scaled score q·k·scale
    LOAD = "load"  # arg: captured-tensor slot; src: one index expression per tensor dimension
    # unary
    NEG = "neg"
    NOT = "not"  # logical not on bools, bitwise invert on ints
    ABS = "abs"
    SIGN = "sign"
    EXP = "exp"
    EXP2 = "exp2"
    LOG = "log"
    LOG2 = "log2"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    SIN = "sin"
    COS = "cos"
    FLOOR = "floor"
    CEIL = "ceil"
    CAST = "cast"  # arg: target storage dtype name ("float32", "bfloat16", "int32", "bool", ...)
    # binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    TRUEDIV = "truediv"
    FLOORDIV = "floordiv"  # floor semantics, as torch and Python (not C's truncation)
    MOD = "mod"  # sign follows the divisor, as torch and Python
    POW = "pow"
    MIN = "min"
    MAX = "max"
    AND = "and"
    OR = "or"
    XOR = "xor"
    SHL = "shl"
    SHR = "shr"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    # ternary
    WHERE = "where"


INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
# A lowering-only index leaf, which mods cannot name: an index a kernel fixes for the whole of its
# inner loop, near the q and kv indices of every tile the loop visits (the first index of the query
# block in the forward and dQ kernels, of the key block in dK/dV). Lowerings measure indices from
# it to keep float sums small (rewrite.recentred_differences).
TILE_ORIGIN = "tile_origin"

UNARY_MATH = {Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.SIN, Op.COS}
UNARY = UNARY_MATH | {Op.NEG, Op.NOT, Op.ABS, Op.SIGN, Op.FLOOR, Op.CEIL, Op.CAST}
ARITH = {Op.ADD, Op.SUB, Op.MUL, Op.TRUEDIV, Op.FLOORDIV, Op.MOD, Op.POW, Op.MIN, Op.MAX}
BITWISE = {Op.AND, Op.OR, Op.XOR, Op.SHL, Op.SHR}
COMPARE = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
BINARY = ARITH | BITWISE | COMPARE
COMMUTATIVE = {Op.ADD, Op.MUL, Op.MIN, Op.MAX, Op.AND, Op.OR, Op.XOR, Op.EQ, Op.NE}

CAST_TARGETS = {
    "bool": DType.BOOL,
    "int32": DType.INT,
    "int64": DType.INT,
    "float16": DType.FLOAT,
    "bfloat16": DType.FLOAT,
    "float32": DType.FLOAT,
    "float64": DType.FLOAT,
}


class IRError(TypeError):
    """An expression that the mod language does not allow (e.g. a bitwise op on floats)."""


def _arg_key(arg: object) -> object:
    # 1 == 1.0 == True as dict keys; the dtype already separates them, but -0.0 vs 0.0 and
    # floats vs ints of the same value must not alias, so floats are keyed by their repr.
    return ("f", repr(arg)) if isinstance(arg, float) else arg


class Node:
    """One IR node. Never construct directly: use the builder functions below."""

    __slots__ = ("op", "dtype", "arg", "src", "key", "__weakref__")
    _interned: weakref.WeakValueDictionary[tuple, Node] = weakref.WeakValueDictionary()

    op: Op
    dtype: DType
    arg: object
    src: tuple[Node, ...]
    key: str

    def __new__(cls, op: Op, dtype: DType, arg: object = None, src: tuple[Node, ...] = ()) -> Node:
        intern_key = (op, dtype, _arg_key(arg), src)
        node = cls._interned.get(intern_key)
        if node is not None:
            return node
        node = object.__new__(cls)
        digest = hashlib.sha256(f"{op.value}|{dtype.value}|{arg!r}".encode())
        for child in src:
            digest.update(child.key.encode())
        for name, value in (("op", op), ("dtype", dtype), ("arg", arg), ("src", src), ("key", digest.hexdigest())):
            object.__setattr__(node, name, value)
        cls._interned[intern_key] = node
        return node

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("IR nodes are immutable")

    def __reduce__(self):  # pickling rebuilds through the interning constructor
        return (Node, (self.op, self.dtype, self.arg, self.src))

    def __repr__(self) -> str:
        return f"Node({format_expr(self)})"

    def toposort(self) -> list[Node]:
        """This node and everything below it, children before parents."""
        return toposort([self])


# ---------------------------------------------------------------------------------------------
# builders (with dtype inference and checks)


def const(value: bool | int | float) -> Node:
    if isinstance(value, bool):
        return Node(Op.CONST, DType.BOOL, value)
    if isinstance(value, int):
        return Node(Op.CONST, DType.INT, value)
    if isinstance(value, float):
        return Node(Op.CONST, DType.FLOAT, value)
    raise IRError(f"constants must be bool, int or float, got {type(value).__name__}: {value!r}")


def index(name: str) -> Node:
    if name not in INDEX_NAMES and name != TILE_ORIGIN:
        raise IRError(f"unknown index variable {name!r}; expected one of {INDEX_NAMES}")
    return Node(Op.INDEX, DType.INT, name)


def score() -> Node:
    return Node(Op.SCORE, DType.FLOAT)


def load(slot: int, dtype: DType, indices: Iterable[Node]) -> Node:
    indices = tuple(indices)
    for i in indices:
        if i.dtype is DType.FLOAT:
            raise IRError("tensor indices must be integers or booleans, got a float expression")
    return Node(Op.LOAD, dtype, slot, indices)


def _numeric(a: Node, b: Node) -> DType:
    return DType.FLOAT if DType.FLOAT in (a.dtype, b.dtype) else DType.INT


def unary(op: Op, x: Node, arg: object = None) -> Node:
    if op is Op.CAST:
        if arg not in CAST_TARGETS:
            raise IRError(f"cannot cast to {arg!r}; supported: {sorted(CAST_TARGETS)}")
        return Node(op, CAST_TARGETS[arg], arg, (x,))
    if op is Op.NOT:
        if x.dtype is DType.FLOAT:
            raise IRError("~ (not) needs a boolean or integer operand, got a float expression")
        return Node(op, x.dtype, None, (x,))
    if op is Op.NEG and x.dtype is DType.BOOL:
        raise IRError("unary minus on a boolean; use ~ for logical not")
    if op in UNARY_MATH:
        return Node(op, DType.FLOAT, None, (x,))
    dtype = DType.INT if x.dtype is DType.BOOL and op is not Op.NEG else x.dtype
    return Node(op, dtype, None, (x,))


def binary(op: Op, a: Node, b: Node) -> Node:
    if op in COMPARE:
        dtype = DType.BOOL
    elif op in (Op.AND, Op.OR, Op.XOR):
        if DType.FLOAT in (a.dtype, b.dtype):
            raise IRError(f"{op.value} needs boolean or integer operands, got a float expression")
        dtype = DType.BOOL if a.dtype is b.dtype is DType.BOOL else DType.INT
    elif op in (Op.SHL, Op.SHR):
        if DType.FLOAT in (a.dtype, b.dtype):
            raise IRError("shifts need integer operands, got a float expression")
        dtype = DType.INT
    elif op is Op.TRUEDIV:
        dtype = DType.FLOAT
    else:
        dtype = _numeric(a, b)
    if op in COMMUTATIVE and b.key < a.key:
        a, b = b, a  # canonical operand order: `q + kv` and `kv + q` are one node
    return Node(op, dtype, None, (a, b))


def where(cond: Node, a: Node, b: Node) -> Node:
    if cond.dtype is not DType.BOOL:
        cond = binary(Op.NE, cond, const(0))
    if a.dtype is b.dtype:
        dtype = a.dtype
    else:
        dtype = DType.FLOAT if DType.FLOAT in (a.dtype, b.dtype) else DType.INT
    return Node(Op.WHERE, dtype, None, (cond, a, b))


def to_dtype(x: Node, dtype: DType) -> Node:
    """Promote ``x`` to ``dtype`` (no-op when it already is)."""
    if x.dtype is dtype:
        return x
    return unary(Op.CAST, x, {DType.BOOL: "bool", DType.INT: "int32", DType.FLOAT: "float32"}[dtype])


# ---------------------------------------------------------------------------------------------
# traversal, views


def toposort(roots: Iterable[Node]) -> list[Node]:
    """Every node reachable from ``roots``, each once, children before parents (deterministic)."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(list(roots))]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(node.src) if id(child) not in seen)
    return order


def to_networkx(roots: Iterable[Node]):
    """A networkx DiGraph of the DAG (edges child -> parent), nodes labelled by their key."""
    import networkx as nx

    graph = nx.DiGraph()
    for node in toposort(roots):
        graph.add_node(node.key, node=node, label=_short(node))
        for child in node.src:
            graph.add_edge(child.key, node.key)
    return graph


def uses(root: Node, predicate: Callable[[Node], bool]) -> bool:
    return any(predicate(n) for n in toposort([root]))


def depends_on(root: Node, name: str) -> bool:
    """Whether ``root`` reads the index variable or leaf ``name`` ("b", "h", "q_idx", "kv_idx", "score")."""
    if name == "score":
        return uses(root, lambda n: n.op is Op.SCORE)
    return uses(root, lambda n: n.op is Op.INDEX and n.arg == name)


# ---------------------------------------------------------------------------------------------
# printing

_INFIX = {
    Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.TRUEDIV: "/", Op.FLOORDIV: "//", Op.MOD: "%", Op.POW: "**",
    Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.SHL: "<<", Op.SHR: ">>",
    Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
}


def _short(node: Node) -> str:
    if node.op is Op.CONST:
        return repr(node.arg)
    if node.op is Op.INDEX:
        return str(node.arg)
    if node.op is Op.LOAD:
        return f"captured{node.arg}[...]"
    return node.op.value


def format_expr(root: Node, names: dict[int, str] | None = None) -> str:
    """A one-line Python-like rendering of ``root`` (``names`` maps node ids to given names)."""
    names = names or {}

    def fmt(node: Node) -> str:
        if id(node) in names:
            return names[id(node)]
        if node.op is Op.CONST:
            return repr(node.arg)
        if node.op is Op.INDEX:
            return str(node.arg)
        if node.op is Op.SCORE:
            return "score"
        if node.op is Op.LOAD:
            return f"captured{node.arg}[{', '.join(fmt(s) for s in node.src)}]"
        if node.op in _INFIX:
            return f"({fmt(node.src[0])} {_INFIX[node.op]} {fmt(node.src[1])})"
        if node.op is Op.NEG:
            return f"-{fmt(node.src[0])}"
        if node.op is Op.NOT:
            return f"~{fmt(node.src[0])}"
        if node.op is Op.CAST:
            return f"{fmt(node.src[0])}.to({node.arg})"
        return f"{node.op.value}({', '.join(fmt(s) for s in node.src)})"

    return fmt(root)


def format_program(roots: dict[str, Node]) -> str:
    """A readable listing: shared subexpressions get names (t0, t1, ...), then each root."""
    order = toposort(roots.values())
    parents: dict[int, int] = {}
    for node in order:
        for child in node.src:
            parents[id(child)] = parents.get(id(child), 0) + 1
    names: dict[int, str] = {}
    lines = []
    for node in order:
        shared = parents.get(id(node), 0) > 1 and node.op not in (Op.CONST, Op.INDEX, Op.SCORE)
        if shared:
            lines.append(f"  t{len(names)} = {format_expr(node, names)}")
            names[id(node)] = f"t{len(names)}"
    for label, root in roots.items():
        lines.append(f"  {label} = {format_expr(root, names)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# bridge to sympy (for the analyses that need algebra)


def to_sympy(root: Node):
    """The expression as a sympy expression. Index variables are non-negative integer symbols,
    ``score`` a real symbol, captured-tensor reads undefined functions ``captured<slot>``."""
    import sympy as sp

    cache: dict[int, object] = {}
    for node in toposort([root]):
        s = [cache[id(c)] for c in node.src]
        op = node.op
        if op is Op.CONST:
            out = sp.sympify(node.arg)
        elif op is Op.INDEX:
            out = sp.Symbol(node.arg, integer=True, nonnegative=True)
        elif op is Op.SCORE:
            out = sp.Symbol("score", real=True)
        elif op is Op.LOAD:
            out = sp.Function(f"captured{node.arg}")(*s)
        elif op is Op.ADD:
            out = s[0] + s[1]
        elif op is Op.SUB:
            out = s[0] - s[1]
        elif op is Op.MUL:
            out = s[0] * s[1]
        elif op is Op.TRUEDIV:
            out = s[0] / s[1]
        elif op is Op.FLOORDIV:
            out = sp.floor(s[0] / s[1])
        elif op is Op.MOD:
            out = sp.Mod(s[0], s[1])
        elif op is Op.POW:
            out = s[0] ** s[1]
        elif op is Op.NEG:
            out = -s[0]
        elif op is Op.MIN:
            out = sp.Min(s[0], s[1])
        elif op is Op.MAX:
            out = sp.Max(s[0], s[1])
        elif op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
            rel = {Op.LT: sp.Lt, Op.LE: sp.Le, Op.GT: sp.Gt, Op.GE: sp.Ge, Op.EQ: sp.Eq, Op.NE: sp.Ne}[op]
            out = rel(s[0], s[1])
        elif op is Op.AND and node.dtype is DType.BOOL:
            out = sp.And(s[0], s[1])
        elif op is Op.OR and node.dtype is DType.BOOL:
            out = sp.Or(s[0], s[1])
        elif op is Op.NOT and node.dtype is DType.BOOL:
            out = sp.Not(s[0])
        elif op is Op.WHERE:
            out = sp.Piecewise((s[1], s[0]), (s[2], True))
        elif op in (Op.EXP, Op.LOG, Op.SQRT, Op.TANH, Op.SIN, Op.COS, Op.FLOOR, Op.CEIL, Op.ABS, Op.SIGN):
            fn = {Op.EXP: sp.exp, Op.LOG: sp.log, Op.SQRT: sp.sqrt, Op.TANH: sp.tanh, Op.SIN: sp.sin,
                  Op.COS: sp.cos, Op.FLOOR: sp.floor, Op.CEIL: sp.ceiling, Op.ABS: sp.Abs, Op.SIGN: sp.sign}[op]
            out = fn(s[0])
        elif op is Op.EXP2:
            out = 2 ** s[0]
        elif op is Op.LOG2:
            out = sp.log(s[0], 2)
        elif op is Op.RSQRT:
            out = 1 / sp.sqrt(s[0])
        elif op is Op.SIGMOID:
            out = 1 / (1 + sp.exp(-s[0]))
        elif op is Op.CAST:
            out = s[0]
        else:
            out = sp.Function(op.value)(*s)
        cache[id(node)] = out
    return cache[id(root)]


# ---------------------------------------------------------------------------------------------
# constant evaluation (used by the simplifier for folding; Python/torch semantics)


def _floordiv(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return float(math.floor(a / b))
    return a // b


def _fmod(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a - b * math.floor(a / b)
    return a % b


def _pow(a, b):
    if isinstance(a, int) and isinstance(b, int) and b < 0:
        raise ZeroDivisionError  # torch refuses negative integer powers of integers; leave unfolded
    return a**b


CONST_EVAL: dict[Op, Callable] = {
    Op.NEG: lambda a: -a,
    Op.TRUEDIV: lambda a, b: a / b,
    Op.POW: _pow,
    Op.EXP: math.exp,
    Op.EXP2: lambda a: 2.0**a,
    Op.LOG: math.log,
    Op.LOG2: math.log2,
    Op.SQRT: math.sqrt,
    Op.RSQRT: lambda a: 1.0 / math.sqrt(a),
    Op.TANH: math.tanh,
    Op.SIGMOID: lambda a: 1.0 / (1.0 + math.exp(-a)),
    Op.SIN: math.sin,
    Op.COS: math.cos,
    Op.ABS: abs,
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.FLOORDIV: _floordiv,
    Op.MOD: _fmod,
    Op.MIN: min,
    Op.MAX: max,
    Op.LT: lambda a, b: a < b,
    Op.LE: lambda a, b: a <= b,
    Op.GT: lambda a, b: a > b,
    Op.GE: lambda a, b: a >= b,
    Op.EQ: lambda a, b: a == b,
    Op.NE: lambda a, b: a != b,
    Op.AND: lambda a, b: a & b,
    Op.OR: lambda a, b: a | b,
    Op.XOR: lambda a, b: a ^ b,
}
