"""Variants of the Triton forward's inner loop at head dim 64, A/B on the GPU (PERFLOG, twenty-first
and twenty-fifth sessions). There the tensor cores, the special-function unit (MUFU: one exp2 per
entry, 16 per clock per SM) and instruction issue take about the same time per entry; every arm
below measured slower than the kernel as generated. Arms:

- ``mufu``: ``tl.exp2``, one ``ex2.approx.f32`` per entry (the kernel as generated);
- ``polyK``: K of every 4 entries by a degree-3 polynomial on the FP32 pipe (Cody-Waite: 2^x =
  2^round(x) · 2^f, f in [-0.5, 0.5]; relative error 1.2e-4, against bf16's 2^-9 rounding of P),
  the others by MUFU (FlashAttention-4's offload, here through one inline-asm block per 4 entries);
- ``bf16x2``: the argument rounded to bf16 and two entries per ``ex2.approx.ftz.bf16x2``;
- ``lazy``: no exp2 changed, but the rescale of acc and l by the running max's growth done only when
  some row's max grew by more than 8 (FlashAttention-4's conditional rescale; twenty-fifth session);
- ``tma``: K and V through TMA descriptors instead of pointer loads (fewer integer instructions per
  tile where the forward is issue-bound; twenty-fifth session).

The arms patch the generated source on its way to the cache (``runtime.load_module``), so each
runs the real kernel with a few lines changed (``lazy`` and ``tma``: the plain forward's only);
interleaved for ``--rounds`` rounds in one process, next to flex; each arm's output is checked
against a float64 reference on a 256-row slice.

    PYTHONPATH=. python3 benchmarks/ab_exp2.py [--shape 8x16x4096x64] [--variants full,causal]
        [--arms mufu,poly1,poly2,bf16x2,lazy,tma] [--rounds 3] [--sass]

``--sass`` compiles each arm offline for sm_90 (no GPU) and prints its instruction mix instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics

import torch

import flashgen as fg
from flashgen import runtime

# 2^f on [-0.5, 0.5] as 1 + f (c1 + f (c2 + f c3)): minimax relative error 1.17e-4 (fitted offline)
C1, C2, C3 = "0f3F317586", "0f3E78063A", "0f3D62FDDA"


def _poly_lines(out: str, x: str) -> list[str]:
    """PTX for out = 2^x on the FP32 pipe. x is clamped at -127, where f = 0, the polynomial is 1.0
    exactly and adding -127 to its exponent gives +0.0: a masked entry (-inf) gives 0, not 2^-127."""
    return [
        f"max.ftz.f32 x, {x}, 0fC2FE0000;",
        "add.rn.ftz.f32 t, x, 0f4B400000;",  # + 1.5·2^23: x rounded to an integer in t's low bits
        "sub.rn.ftz.f32 r, t, 0f4B400000;",
        "sub.rn.ftz.f32 f, x, r;",
        f"fma.rn.ftz.f32 p, f, {C3}, {C2};",
        f"fma.rn.ftz.f32 p, p, f, {C1};",
        "fma.rn.ftz.f32 p, p, f, 0f3F800000;",
        "mov.b32 tb, t;",
        "shl.b32 tb, tb, 23;",
        "mov.b32 pb, p;",
        "add.s32 pb, pb, tb;",
        f"mov.b32 {out}, pb;",
    ]


def poly_asm(k: int) -> str:
    """Inline asm over 4 entries ($0-$3 from $4-$7): the last k by the polynomial, the rest by MUFU."""
    lines = ["{", ".reg .f32 x, t, r, f, p;", ".reg .b32 tb, pb;"]
    for i in range(4):
        if i < 4 - k:
            lines.append(f"ex2.approx.ftz.f32 ${i}, ${i + 4};")
        else:
            lines += _poly_lines(f"${i}", f"${i + 4}")
    return "\n".join(lines + ["}"])


EXP_LINE = "        p = tl.exp2(s * (sm_scale * LOG2E) - m_use[:, None])"
SUM_LINE = "        l_i = l_i * alpha + tl.sum(p, 1)"


LAZY_FROM = "        if APPLY_MASK or CHECK_KV:\n            # rows with every entry so far masked"
LAZY_TO = "        if CHECK_KV:\n            v = tl.load("
LAZY = """\
        # FlashAttention-4's lazy rescale: the running max (and acc and l with it) moves only when some
        # row's grew by more than 8, a block-wide branch; P stays below 2^8 in between
        if tl.max((m_new > m_i + 8.0).to(tl.int32), 0) > 0:
            if APPLY_MASK or CHECK_KV:
                m_up = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_up = m_new
            alpha = tl.exp2(m_i - m_up)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        if APPLY_MASK or CHECK_KV:
            m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        else:
            m_use = m_i
        p = tl.exp2(s * (sm_scale * LOG2E) - m_use[:, None])
        l_i = l_i + tl.sum(p, 1)
