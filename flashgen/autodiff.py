"""Reverse-mode differentiation of IR expressions, producing IR.

The backward kernels need, for the final logit ``L = score_mod(score) + bias``:

- ``dL/dscore``, to turn the softmax gradient into the score gradient (1 for plain attention,
  ``1 - tanh(score/cap)^2`` for soft-capping, and so on for any traced expression), and
- ``dL/d(read)`` for each read of a captured floating-point tensor, to accumulate gradients into
  learnable tensors (a tensor read twice gives two reads, each with its own gradient expression).

Each op has one local rule below. Integer and boolean subexpressions carry no gradient; ``floor``,
``ceil``, ``sign`` and comparisons have zero derivative almost everywhere, as in torch.
"""

from __future__ import annotations

import math

from . import ir
from .ir import DType, Node, Op
from .rewrite import simplify


def _c(value: float) -> Node:
    return ir.const(float(value))


def _mul(a: Node, b: Node) -> Node:
    return ir.binary(Op.MUL, a, b)


def _local_grads(node: Node, g: Node) -> list[Node | None]:
    """Gradient contributions to each source of ``node`` given the gradient ``g`` of ``node``."""
    op, s = node.op, node.src
    if op is Op.ADD:
        return [g, g]
    if op is Op.SUB:
        return [g, ir.unary(Op.NEG, g)]
    if op is Op.MUL:
        return [_mul(g, s[1]), _mul(g, s[0])]
    if op is Op.TRUEDIV:
        return [ir.binary(Op.TRUEDIV, g, s[1]), ir.unary(Op.NEG, ir.binary(Op.TRUEDIV, _mul(g, node), s[1]))]
    if op is Op.NEG:
        return [ir.unary(Op.NEG, g)]
    if op is Op.EXP:
        return [_mul(g, node)]
    if op is Op.EXP2:
        return [_mul(g, _mul(node, _c(math.log(2.0))))]
    if op is Op.LOG:
        return [ir.binary(Op.TRUEDIV, g, s[0])]
    if op is Op.LOG2:
        return [ir.binary(Op.TRUEDIV, g, _mul(s[0], _c(math.log(2.0))))]
    if op is Op.SQRT:
        return [ir.binary(Op.TRUEDIV, _mul(g, _c(0.5)), node)]
    if op is Op.RSQRT:  # d x^-1/2 = -1/2 x^-3/2 = -1/2 * rsqrt(x) / x
        return [_mul(g, ir.binary(Op.TRUEDIV, _mul(node, _c(-0.5)), s[0]))]
    if op is Op.TANH:
        return [_mul(g, ir.binary(Op.SUB, _c(1.0), _mul(node, node)))]
    if op is Op.SIGMOID:
        return [_mul(g, _mul(node, ir.binary(Op.SUB, _c(1.0), node)))]
    if op is Op.SIN:
        return [_mul(g, ir.unary(Op.COS, s[0]))]
    if op is Op.COS:
        return [ir.unary(Op.NEG, _mul(g, ir.unary(Op.SIN, s[0])))]
    if op is Op.ABS:
        return [_mul(g, ir.to_dtype(ir.unary(Op.SIGN, s[0]), DType.FLOAT))]
    if op is Op.POW:
        base, exponent = s
        d_base = _mul(g, _mul(exponent, ir.binary(Op.POW, base, ir.binary(Op.SUB, exponent, _c(1.0)))))
        d_exp = None
        if exponent.op is not Op.CONST:
            d_exp = _mul(g, _mul(node, ir.unary(Op.LOG, base)))
        return [d_base, d_exp]
    if op in (Op.MIN, Op.MAX):
        # as torch.minimum / torch.maximum: the chosen operand gets the gradient, ties split it
        a, b = s if op is Op.MIN else (s[1], s[0])
        zero, half = _c(0.0), _mul(g, _c(0.5))
        first = ir.where(ir.binary(Op.LT, a, b), g, ir.where(ir.binary(Op.EQ, a, b), half, zero))
        second = ir.where(ir.binary(Op.LT, b, a), g, ir.where(ir.binary(Op.EQ, a, b), half, zero))
        return [first, second]
    if op is Op.WHERE:
        zero = _c(0.0)
        return [None, ir.where(s[0], g, zero), ir.where(s[0], zero, g)]
    if op is Op.MOD and node.dtype is DType.FLOAT:
        # torch.remainder: x - y * floor(x / y), so d/dx = 1 and d/dy = -floor(x / y)
        floor = ir.unary(Op.FLOOR, ir.binary(Op.TRUEDIV, s[0], s[1]))
        return [g, ir.unary(Op.NEG, _mul(g, floor))]
    if op is Op.CAST:
        return [g]
    # FLOOR, CEIL, SIGN, float //, comparisons, integer and boolean ops: no gradient
    return [None] * len(s)


def gradients(root: Node, wrt: list[Node]) -> dict[int, Node]:
    """d root / d w for each node ``w`` in ``wrt`` (by id), simplified; zero if root does not use w."""
    order = ir.toposort([root])
    adjoint: dict[int, Node] = {id(root): _c(1.0)}
    for node in reversed(order):
        g = adjoint.get(id(node))
        if g is None or node.dtype is not DType.FLOAT or not node.src:
            continue
        if node.op is Op.LOAD:
            continue  # a read's gradient stops here: it is accumulated into the tensor
        for child, contribution in zip(node.src, _local_grads(node, g)):
            if contribution is None or child.dtype is not DType.FLOAT:
                continue
            previous = adjoint.get(id(child))
            adjoint[id(child)] = contribution if previous is None else ir.binary(Op.ADD, previous, contribution)
    return {id(w): simplify(adjoint.get(id(w), _c(0.0))) for w in wrt}


def float_reads(root: Node) -> list[Node]:
    """The reads of captured floating-point tensors in ``root`` (candidates for gradients)."""
    return [n for n in ir.toposort([root]) if n.op is Op.LOAD and n.dtype is DType.FLOAT]
