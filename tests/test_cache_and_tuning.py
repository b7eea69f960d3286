"""Settings, the disk cache (sources, tuning results) and the autotuner (CPU: Triton's interpreter).

Every test gets its own cache directory and an empty in-process module/tuning memo, so that files
are really written there, and tiny tuning spaces, so that tuning in the interpreter stays fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import triton
from helpers import FLASHGEN_VARS, TOLERANCES, rel_err, requires_interpreter
from triton.runtime.errors import OutOfResources

import flashgen as fg
from flashgen import api, runtime, tuning
from flashgen.runtime import CacheWarning, Config
from flashgen.settings import Settings, settings
from flashgen.tuning import SPACES, Space, candidates, shared_memory_bytes, tuning_key

ROOT = Path(__file__).resolve().parents[1]
TINY = {"fwd": Space((16, 32), (16,), (4,), (1,)),
        "dkdv": Space((16,), (16, 32), (4,), (1,)),
        "dq": Space((16, 32), (16,), (4,), (1,))}


@pytest.fixture
def tiny_spaces(monkeypatch):
    monkeypatch.setattr(tuning, "SPACES", dict(TINY))


def qkv(H=1, S=32, D=16, dtype=torch.float32, grad=False):
    torch.manual_seed(0)
    return [torch.randn(1, H, S, D, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def files(root: Path) -> list[Path]:
    """The cache's files, without the compiled templates (which every render may add)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "templates") if root.exists() else []


# ---------------------------------------------------------------------------------------------
# settings


def test_settings_defaults(monkeypatch, tmp_path):
    for var in FLASHGEN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings() == Settings(cache_dir=tmp_path / ".cache" / "flashgen", disable_cache=False, autotune=False,
                                  tune_ms=50.0, progress=sys.stderr.isatty(), compile_jobs=os.cpu_count() or 1)
    assert runtime.cache_dir() == tmp_path / ".cache" / "flashgen"
    assert fg.compile().autotune is False


def test_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FLASHGEN_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("FLASHGEN_DISABLE_CACHE", "off")
    monkeypatch.setenv("FLASHGEN_AUTOTUNE", "yes")
    monkeypatch.setenv("FLASHGEN_TUNE_MS", " 12.5 ")
    monkeypatch.setenv("FLASHGEN_PROGRESS", "0")
    monkeypatch.setenv("FLASHGEN_COMPILE_JOBS", "3")
    s = settings()
    assert (s.cache_dir, s.disable_cache, s.autotune, s.tune_ms, s.progress, s.compile_jobs) == (
        tmp_path / "elsewhere", False, True, 12.5, False, 3)
    assert runtime.cache_dir() == tmp_path / "elsewhere"
    assert fg.compile().autotune is True and fg.compile(autotune=False).autotune is False
    monkeypatch.setenv("FLASHGEN_CACHE_DIR", "~/tilde")  # read again at every call; ~ is expanded
    monkeypatch.setenv("FLASHGEN_PROGRESS", "TRUE")
    assert settings().cache_dir == tmp_path / "tilde" and settings().progress is True


@pytest.mark.parametrize("var, value", [("FLASHGEN_DISABLE_CACHE", "maybe"), ("FLASHGEN_AUTOTUNE", "2"),
                                        ("FLASHGEN_PROGRESS", "sometimes"), ("FLASHGEN_TUNE_MS", "abc"),
                                        ("FLASHGEN_TUNE_MS", "0"), ("FLASHGEN_TUNE_MS", "-5"),
                                        ("FLASHGEN_COMPILE_JOBS", "2.5"), ("FLASHGEN_COMPILE_JOBS", "-1")])
def test_invalid_setting_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        settings()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_tune_ms_is_refused(monkeypatch, value):
    monkeypatch.setenv("FLASHGEN_TUNE_MS", value)
    with pytest.raises(ValueError, match="FLASHGEN_TUNE_MS"):
        settings()