"""


def lazy(source: str) -> str:
    """The ``lazy`` arm: the plain forward's rescale under a block-wide branch (see LAZY)."""
    for line in ("\n        acc = acc * alpha[:, None]\n", "\n        m_i = m_new\n"):
        assert source.count(line) == 1, line
        source = source.replace(line, "\n")
    start, end = source.index(LAZY_FROM), source.index(LAZY_TO)
    return source[:start] + LAZY + source[end:]


TMA_EDITS = [  # (the plain forward's lines, as generated -> K and V through descriptors)
    ("    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh\n",
     "    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh\n"
     "    k_desc = tl.make_tensor_descriptor(k_base, [Skv, HEAD_D], [stride_kn, 1], [BLOCK_N, BLOCK_D])\n"
     "    v_desc = tl.make_tensor_descriptor(v_base, [Skv, HEAD_DV], [stride_vn, 1], [BLOCK_N, BLOCK_DV])\n"),
    ("acc, l_i, m_i, q, q2, k_base, v_base, stride_kn", "acc, l_i, m_i, q, q2, k_desc, v_desc, stride_kn"),
    ("        k_ptrs = k_base + kv_pos[None, :] * stride_kn + offs_d[:, None] * stride_kd\n"
     "        v_ptrs = v_base + kv_pos[:, None] * stride_vn + offs_dv[None, :] * stride_vd\n",
     "        n0 = tl.where(start_n >= gap_start, start_n + gap_len, start_n) if HAS_GAP else start_n\n"),
    # (rows past Skv and columns past the head dim come back as zeros, as the masked loads gave them)
    ("""        if CHECK_KV:
            k = tl.load(k_ptrs, mask=(kv_pos[None, :] < Skv) & (offs_d[:, None] < HEAD_D), other=0.0)
        elif HEAD_D < BLOCK_D:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_D, other=0.0)
        else:
            k = tl.load(k_ptrs)
""", "        k = tl.trans(k_base.load([n0, 0]))\n"),
    ("""        if CHECK_KV:
            v = tl.load(v_ptrs, mask=(kv_pos[:, None] < Skv) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        elif HEAD_DV != BLOCK_DV:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
        else:
            v = tl.load(v_ptrs)
""", "        v = v_base.load([n0, 0])\n"),
]


def tma(source: str) -> str:
    """The ``tma`` arm: K and V tiles of the forward through TMA descriptors (``tl.make_tensor_descriptor``,
    one per program) instead of pointer loads; for layouts the plain path takes (S a multiple of the
    tile, head dims a power of two)."""
    for old, new in TMA_EDITS:
        assert old in source, old
        source = source.replace(old, new)
    return source


