"""torchrun on the CPU (gloo, 2 processes) against one process on the same seed: the same kept sample ids at every
selecting step, the same weights after a few steps to float tolerance, the same records.

The tolerance: the gradients are summed over the ranks in another order, so they differ in the last bits; Adam
divides each gradient entry by its own running scale, and for an entry whose gradient is near zero (below Adam's
eps) a last-bit difference can change that weight's update by a visible fraction of the lr (8e-4 here). So every
weight tensor must agree on average to 1e-7 and every entry to 2e-4 (a quarter of one step of size lr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scmd import world

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "ddp_driver.py"
STEPS = 6
ARGS = ["--world-per-class", "6", "--steps", str(STEPS), "--checkpoint-freq", "5", "--save-every", "1",
        "--no-progress", "--workers", "0", "--device", "cpu"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp") / "data"
    world.ensure_dataset(d, progress=False, n_per_class=6)
    return d


def _run(tmp: Path, name: str, data_dir: Path, extra, nproc: int):
    out, log = tmp / name, tmp / f"{name}_kept"
    env = dict(os.environ, OMP_NUM_THREADS="1", SCMD_KEPT_LOG=str(log))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    r = subprocess.run([*launcher, str(DRIVER), "--data-dir", str(data_dir), "--output-dir", str(out), *ARGS, *extra],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = [json.loads(Path(f"{log}.{rank}.json").read_text()) for rank in range(nproc)]
    return out, kept, r.stderr


def _records(out: Path):
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.endswith("_acc") or k in ("step", "selecting", "loss")} for r in recs]


@pytest.mark.parametrize("algorithm,extra", [("scmd", []), ("erm", []), ("scmd", ["--selection-losses", "stale"])])
def test_two_processes_keep_the_same_ids_and_reach_the_same_weights_as_one(tmp_path, data_dir, algorithm, extra):
    extra = ["--algorithm", algorithm, *extra]
    one, kept1, _ = _run(tmp_path, "one", data_dir, extra, 1)
    two, kept2, err = _run(tmp_path, "two", data_dir, extra, 2)
    assert "2 process(es)" in err
    if algorithm != "erm":
        assert len(kept1[0]) == STEPS  # every step selects (cut-off 3750)
        assert kept2[0] == kept1[0] and kept2[1] == kept1[0]  # every rank keeps the ids one process keeps
    a = torch.load(one / "checkpoint_last.pt", weights_only=True)["trainer"]
    b = torch.load(two / "checkpoint_last.pt", weights_only=True)["trainer"]
    worst = 0.0
    for part in ("student", "sma") + (("projector",) if "projector" in a else ()):
        for k, v in a[part].items():
            if v.is_floating_point():
                d = (b[part][k] - v).abs()
                assert float(d.mean()) <= 1e-7 and float(d.max()) <= 2e-4, (part, k, float(d.mean()), float(d.max()))
                worst = max(worst, float(d.max()))
    print(f"{algorithm} {' '.join(extra)}: largest weight difference after {STEPS} steps {worst:.2e}")
    ra, rb = _records(one), _records(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            assert y[k] == pytest.approx(x[k], abs=1e-4), k
    assert not list(two.glob("*.tmp"))


def test_two_processes_stopped_by_sigterm_resume_exactly(tmp_path, data_dir):
    """SIGTERM to the whole torchrun job (as Slurm signals it): every rank stops after the same step, rank 0 writes
    the checkpoint, and the same command resumes to the uninterrupted 2-process run's weights, bit for bit."""
    import signal
    import time

    steps = ["--steps", "16", "--checkpoint-freq", "5"]
    ref, _, _ = _run(tmp_path, "ref", data_dir, steps, 2)
    out, log = tmp_path / "stopped", tmp_path / "stopped_kept"
    env = dict(os.environ, OMP_NUM_THREADS="1", SCMD_KEPT_LOG=str(log))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER),
           "--data-dir", str(data_dir), "--output-dir", str(out), *ARGS, *steps]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        try:
            if torch.load(out / "checkpoint_last.pt", weights_only=True)["step"] >= 2:
                break
        except Exception:  # noqa: BLE001 - absent or being replaced
            pass
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    err = p.communicate(timeout=600)[1]
    assert p.returncode != 0 and "stopped by SIGTERM after step" in err, err[-3000:]
    step = torch.load(out / "checkpoint_last.pt", weights_only=True)["step"]
    assert 2 <= step < 15, step
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and f"resuming {out} at step {step + 1}" in r.stderr, r.stderr[-3000:]
    a = torch.load(ref / "checkpoint_last.pt", weights_only=True)["trainer"]
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)["trainer"]
    for part in ("student", "sma", "projector"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert _records(ref) == _records(out)
