"""Compiles the generated Gluon modules for sm_90 and prints one JSON line per case: run by
``test_ws_kernels.py`` in a child process with TRITON_INTERPRET=0 from the start, since Gluon does
not compile in a process that imported Triton for its interpreter (its functions are then
interpreted ones), and with a fresh Triton cache, so that nothing compiled earlier stands in.

    python3 tests/ws_compile.py CASE...     (CASE: mods,dtype,hkv,d,fwd|bwd; mods a key of MODS; d the
                                             head dim, or q and k's:v's, as 144:128)

WS_CHECK_READS=0 compiles the modules a launch takes where it proved the reads in range.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run with TRITON_INTERPRET=0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402

import flashgen as fg  # noqa: E402
from flashgen import parallel, runtime  # noqa: E402

MODS = {"none": {}, "causal": dict(mask_mod=fg.mods.causal), "sliding300": dict(mask_mod=fg.mods.sliding_window(300)),
        "alibi_causal": dict(score_mod=fg.mods.alibi(fg.mods.alibi_slopes(4)), mask_mod=fg.mods.causal),
        "softcap_causal": dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.causal),
        "prefix_lm": dict(mask_mod=fg.mods.prefix_lm(200)),
        "document_causal": dict(mask_mod=fg.mods.document(torch.arange(2 * 512).view(2, 512) // 200) & fg.mods.causal),
        # (int32 ids: staged with K or Q_i where a launch proves the reads in range)
        "document32_causal": dict(mask_mod=fg.mods.document((torch.arange(2 * 512).view(2, 512) // 200).int())
                                  & fg.mods.causal),
        "dense_bias_causal": dict(bias=torch.randn(4, 512, 512, dtype=torch.bfloat16), mask_mod=fg.mods.causal),
        # (its program: causal, plain; compiled with q and k 16 columns wider, the factors' place)
        "low_rank_causal": dict(bias=fg.LowRankBias(torch.randn(1, 4, 512, 16), torch.randn(1, 4, 512, 16)),
                                mask_mod=fg.mods.causal),
        "softcap_document": dict(score_mod=fg.mods.softcap(30.0),
                                 mask_mod=fg.mods.document(torch.arange(2 * 512).view(2, 512) // 200))}


def compile_case(case: str, folder: Path) -> dict:
    mods, dtype, hkv, d, which = case.split(",")
    d, dv = (int(x) for x in d.split(":")) if ":" in d else (int(d), int(d))  # (q and k's, v's)
    dtype, hkv, backward = getattr(torch, dtype), int(hkv), which == "bwd"
    path = folder / f"ws_{len(list(folder.iterdir()))}.py"
    attn = fg.compile(**MODS[mods])
    check_reads = os.environ.get("WS_CHECK_READS", "1") == "1"
    groups = attn._ws_groups(backward, d - dv, dv)  # (the launch's consumer groups there)
    if groups is None:  # (the launch leaves this forward to the Triton kernel)
        return {"case": case, "groups": None}
    ws = attn._ws_source(backward, extra=d - dv, check_reads=check_reads, groups=groups)
    path.write_text(ws.source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    q = torch.randn(2, 4, 512, d, dtype=dtype)
    k, v = torch.randn(2, hkv, 512, d, dtype=dtype), torch.randn(2, hkv, 512, dv, dtype=dtype)
    plain, maps = attn.analysis.plain_logits, attn.analysis.block_runs
    mods = runtime.captured_args(attn.captured) if maps or not plain else None
    runs = torch.zeros(1, 1, 8, 2, 9, dtype=torch.int32)  # (a block map's runs: only their types count here)
    runs = (runs, 0, 0, runs.stride(2), runs.stride(3)) if maps else ()
    for read in ws.axis_reads:  # (staged)
        runs = runs + runtime.ws_axis_args(read, attn.captured[read.slot], 64 if backward else 128)
    reads = attn._ws_source(backward).tile_reads  # (a dense bias: its tiles by TMA)
    tile = runtime.ws_tile_args(reads[0], attn.captured[reads[0].slot], (64, 128) if backward else (128, 128)
                                ) if reads else ()
    launches: list = []
    with parallel.captured(launches):  # the launches' arguments, recorded instead of run
        if backward:  # (delta's Triton kernel first, dQ's cast after)
            out = torch.randn(2, 4, 512, dv, dtype=dtype)  # (and dout: v's head dim)
            runtime.ws_backward(module, q, k, v, out, torch.randn(2, 4, 512), torch.randn_like(out), None, 0.1, mods,
                                plain, runs, tile)
        else:
            runtime.ws_forward(module, q, k, v, torch.empty(2, 4, 512, dv, dtype=dtype), torch.empty(2, 4, 512), 0.1,
                               mods, plain, runs, tile)
    kernel, args, kwargs = next(launch for launch in launches if "GROUP_SIZE" in launch[2])  # (not delta's, dQ's cast)
    target = GPUTarget("cuda", 90, 32)
    src, options = parallel.launch_source(kernel, args, kwargs, target)  # (a Gluon source for a Gluon kernel)
    compiled = triton_compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    return dict(case=case, group_size=kwargs["GROUP_SIZE"], shared=compiled.metadata.shared, groups=groups,
                setmaxnreg="setmaxnreg" in ptx, tma_reduce="cp.reduce.async.bulk.tensor" in ptx,
                staged=len(ws.axis_reads))


def main(cases: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        for case in cases:
            print(json.dumps(compile_case(case, Path(folder))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