def test_describe_lists_every_field(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHGEN_TUNE_MS", "7")
    monkeypatch.setenv("FLASHGEN_AUTOTUNE", "1")
    rows = settings().describe()
    assert [var for var, _, _ in rows] == ["FLASHGEN_" + f.name.upper() for f in fields(Settings)]
    shown = {var: value for var, value, _ in rows}
    assert shown["FLASHGEN_CACHE_DIR"] == str(tmp_path) and shown["FLASHGEN_TUNE_MS"] == "7.0"
    assert shown["FLASHGEN_AUTOTUNE"] == "1" and all(meaning for _, _, meaning in rows)
    # and no FLASHGEN_* variable named anywhere in the package is missing from the list
    named = {m for path in (ROOT / "flashgen").rglob("*.py") for m in re.findall(r"FLASHGEN_[A-Z_]+", path.read_text())}
    assert named <= set(shown), named - set(shown)


@requires_interpreter
def test_disable_cache_writes_nothing(cache, tiny_spaces, monkeypatch):
    monkeypatch.setenv("FLASHGEN_DISABLE_CACHE", "1")
    private = runtime.cache_dir()
    assert private != cache and private.is_dir() and private.name.startswith("flashgen-nocache-")
    assert runtime.cache_dir() == private  # one directory per process
    attn = fg.compile(mask_mod=fg.mods.chunked(8), autotune=True)
    q, k, v = qkv()
    with torch.no_grad():
        attn(q, k, v)
    assert set(attn.last_tuning) == {"fwd"}
    assert runtime.source_path(attn._kernel_source()).is_file()  # the source went to the private directory
    assert runtime.source_path(attn._kernel_source()).is_relative_to(private)
    assert set(attn.tune(q, k, v)) == {"fwd"}  # explicit tuning too
    assert not list(private.glob("tuning/*.json"))  # tuning results stay in memory ...
    monkeypatch.setattr(api, "tune", _must_not_tune)
    again = fg.compile(mask_mod=fg.mods.chunked(8), autotune=True)
    with torch.no_grad():
        again(q, k, v)  # ... and are reused from there
    assert files(cache) == []


def _must_not_tune(*args, **kwargs):
    raise AssertionError("tune() was called although a stored result exists")


# ---------------------------------------------------------------------------------------------
# generated sources on disk


@requires_interpreter
def test_source_file_named_and_rebuilt_when_corrupted(cache):
    attn = fg.compile(mask_mod=fg.mods.sliding_window(9))
    q, k, v = qkv()
    with torch.no_grad():
        expected = attn(q, k, v)
    ks = attn._kernel_source()
    path = runtime.source_path(ks)
    assert path.parent == cache / "kernels" and path.is_file()
    assert re.fullmatch(re.escape(attn.name) + r"-[0-9a-f]{12}\.py", path.name), path.name
    assert path.name == f"sliding_window_9-{ks.key[:12]}.py" and path.read_text() == attn.source("fwd")

    path.write_text(path.read_text()[:200])  # truncated, as by a crash of an older writer or a full disk
    del runtime._modules[ks.key]  # load_module memoizes per key and process,
    attn._plans.clear()  # and the Attention its launches per call signature
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = attn(q, k, v)
    cache_warnings = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1 and str(path) in str(cache_warnings[0].message)
    assert path.read_text() == attn.source("fwd") and torch.equal(out, expected)

    path.write_text("edited")  # a second corruption in this process is rebuilt as well (reported once)
    del runtime._modules[ks.key]
    attn._plans.clear()
    runtime.load_module(ks)
    assert path.read_text() == attn.source("fwd")
    assert sorted(p.name for p in files(cache)) == [path.name, path.name + ".lock"]  # no temp files left


def test_concurrent_processes_write_one_source(cache):
    script = textwrap.dedent("""
        import sys, time, warnings
        from pathlib import Path
        import flashgen as fg
        from flashgen import runtime
        warnings.simplefilter("error", runtime.CacheWarning)
        ks = fg.compile(mask_mod=fg.mods.prefix_lm(5) & fg.mods.causal)._kernel_source()
        ready = Path(sys.argv[1])
        (ready / sys.argv[2]).touch()
        deadline = time.time() + 60
        while len(list(ready.iterdir())) < 2 and time.time() < deadline:  # start together
            time.sleep(0.001)
        runtime.load_module(ks)
        print(runtime.source_path(ks))
    """)
    ready = cache.parent / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(ready), str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in results}
    sources = list((cache / "kernels").glob("*.py"))
    assert len(paths) == 1 and [str(p) for p in sources] == list(paths)
    expected = fg.compile(mask_mod=fg.mods.prefix_lm(5) & fg.mods.causal).source("fwd")
    assert sources[0].read_text() == expected
    assert not [p for p in files(cache) if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# tuning through Attention


def _tuning_files(cache: Path, name: str, family: str = "fwd") -> list[Path]:
    return [p for p in (cache / "tuning").glob("*.json")
            if re.fullmatch(re.escape(f"{name}-{family}-") + r"[0-9a-f]{16}\.json", p.name)]


def _spy_launch(monkeypatch) -> list[Config]:
    used: list[Config] = []
    original = api.launch

    def spy(kernel, key, cfg, *args, **kwargs):
        used.append(cfg)
        return original(kernel, key, cfg, *args, **kwargs)

    monkeypatch.setattr(api, "launch", spy)
    return used


@requires_interpreter
def test_autotune_tunes_once_and_reuses_the_stored_result(cache, tiny_spaces, monkeypatch):
    q, k, v = qkv(S=40)
    attn = fg.compile(mask_mod=fg.mods.causal, autotune=True)
    with torch.no_grad():
        out = attn(q, k, v)
    assert rel_err(out, fg.attention_reference(q, k, v, mask_mod=fg.mods.causal)) < TOLERANCES[torch.float32]
    trials = attn.last_tuning["fwd"]
    assert set(attn.last_tuning) == {"fwd"} and len(trials) == 2
    assert {(t["block_m"], t["block_n"]) for t in trials} == {(16, 16), (32, 16)}
    assert all(t["ms"] is not None and t["ms"] > 0 for t in trials)
    [path] = _tuning_files(cache, "causal")
    record = json.loads(path.read_text())
    assert record["trials"] == trials
    assert record["best"] == {k: v for k, v in min(trials, key=lambda t: t["ms"]).items() if k != "ms"}
    assert record["key"]["family"] == "fwd" and record["key"]["kernel"] == attn._kernel_source().key
    assert (record["key"]["q_len"], record["key"]["kv_len"], record["key"]["dtype"]) == (64, 64, "float32")
    assert record["key"]["flashgen"] == fg.__version__ and record["key"]["gpu"] == "cpu"

    # a new Attention (as in a new process: nothing in memory) reads the result instead of tuning
    runtime._tuned_in_memory.clear()
    monkeypatch.setattr(api, "tune", _must_not_tune)
    used = _spy_launch(monkeypatch)
    again = fg.compile(mask_mod=fg.mods.causal, autotune=True)
    with torch.no_grad():
        again(q, k, v)
        again(*qkv(S=64))  # the same power-of-two bucket
    assert used == [Config(**record["best"])] * 2 and again.last_tuning == {}
    with pytest.raises(AssertionError, match="stored result"), torch.no_grad():
        again(*qkv(S=65))  # a new bucket is tuned
    assert len(files(cache / "tuning")) == 2  # the json and its lock file


@requires_interpreter
def test_corrupted_tuning_result_warns_and_is_tuned_again(cache, tiny_spaces, monkeypatch):
    q, k, v = qkv()
    with torch.no_grad():
        fg.compile(mask_mod=fg.mods.causal, autotune=True)(q, k, v)
    [path] = _tuning_files(cache, "causal")
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    runtime._tuned_in_memory.clear()
    calls = []
    original = api.tune

    def counting(*args, **kwargs):
        calls.append(path.exists())
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "tune", counting)
    attn = fg.compile(mask_mod=fg.mods.causal, autotune=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            attn(q, k, v)
            fg.compile(mask_mod=fg.mods.causal, autotune=True)(q, k, v)  # reads the new, valid result
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1 and str(path) in messages[0] and "corrupted" in messages[0], messages
    assert calls == [False]  # removed before tuning again, tuned once
    assert set(attn.last_tuning) == {"fwd"} and "best" in json.loads(path.read_text())


@requires_interpreter
@pytest.mark.parametrize("text", ["null", "[]"])
def test_tuning_result_that_is_not_an_object_is_tuned_again(cache, tiny_spaces, text):
    q, k, v = qkv()
    with torch.no_grad():
        fg.compile(mask_mod=fg.mods.causal, autotune=True)(q, k, v)
    [path] = _tuning_files(cache, "causal")
    path.write_text(text)
    runtime._tuned_in_memory.clear()
    attn = fg.compile(mask_mod=fg.mods.causal, autotune=True)
    with pytest.warns(CacheWarning), torch.no_grad():
        attn(q, k, v)
    assert "fwd" in attn.last_tuning


@requires_interpreter
def test_backward_with_tuning_matches_the_reference(cache, tiny_spaces):
    torch.manual_seed(1)
    H, S, D = 2, 40, 16
    table = (0.1 * torch.randn(H, 2 * S - 1)).requires_grad_()
    q, k, v = (torch.randn(1, H, S, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, H, S, D)
    attn = fg.compile(score_mod=fg.mods.relative_bias(table), mask_mod=fg.mods.causal, autotune=True)
    out = attn(q, k, v)
    (out * dout).sum().backward()
    assert set(attn.last_tuning) == {"fwd", "dkdv", "dq"}
    assert all(len(_tuning_files(cache, attn.name, f)) == 1 for f in ("fwd", "dkdv", "dq"))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = fg.attention_reference(*leaves[:3], fg.mods.relative_bias(leaves[3]), fg.mods.causal)
    (ref * dout.double()).sum().backward()
    tol = TOLERANCES[torch.float32]
    assert rel_err(out, ref) < tol
    for name, got, want in zip(("dq", "dk", "dv", "dtable"), (q, k, v, table), leaves):
        assert rel_err(got.grad, want.grad) < tol, f"{name}: {rel_err(got.grad, want.grad):.2e}"


@requires_interpreter
def test_attention_tune_backward_returns_every_family(cache, tiny_spaces):
    attn = fg.compile(mask_mod=fg.mods.causal)
    assert attn.autotune is False
    q, k, v = qkv(S=24)
    trials = attn.tune(q, k, v, backward=True)
    assert set(trials) == {"fwd", "dkdv", "dq"} and attn.autotune is False
    for family, rows in trials.items():
        assert len(rows) == len(candidates(family, q.device, 16, 16, torch.float32)) == 2
        assert all(r["ms"] is not None for r in rows)
        assert len(_tuning_files(cache, "causal", family)) == 1
    assert q.grad is None and not q.requires_grad  # the inputs are not touched
    assert set(attn.tune(q, k, v)) == {"fwd"}  # tunes again although a result is stored


@requires_interpreter
def test_attention_tune_leaves_captured_gradients_alone(cache, tiny_spaces):
    table = (0.1 * torch.randn(1, 2 * 24 - 1)).requires_grad_()
    attn = fg.compile(score_mod=fg.mods.relative_bias(table), mask_mod=fg.mods.causal)
    attn.tune(*qkv(S=24), backward=True)
    assert table.grad is None


@requires_interpreter
def test_autotune_backward_with_wide_fp32_heads(cache, monkeypatch):
    assert candidates("dkdv", torch.device("cpu"), 256, 256, torch.float32) == []  # the cause
    monkeypatch.setattr(tuning, "SPACES", {**SPACES, "fwd": TINY["fwd"]})  # the forward tunes fast
    q, k, v = qkv(S=16, D=256, grad=True)
    attn = fg.compile(autotune=True)
    attn(q, k, v).sum().backward()
    assert q.grad is not None


# ---------------------------------------------------------------------------------------------
# the tuner's pieces


def test_candidates_prune_by_shared_memory_and_registers():
    cpu = torch.device("cpu")
    limit = tuning.shared_memory_limit(cpu)
    everything = SPACES["fwd"].configs()
    kept = candidates("fwd", cpu, 256, 256, torch.float32)
    removed = [c for c in everything if c not in kept]
    assert kept and removed and set(kept) <= set(everything)
    assert any(shared_memory_bytes("fwd", c, 256, 256, 4) > limit for c in removed)
    for c in kept:
        assert shared_memory_bytes("fwd", c, 256, 256, 4) <= limit
        assert tuning.register_values("fwd", c, 256, 256) <= tuning._REGISTERS_PER_THREAD
    for c in removed:
        assert (shared_memory_bytes("fwd", c, 256, 256, 4) > limit
                or tuning.register_values("fwd", c, 256, 256) > tuning._REGISTERS_PER_THREAD)
    for family in ("fwd", "dkdv", "dq"):
        small = [c for c in SPACES[family].configs() if c.block_m <= 64 and c.block_n <= 64]
        kept = candidates(family, cpu, 64, 64, torch.bfloat16)
        assert small and all(c in kept for c in small), family
    assert candidates("fwd", cpu, 16, 16, torch.float16, space=TINY["fwd"]) == TINY["fwd"].configs()


def test_shared_memory_grows_with_stages():
    for family in ("fwd", "dkdv", "dq"):
        for bm, bn in ((64, 32), (128, 128)):
            sizes = [shared_memory_bytes(family, Config(bm, bn, 4, s), 128, 64, 2) for s in range(1, 6)]
            assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), (family, sizes)
    assert shared_memory_bytes("fwd", Config(64, 32, 4, 2), 64, 64, 2) == 2 * (64 * 64 + 2 * 32 * 128)


def test_tuning_key_buckets_lengths_to_powers_of_two():
    def key(sq, skv=512, bh=16):
        return tuning_key("fwd", "k" * 64, bh, sq, skv, 128, 128, torch.bfloat16, "band")

    assert key(1000) == key(1024) != key(1025)
    assert key(1000)["q_len"] == 1024 and key(1025)["q_len"] == 2048 and key(1)["q_len"] == 1
    assert key(64, 1000) == key(64, 1024) != key(64, 1025)
    assert key(64, bh=12) == key(64, bh=16) != key(64, bh=17)
    assert key(64)["dtype"] == "bfloat16" and key(64)["sparsity"] == "band"


def _sleepy(ms: dict, fail: set):
    def run(cfg):
        if cfg.block_m in fail:
            raise OutOfResources(300000, 232448, "shared memory")
        time.sleep(ms[cfg.block_m] / 1e3)
    return run


def test_tune_records_failures_and_picks_the_fastest(capsys):
    configs = [Config(16, 16, 4, 1), Config(32, 16, 4, 1), Config(64, 16, 4, 1)]
    best, trials = tuning.tune("demo fwd", configs, _sleepy({16: 8, 64: 1}, {32}), torch.device("cpu"),
                               tune_ms=1, progress=True)
    assert best == Config(64, 16, 4, 1)
    assert [(t["block_m"], t["ms"] is None) for t in trials] == [(16, False), (32, True), (64, False)]
    assert trials[1]["error"].startswith("OutOfResources") and trials[0]["ms"] > trials[2]["ms"]
    err = capsys.readouterr().err
    assert "flashgen: tuning demo fwd" in err and "3/3" in err and err.endswith("\n")


def test_tune_fails_when_no_configuration_runs():
    configs = [Config(16, 16, 4, 1), Config(32, 16, 4, 1)]
    with pytest.raises(RuntimeError, match="no configuration of demo fwd ran.*OutOfResources"):
        tuning.tune("demo fwd", configs, _sleepy({}, {16, 32}), torch.device("cpu"), tune_ms=1, progress=False)


def test_measure_on_cpu_is_a_median_of_wall_times():
    calls = []
    ms = tuning.measure(lambda: (calls.append(1), time.sleep(0.002)), torch.device("cpu"), 50.0)
    assert len(calls) == 4 and 2 <= ms < 200 and math.isfinite(ms)


# ---------------------------------------------------------------------------------------------
# listing and clearing


def test_compiled_binaries_go_to_the_cache(cache, monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    monkeypatch.setattr(runtime, "interpreting", lambda: False)  # as on a GPU, where Triton compiles
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    before = knobs.cache.dir
    with runtime.binaries_here():
        assert knobs.cache.dir == str(cache / "triton")
    assert knobs.cache.dir == before
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache / "users"))  # the user's choice wins
    with runtime.binaries_here():
        assert knobs.cache.dir == str(cache / "users")
    # a compiled kernel is one directory of Triton's files: one entry, named by the kernel
    binary = cache / "triton" / "ABCDEF"
    binary.mkdir(parents=True)
    (binary / "attn_fwd.json").write_text("{}")
    (binary / "attn_fwd.cubin").write_bytes(b"\0" * 100)
    (binary / "__grp__attn_fwd.json").write_text("{}")
    [entry] = runtime.cache_entries()
    assert (entry.kind, entry.path, entry.label, entry.size) == ("binary", binary, "attn_fwd", 104)
    assert runtime.clear_cache() == 1 and not binary.exists()


