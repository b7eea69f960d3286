"""What a piece of the generated kernels costs: a variant timed with its kernels as generated and
with that piece dropped from their source (the same tiles visited; wrong outputs, timed only), for
the Triton kernels (``runtime.WS_FORWARD`` and ``WS_BACKWARD`` off in their calls) and for the Gluon
ones (which sparse maps take at head dim 128 only: ``Attention._ws_map_fits`` is overridden).
Forward and forward+backward, arms interleaved in one process, next to flex (PERFLOG, twenty-first
session, whose call 4 ran this as ``ab_mask_cost.py``, the ``mask`` arms; before the twenty-second
the Gluon arms ran unpatched Gluon kernels, and ``triton`` the default dispatch).

    PYTHONPATH=. python3 benchmarks/ab_ablate.py [--variants document] [--shape 4x16x8192x128]
        [--arms triton,triton:mask,gluon,gluon:mask,gluon:dq_reduce] [--docs 1,16] [--rounds 3] [--profile]

Pieces (``DROPS``): ``mask``, the mask's ``where`` (its reads and compares go with it);
``dq_reduce``, the Gluon backward's TMA reduction of each dQ tile into the float32 buffer. An arm
whose piece is not in its kernels' source is refused. The ``triton`` and ``gluon`` arms are checked
against each other (out and gradients, relative error).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402
from bench_forward import build_variants  # noqa: E402

import flashgen as fg  # noqa: E402
from flashgen import api, runtime  # noqa: E402

DROPS = {  # piece -> (the lines that are it, what stands in for them)
    "mask": (re.compile(r'^(\s*)(s|st) = (tl|gl)\.where\(([tm]\d+), (s|st), float\("-inf"\)\)$', re.M),
             r"\1\2 = \2  # (mask dropped: timing only)"),
    "dq_reduce": (re.compile(r"^(\s*)_tma_reduce_add\(dqa_desc, .*\)$", re.M),
                  r"\1pass  # (dQ's reduction dropped: timing only)"),
}
DROP = {"now": None, "done": set()}  # the piece dropped by the call running now; pieces found in a source
_load_module = runtime.load_module


def _patched_load_module(ks):
    if DROP["now"]:
        pattern, stand_in = DROPS[DROP["now"]]
        source, n = pattern.subn(stand_in, ks.source)
        if n:
            DROP["done"].add(DROP["now"])
            ks = dataclasses.replace(ks, source=source, key=hashlib.sha256(source.encode()).hexdigest())
    return _load_module(ks)


runtime.load_module = _patched_load_module
api.load_module = _patched_load_module  # (the Gluon kernels' launches import it by name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_times(fn) -> str:
    """The CUDA kernels of one call of ``fn`` (after one warm call): name and µs, largest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return "\n".join(f"  {t:9.1f}  {k[:90]}" for k, t in rows[:12]) + f"\n  {sum(t for _, t in rows):9.1f}  (sum)"


