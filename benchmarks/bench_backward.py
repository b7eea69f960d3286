"""Forward+backward benchmark: flashgen next to torch.compile(flex_attention) and SDPA, one process.

    PYTHONPATH=. python3 benchmarks/bench_backward.py [--out DIR] [--seq-len 8192]

bf16, B=4, H=16, S=8192, D=128. Variants: full, causal, ALiBi + causal, soft-cap 30 + causal,
relative-position table (frozen, and requiring grad). Time of out = attn(q, k, v);
out.backward(dout), median of triton.testing.do_bench. TFLOP/s counts unmasked entries only:
3.5 x 4·B·H·S²·D·density (forward + backward, as FlashAttention reports). Each variant's gradients
are checked against FlexAttention's (or SDPA's) on the full shape before timing; peak memory of
the learnable-table variant is reported next to FlexAttention's.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

REL_TOL = 3e-2


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--variants", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_backward: no CUDA device; nothing to time")
        return 0
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import flashgen as fg

    B, H, S, D = args.batch, args.heads, args.seq_len, args.head_dim
    dev, dtype = "cuda", torch.bfloat16
    flex = torch.compile(flex_attention)
    slopes = fg.mods.alibi_slopes(H, device=dev)
    table = torch.randn(H, 2 * S - 1, device=dev) * 0.1

    def causal(b, h, q, kv):
        return q >= kv

    def alibi(score, b, h, q, kv):
        return score + slopes[h] * (kv - q)

    def softcap(score, b, h, q, kv):
        return 30.0 * torch.tanh(score / 30.0)

    def relative(score, b, h, q, kv):
        return score + table[h, q - kv + S - 1]

    learnable = table.clone().requires_grad_()

    def relative_learnable(score, b, h, q, kv):
        return score + learnable[h, q - kv + S - 1]

    half = (S + 1) / (2 * S)
    variants = {  # name: (score_mod, mask_mod, density, captured tensors with grads)
        "full": (None, None, 1.0, []),
        "causal": (None, causal, half, []),
        "alibi+causal": (alibi, causal, half, []),
        "softcap+causal": (softcap, causal, half, []),
        "relative table": (relative, None, 1.0, []),
        "relative table (learnable)": (relative_learnable, None, 1.0, [learnable]),
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device=dev, dtype=dtype)
    rows = []
    for name, (score_mod, mask_mod, density, extra) in variants.items():
        flop = 3.5 * 4 * B * H * S * S * D * density
        row = {"variant": name}
        attn = fg.compile(score_mod=score_mod, mask_mod=mask_mod)
        block_mask = create_block_mask(mask_mod, None, None, S, S, device=dev) if mask_mod else None
        inputs = [q, k, v, *extra]

        def grads(run, inputs=inputs):
            for t in inputs:
                t.grad = None
            run().backward(dout)
            return [t.grad.clone() for t in inputs]

        def fg_run(attn=attn):
            return attn(q, k, v)

        def flex_run(score_mod=score_mod, block_mask=block_mask):
            return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

        for peer, run in (("flashgen", fg_run), ("flex", flex_run)):
            try:
                torch.cuda.reset_peak_memory_stats()
                g = grads(run)
                row[f"{peer}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                row[f"{peer}_grads"] = g
                ms = triton.testing.do_bench(lambda run=run: run().backward(dout), warmup=25, rep=100,
                                             return_mode="median")
                row[peer] = flop / ms / 1e9
            except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                row[peer] = None
                row[f"{peer}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
        if name in ("full", "causal"):
            def sdpa_run(causal_flag=name == "causal"):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal_flag)
            g = grads(sdpa_run)
            row["sdpa_grads"] = g
            row["sdpa"] = flop / triton.testing.do_bench(lambda: sdpa_run().backward(dout), warmup=25, rep=100,
                                                         return_mode="median") / 1e9
        peer_grads = row.get("flex_grads") or row.get("sdpa_grads")
        if row.get("flashgen_grads") is not None and peer_grads is not None:
            row["max_rel_err_vs_peer"] = max(rel(a, b) for a, b in zip(row["flashgen_grads"], peer_grads))
        for key in ("flashgen_grads", "flex_grads", "sdpa_grads"):
            row.pop(key, None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
             "torch": torch.__version__, "triton": triton.__version__, "shape": [B, H, S, D], "dtype": "bf16"}
    (out / "bench_backward.json").write_text(json.dumps({"meta": stamp, "rows": rows}, indent=2))
    lines = [f"fwd+bwd TFLOP/s, {stamp['date']}, {stamp['gpu']}, torch {stamp['torch']}, triton {stamp['triton']}, "
             f"bf16 B={B} H={H} S={S} D={D}", "",
             "| variant | flashgen | flex | ratio | SDPA (default) | grad rel err vs peer | peak GiB fg / flex |",
             "|---|---|---|---|---|---|---|"]

    def f(x, spec=".0f"):
        return "—" if x is None else format(x, spec)

    for r in rows:
        ratio = r["flashgen"] / r["flex"] if r.get("flashgen") and r.get("flex") else None
        flex_cell = f(r.get("flex")) if r.get("flex") else r.get("flex_error", "—")[:40]
        lines.append(f"| {r['variant']} | {f(r.get('flashgen'))} | {flex_cell} | {f(ratio, '.2f')} | "
                     f"{f(r.get('sdpa'))} | {f(r.get('max_rel_err_vs_peer'), '.1e')} | "
                     f"{f(r.get('flashgen_peak_gib'), '.1f')} / {f(r.get('flex_peak_gib'), '.1f')} |")
    (out / "bench_backward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [r["variant"] for r in rows if r.get("max_rel_err_vs_peer", 0) > REL_TOL]
    if bad:
        print(f"gradient check failed for: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
