"""benchmarks/suite.py: a smoke run and its report end to end (a subprocess, Triton's interpreter
without a GPU), and the merge of several runs (the newest record wins)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suite.py"


def load_suite():
    spec = importlib.util.spec_from_file_location("bench_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def suite(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SUITE), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_smoke_run_and_report(tmp_path):
    suite("run", "--smoke", "--variants", "causal,document,dilated", "--passes", "fwd", "--rounds", "2",
          "--ab-ws", "--out", str(tmp_path))
    (path,) = tmp_path.glob("suite-*.json")
    run = json.loads(path.read_text())
    assert {"date", "gpu", "torch", "triton", "flashgen"} <= set(run["header"])
    records = {(r["variant"], r["pass_name"], r["impl"]): r for r in run["records"]}
    assert set(records) == {(v, "fwd", impl) for v in ("causal", "document", "dilated")
                            for impl in ("flashgen", "flashgen-triton")}  # (--ab-ws: the Gluon kernels off)
    for r in records.values():
        assert r["error"] is None and r["ms"] > 0 and r["tflops"] > 0 and 0 < r["density"] < 1
        assert len(r["rounds_ms"]) == 2 and min(r["rounds_ms"]) <= r["ms"] <= max(r["rounds_ms"])
        assert r["kernels"]["forward"].startswith("Config(")  # (what ran: the Triton kernel, in the interpreter)
        if r["impl"] == "flashgen":
            (name, err), = r["checks"].items()
            assert name.startswith("out_vs_reference") and err < 2e-2

    suite("report", str(tmp_path))
    md = (tmp_path / "suite.md").read_text()
    assert "| causal |" in md and "| causal document (16 docs) |" in md and run["header"]["date"] in md
    assert "flashgen-triton" not in md and "†" not in md  # (the A/B arm stays in the JSON)


def test_merge_keeps_the_newest_record(tmp_path):
    bench = load_suite()

    def write(stamp: str, records: list[tuple[str, float]]) -> None:
        header = {"timestamp": f"2026-11-{stamp}T00:00:00+00:00"}
        rows = [{"variant": v, "shape": "1x2x128x32", "pass_name": "fwd", "impl": "flashgen", "ms": ms}
                for v, ms in records]
        (tmp_path / f"suite-202611{stamp}.json").write_text(json.dumps({"header": header, "records": rows}))

    write("02", [("causal", 1.0)])
    write("01", [("causal", 2.0), ("full", 3.0)])
    write("03", [("full", 4.0)])
    runs = bench.load_runs(tmp_path)
    merged = bench.merge(runs[::-1])  # the order of the runs does not matter, their timestamps do
    assert {key[0]: record["ms"] for key, (record, _) in merged.items()} == {"causal": 1.0, "full": 4.0}
    assert merged[("causal", "1x2x128x32", "fwd", "flashgen")][1]["timestamp"].startswith("2026-11-02")


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    import argparse


    bench = load_suite()
    done = []

    def run_shape(shape, variants, *rest):
        if done:
            raise KeyboardInterrupt  # the device call's time limit, say, during the second variant
        done.append(variants)
        return [bench.Record(**{**{f: None for f in bench.Record.__dataclass_fields__},
                                "variant": variants[0], "impl": "flashgen", "ms": 1.0})]

    monkeypatch.setattr(bench, "run_shape", run_shape)
    args = argparse.Namespace(smoke=True, shapes="", variants="causal,document", passes="fwd", out=str(tmp_path),
                              bias_dtype="bf16")
    with pytest.raises(KeyboardInterrupt):
        bench.cmd_run(args)
    (path,) = tmp_path.glob("suite-*.json")
    assert [r["variant"] for r in json.loads(path.read_text())["records"]] == ["causal"]


def test_sass_tool_compiles_for_hopper_without_a_gpu():
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass.py"), "alibi_causal", "--bwd",
                           "--shape", "1,1,128,64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert set(rows) == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
    for name, cols in rows.items():
        regs, spill, mma, total = int(cols[-12]), int(cols[-11]), int(cols[-10]), int(cols[-1])
        assert 0 < regs <= 255 and spill == 0 and total > 0, (name, cols)
        assert mma > 0  # the attention kernels run on the tensor cores


def test_warp_specialised_forward_prototype_matches_float64_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "proto_ws_forward.py"), "--check"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("rel. err.") == 4


@pytest.mark.parametrize("script, checks", [("proto_fused_backward.py", 2), ("proto_overlap.py", 4)])
def test_backward_and_overlap_prototypes_match_float64_in_the_interpreter(script, checks):
    """The measured-and-not-taken prototypes (PERFLOG, eleventh session) stay runnable and right."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--check-only", "--shape", "1,2,128,64"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("check")]
    assert len(lines) == checks and not any("FAIL" in line for line in lines), done.stdout


