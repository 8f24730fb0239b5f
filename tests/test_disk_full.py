"""Faults as they really happen, in child processes.

A real file-size limit (RLIMIT_FSIZE; CPython ignores SIGXFSZ, so a write past it fails with EFBIG) or a full
disk (a 2 MiB tmpfs, where mounting is allowed) on every writer of a run: one line on stderr naming the file and
the cause, exit status 2 (as other data faults), no temporary file, the previous checkpoint intact, and the rerun
without the limit ends as the uninterrupted run. And a stop signal at any moment of start-up: one line, 130 or
143, no traceback, nothing partial."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scmd import world

ROOT = Path(__file__).resolve().parent.parent
STEPS = 9
ARGS = ["--world-per-class", "6", "--steps", str(STEPS), "--checkpoint-freq", "4", "--save-every", "1000",
        "--no-progress", "--workers", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TOO_LARGE = "file too large"
pytestmark = pytest.mark.slow  # every test here runs scmd_ref.py or Python processes


def _cmd(data_dir: Path, out: Path, *extra):
    return [sys.executable, str(ROOT / "scmd_ref.py"), "--data-dir", str(data_dir), "--output-dir", str(out), *ARGS,
            *extra]


def _limit(n: int):
    """preexec_fn: the child's file-size limit is n bytes."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def _run(cmd, limit=None, **kw):
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900,
                          preexec_fn=_limit(limit) if limit else None, **kw)


def _error_line(err: str, code: int, got: int, *fragments) -> str:
    """Exactly one error line on stderr, holding every fragment; no traceback; the exit status."""
    lines = [ln for ln in err.splitlines() if ln.startswith("scmd_ref.py:")]
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err)
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    return lines[0]


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name], list(folder.iterdir())