def test_triton_hashes_itself_in_the_background_and_the_first_launch_waits(cache, monkeypatch):
    import threading

    assert runtime.interpreting() and runtime._prewarm is None  # no thread under the interpreter
    started, release, done = threading.Event(), threading.Event(), []

    def slow_key():  # stands in for triton_key(): hashing Triton's library
        started.set()
        release.wait(5)
        done.append(1)

    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(triton.runtime.cache, "triton_key", slow_key)
    monkeypatch.setattr(runtime, "_prewarm", None)
    monkeypatch.setattr(runtime, "_FIRST_CALL_IMPORTS", ("json.tool", "no_such_module_here"))
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    runtime.prewarm_compiler()
    assert started.wait(5) and not done
    thread = runtime._prewarm
    runtime.prewarm_compiler()  # once per process
    assert runtime._prewarm is thread
    threading.Timer(0.05, release.set).start()
    monkeypatch.setenv("TRITON_CACHE_DIR", "/unused")  # binaries_here leaves the user's directory alone
    with runtime.binaries_here():
        assert done == [1]  # the launch waited for the hash instead of computing it again
    assert "json.tool" in sys.modules  # and for the first call's imports (a missing one is skipped)


def test_triton_key_is_remembered_while_tritons_files_are_unchanged(cache, monkeypatch):
    import triton.runtime.cache as triton_cache

    calls = []

    def key():  # stands in for triton_key(): a hash of Triton's files, prefixed by its version
        calls.append(1)
        return f"{triton.__version__}-{'ab' * 32}"

    monkeypatch.setattr(triton_cache, "triton_key", key)
    runtime._remember_triton_key(key)  # a first process: hashes, and keeps the result
    assert calls == [1] and triton_cache.triton_key is key
    [path] = (cache / "triton-key").glob("*.txt")
    assert path.read_text() == key()
    runtime._remember_triton_key(key)  # a later process: reads it, and Triton's first launch hashes nothing
    assert calls == [1, 1] and triton_cache.triton_key is not key and triton_cache.triton_key() == key()
    monkeypatch.setattr(triton_cache, "triton_key", key)
    path.write_text("2.0.0-from-an-older-triton")  # a file that does not belong to this Triton is not used
    runtime._remember_triton_key(key)
    assert len(calls) == 4 and triton_cache.triton_key is key and path.read_text() == key()
    monkeypatch.setattr(triton, "__version__", triton.__version__ + "+edited")  # another Triton: another stamp
    assert runtime._triton_stamp() != path.stem


