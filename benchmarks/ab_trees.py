"""Two versions of flashgen timed against each other: the working tree and an older copy of the
package, in alternating processes on one GPU (PERFLOG, fifteenth session).

A change to code generation gives new kernel sources, and both versions cannot be imported into
one process (they register the same torch.library operators). So this runs ``suite.py run
--flashgen-only`` once per version per round, old then new, each in a fresh process, and prints
each variant's forward (or fwd+bwd) ms per round and the change of the medians:

    python3 benchmarks/ab_trees.py --prepare HEAD~1 ab_old      # here: the old package, from git
    PYTHONPATH=. python3 benchmarks/ab_trees.py --old ab_old --variants full,causal,dense_bias \\
        --shapes 4x16x8192x128 --passes fwd --rounds 2           # on the GPU machine

``ab_old`` must travel with the working tree to the GPU machine (untracked, not ignored). Both
versions share the kernel cache (entries are named by their source's hash).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def prepare(rev: str, into: Path) -> None:
    """``into/flashgen``: the package as it was at git revision ``rev``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "flashgen"], cwd=HERE.parent, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    print(f"{into}/flashgen: flashgen at {rev}")


def timed(package_dir: Path, args: argparse.Namespace) -> dict[tuple[str, str, str], float]:
    """flashgen's ms per (variant, shape, pass), from one suite process importing ``package_dir``'s flashgen."""
    env = dict(os.environ, PYTHONPATH=str(package_dir))
    found = subprocess.run([sys.executable, "-c", "import flashgen; print(flashgen.__file__)"], env=env, cwd=HERE,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(package_dir.resolve()):  # (an installed copy would shadow it)
        raise SystemExit(f"ab_trees: with PYTHONPATH={package_dir}, flashgen comes from {found}")
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(HERE / "suite.py"), "run", "--flashgen-only", "--out", out,
                   "--variants", args.variants, "--passes", args.passes]
        command += ["--smoke"] if args.smoke else ["--shapes", args.shapes]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        records = [r for f in Path(out).glob("suite-*.json") for r in json.loads(f.read_text())["records"]]
    return {(r["label"], r["shape"], r["pass_name"]): r["ms"] for r in records
            if r["impl"] == "flashgen" and r["ms"] is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", nargs=2, metavar=("REV", "DIR"), help="write the package at REV into DIR and stop")
    p.add_argument("--old", type=Path, help="a directory holding the old flashgen package")
    p.add_argument("--variants", default="full,causal")
    p.add_argument("--shapes", default="4x16x8192x128")
    p.add_argument("--passes", default="fwd")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the suite's tiny CPU shapes (a check of the plumbing)")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.prepare[0], Path(args.prepare[1]))
        return 0
    if args.old is None or not (args.old / "flashgen").is_dir():
        p.error("--old DIR must hold a flashgen package (make one with --prepare REV DIR)")
    arms = {"old": args.old.resolve(), "new": HERE.parent}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, where in arms.items():
            runs[name].append(timed(where, args))
    print(f"{'variant, shape, pass':<58} {'old ms (rounds)':>22} {'new ms (rounds)':>22} {'change':>7}")
    for key in runs["new"][0]:
        old = [r[key] for r in runs["old"] if key in r]
        new = [r[key] for r in runs["new"]]
        change = f"{(statistics.median(new) / statistics.median(old) - 1) * 100:+.1f}%" if old else "-"
        print(f"{', '.join(key):<58} {', '.join(f'{x:.4g}' for x in old):>22} "
              f"{', '.join(f'{x:.4g}' for x in new):>22} {change:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
