"""Sparse block maps in the Triton kernels or the Gluon ones (``runtime.WS_SPARSE_HEAD_DIMS``), A/B:
``triton`` (both ways), ``gluon`` (both ways where the Gluon forward covers the head dim) and
``gluon-bwd`` (the Triton forward, the Gluon backward); whole forward+backward calls, arms
interleaved for ``--rounds`` rounds on the same buffers, next to flex (PERFLOG, twenty-first and
twenty-second sessions).

    PYTHONPATH=. python3 benchmarks/ab_sparse_backward.py [--variants document] [--shape 4x16x8192x128]
        [--rounds 3] [--profile]

The arms' gradients are checked against each other (relative error, printed; above 1e-2 fails).
``--profile`` prints each arm's CUDA kernels in one call (``ab_ablate.kernel_times``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402
from ab_ablate import inputs, kernel_times, rel  # noqa: E402

import flashgen as fg  # noqa: E402
from flashgen import runtime  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="document", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--stages", default="", help="more Gluon arms at other (Q/dO stages, dQ buffers), as 3x1,2x1")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_sparse_backward: no CUDA device")
        return 0
    from torch.nn.attention.flex_attention import create_block_mask
    flex, (B, H, S, D), (q, k, v), dout = inputs(args.shape)
    knobs = ("WS_SPARSE_HEAD_DIMS", "WS_FORWARD", "WS_BACKWARD_STAGES", "WS_DQ_BUFFERS")
    saved = {knob: getattr(runtime, knob) for knob in knobs}
    rows = []
    for name in suite.parse_list(args.variants, suite.VARIANTS, "variants"):
        var = suite.build_cases(H, S, "cuda", torch.bfloat16, [name])[name].variant
        attn = fg.compile(**var.fg_kwargs)
        mask = create_block_mask(var.flex_mask, None, None, S, S, device="cuda") if var.flex_mask else None

        def call(gluon: bool, forward: bool = True, stages: tuple[int, int] | None = None, attn=attn):
            def run():  # (the knobs are read by each call)
                runtime.WS_SPARSE_HEAD_DIMS, runtime.WS_FORWARD = ((D,) if gluon else ()), forward
                runtime.WS_BACKWARD_STAGES, runtime.WS_DQ_BUFFERS = stages or (saved["WS_BACKWARD_STAGES"],
                                                                             saved["WS_DQ_BUFFERS"])
                try:
                    attn(q, k, v).backward(dout)
                finally:
                    for knob, value in saved.items():
                        setattr(runtime, knob, value)
            return run

        arms = {"triton": call(False), "gluon": call(True), "gluon-bwd": call(True, forward=False)}
        for spec in filter(None, args.stages.split(",")):
            stages, buffers = map(int, spec.split("x"))
            arms[f"gluon-s{stages}b{buffers}"] = call(True, stages=(stages, buffers))
        ours = list(arms)
        arms["flex"] = lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score,
                                                       block_mask=mask).backward(dout)
        grads, kernels = {}, {}
        for arm in ours:
            for t in (q, k, v):
                t.grad = None
            arms[arm]()
            kernels[arm] = ", ".join(f"{kind}: {cfg}" for kind, cfg in attn.last_tiles.items())
            grads[arm] = [t.grad.clone() for t in (q, k, v)]
        err = max(rel(a, b) for arm in ours[1:] for a, b in zip(grads[arm], grads["triton"]))
        if args.profile:
            for arm in ours:
                print(f"## {name} {args.shape}, {arm}: CUDA kernels of one fwd+bwd (µs)")
                print(kernel_times(arms[arm]), flush=True)
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.rounds):
            for arm, fn in arms.items():
                times[arm].append(suite.time_ms(fn, [q, k, v], "cuda"))
        flops = 3.5 * 4 * B * H * suite.count_kept(var.fg_kwargs.get("mask_mod"), S, S, "cuda") * D
        flex_ms = statistics.median(times["flex"])
        for arm, ts in times.items():
            ms = statistics.median(ts)
            rows.append((name, arm, ms, flops / ms / 1e9, flex_ms / ms, err if arm.startswith("gluon") else None,
                         kernels.get(arm, "")))
        assert err < 1e-2, err
    print(f"\n# {args.shape} bf16 forward+backward, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<10} {'arm':>12} {'ms':>8} {'TF/s':>7} {'x flex':>7} {'grad err':>9}  kernels")
    for name, arm, ms, tf, ratio, e, kern in rows:
        err = "" if e is None else f"{e:.1e}"
        print(f"{name:<10} {arm:>12} {ms:8.3f} {tf:7.1f} {ratio:7.2f} {err:>9}  {kern[:78]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
