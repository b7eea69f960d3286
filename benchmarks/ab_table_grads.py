"""Where should a learnable table's gradient accumulate? (PERFLOG, twelfth session)

A learnable relative-position table gets one atomic add per score entry in the dK/dV pass: at
the table's own index, or on a buffer indexed as its staggered copies and folded into the table
after the pass (``runtime.gradient_buffer``, ``runtime.fold_staggered``). flashgen takes the copies
only for looked-up or clamped indices (``render._gradient_on_copies``); this times both places for
the plain table, next to T5's table, fwd+bwd steps interleaved for ``--rounds`` rounds in one
process, and checks that the arms' table gradients agree:

    PYTHONPATH=. python3 benchmarks/ab_table_grads.py [--shape 4,16,8192,128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import flashgen as fg
from flashgen.codegen import render


def on_copies(attn: fg.Attention, always: bool) -> fg.Attention:
    """``attn`` rendering its backward with the gradients on the copies for every diagonal read
    (``always``) or by flashgen's rule, in a cache of its own (the arms share a program key)."""
    cache: dict = {}

    def source(grad_slots):
        if grad_slots not in cache:
            rule = render._gradient_on_copies
            render._gradient_on_copies = (lambda d: True) if always else rule
            try:
                cache[grad_slots] = render.render_backward(
                    attn.name, attn.program.key, attn.program.logits, attn.program.mask, attn.analysis,
                    tuple(c.ndim for c in attn.program.captures), grad_slots)
            finally:
                render._gradient_on_copies = rule
        return cache[grad_slots]

    attn._backward_source = source
    return attn


def command_line(doc: str, rounds: int) -> tuple[argparse.Namespace, tuple[int, ...]]:
    """The A/B scripts' options (--shape B,H,S,D, --rounds) and the shape."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--shape", default="4,16,8192,128")
    p.add_argument("--rounds", type=int, default=rounds)
    args = p.parse_args()
    return args, tuple(int(x) for x in args.shape.split(","))


def main() -> None:
    args, (B, H, S, D) = command_line(__doc__, 3)
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    table = (0.1 * torch.randn(H, 2 * S - 1, device="cuda", generator=gen)).requires_grad_()
    t5 = (0.5 * torch.randn(H, 32, device="cuda", generator=gen)).requires_grad_()
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    arms = {
        "table, own index": (on_copies(fg.compile(score_mod=fg.mods.relative_bias(table)), False), table),
        "table, on copies": (on_copies(fg.compile(score_mod=fg.mods.relative_bias(table)), True), table),
        "T5, on copies": (fg.compile(score_mod=fg.mods.t5_bias(t5)), t5),
    }

    def step(attn, learnable):
        for t in (q, k, v, learnable):
            t.grad = None
        attn(q, k, v).backward(dout)

    grads = {}
    for name, (attn, learnable) in arms.items():
        step(attn, learnable)
        grads[name] = learnable.grad.clone()
    a, b = grads["table, own index"], grads["table, on copies"]
    print(f"table gradients, own index against copies: {((a - b).norm() / a.norm()).item():.2e}")
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, (attn, learnable) in arms.items():
            times[name].append(do_bench(lambda attn=attn, learnable=learnable: step(attn, learnable),
                                        warmup=100, rep=1000))
    print(f"{'arm':<18} {'fwd+bwd ms':>10}  rounds")
    for name, ts in times.items():
        print(f"{name:<18} {statistics.median(ts):>10.2f}  {', '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()
