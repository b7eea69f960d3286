"""A/B of this tree against an earlier flashgen in one process, next to flex: forward and forward+backward
of a few variants, the arms interleaved, and optionally each arm's CUDA kernels (torch.profiler).

The baseline is a copy of another commit's package under the name ``flashgen_old`` (its torch
operators and template lookup renamed, so that both packages load side by side)::

    python3 benchmarks/ab_baseline.py make COMMIT benchmarks/_base     # here, where git is
    PYTHONPATH=.:benchmarks/_base python3 benchmarks/ab_baseline.py run [--variants document,full]
        [--shape 4x16x8192x128] [--rounds 3] [--profile]                 # on the GPU machine

(``benchmarks/_base`` is ignored by git and ruff: a device call must carry it.)
Written for the twenty-fourth session's fused dQ cast, measured against the commit before it.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402
from ab_ablate import kernel_times, rel  # noqa: E402
from bench_forward import build_variants  # noqa: E402

import flashgen as fg  # noqa: E402

RENAMES = {"api.py": [('"flashgen::', '"flashgen_old::'), ("torch.ops.flashgen.", "torch.ops.flashgen_old.")],
           "codegen/render.py": [('files("flashgen.codegen")', 'files("flashgen_old.codegen")')]}


def make(commit: str, dest: Path) -> None:
    """``dest/flashgen_old``: the package at ``commit``, renamed to load beside this tree's."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "pkg.tar"
        subprocess.run(["git", "archive", "-o", str(archive), commit, "flashgen"], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        target = dest / "flashgen_old"
        shutil.rmtree(target, ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / "flashgen"), target)
    for name, pairs in RENAMES.items():
        path = target / name
        text = path.read_text()
        for a, b in pairs:
            assert a in text, (name, a)
            text = text.replace(a, b)
        path.write_text(text)


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("ab_baseline: no CUDA device")
        return 0
    old = importlib.import_module("flashgen_old")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    B, H, S, D = suite.parse_shape(args.shape)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    rows = []
    for name in args.variants.split(","):
        new_var = next(x for x in build_variants(fg, H, "cuda", seq_len=S) if x.key == name)
        old_var = next(x for x in build_variants(old, H, "cuda", seq_len=S) if x.key == name)
        mask = create_block_mask(new_var.flex_mask, None, None, S, S, device="cuda") if new_var.flex_mask else None
        fns = {"new": fg.compile(**new_var.fg_kwargs), "old": old.compile(**old_var.fg_kwargs),
               "flex": lambda q, k, v, var=new_var, mask=mask: flex(q, k, v, score_mod=var.flex_score, block_mask=mask)}

        def forward(fn):
            with torch.no_grad():
                fn(q, k, v)

        results = {}
        for arm, fn in fns.items():
            for t in (q, k, v):
                t.grad = None
            out = fn(q, k, v)
            out.backward(dout)
            results[arm] = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
        err = {arm: max(rel(a, b) for a, b in zip(results[arm], results["flex"])) for arm in ("new", "old")}
        same = max(rel(a, b) for a, b in zip(results["new"], results["old"]))
        print(f"{name}: out, dq, dk, dv against flex: new {err['new']:.1e}, old {err['old']:.1e}; new against old "
              f"{same:.1e}; new's kernels: {fns['new'].last_tiles}", flush=True)
        assert same < 1e-2 and err["new"] < 2e-2, (same, err)
        if args.profile:
            for arm in ("new", "old"):
                print(f"## {name}, {arm}: CUDA kernels of one fwd+bwd (µs)")
                print(kernel_times(lambda fn=fns[arm]: fn(q, k, v).backward(dout)), flush=True)
        times = {arm: ([], []) for arm in fns}
        for _ in range(args.rounds):
            for arm, fn in fns.items():
                times[arm][0].append(suite.time_ms(lambda fn=fn: forward(fn), [], "cuda"))
                times[arm][1].append(suite.time_ms(lambda fn=fn: fn(q, k, v).backward(dout), [q, k, v], "cuda"))
        flops = 4 * B * H * suite.count_kept(new_var.fg_kwargs.get("mask_mod"), S, S, "cuda") * D
        flex_ms = [statistics.median(t) for t in times["flex"]]
        for arm, (tf, tb) in times.items():
            f, b = statistics.median(tf), statistics.median(tb)
            rows.append((name, arm, f, flops / f / 1e9, flex_ms[0] / f, b, 3.5 * flops / b / 1e9, flex_ms[1] / b))
    print(f"\n# {args.shape} bf16, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<10} {'arm':<5} {'fwd ms':>7} {'TF/s':>6} {'x flex':>6} {'f+b ms':>7} {'TF/s':>6} {'x flex':>6}")
    for name, arm, f, ftf, fx, b, btf, bx in rows:
        print(f"{name:<10} {arm:<5} {f:7.3f} {ftf:6.1f} {fx:6.3f} {b:7.3f} {btf:6.1f} {bx:6.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="copy a commit's package as flashgen_old under DEST")
    m.add_argument("commit")
    m.add_argument("dest", type=Path)
    r = sub.add_parser("run", help="time this tree against flashgen_old (on PYTHONPATH), next to flex")
    r.add_argument("--variants", default="document,full")
    r.add_argument("--shape", default="4x16x8192x128")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--profile", action="store_true", help="each arm's CUDA kernels in one fwd+bwd")
    args = p.parse_args(argv)
    if args.cmd == "make":
        make(args.commit, args.dest)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
