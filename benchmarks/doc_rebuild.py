"""A training step whose document ids change every step, next to one whose ids stay put.

    PYTHONPATH=. python3 benchmarks/doc_rebuild.py [--shape 4x16x8192x128] [--docs 16] [--profile] [--breakdown]

Causal document mask, bf16, forward+backward. flashgen: the same ``Attention`` each step; with
"ids change" the step first copies the next of two sets of ids (16 documents each, different
boundaries) into the captured id tensor, as a training loop would for a new packed batch; the
kept launches then refill their runs on the device (``maps.LiveRuns``).
FlexAttention (``torch.compile(flex_attention)``): the block mask built once, against
``torch.compile(create_block_mask)`` called every step, as its documentation suggests for
masks that change. Median milliseconds of ``triton.testing.do_bench`` per step; the
difference between the two rows of an implementation is what changing ids costs it per step.
Also printed: flashgen's refill alone and flex's compiled ``create_block_mask`` alone (GPU
time), and with ``--breakdown`` each refill kernel's time under a few settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import flashgen as fg  # noqa: E402


def breakdown(kept, bench) -> None:
    """GPU time of each map's refill under a few settings: the bounds (``block_summaries`` where
    the mask reads a tensor along one side, then ``block_states``) and the whole refill (then
    ``block_runs``); ``exact=False`` (``block_states`` leaves open tiles partial) shows what the open
    tiles' entries cost."""
    from flashgen import maps
    from flashgen.runtime import captured_args

    defaults = maps._PROGRAMS, maps._STRIP
    for live, keys in kept:
        keys = [key for key in keys if key[-1] != "hull"]  # (the hulls: ``levels``)
        variants = {}  # (exact, programs aimed at, entries per step of the entries' pass)
        for exact, programs, strip in ((True, 8192, 4096), (False, 8192, 4096), (True, 2048, 4096),
                                       (True, 32768, 4096), (True, 8192, 1024)):
            maps._PROGRAMS, maps._STRIP = programs, strip
            variants[exact, programs, strip] = maps.LiveRuns(live.source, live.mask, live.captured, live.shape,
                                                             live.device, live._constants["CHECK_READS"], exact=exact)
            for key in keys:  # (the launches are made here, with these settings)
                variants[exact, programs, strip].runs(key[0], transpose=key[1], ragged_last=key[2])
        maps._PROGRAMS, maps._STRIP = defaults
        _, _, sq, skv = live.shape
        for key in keys:
            base = live._runs[key][3]  # (the tile size whose states the map combines)
            print(f"  map {key}: {live._states[base][0].numel()} states of {base} tiles, {live._slots} one-side reads")
            for (exact, programs, strip), other in variants.items():
                states, launch, sums, summaries = other._states[base]
                extra = (sums, sums.shape[-1]) if other._slots else ()
                tail = (*captured_args(other.captured), sq, skv, other.dims[1])
                head = (states, *states.stride()[:3], *extra)
                emptied, added = other._hull_args(base, states, True), other._hull_args(base, states, False)

                def bounds(launch=launch, summaries=summaries, head=head, extra=extra, tail=tail, emptied=emptied,
                           added=added):
                    if extra:
                        summaries(*extra, *tail, *emptied)
                    launch(*head, *tail, *added)

                def refill(bounds=bounds, runs=other._runs[key]):
                    bounds()
                    runs[1](*runs[2])

                print(f"    {'exact' if exact else 'bounds alone'}, ~{programs} programs, {strip} entries a step: "
                      f"bounds {bench(bounds) * 1e3:.1f} us, with block_runs {bench(refill) * 1e3:.1f} us")


def levels(kept, bench, rounds: int) -> None:
    """The refill's graph cut after each level (``block_summaries``; then ``block_states``, which
    fills the hulls; then every map's ``block_runs``, as ``LiveRuns`` records it), next to a graph
    of one tiny kernel: what each level adds to the refill's GPU time, and the floor of any graph."""
    from flashgen.runtime import captured_args

    live, keys = kept[0]
    live.refresh(keys)  # (filled, and its graph recorded: the launches exist)
    base = live._runs[keys[0]][3]
    states, launch, sums, summaries = live._states[base]
    extra = (sums, sums.shape[-1]) if live._slots else ()
    tail = (*captured_args(live.captured), *live.shape[2:], live.dims[1])
    emptied, added = live._hull_args(base, states, True), live._hull_args(base, states, False)  # (the hulls)
    one = torch.zeros(1, device="cuda")

    def graph(fn) -> torch.cuda.CUDAGraph:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    cuts = {"one tiny kernel": graph(lambda: one.add_(1))}
    if extra:
        cuts["block_summaries"] = graph(lambda: summaries(*extra, *tail, *emptied))

    def bounds():
        if extra:
            summaries(*extra, *tail, *emptied)
        launch(states, *states.stride()[:3], *extra, *tail, *added)

    cuts["+ block_states"] = graph(bounds)
    runs = sum(1 for key in keys if key[-1] != "hull")
    cuts[f"the refill ({runs} maps' runs, {len(keys) - runs} hulls)"] = next(
        g for g in live._graphs.values() if isinstance(g, torch.cuda.CUDAGraph))
    times = {name: [] for name in cuts}
    for _ in range(rounds):
        for name, g in cuts.items():
            times[name].append(bench(g.replay))
    for name, ms in times.items():
        print(f"  levels: {name:36s} {statistics.median(ms) * 1e3:6.1f} us "
              f"(rounds {', '.join(f'{x * 1e3:.1f}' for x in ms)})")