def inputs(shape: str) -> tuple:
    """flex compiled, the shape's (B, H, S, D), bf16 q, k, v that require grad, and dout, on the GPU."""
    from torch.nn.attention.flex_attention import flex_attention
    B, H, S, D = suite.parse_shape(shape)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return torch.compile(flex_attention), (B, H, S, D), (q, k, v), torch.randn_like(q)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="document", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--arms", default="triton,triton:mask,gluon,gluon:mask,gluon:dq_reduce")
    p.add_argument("--docs", default="16", help="document counts for the document variant, e.g. 1,16 (one "
                   "document: causal through a block map's runs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="each arm's CUDA kernels in one fwd+bwd (torch.profiler)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_ablate: no CUDA device")
        return 0
    from torch.nn.attention.flex_attention import create_block_mask
    flex, (B, H, S, D), (q, k, v), dout = inputs(args.shape)
    rows = []
    named = []
    for name in suite.parse_list(args.variants, suite.VARIANTS, "variants"):
        if name != "document":
            named.append((name, suite.build_cases(H, S, "cuda", torch.bfloat16, [name])[name].variant))
            continue
        for n in map(int, args.docs.split(",")):
            var = next(v for v in build_variants(fg, H, "cuda", seq_len=S, num_docs=n) if v.key == name)
            named.append((f"document/{n}", var))
    for name, var in named:
        mask = create_block_mask(var.flex_mask, None, None, S, S, device="cuda") if var.flex_mask else None
        arms = {}
        for arm in args.arms.split(","):
            kernels, _, drop = arm.partition(":")
            assert kernels in ("triton", "gluon") and (not drop or drop in DROPS), arm
            attn = fg.compile(**var.fg_kwargs)
            if kernels == "gluon":
                attn._ws_dense[((B, H, S, S), str(q.device))] = True  # (sparse maps take the Gluon kernels)

            def fwd(attn=attn, drop=drop or None, ws=kernels == "gluon"):
                DROP["now"], runtime.WS_FORWARD, runtime.WS_BACKWARD = drop, ws, ws
                try:
                    with torch.no_grad():
                        return attn(q, k, v)
                finally:
                    DROP["now"], runtime.WS_FORWARD, runtime.WS_BACKWARD = None, True, True

            def both(attn=attn, drop=drop or None, ws=kernels == "gluon"):
                DROP["now"], runtime.WS_FORWARD, runtime.WS_BACKWARD = drop, ws, ws
                try:
                    out = attn(q, k, v)
                    out.backward(dout)
                    return out
                finally:
                    DROP["now"], runtime.WS_FORWARD, runtime.WS_BACKWARD = None, True, True

            arms[arm] = (attn, fwd, both)
        arms["flex"] = (None, lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score, block_mask=mask),
                        lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score,
                                                        block_mask=mask).backward(dout))
        results, used = {}, {}
        for arm, (attn, _, both) in arms.items():
            for t in (q, k, v):
                t.grad = None
            DROP["done"].clear()
            out = both()
            drop = arm.partition(":")[2]
            assert not drop or drop in DROP["done"], f"{arm}: no {drop} in its kernels' source"
            results[arm] = [out.detach() if out is not None else None] + [t.grad.clone() for t in (q, k, v)]
            used[arm] = dict(attn.last_tiles) if attn is not None else {}
        if "triton" in results and "gluon" in results:
            err = max(rel(a, b) for a, b in zip(results["gluon"], results["triton"]) if a is not None)
            print(f"{name}: gluon against triton (out, dq, dk, dv) {err:.1e}", flush=True)
            assert err < 2e-2, err
        if args.profile:
            for arm in arms:
                print(f"## {name}, {arm}: CUDA kernels of one fwd+bwd (µs)")
                print(kernel_times(arms[arm][2]), flush=True)
        times = {arm: ([], []) for arm in arms}
        for _ in range(args.rounds):
            for arm, (_, fwd, both) in arms.items():
                times[arm][0].append(suite.time_ms(fwd, [], "cuda"))
                times[arm][1].append(suite.time_ms(both, [q, k, v], "cuda"))
        flops = 4 * B * H * suite.count_kept(var.fg_kwargs.get("mask_mod"), S, S, "cuda") * D
        for arm, (tf, tb) in times.items():
            f, b = statistics.median(tf), statistics.median(tb)
            rows.append((name, arm, f, flops / f / 1e9, b, 3.5 * flops / b / 1e9, b - f, used[arm]))
    print(f"\n# {args.shape} bf16, median of {args.rounds} interleaved rounds (arms with a drop: timing only)")
    print(f"{'variant':<12} {'arm':<16} {'fwd ms':>7} {'TF/s':>6} {'f+b ms':>7} {'TF/s':>6} {'bwd ms':>7}  kernels")
    for name, arm, f, ftf, b, btf, bw, kern in rows:
        kinds = ", ".join(f"{kind}: {cfg}" for kind, cfg in kern.items())
        print(f"{name:<12} {arm:<16} {f:7.3f} {ftf:6.1f} {b:7.3f} {btf:6.1f} {bw:7.3f}  {kinds[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