def test_an_unwritable_cache_leaves_triton_to_hash_itself(cache, monkeypatch):
    calls = []

    def key():
        calls.append(1)
        return f"{triton.__version__}-{'cd' * 32}"

    def refuse(path, text):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(runtime, "write_atomic", refuse)
    monkeypatch.setattr(runtime, "_FIRST_CALL_IMPORTS", ())
    runtime._prewarm_work(key)  # in the prewarm thread: no traceback, Triton's own hash instead
    assert calls and not (cache / "triton-key").exists()


def test_the_wait_for_the_prewarm_thread_is_counted(monkeypatch):
    import time

    class Busy:  # a prewarm thread with 50 ms of work left
        def is_alive(self):
            return True

        def join(self):
            time.sleep(0.05)

    monkeypatch.setattr(runtime, "_prewarm", Busy())
    monkeypatch.setattr(runtime, "prewarm_wait_s", 0.0)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/unused")
    with runtime.binaries_here():
        pass
    assert runtime.prewarm_wait_s >= 0.045  # (the clocks of sleep and perf_counter may differ by a tick)


def test_compiled_templates_are_kept_in_the_cache(cache, monkeypatch):
    import jinja2

    from flashgen.codegen import render

    fg.compile(mask_mod=fg.mods.sliding_window(777)).source("bwd")  # renders (a variant not seen before)
    kept = [e for e in runtime.cache_entries() if e.kind == "template"]
    assert len(kept) >= 2 and {e.path.parent for e in kept} == {cache / "templates"}
    # a fresh process (a new environment) loads the compiled templates instead of compiling them
    render._environment.cache_clear()
    compiled = []
    real = jinja2.Environment.compile
    monkeypatch.setattr(jinja2.Environment, "compile", lambda self, *a, **k: compiled.append(a) or real(self, *a, **k))
    fg.compile(mask_mod=fg.mods.sliding_window(778)).source("bwd")
    assert compiled == []
    assert runtime.clear_cache() >= len(kept) and not list((cache / "templates").glob("*.cache"))