def kernels(name: str, fn, n: int = 20) -> None:
    """The CUDA kernels of ``fn`` (torch.profiler), us per call, and the span of one call on the GPU."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    span = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / n if events else 0
    busy = sum(e.device_time for e in events) / n
    print(f"== {name}: CUDA kernels, us per call "
          f"(busy {busy:.1f} us; a call spans {span:.1f} us on the GPU) ==")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]:
        print(f"  {e.device_time_total / n:8.1f}  x{e.count / n:.0f}  {e.key[:80]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="also a cProfile of flashgen's steps whose ids change")
    p.add_argument("--breakdown", action="store_true", help="also each refill kernel's GPU time, per map")
    p.add_argument("--kernels", action="store_true",
                   help="also the CUDA kernels (torch.profiler, us per call) of a refill and of flex's "
                        "create_block_mask")
    p.add_argument("--analysis-rounds", type=int, default=5, metavar="N",
                   help="flashgen's refill and flex's compiled create_block_mask timed in turn for N rounds")
    p.add_argument("--analysis-only", action="store_true", help="time no steps: the refill and flex's analysis only")
    p.add_argument("--levels", type=int, default=0, metavar="ROUNDS",
                   help="also the refill's graph cut after each level, and a graph of one tiny kernel")
    p.add_argument("--no-pdl", action="store_true", help="refill kernels without programmatic dependent launch")
    p.add_argument("--ab-graphs", type=int, default=0, metavar="ROUNDS",
                   help="also steps with changing ids and refills alone, refills replayed as CUDA graphs or "
                        "launched one by one (maps.GRAPHS), alternating for ROUNDS rounds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("doc_rebuild: no CUDA device")
        return 0
    B, H, S, D = suite.parse_shape(args.shape)
    if args.no_pdl:
        from flashgen import maps

        maps.PDL = False
    doc = torch.arange(S, device="cuda") * args.docs // S
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def bench(step) -> float:
        return float(triton.testing.do_bench(step, warmup=5, rep=100, return_mode="median"))

    # two batches' ids: the same number of documents, boundaries shifted by a third of one
    batches = [doc.clone(), ((torch.arange(S, device="cuda") + S // (3 * args.docs)) * args.docs // S)
               .clamp(max=args.docs - 1)]
    attn = fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)
    step = [0]

    def fg_step(change: bool):
        if change:  # the next batch's ids, in place
            step[0] += 1
            doc.copy_(batches[step[0] % 2])
        attn(q, k, v).backward(dout)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fg_step(False)  # the first step compiles (or loads) the attention and block-map kernels
    torch.cuda.synchronize()
    print(f"flashgen's first step: {time.perf_counter() - t0:.2f} s")
    rounds = {False: [], True: []}  # (alternating, so that a drift of the clocks shows in both)
    for _ in range(0 if args.analysis_only else 3):
        for change in (False, True):
            rounds[change].append(bench(lambda change=change: fg_step(change)))
    rows = [(f"flashgen, ids {'change every step' if change else 'stay put'}", statistics.median(ms),
             ", ".join(f"{x:.3f}" for x in ms)) for change, ms in rounds.items() if ms]
    # the refill alone: host time to issue it (no synchronisation) and its GPU time; every map the
    # calls asked for (the Triton kernels' kept launches and the Gluon kernels' calls alike)
    kept = [(live, tuple(live._runs)) for live in attn._live.values()]
    if kept:
        def refill():  # (the ids' version bumped without a kernel: new values, as far as the maps can tell)
            torch.autograd.graph.increment_version(doc)
            for live, keys in kept:
                live.refresh(keys)

        for _ in range(3):  # (the second refill of the same maps records them as one CUDA graph)
            refill()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            refill()
        issued = (time.perf_counter() - t0) / 50
        torch.cuda.synchronize()
        maps = len({key for _, keys in kept for key in keys})
        print(f"refill of the kept runs ({maps} maps): host {issued * 1e3:.3f} ms to issue, "
              f"GPU {bench(refill):.3f} ms (median)")
    if args.kernels:
        kernels("flashgen's step, ids stay put", lambda: fg_step(False), n=5)
    if kept and args.kernels:
        kernels("flashgen's refill", refill)
        for live, _ in kept:  # (the compiled refill kernels' resources)
            for name in ("block_summaries", "block_states", "block_runs"):
                for cache in getattr(getattr(live._module, name, None), "device_caches", {}).values():
                    for compiled in cache[0].values():
                        print(f"  {name}: {compiled.n_regs} registers, {compiled.n_spills} spills, "
                              f"{compiled.metadata.num_warps} warps")
        graph = next(g for live, _ in kept for g in live._graphs.values() if isinstance(g, torch.cuda.CUDAGraph))
        for name, fn in (("refill", refill), ("graph.replay() alone", graph.replay),
                         ("torch.cuda.is_current_stream_capturing()", torch.cuda.is_current_stream_capturing),
                         ("increment_version", lambda: torch.autograd.graph.increment_version(doc))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(1000):
                fn()
            print(f"  host per call, {name}: {(time.perf_counter() - t0) * 1e3:.1f} us")
            torch.cuda.synchronize()
    if kept and args.levels:
        levels(kept, bench, args.levels)
    if kept and args.breakdown:
        breakdown(kept, bench)
    if kept and args.ab_graphs:
        from flashgen import maps as fg_maps

        times = {(graphs, what): [] for graphs in (True, False) for what in ("step", "refill")}
        for _ in range(args.ab_graphs):
            for graphs in (True, False):
                fg_maps.GRAPHS = graphs
                times[graphs, "step"].append(bench(lambda: fg_step(True)))
                times[graphs, "refill"].append(bench(refill))
        fg_maps.GRAPHS = True
        for (graphs, what), ms in times.items():
            print(f"  refills {'as graphs' if graphs else 'one by one'}, {what}: median {statistics.median(ms):.3f} ms "
                  f"(rounds {', '.join(f'{x:.3f}' for x in ms)})")
    if args.profile:  # where a step's host time goes (by own time)
        print(suite.own_time_profile(lambda: ([fg_step(True) for _ in range(10)], torch.cuda.synchronize())))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        create_block_mask = None
    if create_block_mask is not None:
        flex, build = torch.compile(flex_attention), torch.compile(create_block_mask)

        def mask(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        def flex_step():
            step[0] += 1
            doc.copy_(batches[step[0] % 2])
            flex(q, k, v, block_mask=build(mask, None, None, S, S, device="cuda")).backward(dout)

        if not args.analysis_only:
            fixed = create_block_mask(mask, None, None, S, S, device="cuda")
            rows.append(("flex, block mask built once", bench(lambda: flex(q, k, v, block_mask=fixed).backward(dout)),
                         ""))
            rows.append(("flex, ids change, compiled create_block_mask every step", bench(flex_step), ""))
        build_ms = bench(lambda: build(mask, None, None, S, S, device="cuda"))
        print(f"flex's compiled create_block_mask alone: {build_ms:.3f} ms (median)")
        if kept and args.analysis_rounds:  # the two analyses in turn, round after round (#4's ratio)
            ours, theirs = [], []
            for _ in range(args.analysis_rounds):
                ours.append(bench(refill))
                theirs.append(bench(lambda: build(mask, None, None, S, S, device="cuda")))
            print(f"analysis per call, {args.analysis_rounds} rounds in turn: flashgen's refill "
                  f"{statistics.median(ours) * 1e3:.1f} us (rounds {', '.join(f'{x * 1e3:.1f}' for x in ours)}), "
                  f"flex's create_block_mask {statistics.median(theirs) * 1e3:.1f} us "
                  f"(rounds {', '.join(f'{x * 1e3:.1f}' for x in theirs)}): "
                  f"{statistics.median(theirs) / statistics.median(ours):.1f}x")
        if args.kernels:
            kernels("flex's compiled create_block_mask", lambda: build(mask, None, None, S, S, device="cuda"))
        flex_step()  # (new ids, then the refilled runs against flex's mask of the same ids)
        with torch.no_grad():
            want = flex(q, k, v, block_mask=create_block_mask(mask, None, None, S, S, device="cuda")).float()
            err = float((attn(q, k, v).float() - want).norm() / want.norm())
        print(f"flashgen after {step[0]} changes of the ids vs flex, relative error: {err:.2e}")
    print(f"causal document mask ({args.docs} documents), {args.shape}, bf16, fwd+bwd, median ms per step")
    for name, ms, spread in rows:
        print(f"  {name:<46} {ms:8.3f}" + (f"  (rounds {spread})" if spread else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
