"""What the GPU would run, without a GPU: compile a variant's kernels for sm_90 (H100/H200) with
Triton's bundled ptxas and count their SASS instructions, registers and spills.

    python3 benchmarks/sass.py alibi_causal [--bwd] [--shape 4,16,8192,128] [--dump DIR]

Variants are the suite's (``benchmarks/suite.py``): full, causal, alibi_causal, softcap_causal,
rel_table, document, ... The calls go through flashgen's real launch path with CPU tensors; the
launches are captured instead of run and compiled with the same specialisation (alignment,
divisibility by 16) that a GPU launch of tensors of that shape gets. Prints per kernel:
registers, local-memory (spill) bytes per thread, and the instruction mix of the main loop's kinds (MMA, MUFU for exp2 /
tanh / conversions, FP32, integer, loads). A cheap first look before spending device time: the
instruction count is not the time, but a change that adds per-entry work or spills shows here.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (set before triton is imported)

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flashgen as fg  # noqa: E402
from flashgen import api, parallel, runtime  # noqa: E402

GROUPS = [  # (label, SASS opcode prefixes)
    ("mma", ("HGMMA", "HMMA", "WARPGROUP")),
    ("mufu", ("MUFU",)),
    ("convert", ("F2F", "I2F", "F2I", "F2FP", "I2FP")),
    ("fp32", ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK")),
    ("int", ("IADD", "IMAD", "ISETP", "LOP3", "SHF", "LEA", "IMNMX", "SEL", "IABS", "VIMNMX")),
    ("load", ("LDG", "LDS", "LDSM", "LDGSTS", "UTMALDG", "LDC")),
    ("store", ("STG", "STS", "ATOM", "RED")),
    ("sync", ("BAR", "SYNCS", "DEPBAR", "WARPSYNC")),
]


def captured_launches(variant: str, shape: tuple[int, int, int, int], backward: bool, tma: bool = True) -> list[tuple]:
    """Run the variant through flashgen with launches captured (kernel, config, args, kwargs)."""
    import suite

    B, H, S, D = shape
    case = suite.build_cases(H, S, "cpu", torch.bfloat16, [variant])[variant]
    launches: list = []
    cuda = torch.device("cuda")
    for module in (api, runtime):  # the GPU's default configurations, not the interpreter's
        for name in ("default_config", "default_backward_configs"):
            if hasattr(module, name):
                real = getattr(runtime, name)
                setattr(module, name, lambda device, *a, real=real: real(cuda, *a))
    check = api._check_inputs

    def check_on_cpu(*a):  # CPU tensors stand in for the GPU's: let them past the device check
        real, api.interpreting = api.interpreting, lambda: True
        try:
            return check(*a)
        finally:
            api.interpreting = real

    api._check_inputs = check_on_cpu
    api.tma_ok = lambda *tensors: tma  # an sm_90 GPU's answer for these layouts (CPU tensors get False)
    api.tile_tma_ok = lambda captured, reads: tma and bool(reads)  # (likewise for a dense bias's tiles)
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    with parallel.captured(launches):
        out = fg.compile(**case.variant.fg_kwargs)(q, k, v)
        if backward:
            out.backward(torch.randn_like(out))
    return launches


def compile_sm90(kernel, args, kwargs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile

    target = GPUTarget("cuda", 90, 32)
    src, options = parallel.launch_source(kernel, args, kwargs, target)
    return compile(src, target=target, options=options.__dict__)


def cuobjdump(compiled, *flags: str) -> str:
    tool = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resources(compiled) -> tuple[str, str]:
    """(registers per thread, local-memory bytes per thread: spills) from the cubin."""
    usage = cuobjdump(compiled, "-res-usage")
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return (regs.group(1) if regs else "?"), (local.group(1) if local else "?")


def mix(sass: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not m:
            continue
        op = m.group(1)
        group = next((g for g, prefixes in GROUPS if op.startswith(prefixes)), "other")
        counts[group] += 1
        counts["total"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variant")
    p.add_argument("--bwd", action="store_true", help="also the backward kernels")
    p.add_argument("--shape", default="4,16,8192,128", help="B,H,S,D (default 4,16,8192,128)")
    p.add_argument("--no-tma", action="store_true", help="pointer loads (the form for layouts TMA cannot read)")
    p.add_argument("--dump", default="", help="write each kernel's SASS, PTX and TTGIR into this folder")
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    print(f"{'kernel':<16} {'config':<18} {'regs':>5} {'spill':>6} " + " ".join(f"{g:>7}" for g, _ in GROUPS)
          + f" {'other':>6} {'total':>6}")
    for kernel, kargs, kwargs in captured_launches(args.variant, shape, args.bwd, not args.no_tma):
        compiled = compile_sm90(kernel, kargs, kwargs)
        cfg = tuple(kwargs.get(k, "-") for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
        sass = cuobjdump(compiled, "-sass")
        counts = mix(sass)
        regs, spills = resources(compiled)
        print(f"{kernel.fn.__name__:<16} {str(cfg):<18} "
              f"{regs:>5} {spills:>6} "
              + " ".join(f"{counts[g]:>7}" for g, _ in GROUPS) + f" {counts['other']:>6} {counts['total']:>6}")
        if args.dump:
            folder = Path(args.dump)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{args.variant}-{kernel.fn.__name__}.sass").write_text(sass)
            for ir in ("ptx", "ttgir"):
                (folder / f"{args.variant}-{kernel.fn.__name__}.{ir}").write_text(compiled.asm[ir])
    return 0


if __name__ == "__main__":
    sys.exit(main())
