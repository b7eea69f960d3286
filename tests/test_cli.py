"""The ``flashgen`` command line, called in-process (plus one real ``python -m flashgen``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FLASHGEN_VARS

import flashgen as fg
from flashgen import runtime
from flashgen.cli import main
from flashgen.runtime import Config
from flashgen.settings import settings
from flashgen.tuning import tuning_key

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")

MODS_FILE = '''
import flashgen as fg

@fg.score_mod
def tanh_cap(score, b, h, q_idx, kv_idx):
    return 20.0 * (score / 20.0).tanh()

def local(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 8

def branchy(b, h, q_idx, kv_idx):
    if q_idx > kv_idx:
        return True
    return False

number = 3
'''


@pytest.fixture
def mods_file(tmp_path) -> Path:
    path = tmp_path / "my_mods.py"
    path.write_text(MODS_FILE)
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ir_lines(source: str) -> list[str]:
    """The '#   logits = ...' and '#   mask = ...' lines of a generated source's header."""
    return [line[1:].strip() for line in source.splitlines()
            if line.startswith("#   logits =") or line.startswith("#   mask =")]


# ---------------------------------------------------------------------------------------------
# config and cache


def test_config_prints_every_variable(cache, capsys, monkeypatch):
    monkeypatch.setenv("FLASHGEN_TUNE_MS", "75")
    rc, out, err = cli(capsys, "config")
    assert rc == 0 and err == ""
    rows = settings().describe()
    lines = out.splitlines()
    assert len(lines) == len(rows) == len(FLASHGEN_VARS)
    for line, (var, value, meaning) in zip(lines, rows):
        assert line.split()[:2] == [var, value] and line.endswith(meaning)
    assert f"FLASHGEN_CACHE_DIR       {cache} " in out and "75.0" in out


def test_config_with_a_bad_value_is_an_error(cache, capsys, monkeypatch):
    monkeypatch.setenv("FLASHGEN_DISABLE_CACHE", "maybe")
    rc, out, err = cli(capsys, "config")
    assert rc == 2 and out == "" and err.startswith("flashgen: error: FLASHGEN_DISABLE_CACHE='maybe'")
    assert err.count("\n") == 1


