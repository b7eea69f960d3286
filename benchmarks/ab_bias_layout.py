"""Does the dK/dV pass read a dense bias faster from a copy laid out along q? (PERFLOG, twelfth session)

The dK/dV pass reads a dense bias ``bias[h, q, kv]`` as [kv, q] tiles, against the tensor's
layout: Triton prefetches them into registers and converts their layout on every tile. Read
from a transposed copy ``bias_t[h, kv, q]`` the same tiles run along memory, and the pipeliner
copies them asynchronously (TTGIR, offline). This times the backward alone (``torch.autograd.grad``
of a kept forward), both arms interleaved for ``--rounds`` rounds in one process:

    PYTHONPATH=. python3 benchmarks/ab_bias_layout.py [--shape 4,16,8192,128] [--rounds 4]

Arm ``bias``: ``fg.compile(bias=bias)``; arm ``transposed``: a score_mod reading ``bias_t[h, kv_idx,
q_idx]`` (its forward reads across the layout, so only the backward is compared). Both arms'
gradients are checked against each other, and torch.profiler splits each backward into its two
passes (the dQ pass reads the copy across its layout in turn).
"""

from __future__ import annotations

import statistics

import torch
from ab_table_grads import command_line

import flashgen as fg


def main() -> None:
    args, (B, H, S, D) = command_line(__doc__, 4)
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    bias = torch.randn(H, S, S, device="cuda", dtype=torch.bfloat16, generator=gen)
    bias_t = bias.transpose(-1, -2).contiguous()

    def transposed(score, b, h, q_idx, kv_idx):
        return score + bias_t[h, kv_idx, q_idx]

    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    arms = {"bias": fg.compile(bias=bias), "transposed": fg.compile(score_mod=transposed)}
    outs = {name: attn(q, k, v) for name, attn in arms.items()}
    grads = {name: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) for name, out in outs.items()}
    for a, b in zip(grads["bias"], grads["transposed"]):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        print(f"gradient agreement: {err:.2e}")
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, out in outs.items():
            times[name].append(do_bench(lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                        warmup=50, rep=300))
    for name, out in outs.items():  # each pass on its own (the dQ pass reads the copy across its layout)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.key.startswith("attn_bwd"):
                print(f"{name:<12} {e.key:<16} {e.device_time_total / 3:9.0f} us per backward")
    ratios = [t / b for t, b in zip(times["transposed"], times["bias"])]
    print(f"{'arm':<12} {'backward ms (median of rounds)':>32}  rounds")
    for name, ts in times.items():
        print(f"{name:<12} {statistics.median(ts):>32.3f}  {', '.join(f'{t:.3f}' for t in ts)}")
    print(f"transposed / bias: median {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")


if __name__ == "__main__":
    main()
