"""Should the gradient of a tensor that every score entry reads its own entry of be stored by the
dQ pass? (PERFLOG, fourteenth and fifteenth sessions)

A learnable dense bias [B, H, S, S] (AlphaFold's pair bias, FlashBias's experiment) is read at
[b, h, q_idx, kv_idx]: no two score entries share a bias entry, and flashgen's dQ pass stores its
gradient once per entry, in the bias's dtype (``analysis.entrywise_reads``). A bias [H, S, S] that
the batch shares is stored the same way into a [B, H, S, S] buffer, summed over b after
(``runtime.sum_leading``), where that buffer is at most twice a float32 copy. The other arm renders
the backward as before: fp32 atomic adds in the dK/dV pass into a zeroed float32 buffer, converted
to the bias's dtype after. This times the arms' fwd+bwd steps interleaved for ``--rounds`` rounds
in one process, and checks that their gradients agree:

    PYTHONPATH=. python3 benchmarks/ab_stored_grads.py [--shape 4,16,8192,128] [--rounds 3] [--bias pair|shared]
"""

from __future__ import annotations

import statistics

import torch
from ab_table_grads import command_line

import flashgen as fg


def added(attn: fg.Attention) -> fg.Attention:
    """``attn`` with every captured tensor's gradient added by the dK/dV pass (as before
    ``entrywise_reads``)."""
    attn._stored_slots = lambda grad_slots, B, H: ()
    return attn


def main() -> None:
    args, (B, H, S, D) = command_line(__doc__, 3, bias=dict(choices=("pair", "shared"), default="pair"))
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (B, H, S, S) if args.bias == "pair" else (H, S, S)
    bias = (0.5 * torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)).requires_grad_()
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    arms = {
        "stored by the dQ pass": fg.compile(bias=bias),
        "added by the dK/dV pass": added(fg.compile(bias=bias)),
        "stored, causal": fg.compile(bias=bias, mask_mod=fg.mods.causal),
        "added, causal": added(fg.compile(bias=bias, mask_mod=fg.mods.causal)),
    }

    def step(attn):
        for t in (q, k, v, bias):
            t.grad = None
        attn(q, k, v).backward(dout)

    grads = {}
    for name, attn in arms.items():
        step(attn)
        grads[name] = [t.grad.float().clone() for t in (q, k, v, bias)]
    for a, b in (("stored by the dQ pass", "added by the dK/dV pass"), ("stored, causal", "added, causal")):
        errs = [((x - y).norm() / y.norm()).item() for x, y in zip(grads[a], grads[b])]
        print(f"{a!r} against {b!r}: dq, dk, dv, dbias relative differences "
              + ", ".join(f"{e:.1e}" for e in errs))
    print("stored in the dQ pass:", ["tl.store(gcap0" in attn.source("bwd") for attn in arms.values()])
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