def rewrite(source: str, arm: str) -> str:
    if arm == "mufu":
        return source
    if arm == "lazy":
        return lazy(source)
    if arm == "tma":
        return tma(source)
    assert source.count(EXP_LINE) == 1 and source.count(SUM_LINE) == 1, "the plain forward's lines moved"
    x = "s * (sm_scale * LOG2E) - m_use[:, None]"
    if arm.startswith("poly"):
        k = int(arm[4:])
        new = (f"        p = tl.inline_asm_elementwise({poly_asm(k)!r}, \"=f,=f,=f,=f,f,f,f,f\", [{x}], "
               "dtype=tl.float32, is_pure=True, pack=4)")
        return source.replace(EXP_LINE, new)
    assert arm == "bf16x2", arm
    new = ("        p = tl.inline_asm_elementwise(\"ex2.approx.ftz.bf16x2 $0, $1;\", \"=r,r\", "
           f"[({x}).to(tl.bfloat16)], dtype=tl.bfloat16, is_pure=True, pack=2)")
    return source.replace(EXP_LINE, new).replace(SUM_LINE, "        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)")


ARM = {"now": "mufu"}
_load_module = runtime.load_module


def _patched_load_module(ks):
    if "def attn_fwd_inner" in ks.source and ARM["now"] != "mufu":
        source = rewrite(ks.source, ARM["now"])
        ks = dataclasses.replace(ks, source=source, key=hashlib.sha256(source.encode()).hexdigest())
    return _load_module(ks)


runtime.load_module = _patched_load_module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8x16x4096x64")
    p.add_argument("--variants", default="full,causal")
    p.add_argument("--arms", default="mufu,poly1,poly2,bf16x2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sass", action="store_true")
    args = p.parse_args()
    arms = args.arms.split(",")
    if args.sass:
        return sass(arms, args.shape)
    from bench_forward import build_variants, count_kept, interleaved, parse_shape
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    runtime.ensure_allocator()  # (the tma arm's descriptors)
    B, H, S, D = parse_shape(args.shape)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    flex = torch.compile(flex_attention)
    rows = []
    for var in build_variants(fg, H, "cuda", seq_len=S):
        if var.key not in args.variants.split(","):
            continue
        # float64, for the first 256 queries of every head
        ref = fg.attention_reference(q[:, :, :256].double(), k.double(), v.double(), **var.fg_kwargs)
        fns, errs = {}, {}
        for arm in arms:
            ARM["now"] = arm
            attn = fg.compile(**var.fg_kwargs)  # a fresh object: its launch loads the patched source
            with torch.no_grad():
                out = attn(q, k, v)
            errs[arm] = ((out[:, :, :256].double() - ref).norm() / ref.norm()).item()
            fns[arm] = lambda attn=attn: attn(q, k, v)
        mask = create_block_mask(var.flex_mask, B, H, S, S, device="cuda") if var.flex_mask else None
        fns["flex"] = lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score, block_mask=mask)
        with torch.no_grad():
            errs["flex"] = ((fns["flex"]()[:, :, :256].double() - ref).norm() / ref.norm()).item()
            times = interleaved(fns, args.rounds)
        flops = 4 * B * H * count_kept(var.flex_mask, S, S, "cuda") * D
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append((var.key, name, ms, flops / ms / 1e9, errs[name]))
    print(f"# {args.shape} bf16 forward, TF/s over kept entries (median of {args.rounds} interleaved rounds)")
    flex_tf = {r[0]: r[3] for r in rows if r[1] == "flex"}
    print(f"{'variant':>8} {'arm':>7} {'ms':>7} {'TF/s':>7} {'/flex':>6} {'err vs f64':>10}")
    for key, name, ms, tf, err in rows:
        print(f"{key:>8} {name:>7} {ms:7.3f} {tf:7.1f} {tf / flex_tf[key]:6.2f} {err:10.2e}")


def sass(arms: list[str], shape: str) -> None:
    """Each arm's forward compiled offline for sm_90: registers, spills and the loop's instruction mix."""
    import subprocess
    import sys
    from pathlib import Path
    for arm in arms:
        print(f"## {arm}", flush=True)
        code = (f"import sass, ab_exp2; ab_exp2.ARM['now'] = {arm!r}; "
                f"sass.main(['full', '--shape', {shape.replace('x', ',')!r}])")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


if __name__ == "__main__":
    main()
