"""Host time to rebuild the block maps of one training step after the document ids change.

    PYTHONPATH=. python3 benchmarks/map_rebuild.py [--seq-len 8192] [--docs 16] [--profile]

The analysis of the runtime tier runs on the host (on CPU copies of the ids), so this runs
without a GPU. A causal document mask's training step at the H200's default tiles looks up three
maps: the dense forward tiles' (128 x 64, to choose the tiles), the forward's and dQ pass's
(64 x 32) and the dK/dV pass's (32 x 64, transposed runs); each is rebuilt when the ids' version
changes. Prints the median milliseconds of the three (with their tile counts and runs, as a call
reads them); ``--profile`` adds the top of a cProfile by own time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import flashgen as fg  # noqa: E402

TILES = (((128, 64), False), ((64, 32), False), ((32, 64), True))  # (tiles, transposed runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    S = args.seq_len
    doc = torch.arange(S) * args.docs // S
    attn = fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)

    def step() -> None:
        doc.add_(0)  # a new version of the ids, as a new batch brings
        for tile, transpose in TILES:
            bm = attn.block_mask(4, 16, S, S, tile, "cpu")
            bm.counts()
            bm.runs(transpose=transpose)

    for _ in range(3):
        step()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"causal document mask, {args.docs} documents, S={S}: {statistics.median(times) * 1e3:.2f} ms "
          f"to rebuild the three maps of a training step (median of 20)")
    if args.profile:
        print(suite.own_time_profile(lambda: [step() for _ in range(10)], 20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
