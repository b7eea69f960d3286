"""Forward+backward benchmark: flashgen next to torch.compile(flex_attention) and SDPA, one process.

    PYTHONPATH=. python3 benchmarks/bench_backward.py [--out DIR] [--seq-len 8192]
    PYTHONPATH=. python3 benchmarks/bench_backward.py --variants document,prefix_lm,dilated

bf16, B=4, H=16, S=8192, D=128. Variants: full, causal, ALiBi + causal, soft-cap 30 + causal,
relative-position table (frozen, and requiring grad), and the block-sparse masks: causal document
mask (16 documents of random lengths, fixed seed; flashgen ``fg.mods.causal &
fg.mods.document(doc)``), prefix LM 1024 (``fg.mods.prefix_lm(1024)``) and a dilated sliding window
(``(kv <= q) & (q - kv < 2048) & ((q - kv) % 2 == 0)``, an ``@fg.mask_mod`` function). FlexAttention
runs the same masks written inline, with a ``create_block_mask`` block mask. Time of
out = attn(q, k, v); out.backward(dout), median of triton.testing.do_bench. TFLOP/s counts unmasked
entries only: 3.5 x 4·B·H·kept·D = 3.5 x 4·B·H·S²·D·density (forward + backward, as FlashAttention
reports), kept counted exactly by evaluating the mask (row chunks, never S x S at once). Each
variant's gradients are checked against FlexAttention's (or SDPA's) on the full shape before
timing; peak memory of the learnable-table variant is reported next to FlexAttention's.
Without CUDA the script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import count_kept, document_ids  # noqa: E402 - one definition for both scripts

REL_TOL = 3e-2
VARIANTS = ("full", "causal", "alibi+causal", "softcap+causal", "relative table", "relative table (learnable)",
            "document", "prefix_lm", "dilated")


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
    parser.add_argument("--variants", default="", help=f"comma-separated subset of: {', '.join(VARIANTS)} "
                        "(default: all)")
    parser.add_argument("--prefix", type=int, default=1024, help="prefix length of the prefix LM mask (default 1024)")
    parser.add_argument("--docs", type=int, default=16, help="documents in the causal document mask (default 16)")
    parser.add_argument("--dilated-window", type=int, default=2048,
                        help="window of the dilated (stride 2) sliding window (default 2048)")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        print("bench_backward: no CUDA device; nothing to time")
        return 0
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import flashgen as fg

    B, H, S, D = args.batch, args.heads, args.seq_len, args.head_dim
    dev, dtype = "cuda", torch.bfloat16
    try:  # one compile per variant: stay well inside dynamo's recompile limit
        import torch._dynamo as dynamo

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    except Exception:  # noqa: BLE001
        dynamo = None
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

    doc, doc_lengths = document_ids(S, args.docs, dev)
    prefix, dilated_window = args.prefix, args.dilated_window

    def document(b, h, q, kv):
        return (doc[q] == doc[kv]) & (kv <= q)

    def prefix_lm(b, h, q, kv):  # as fg.mods.prefix_lm
        return (kv < prefix) | (q >= kv)

    def dilated(b, h, q, kv):
        return (kv <= q) & (q - kv < dilated_window) & ((q - kv) % 2 == 0)

    @fg.mask_mod
    def fg_dilated(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < dilated_window) & ((q_idx - kv_idx) % 2 == 0)

    variants = {  # name: (score_mod, mask_mod, captured tensors with grads); flashgen runs the same mods
        "full": (None, None, []),
        "causal": (None, causal, []),
        "alibi+causal": (alibi, causal, []),
        "softcap+causal": (softcap, causal, []),
        "relative table": (relative, None, []),
        "relative table (learnable)": (relative_learnable, None, [learnable]),
        "document": (None, document, []),
        "prefix_lm": (None, prefix_lm, []),
        "dilated": (None, dilated, []),
    }
    assert tuple(variants) == VARIANTS
    fg_masks = {  # the block-sparse variants: flashgen runs its library mods instead of the inline mask
        "document": fg.mods.causal & fg.mods.document(doc),
        "prefix_lm": fg.mods.prefix_lm(prefix),
        "dilated": fg_dilated,
    }
    if wanted:
        variants = {k: v for k, v in variants.items() if k in wanted}
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device=dev, dtype=dtype)
    rows = []
    for name, (score_mod, mask_mod, extra) in variants.items():
        fg_mask = fg_masks.get(name, mask_mod)
        kept = count_kept(fg_mask, S, S, dev)
        flop = 3.5 * 4 * B * H * kept * D
        row = {"variant": name, "density": kept / (S * S)}
        if name == "document":
            row["doc_lengths"] = doc_lengths
        if dynamo is not None:  # each variant compiles flex afresh (as bench_forward)
            dynamo.reset()
        attn = fg.compile(score_mod=score_mod, mask_mod=fg_mask)
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
             "| variant | density | flashgen | flex | ratio | SDPA (default) | grad rel err vs peer | "
             "peak GiB fg / flex |",
             "|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".0f"):
        return "—" if x is None else format(x, spec)

    for r in rows:
        ratio = r["flashgen"] / r["flex"] if r.get("flashgen") and r.get("flex") else None
        flex_cell = f(r.get("flex")) if r.get("flex") else r.get("flex_error", "—")[:40]
        lines.append(f"| {r['variant']} | {r['density']:.4f} | {f(r.get('flashgen'))} | {flex_cell} | "
                     f"{f(ratio, '.2f')} | "
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