def test_python_dash_m_entry_point(cache):
    env = {**os.environ, "FLASHGEN_TUNE_MS": "33",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "flashgen", "config"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for var in FLASHGEN_VARS:
        assert var in proc.stdout
    assert str(cache) in proc.stdout and "33.0" in proc.stdout


def test_cache_info_ls_clear(cache, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    rc, out, _ = cli(capsys, "cache", "ls")
    assert rc == 0 and out == f"(empty: {cache})\n"
    attn = fg.compile(mask_mod=fg.mods.causal)
    ks = attn._kernel_source()
    runtime.load_module(ks)
    key = tuning_key("fwd", ks.key, 1, 32, 32, 16, 16, torch.float32, "band")
    stored = runtime.store_tuning("causal", "fwd", key, Config(16, 16, 4, 1), [])

    rc, out, _ = cli(capsys, "cache", "info")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"cache directory: {cache}"
    kib = runtime.source_path(ks).stat().st_size / 1024
    assert lines[1].split() == ["kernel", "entries:", "1", f"{kib:.1f}", "KiB"]
    assert lines[2].split() == ["binary", "entries:", "0", "0.0", "KiB"]  # the interpreter compiles nothing
    assert lines[3].split()[:3] == ["tuning", "entries:", "1"]
    templates = len(list((cache / "templates").glob("*.cache")))  # the compiled template and its include
    assert templates >= 1 and lines[4].split()[:3] == ["template", "entries:", str(templates)]
    assert len(lines) == 5

    rc, out, _ = cli(capsys, "cache", "ls")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2 + templates
    assert lines[0].split()[0] == "kernel" and lines[0].split()[-1] == runtime.source_path(ks).name
    assert lines[1].split()[0] == "tuning" and lines[1].split()[-1] == stored.name
    assert f"{stored.stat().st_size} B" in lines[1]
    assert all(line.split()[0] == "template" for line in lines[2:])

    rc, out, _ = cli(capsys, "cache", "clear")
    assert rc == 0 and out == f"removed {2 + templates} entries from {cache}\n"
    assert not list(cache.rglob("*.py")) and not list(cache.rglob("*.json"))
    assert cli(capsys, "cache", "ls")[1] == f"(empty: {cache})\n"


# ---------------------------------------------------------------------------------------------
# show and explain


def test_show_causal(cache, capsys):
    rc, out, err = cli(capsys, "show", "causal")
    assert rc == 0 and err == ""
    assert "@triton.jit" in out and "def attn_fwd(" in out and "attn_bwd_dkdv" not in out
    assert ir_lines(out) == ["logits = score", "mask = (kv_idx <= q_idx)"]
    assert out == fg.compile(mask_mod=fg.mods.causal).source("fwd")
    assert {p.parent.name for p in cache.rglob("*") if p.is_file()} <= {"templates"}  # show only renders


def test_show_backward(cache, capsys):
    rc, out, _ = cli(capsys, "show", "causal", "--bwd")
    assert rc == 0 and "def attn_bwd_dkdv(" in out and "def attn_bwd_dq(" in out and "def attn_fwd(" not in out
    assert out == fg.compile(mask_mod=fg.mods.causal).source("bwd")


def test_show_warp_specialised_kernels(cache, capsys):
    rc, out, _ = cli(capsys, "show", "causal", "--ws")
    assert rc == 0 and "def attn_fwd_ws(" in out and "gl.warp_specialize" in out
    assert out == fg.compile(mask_mod=fg.mods.causal).source("fwd_ws")
    rc, out, _ = cli(capsys, "show", "causal", "--ws", "--bwd")
    assert rc == 0 and "def attn_bwd_ws(" in out and "_tma_reduce_add(" in out
    assert out == fg.compile(mask_mod=fg.mods.causal).source("bwd_ws")
    rc, out, _ = cli(capsys, "show", "alibi", "--ws", "--bwd")  # (a score_mod read per head)
    assert rc == 0 and "def attn_bwd_ws(" in out and "_read(cap0 + (h)" in out
    rc, out, _ = cli(capsys, "show", "prefix_lm", "--ws")  # (a union: the tiles of a block map)
    assert rc == 0 and "def _hull_row(row):" in out
    rc, out, err = cli(capsys, "show", "relative_bias", "--ws")  # (a table read per entry)
    assert rc != 0 and "no warp-specialised kernels" in err


def test_show_library_argument(cache, capsys):
    rc, out, _ = cli(capsys, "show", "sliding_window:64")
    assert rc == 0 and ir_lines(out) == ["logits = score", "mask = ((kv_idx <= q_idx) & ((q_idx - kv_idx) < 64))"]
    assert out == fg.compile(mask_mod=fg.mods.sliding_window(64)).source("fwd")
    rc, out, _ = cli(capsys, "show", "softcap:7.5", "--shape", "1,2,64,16")
    assert rc == 0 and "7.5" in ir_lines(out)[0] and "tanh" in ir_lines(out)[0]


def test_explain_prints_analysis_and_block_map(cache, capsys):
    rc, out, err = cli(capsys, "explain", "prefix_lm:64", "--shape", "1,2,256,32")
    assert rc == 0 and err == ""
    assert "flashgen.Attention 'prefix_lm(64)'" in out and "analysis:" in out
    assert "mask = ((kv_idx < 64) | (kv_idx <= q_idx))" in out
    assert "block map of the last call:" in out and "BlockMask 256x256" in out
    picture = [line for line in out.splitlines() if set(line.strip()) <= set("░█·") and line.strip()]
    assert len(picture) >= 2 and any("█" in line for line in picture) and any("░" in line for line in picture)


def test_show_specs_from_a_file(cache, capsys, mods_file):
    rc, out, _ = cli(capsys, "show", f"{mods_file}:tanh_cap")
    assert rc == 0 and "# variant:  tanh_cap" in out
    assert ir_lines(out) == ["logits = (tanh((score / 20.0)) * 20.0)", "mask = True"]
    rc, out, _ = cli(capsys, "show", f"{mods_file}:local")  # a plain 4-argument function is a mask_mod
    assert rc == 0 and "# variant:  local" in out
    assert ir_lines(out) == ["logits = score", "mask = (abs((q_idx - kv_idx)) <= 8)"]
    rc, out, _ = cli(capsys, "explain", f"{mods_file}:local", "--shape", "1,1,64,16")
    assert rc == 0 and "flashgen.Attention 'local'" in out and "BlockMask 64x64" in out


# ---------------------------------------------------------------------------------------------
# errors: exit status 2, one line on stderr, no traceback


ERRORS = {
    "unknown spec": (["show", "nope"], "unknown SPEC 'nope'"),
    "bad shape": (["show", "causal", "--shape", "1,2,3"], "--shape '1,2,3'"),
    "bad shape value": (["explain", "causal", "--shape", "1,2,x,4"], "--shape '1,2,x,4'"),
    "zero in shape": (["explain", "causal", "--shape", "1,0,64,16"], "four positive integers"),
    "argument not taken": (["show", "causal:5"], "causal takes no argument"),
    "bad argument": (["show", "sliding_window:abc"], "the argument of sliding_window must be a int"),
    "bad float argument": (["show", "softcap:big"], "the argument of softcap must be a float"),
    "missing file": (["show", "{tmp}/missing.py:m"], "no such file"),
    "missing attribute": (["show", "{file}:nope"], "has no 'nope'"),
    "no attribute named": (["show", "{file}"], "name the object after the file"),
    "not a mod": (["show", "{file}:number"], "number is a int; expected"),
    "untraceable": (["show", "{file}:branchy"], "cannot trace mask_mod branchy"),
    "import fails": (["show", "{tmp}/broken.py:m"], "importing"),
    "bad dtype": (["explain", "causal", "--dtype", "fp64"], "--dtype 'fp64': choose bf16, fp16 or fp32"),
    "tune without gpu": (["tune", "causal"], "'flashgen tune' times kernels and needs a CUDA GPU"),
    "bench without gpu": (["bench", "causal"], "'flashgen bench' times kernels and needs a CUDA GPU"),
}


@pytest.mark.parametrize("case", [pytest.param(name, marks=NO_GPU) if "gpu" in name else name for name in ERRORS])
def test_errors_are_one_line(cache, capsys, mods_file, tmp_path, case):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    argv, expected = ERRORS[case]
    argv = [a.format(tmp=tmp_path, file=mods_file) for a in argv]
    rc, out, err = cli(capsys, *argv)
    assert rc == 2, (out, err)
    assert out == "" and err.startswith("flashgen: error: ") and err.count("\n") == 1 and err.endswith("\n")
    assert expected in err and "Traceback" not in err


def test_bad_dtype_without_a_mask_is_an_error(cache, capsys):
    rc, _, err = cli(capsys, "explain", "full", "--dtype", "fp64")
    assert rc == 2 and err.startswith("flashgen: error: --dtype")


def test_usage_errors_come_from_argparse(cache, capsys):
    for argv in ([], ["cache", "bogus"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "usage: flashgen" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "show", "explain", "tune", "bench", "cache", "config"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    out = capsys.readouterr().out
    assert "--shape" in out and "--dtype" in out and "--bwd" in out and "sliding_window:512" in out
