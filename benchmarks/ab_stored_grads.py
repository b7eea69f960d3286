"""Should the gradient of a tensor that every score entry reads its own entry of be stored by the
dQ pass? (PERFLOG, fourteenth session)

A learnable dense bias [B, H, S, S] (AlphaFold's pair bias, FlashBias's experiment) is read at
[b, h, q_idx, kv_idx]: no two score entries share a bias entry. flashgen's dQ pass stores its
gradient, once per entry, in the bias's dtype (``analysis.entrywise_reads``). The other arm renders
the backward as it was before: fp32 atomic adds in the dK/dV pass into a zeroed float32 buffer,
converted to the bias's dtype after. This times both arms' fwd+bwd steps interleaved for
``--rounds`` rounds in one process, and checks that their gradients agree:

    PYTHONPATH=. python3 benchmarks/ab_stored_grads.py [--shape 4,16,8192,128] [--rounds 3]
"""

from __future__ import annotations

import statistics

import torch
from ab_table_grads import command_line

import flashgen as fg
from flashgen.codegen import render


def added(attn: fg.Attention) -> fg.Attention:
    """``attn`` rendering its backward with every captured tensor's gradient added by the dK/dV pass
    (as before ``entrywise_reads``), in a cache of its own (the arms share a program key)."""
    cache: dict = {}

    def source(grad_slots):
        if grad_slots not in cache:
            rule, render.entrywise_reads = render.entrywise_reads, lambda logits: {}
            try:
                cache[grad_slots] = render.render_backward(
                    attn.name, attn.program.key, attn.program.logits, attn.program.mask, attn.analysis,
                    tuple(c.ndim for c in attn.program.captures), grad_slots)
            finally:
                render.entrywise_reads = rule
        return cache[grad_slots]

    attn._backward_source = source
    return attn


def main() -> None:
    args, (B, H, S, D) = command_line(__doc__, 3)
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    pair = (0.5 * torch.randn(B, H, S, S, device="cuda", dtype=torch.bfloat16, generator=gen)).requires_grad_()
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    arms = {
        "stored by the dQ pass": fg.compile(bias=pair),
        "added by the dK/dV pass": added(fg.compile(bias=pair)),
        "stored, causal": fg.compile(bias=pair, mask_mod=fg.mods.causal),
        "added, causal": added(fg.compile(bias=pair, mask_mod=fg.mods.causal)),
    }
    assert "tl.store(gcap0" in arms["stored by the dQ pass"].source("bwd")

    def step(attn):
        for t in (q, k, v, pair):
            t.grad = None
        attn(q, k, v).backward(dout)

    grads = {}
    for name, attn in arms.items():
        step(attn)
        grads[name] = [t.grad.float().clone() for t in (q, k, v, pair)]
    for a, b in (("stored by the dQ pass", "added by the dK/dV pass"), ("stored, causal", "added, causal")):
        errs = [((x - y).norm() / y.norm()).item() for x, y in zip(grads[a], grads[b])]
        print(f"{a!r} against {b!r}: dq, dk, dv, dbias relative differences "
              + ", ".join(f"{e:.1e}" for e in errs))
    del grads
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, attn in arms.items():
            times[name].append(do_bench(lambda attn=attn: step(attn), warmup=10, rep=200))
    print(f"{'arm':<28} {'fwd+bwd ms':>10}  rounds")
    for name, ts in times.items():
        print(f"{name:<28} {statistics.median(ts):>10.2f}  {', '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()