def _ckpt_step(out: Path) -> int:
    try:
        return torch.load(out / "checkpoint_last.pt", weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - absent or being replaced
        return -1


def _records(out: Path):
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        for k in ("step_time", "mem_gb"):
            r.pop(k)
        r["args"].pop("output_dir")
        r["scmd_args"].pop("output_dir")
    return recs


def _assert_same_run(ref: Path, out: Path) -> None:
    a = torch.load(ref / "checkpoint_last.pt", weights_only=True)
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS - 1
    for part in ("student", "sma", "projector"):
        for k, v in a["trainer"][part].items():
            assert torch.equal(v, b["trainer"][part][k]), (part, k)
    assert torch.equal(a["trainer"]["theta"], b["trainer"]["theta"])
    assert _records(ref) == _records(out)
    for name in ("summary.json", "done"):
        assert (out / name).exists()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("world") / "data"
    world.ensure_dataset(d, progress=False, n_per_class=6)
    return d


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "uninterrupted"
    r = _run(_cmd(data_dir, ref))
    assert r.returncode == 0, r.stderr
    return ref


# ---------------------------------------------------------------------------------------------------------
# a real file-size limit


def test_file_size_limit_on_results_then_checkpoints_then_the_figures_and_the_rerun_resumes_exactly(
        tmp_path, data_dir, reference):
    out = tmp_path / "run"
    # 1. results.jsonl: the limit is set on the running process once the step-0 record and checkpoint are
    # written, a little above results.jsonl's size: the step-4 record is the next write, and it fails
    p = subprocess.Popen(_cmd(data_dir, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while _ckpt_step(out) < 0 and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    size = (out / "results.jsonl").stat().st_size
    resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (size + 100, size + 100))
    err = p.communicate(timeout=600)[1]
    _error_line(err, 2, p.returncode, str(out / "results.jsonl"), TOO_LARGE)
    assert (out / "results.jsonl").stat().st_size == size  # the short write was cut off: whole records only
    assert _ckpt_step(out) == 0
    _no_temp_files(out)

    # 2. checkpoints: rerun (resumes after step 0) under a 1 MB limit: the records and curves.png fit, the step-4
    # checkpoints do not; the step-0 checkpoint stays as it was
    r = _run(_cmd(data_dir, out), limit=1_000_000)
    _error_line(r.stderr, 2, r.returncode, str(out / "checkpoint_"), ".pt", TOO_LARGE)
    assert f"resuming {out} at step 1" in r.stderr
    assert _ckpt_step(out) == 0
    _no_temp_files(out)

    # 3. without the limit: the run ends as the uninterrupted one
    r = _run(_cmd(data_dir, out))
    assert r.returncode == 0, r.stderr
    _assert_same_run(reference, out)

    # 4. the end of the run under a 20 kB limit (the records fit, kept_share.png does not): no done marker;
    # the rerun writes it
    for name in ("done", "summary.json", "hardness.json", "kept_share.png"):
        (out / name).unlink(missing_ok=True)
    r = _run(_cmd(data_dir, out), limit=20_000)
    _error_line(r.stderr, 2, r.returncode, str(out / "kept_share.png"), TOO_LARGE)
    assert not (out / "done").exists()
    _no_temp_files(out)
    r = _run(_cmd(data_dir, out))
    assert r.returncode == 0, r.stderr
    _assert_same_run(reference, out)


WRITERS = {  # the end-of-run files and the figures, each written by its own function in a child process
    "summary.json": "O.atomic_write_bytes(out / 'summary.json', b'{}' * 20000)",
    "hardness.json": "O.atomic_write_bytes(out / 'hardness.json', b'{}' * 20000)",
    "done": "O.atomic_write_bytes(out / 'done', b'{}' * 20000)",
    "curves.png": "P.plot_curves(recs, envs, 0, 5, 4, [0.9, 0.8, 0.7], out / 'curves.png')",
    "kept_share.png": "P.plot_kept_share(report, envs, 0.2, out / 'kept_share.png')",
    "checkpoint_last.pt": "O.atomic_torch_save({'w': torch.randn(100_000)}, out / 'checkpoint_last.pt')",
    "results.jsonl": "O.append_record(out / 'results.jsonl', {'x': 'y' * 20000})",
}
CHILD = """
import sys
from pathlib import Path
import torch
from scmd import outputs as O, plots as P
from scmd.run import cli
out = Path(sys.argv[1])
envs = ['a', 'b', 'c']
recs = [{'step': s, **{f'env{i}_{sp}_acc': 0.5 for i in range(3) for sp in ('in', 'out')}} for s in (0, 4, 8)]
report = {'windows': [{'first_step': s, 'rows_seen': [8, 8, 8], 'kept_share': [0.1, 0.3, 0.6]} for s in (0, 4)]}
sys.exit(cli(lambda argv: {writer} or 0, []))
"""


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_writer_under_a_file_size_limit_is_one_line_and_keeps_the_previous_file(tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"previous")
    r = _run([sys.executable, "-c", CHILD.replace("{writer}", WRITERS[name]), str(out)], limit=10_000, cwd=ROOT)
    _error_line(r.stderr, 2, r.returncode, str(out / name), TOO_LARGE)
    assert (out / name).read_bytes() == b"previous"
    _no_temp_files(out)


def test_lock_holder_file_under_a_file_size_limit(tmp_path, data_dir):
    out = tmp_path / "run"
    r = _run(_cmd(data_dir, out), limit=20)
    _error_line(r.stderr, 2, r.returncode, str(out / ".lock.holder"), TOO_LARGE)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_embedded_world_generation_under_a_file_size_limit_leaves_no_half_world(tmp_path):
    data = tmp_path / "data"
    r = _run(_cmd(data, tmp_path / "run"), limit=1000)  # each image is larger
    _error_line(r.stderr, 2, r.returncode, str(data), TOO_LARGE)
    assert list(data.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# a real full disk: a 2 MiB tmpfs (root only; skipped where mounting is not allowed)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a 2 MiB tmpfs is not allowed here ({r.stderr.strip() or r.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_on_a_real_small_disk_is_one_line_and_leaves_no_temp_file(small_disk, data_dir):
    out = small_disk / "run"
    r = _run(_cmd(data_dir, out))  # the step-0 checkpoints (3 and 12 MB) do not fit
    _error_line(r.stderr, 2, r.returncode, str(out / "checkpoint_"), "disk full")
    _no_temp_files(out)
    assert not (out / "done").exists()


# ---------------------------------------------------------------------------------------------------------
# a stop signal during start-up


def _start(data_dir: Path, out: Path, *extra):
    return subprocess.Popen(_cmd(data_dir, out, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(p, text: str) -> str:
    seen = ""
    for line in p.stderr:
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never appeared on stderr:\n{seen}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["imports", "generating the world", "zero-shot pass"])
def test_a_stop_signal_during_start_up_is_one_line_and_leaves_nothing_partial(tmp_path, data_dir, sig, moment):
    out = tmp_path / "run"
    seen = ""
    if moment == "imports":
        p = _start(data_dir, out)
        time.sleep(1.0)  # torch is still loading
    elif moment == "generating the world":
        data_dir = tmp_path / "data"
        p = _start(data_dir, out, "--world-per-class", "40")
        deadline = time.time() + 300
        while not list(data_dir.glob(".embedded_world_n40.tmp-*/*/*/*.png")) and time.time() < deadline:
            time.sleep(0.01)
    else:
        p = _start(data_dir, out)
        seen = _wait_for(p, "[scmd] hparams:")  # the last start-up line: the teacher's zero-shot pass follows
    p.send_signal(sig)
    err = seen + p.communicate(timeout=300)[1]
    _error_line(err, 128 + sig, p.returncode, f"stopped by {signal.Signals(sig).name} during start-up")
    if out.exists():
        assert sorted(q.name for q in out.iterdir()) in ([], [".lock"]), list(out.iterdir())
    if moment == "generating the world":
        assert list(data_dir.iterdir()) == []  # no half-generated world
