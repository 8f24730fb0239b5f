"""Exact resume: a run killed with SIGKILL at random moments (more than once) and resumed each time ends with
bit-identical weights and the same results.jsonl records (timing fields aside) as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_sigkill_at_random_steps_then_resume_is_exact(tmp_path):
    data_dir = tmp_path / "data"
    world.ensure_dataset(data_dir, progress=False, n_per_class=6)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    ref = tmp_path / "uninterrupted"
    r = subprocess.run(_cmd(data_dir, ref), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

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

    a = torch.load(ref / "checkpoint_last.pt", weights_only=True)
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS - 1
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
