"""Exact resume: a run killed with SIGKILL at random moments (more than once), or stopped by SIGTERM, and resumed
ends with bit-identical weights and the same results.jsonl records (timing fields aside) as an uninterrupted run.
While a run holds its folder, a second run into it is refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scmd import world

ROOT = Path(__file__).resolve().parent.parent
STEPS = 14
ARGS = ["--world-per-class", "6", "--steps", str(STEPS), "--checkpoint-freq", "4", "--save-every", "1",
        "--no-progress", "--workers", "0"]
TIMING = ("step_time", "mem_gb")


def _cmd(data_dir: Path, out: Path):
    return [sys.executable, str(ROOT / "scmd_ref.py"), "--data-dir", str(data_dir), "--output-dir", str(out), *ARGS]


def _ckpt_step(out: Path) -> int:
    try:
        return torch.load(out / "checkpoint_last.pt", weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - absent or being replaced
        return -1


def _records(out: Path):
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        for k in TIMING:
            r.pop(k)
        r["args"].pop("output_dir")
        r["scmd_args"].pop("output_dir")
    return recs


ENV = dict(os.environ, OMP_NUM_THREADS="1")
pytestmark = pytest.mark.slow  # every test here runs scmd_ref.py processes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data folder, folder of an uninterrupted run)."""
    tmp = tmp_path_factory.mktemp("resume")
    data_dir = tmp / "data"
    world.ensure_dataset(data_dir, progress=False, n_per_class=6)
    ref = tmp / "uninterrupted"
    r = subprocess.run(_cmd(data_dir, ref), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return data_dir, ref


def _assert_same_run(ref: Path, out: Path, n_steps: int = STEPS) -> None:
    a = torch.load(ref / "checkpoint_last.pt", weights_only=True)
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert a["step"] == b["step"] == n_steps - 1
    for part in ("student", "sma", "projector"):
        for k, v in a["trainer"][part].items():
            assert torch.equal(v, b["trainer"][part][k]), (part, k)
    assert torch.equal(a["trainer"]["theta"], b["trainer"]["theta"])
    for k, v in a["tracker"].items():  # bit-identical bookkeeping (NaN marks never-seen samples)
        if torch.is_tensor(v):
            torch.testing.assert_close(v, b["tracker"][k], rtol=0, atol=0, equal_nan=True, msg=k)
        else:
            assert v == b["tracker"][k], k
    assert _records(ref) == _records(out)
    assert json.loads((ref / "hardness.json").read_text())["domains"] == json.loads(
        (out / "hardness.json").read_text())["domains"]
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_sigkill_at_random_steps_then_resume_is_exact(tmp_path, reference):
    data_dir, ref = reference
    env = ENV

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    targets = sorted(rng.sample(range(1, STEPS - 2), 3))
    for target in targets:
        p = subprocess.Popen(_cmd(data_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        deadline = time.time() + 300
        while _ckpt_step(out) < target and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # land anywhere inside the next step (or its checkpoint write)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    r = subprocess.run(_cmd(data_dir, out), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert kills >= 2, f"only {kills} kills landed"
    print(f"killed {kills} times with SIGKILL, resumed {kills} times")

    _assert_same_run(ref, out)


def test_a_second_run_into_a_held_folder_exits_2_naming_the_holder(tmp_path, reference):
    from scmd import outputs

    data_dir, _ = reference
    out = tmp_path / "held"
    out.mkdir()
    with outputs.run_lock(out):  # this test process holds the folder, as a running scmd_ref.py does
        r = subprocess.run(_cmd(data_dir, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("scmd_ref.py: error:") and str(out) in line and f"pid {os.getpid()}" in line, line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of a run was written
    r = subprocess.run(_cmd(data_dir, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # free again once the holder is gone


def _stop_midway_then_resume(tmp_path, data_dir, extra, kill) -> str:
    """An uninterrupted 40-step run (checkpoints only at evaluations 0, 10, 20, 30, 39), then the same command
    stopped by `kill(process)` after its step-10 checkpoint and rerun; returns the stopped process's stderr.
    The stop must exit 143 after a whole step, and the rerun must end as the uninterrupted run."""
    steps = ["--steps", "40", "--checkpoint-freq", "10", "--save-every", "1000", *extra]

    def cmd(out):
        return [*_cmd(data_dir, out), *steps]

    ref = tmp_path / "uninterrupted"
    r = subprocess.run(cmd(ref), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "stopped"
    p = subprocess.Popen(cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 300
    while _ckpt_step(out) < 10 and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill(p)
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 143, err
    stop = [ln for ln in err.splitlines() if "stopped by SIGTERM" in ln]
    assert len(stop) == 1 and "Traceback" not in err, err
    step = int(stop[0].split("after step ")[1].split(";")[0])
    assert _ckpt_step(out) == step and 10 <= step < 39, (step, err)
    r = subprocess.run(cmd(out), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} at step {step + 1}" in r.stderr
    _assert_same_run(ref, out, n_steps=40)
    return err


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path, reference):
    """SIGTERM (Slurm's notice before preemption) between two scheduled checkpoints: the run finishes its
    step, writes a checkpoint, says so in one line and exits 143; the same command resumes and ends as the
    uninterrupted run."""
    _stop_midway_then_resume(tmp_path, reference[0], [], lambda p: p.send_signal(signal.SIGTERM))


def test_sigterm_to_the_whole_process_group_with_loader_workers_stops_with_a_checkpoint(tmp_path, reference):
    """As Slurm signals every process of a job: the loader workers die of the SIGTERM too; the run still stops
    after a whole step with a checkpoint and exit 143, and the rerun resumes to the uninterrupted run's end."""
    _stop_midway_then_resume(tmp_path, reference[0], ["--workers", "1"], lambda p: os.killpg(p.pid, signal.SIGTERM))


def test_stale_selection_losses_stop_and_resume_exactly(tmp_path, reference):
    """--selection-losses stale feeds the tracker's recorded losses back into the ranking: the checkpoint's tracker
    state (times_scored, last_loss) and the per-step tie order make the resumed run end as the uninterrupted one."""
    _stop_midway_then_resume(tmp_path, reference[0], ["--selection-losses", "stale"],
                             lambda p: p.send_signal(signal.SIGTERM))
