"""How should a learnable tensor's gradient accumulate in the dK/dV pass? (PERFLOG, twelfth and
thirteenth sessions)

A learnable relative-position table gets one atomic add per score entry in the dK/dV pass: at
the table's own index, or on a buffer indexed as its staggered copies and folded into the table
after the pass (``runtime.gradient_buffer``, ``runtime.fold_staggered``). flashgen takes the copies
only for looked-up or clamped indices (``render._gradient_on_copies``), and its atomics are relaxed
(Triton's default, acquire-release, puts a GPU-scope fence on each). This times, in one process with
the fwd+bwd steps interleaved for ``--rounds`` rounds: the plain table at its own index and on
copies, T5's table on copies, and a learnable dense bias [H, S, S] (one atomic per entry), each
with relaxed and with acquire-release atomics, and checks that the arms' gradients agree:

    PYTHONPATH=. python3 benchmarks/ab_table_grads.py [--shape 4,16,8192,128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import statistics

import torch

import flashgen as fg
from flashgen.codegen import render


def rendered(attn: fg.Attention, copies: bool | None = None, ordered: bool = False) -> fg.Attention:
    """``attn`` rendering its backward with the gradients of diagonal reads on the copies
    (``copies`` True), at their own index (False) or by flashgen's rule (None), and with Triton's
    default acquire-release atomics (``ordered``), in a cache of its own (the arms share a program key)."""
    cache: dict = {}

    def source(grad_slots):
        if grad_slots not in cache:
            rule = render._gradient_on_copies
            render._gradient_on_copies = rule if copies is None else (lambda d: copies)
            try:
                ks = render.render_backward(
                    attn.name, attn.program.key, attn.program.logits, attn.program.mask, attn.analysis,
                    tuple(c.ndim for c in attn.program.captures), grad_slots)
            finally:
                render._gradient_on_copies = rule
            if ordered:
                text = re.sub(r',\s*sem="relaxed"\)', ")", ks.source)
                ks = dataclasses.replace(ks, source=text, key=hashlib.sha256(text.encode()).hexdigest())
            cache[grad_slots] = ks
        return cache[grad_slots]

    attn._backward_source = source
    return attn


def command_line(doc: str, rounds: int, **options: dict) -> tuple[argparse.Namespace, tuple[int, ...]]:
    """The A/B scripts' options (--shape B,H,S,D, --rounds, and ``options``: name -> add_argument's
    keywords) and the shape."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--shape", default="4,16,8192,128")
    p.add_argument("--rounds", type=int, default=rounds)
    for name, kw in options.items():
        p.add_argument(f"--{name}", **kw)
    args = p.parse_args()
    return args, tuple(int(x) for x in args.shape.split(","))


def main() -> None:
    args, (B, H, S, D) = command_line(__doc__, 3)
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    table = (0.1 * torch.randn(H, 2 * S - 1, device="cuda", generator=gen)).requires_grad_()
    t5 = (0.5 * torch.randn(H, 32, device="cuda", generator=gen)).requires_grad_()
    bias = (0.5 * torch.randn(H, S, S, device="cuda", dtype=torch.bfloat16, generator=gen)).requires_grad_()
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    rel, buckets = fg.mods.relative_bias(table), fg.mods.t5_bias(t5)
    arms = {
        "table, own index": (rendered(fg.compile(score_mod=rel), False), table),
        "table, own index, acq_rel": (rendered(fg.compile(score_mod=rel), False, True), table),
        "table, on copies": (rendered(fg.compile(score_mod=rel), True), table),
        "T5, on copies": (rendered(fg.compile(score_mod=buckets), True), t5),
        "T5, on copies, acq_rel": (rendered(fg.compile(score_mod=buckets), True, True), t5),
        "dense bias": (rendered(fg.compile(bias=bias)), bias),
        "dense bias, acq_rel": (rendered(fg.compile(bias=bias), ordered=True), bias),
    }

    def step(attn, learnable):
        for t in (q, k, v, learnable):
            t.grad = None
        attn(q, k, v).backward(dout)

    grads = {}
    for name, (attn, learnable) in arms.items():
        step(attn, learnable)
        grads[name] = learnable.grad.float().clone()
    for name, g in grads.items():
        first = next(n for n in grads if n.split(",")[0] == name.split(",")[0])
        if first != name:
            ref = grads[first]
            print(f"{name:<28} gradient against {first!r}: {((g - ref).norm() / ref.norm()).item():.2e}")
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, (attn, learnable) in arms.items():
            times[name].append(do_bench(lambda attn=attn, learnable=learnable: step(attn, learnable),
                                        warmup=25, rep=300))
    print(f"{'arm':<28} {'fwd+bwd ms':>10}  rounds")
    for name, ts in times.items():
        print(f"{name:<28} {statistics.median(ts):>10.2f}  {', '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()