def test_the_cache_switch_happens_once_per_call_signature(cache, monkeypatch):
    import contextlib

    entered = []

    @contextlib.contextmanager
    def counting():
        entered.append(1)
        yield

    monkeypatch.setattr(api, "binaries_here", counting)
    attn = fg.compile(mask_mod=fg.mods.causal)
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    for _ in range(3):
        attn(q, k, v)
    assert len(entered) == 1  # later calls find the kernel compiled in memory
    attn(q[:, :, :8], k, v)  # a new shape may specialise a new kernel
    attn(q, k, v, return_lse=True)
    assert len(entered) == 3
    q.requires_grad_()
    attn(q, k, v).sum().backward()  # the forward for autograd is the return_lse=True signature, kept;
    assert len(entered) == 4        # the backward is one more
    q2 = q.detach()[:, :, :12].requires_grad_()
    attn(q2, k, v).sum().backward()  # a new shape: its forward for autograd, which also compiles the
    assert len(entered) == 6         # backward's kernels, then its backward


def test_cache_entries_and_clear(cache):
    assert runtime.cache_entries() == []  # the directory does not exist yet
    attn = fg.compile(mask_mod=fg.mods.causal)
    runtime.load_module(attn._kernel_source())
    key = tuning_key("fwd", attn._kernel_source().key, 1, 32, 32, 16, 16, torch.float32, "band")
    stored = runtime.store_tuning("causal", "fwd", key, Config(16, 16, 4, 1), [])
    assert runtime.load_tuning("causal", "fwd", key)["best"] == Config(16, 16, 4, 1).__dict__
    (cache / "kernels" / ".stray.py.123.tmp").write_text("")  # temp files and locks are not entries
    entries = runtime.cache_entries()
    templates = sorted((cache / "templates").glob("*.cache"))  # the forward template and its two includes
    assert [(e.kind, e.path) for e in entries] == [("kernel", runtime.source_path(attn._kernel_source())),
                                                    ("tuning", stored)] + [("template", t) for t in templates]
    assert len(templates) == 3
    assert all(e.size == e.path.stat().st_size > 0 and e.mtime == e.path.stat().st_mtime for e in entries)
    assert runtime.clear_cache() == 5
    assert runtime.cache_entries() == [] and runtime._tuned_in_memory == {}
    assert [p.name for p in files(cache)] == [".stray.py.123.tmp"]  # the entries and their .lock files are gone
    assert runtime.load_tuning("causal", "fwd", key) is None
