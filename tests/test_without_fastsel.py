"""scmd_ref.py without the Rust extension: a run in an interpreter where `import fastsel` fails is the same run as
with fastsel (the same records but timing, the same weights bit for bit), because what fastsel does is proven equal
to the references the script then uses (torch.sort, torchvision ImageFolder, open_clip's tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scmd import world

ROOT = Path(__file__).resolve().parent.parent
HIDE_FASTSEL = ("import runpy, sys; sys.modules['fastsel'] = None; sys.argv = ['scmd_ref.py', *sys.argv[1:]]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")  # `import fastsel` raises ImportError
TIMING = ("step_time", "mem_gb")


def _run(out: Path, data_dir: Path, extra, hide: bool) -> subprocess.CompletedProcess:
    argv = ["--world-per-class", "6", "--data-dir", str(data_dir), "--steps", "12", "--checkpoint-freq", "5",
            "--output-dir", str(out), "--no-progress", "--workers", "0", "--device", "cpu", *extra]
    cmd = [sys.executable, "-c", HIDE_FASTSEL, *argv] if hide else [sys.executable, "scmd_ref.py", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)


def _records(out: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--select-per-domain"], ["--algorithm", "kd"]])
def test_a_run_without_fastsel_is_the_same_run(tmp_path, extra):
    data_dir = tmp_path / "data"
    world.ensure_dataset(data_dir, progress=False, n_per_class=6)
    out = tmp_path / "out"  # both runs write into the same folder (its path is in the records), one after the other
    with_rust = _run(out, data_dir, extra, hide=False)
    assert with_rust.returncode == 0, with_rust.stderr[-3000:]
    assert "not installed" not in with_rust.stderr
    shutil.move(out, tmp_path / "with_fastsel")
    without = _run(out, data_dir, extra, hide=True)
    assert without.returncode == 0, without.stderr[-3000:]
    notes = [ln for ln in without.stderr.splitlines() if "fastsel (the Rust extension) is not installed" in ln]
    assert len(notes) == 1, without.stderr[-3000:]  # said once, in one line
    assert "selector torch" in without.stderr

    assert _records(out) == _records(tmp_path / "with_fastsel")
    a = torch.load(tmp_path / "with_fastsel" / "checkpoint_last.pt", weights_only=True)["trainer"]
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)["trainer"]
    for part in ("student", "sma") + (("projector",) if "projector" in a else ()):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    selecting = "--algorithm" not in extra
    assert (tmp_path / "with_fastsel" / "hardness.json").exists() == selecting  # fastsel's tracker: bookkeeping
    assert not (out / "hardness.json").exists() and not (out / "kept_share.png").exists()
    assert (out / "summary.json").exists() and (out / "curves.png").exists()


@pytest.mark.slow
def test_without_fastsel_the_options_that_need_it_say_so_before_any_work(tmp_path):
    for extra, needle in ((["--selector", "fastsel"], "--selector fastsel: the fastsel extension is not installed"),
                          (["--selection-losses", "stale"], "--selection-losses stale ranks by the per-sample losses")):
        r = _run(tmp_path / "out", tmp_path / "data", extra, hide=True)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "data").exists()


def test_the_pip_only_requirements_are_the_packages_dependencies():
    """`pip install -r requirements.txt` installs exactly what pyproject.toml's [project] dependencies name."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [ln for ln in lines if ln and not ln.startswith("#")] == [d.replace('"', "'") for d in deps]