def test_interleaved_load_ab_runs_every_arm():
    """benchmarks/ab_loads.py: TMA, pointer and default arms in rounds (the plumbing, on the CPU)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_loads.py"), "--smoke", "--variants", "causal",
                           "--passes", "fwd+bwd", "--rounds", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    row = done.stdout.splitlines()[-1].split()
    assert row[:2] == ["causal", "fwd+bwd"] and all(float(x) > 0 for x in row[2:6]), done.stdout


def test_interleaved_backward_tiles_run_every_arm():
    """benchmarks/ab_backward_tiles.py: the default and a forced dK/dV tile in rounds, each arm's
    launches with its own tiles (the plumbing, on the CPU)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_backward_tiles.py"), "--smoke", "--variants",
                           "causal", "--dkdv", "16,32,4,1", "--dq", "32,16,4,1", "--rounds", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[-3:]]
    assert [r[:2] for r in rows] == [["causal", "default"], ["causal", "16,32,4,1"], ["causal", "dq:32,16,4,1"]], \
        done.stdout
    assert all(float(r[2]) > 0 for r in rows), done.stdout


def test_report_gives_the_range_of_per_round_ratios():
    """--rounds: flashgen and flex timed in turn; the table shows the ratio of medians and the range
    of the rounds' ratios (within one run only)."""
    bench = load_suite()
    header = {"timestamp": "2026-11-29T00:00:00+00:00", "date": "d", "gpu": "g", "torch": "t", "triton": "t",
              "flashgen": "f"}

    def record(impl, rounds):
        return {"variant": "causal", "label": "causal", "shape": "1x2x128x32", "pass_name": "fwd", "impl": impl,
                "density": 0.5, "ms": sorted(rounds)[1], "tflops": 1.0 / sorted(rounds)[1], "error": None,
                "checks": {}, "rounds_ms": rounds}

    impls = {"flashgen": (record("flashgen", [1.0, 1.1, 0.9]), header),
             "flex": (record("flex", [1.2, 1.1, 1.35]), header)}
    lo, hi = bench.ratio_range(impls)
    assert (round(lo, 3), round(hi, 3)) == (1.0, 1.5)
    row = next(line for line in bench.table("1x2x128x32", "fwd", {"causal": impls}) if line.startswith("| causal"))
    assert "| 1.20 (1.00-1.50) |" in row  # medians 1.2 and 1.0; rounds 1.2, 1.0, 1.5
    impls["flex"][0]["rounds_ms"] = None  # a run without rounds: the ratio alone
    assert bench.ratio_range(impls) is None


def test_pair_bias_variant_checks_a_corner_and_records_peers_not_run():
    """pair_bias_learnable ([B, H, S, S] requiring grad): its float64 reference slice reads a copied
    corner (not the full-size leaf, whose gradient the reference would allocate), and a peer listed in
    ``Case.not_run`` is recorded with that reason instead of being run."""
    import dataclasses

    import torch

    bench = load_suite()
    case = bench.build_cases(2, 40, "cpu", torch.float32, ["pair_bias_learnable"], batch=3)["pair_bias_learnable"]
    pair = case.learnable["dbias"]
    assert pair.shape == (3, 2, 40, 40) and pair.requires_grad and case.not_run == {}  # (under 2^31 entries)
    corner = case.sliced_learnable["dbias"]
    assert corner.requires_grad and corner.data_ptr() != pair.data_ptr()
    assert torch.equal(corner, pair[:1, :1].detach()) and case.slice_kwargs(16)["bias"].shape == (1, 1, 16, 16)
    q = torch.randn(3, 2, 40, 16)
    skipped = dataclasses.replace(case, not_run={"flex": "not run: a reason"})
    calls, errors = bench.implementations(skipped, q, q, q, "cpu", True, flex=lambda *a, **kw: None)
    assert errors == {"flex": "not run: a reason"} and "flex" not in calls and "flashgen" in calls


def test_two_trees_are_timed_in_alternating_processes(tmp_path):
    """benchmarks/ab_trees.py: the package at a git revision against the working tree, each arm in its
    own process importing its own copy (the plumbing, on the CPU; a tree without a package is refused)."""
    script = ROOT / "benchmarks" / "ab_trees.py"
    run = [sys.executable, str(script)]
    subprocess.run(run + ["--prepare", "HEAD", str(tmp_path / "old")], cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / "old" / "flashgen" / "api.py").is_file()
    done = subprocess.run(run + ["--old", str(tmp_path / "old"), "--variants", "full", "--rounds", "1", "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    cells = done.stdout.splitlines()[-1].rsplit(maxsplit=3)
    assert cells[0].startswith("full, ") and float(cells[1]) > 0 and float(cells[2]) > 0, done.stdout
    refused = subprocess.run(run + ["--old", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "must hold a flashgen package" in refused.stderr
