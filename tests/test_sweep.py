"""python -m scmd.sweep: the grid and its seeds line up with DomainBed's; a local sweep stopped mid-way and
launched again resumes and ends with the records of uninterrupted runs, and retrains nothing finished; submitit's
local executor runs a sweep; collect's tables from records whose values are known; bad inputs are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scmd import outputs as O
from scmd import sweep, world
from scmd.hparams import seed_hash

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _launch_args(data_dir, out, *more, extra=("--world-per-class", "6", "--checkpoint-freq", "10")):
    return ["launch", "--algorithms", "erm", "scmd", "--test-envs", "1", "--n-hparams", "1", "--n-trials", "1",
            "--steps", "30", "--data-dir", str(data_dir), "--output-dir", str(out), *more, "--", *extra]


def test_grid_and_seeds_are_domainbeds(tmp_path):
    a = sweep.parse(["launch", "--datasets", "vlcs", "embedded", "--algorithms", "SCMD", "erm", "--n-hparams", "2",
                     "--n-trials", "3", "--output-dir", str(tmp_path)])
    runs = sweep.plan(a)
    assert len(runs) == 2 * 4 * 2 * 2 * 3  # datasets x (4 envs each) x algorithms x hparams x trials
    r = next(r for r in runs if (r.dataset, r.algorithm, r.test_env, r.hparams_seed, r.trial_seed)
             == ("vlcs", "scmd", 2, 0, 0))
    assert r.seed == seed_hash("VLCS", "SCMD", [2], 0, 0) == 1719258486  # DomainBed's sweep seed of that run
    assert len({r.out for r in runs}) == len(runs)
    assert all(f"--seed {x.seed} " in " ".join(x.argv) + " " for x in runs)
    assert sweep.command(r)[1] == str(sweep.ROOT / "scmd_ref.py")  # one process per run by default


def test_gpus_per_run_starts_each_run_with_torchrun(tmp_path, capsys):
    a = sweep.parse(["launch", "--algorithms", "scmd", "--test-envs", "0", "--n-hparams", "1", "--n-trials", "1",
                     "--launcher", "multi_gpu", "--gpus-per-run", "2", "--output-dir", str(tmp_path), "--dry-run"])
    assert sweep.launch(a) == 0
    cmd = capsys.readouterr().out.strip().splitlines()[-1]
    assert "-m torch.distributed.run --standalone --nproc_per_node 2" in cmd and "scmd_ref.py --dataset embedded" in cmd


@pytest.mark.parametrize("argv,fragment", [
    (["launch", "--datasets", "mnist", "--output-dir", "x"], "unknown dataset"),
    (["launch", "--algorithms", "dann", "--output-dir", "x"], "unknown --algorithm"),
    (["launch", "--test-envs", "4", "--output-dir", "x"], "out of range"),
    (["launch", "--n-hparams", "0", "--output-dir", "x"], "--n-hparams and --n-trials must be >= 1"),
    (["launch", "--jobs", "0", "--output-dir", "x"], "--jobs"),
    (["launch", "--launcher", "slurm", "--output-dir", "x"], "--slurm-partition"),
    (["launch", "--slurm-param", "mem", "--output-dir", "x"], "K=V"),
    (["launch", "--gpus-per-run", "2", "--output-dir", "x"], "--gpus-per-run needs --launcher multi_gpu or slurm"),
    (["launch", "--gpus-per-run", "0", "--launcher", "multi_gpu", "--output-dir", "x"], "--gpus-per-run"),
    (["launch", "--algorithms", "erm", "--output-dir", "x", "--", "--selection-losses", "stale"],
     "--selection-losses stale needs an algorithm with selection"),
    (["status", "--output-dir", "/nonexistent/sweep"], "not a folder"),
    (["collect"], "required"),
])
def test_bad_input_is_one_line(argv, fragment, capsys):
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m scmd.sweep: error:") and fragment in err[0], err


def test_slurm_without_submitit_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    code = sweep.main(["launch", "--launcher", "slurm", "--slurm-partition", "gpu", "--test-envs", "0",
                       "--n-hparams", "1", "--n-trials", "1", "--output-dir", str(tmp_path)])
    assert code == 2 and "needs submitit: pip install submitit" in capsys.readouterr().err


def test_a_folder_of_other_settings_is_refused(tmp_path, capsys):
    args = ["launch", "--algorithms", "erm", "--test-envs", "0", "--n-hparams", "1", "--n-trials", "1",
            "--output-dir", str(tmp_path)]
    run = sweep.plan(sweep.parse(args))[0]
    Path(run.out).mkdir(parents=True)
    (Path(run.out) / O.DONE).write_text(json.dumps({**run.fingerprint, "steps": 3}))
    assert sweep.main(args) == 2
    line = capsys.readouterr().err.strip()
    assert "other settings (steps: 3 there, 5001 now)" in line and run.name in line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    world.ensure_dataset(d, progress=False, n_per_class=6)
    return d


def _records(out: Path):
    recs = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    for r in recs:
        for k in ("step_time", "mem_gb"):
            r.pop(k)
        r["args"].pop("output_dir")
        r["scmd_args"].pop("output_dir")
    return recs


@pytest.mark.slow
def test_local_sweep_stopped_and_launched_again_resumes_and_skips_finished_runs(tmp_path, data_dir):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "scmd.sweep", *_launch_args(data_dir, out, "--jobs", "2")]
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    runs = sweep.plan(sweep.parse(_launch_args(data_dir, out)))
    deadline = time.time() + 300
    while not any((Path(r.out) / O.CKPT_LAST).exists() for r in runs) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # the launcher forwards it to its runs, which stop with a checkpoint
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 130 and "launch again to resume" in text, text
    states = {r.name: sweep.state(Path(r.out)) for r in runs}
    assert "unfinished" in states.values() or "new" in states.values(), states  # something is left to do
    r2 = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert all(sweep.state(Path(r.out)) == "done" for r in runs)
    for r in runs:  # each run equals the same command run uninterrupted
        ref = tmp_path / f"ref_{r.name}"
        argv = [*r.argv[:-1], str(ref)]
        rr = subprocess.run([sys.executable, str(ROOT / "scmd_ref.py"), *argv], env=ENV, capture_output=True,
                            text=True, timeout=600)
        assert rr.returncode == 0, rr.stderr
        assert _records(ref) == _records(Path(r.out)), r.name
    logs = {r.name: (Path(r.out) / sweep.LOG_FILE).read_text().count("$ ") for r in runs}
    r3 = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r3.returncode == 0 and "2 done; 0 to run" in r3.stdout, r3.stdout
    assert logs == {r.name: (Path(r.out) / sweep.LOG_FILE).read_text().count("$ ") for r in runs}  # no new process
    st = subprocess.run([sys.executable, "-m", "scmd.sweep", "status", "--output-dir", str(out)], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert "embedded" in st.stdout and st.returncode == 0
    row = [ln.split() for ln in st.stdout.splitlines() if ln.startswith("embedded")]
    assert sorted(r[1] for r in row) == ["erm", "scmd"] and all(r[2] == "1" for r in row), st.stdout


@pytest.mark.slow
def test_submitit_local_executor_runs_a_sweep(tmp_path, data_dir):
    """As a user starts it (`python -m scmd.sweep launch --launcher slurm`, here with submitit's local executor):
    the job array is pickled from the scmd.sweep module, runs, and its run folder ends done."""
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    argv = ["launch", "--algorithms", "erm", "--test-envs", "2", "--n-hparams", "1", "--n-trials", "1",
            "--steps", "12", "--data-dir", str(data_dir), "--output-dir", str(out), "--launcher", "slurm",
            "--submitit-cluster", "local", "--", "--world-per-class", "6", "--checkpoint-freq", "5"]
    r = subprocess.run([sys.executable, "-m", "scmd.sweep", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "submitted 1 runs as job array" in r.stdout
    (run,) = sweep.plan(sweep.parse(argv))
    deadline = time.time() + 600
    while sweep.state(Path(run.out)) != "done" and time.time() < deadline:
        time.sleep(1)
    assert sweep.state(Path(run.out)) == "done"
    assert [r["step"] for r in O.read_records(Path(run.out) / O.RESULTS)] == [0, 5, 10, 11]


# ---------------------------------------------------------------------------------------------------------
# collect, from records whose values are known


def _fake_run(root: Path, alg: str, te: int, h: int, t: int, accs, done=True, stale=False):
    """A finished (or unfinished) run folder of the embedded world (4 envs): one record per (val, test) pair."""
    out = root / (f"embedded_{alg}_te{te}_h{h}_t{t}" + ("_stale" if stale else ""))
    out.mkdir(parents=True)
    db = sweep.DOMAINBED_ALGORITHM_NAME[alg]
    for step, (val, test) in enumerate(accs):
        rec = {"step": step, "args": {"dataset": "EmbeddedWorld", "algorithm": db, "test_envs": [te],
                                      "hparams_seed": h, "trial_seed": t},
               "scmd_args": {"selection_losses": "stale" if stale else "fresh"}}
        for e in range(4):
            rec[f"env{e}_out_acc"] = test + 0.01 if e == te else val  # oracle: test env out = test + 0.01
            rec[f"env{e}_in_acc"] = test if e == te else 0.0
        O.append_record(out / O.RESULTS, rec)
    fp = {"selection_losses": "stale"} if stale else {}
    (out / sweep.SWEEP_FILE).write_text(json.dumps({"dataset": "embedded", "algorithm": alg, "test_env": te,
                                                    "hparams_seed": h, "trial_seed": t, "out": str(out),
                                                    "fingerprint": fp}))
    if done:
        (out / O.DONE).write_text("{}")


def test_collect_selects_like_domainbed_and_marks_incomplete_cells(tmp_path):
    root = tmp_path / "sweep"
    # ERM, every env, trials 0 and 1, hparams 0 and 1: hparams 1 has the better validation in trial 0 only
    for te in range(4):
        for t in range(2):
            _fake_run(root, "erm", te, 0, t, [(0.5, 0.60 + 0.01 * te), (0.7, 0.70 + 0.01 * te + 0.02 * t)])
            _fake_run(root, "erm", te, 1, t, [(0.8 if t == 0 else 0.6, 0.90), (0.4, 0.10)])
    # SCMD: env 3 missing, env 2's trial 1 unfinished
    for te in range(3):
        for t in range(2):
            _fake_run(root, "scmd", te, 0, t, [(0.6, 0.5 + 0.1 * t)], done=not (te == 2 and t == 1))
    t_ = sweep.tables(root)
    iid = t_["selection"]["training-domain validation"]
    erm = iid["datasets"]["EmbeddedWorld"]["rows"]["ERM"]
    # trial 0: hparams 1 (val 0.8 at step 0) -> 0.90; trial 1: hparams 0 (val 0.7 at step 1) -> 0.72 + 0.01 te
    for te, cell in enumerate(erm["envs"]):
        vals = [0.90, 0.72 + 0.01 * te]
        assert cell["mean"] == pytest.approx(100 * sum(vals) / 2)
        assert cell["se"] == pytest.approx(100 * abs(vals[0] - vals[1]) / 2 / 2 ** 0.5)  # std(v/sqrt(n)), ddof 0
        assert cell["complete"] and cell["n"] == 2
    assert erm["avg"] == pytest.approx(sum(c["mean"] for c in erm["envs"]) / 4)
    scmd = iid["datasets"]["EmbeddedWorld"]["rows"]["SCMD"]
    assert scmd["envs"][3]["mean"] is None and scmd["avg"] is None  # a missing env: no average
    assert not scmd["envs"][2]["complete"] and scmd["envs"][1]["complete"]
    avg = iid["averages"]["ERM"]["EmbeddedWorld"]
    trial_means = [sum([0.90] * 4) / 4, sum(0.72 + 0.01 * te for te in range(4)) / 4]
    assert avg["mean"] == pytest.approx(100 * sum(trial_means) / 2) and avg["n"] == 2
    oracle = t_["selection"]["test-domain validation (oracle)"]["datasets"]["EmbeddedWorld"]["rows"]["ERM"]
    # the last step of each run; of the hparams seeds the best test-env out-split: hparams 0 (0.71..) > hparams 1
    for te, cell in enumerate(oracle["envs"]):
        assert cell["mean"] == pytest.approx(100 * ((0.70 + 0.01 * te) + (0.72 + 0.01 * te)) / 2)
    text = sweep.format_tables(t_, "text")
    assert "Averages (Table 1), model selection: training-domain validation" in text
    assert " *" in text and "X" in text
    md = sweep.format_tables(t_, "markdown")
    assert "| Algorithm | cartoon | painting | photo | sketch | Avg |" in md
    assert "\\pm" in sweep.format_tables(t_, "latex")


def test_collect_gives_stale_selection_losses_a_row_of_their_own(tmp_path):
    """Runs with --selection-losses stale are not the paper's SCMD: collect lists them as SCMD_stale, never averaged
    into SCMD's cells."""
    root = tmp_path / "sweep"
    for te in range(4):
        _fake_run(root, "scmd", te, 0, 0, [(0.6, 0.50)])
        _fake_run(root, "scmd", te, 0, 0, [(0.6, 0.30)], stale=True)
    rows = sweep.tables(root)["selection"]["training-domain validation"]["datasets"]["EmbeddedWorld"]["rows"]
    assert list(rows) == ["SCMD", "SCMD_stale"]
    assert [c["mean"] for c in rows["SCMD"]["envs"]] == pytest.approx([50.0] * 4)
    assert [c["mean"] for c in rows["SCMD_stale"]["envs"]] == pytest.approx([30.0] * 4)
    assert rows["SCMD_stale"]["complete"]


@pytest.mark.slow
def test_embedded_benchmark_is_a_sweep_that_collect_reads(tmp_path, data_dir, capsys):
    """bench/embedded_benchmark.py launches its runs through scmd.sweep: a second launch reuses them, status
    and collect read its folder, and collect's table has the benchmark's own accuracies."""
    from bench import embedded_benchmark as eb

    argv = ["--data-dir", str(data_dir), "--world-per-class", "6", "--steps", "4", "--envs", "0", "--seeds", "0",
            "--algorithms", "erm", "scmd-stale", "--parallel", "2", "--out", str(tmp_path)]
    eb.main(argv)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    bench = json.loads((folder / "benchmark.json").read_text())
    assert bench["finished"] == 2 and set(bench["runs"]) == {"erm_te0_s0", "scmd-stale_te0_s0"}
    assert json.loads((folder / "scmd-stale_te0_s0" / sweep.SWEEP_FILE).read_text())["fingerprint"][
        "selection_losses"] == "stale"
    capsys.readouterr()
    eb.main(argv + ["--dry-run"])  # launched again: nothing to do
    assert "2 done; 0 to run" in capsys.readouterr().out
    assert sweep.main(["collect", "--output-dir", str(folder), "--format", "json"]) == 0
    t = json.loads(capsys.readouterr().out)
    rows = t["selection"]["training-domain validation"]["datasets"]["EmbeddedWorld"]["rows"]
    assert rows["ERM"]["envs"][0]["mean"] == pytest.approx(100 * bench["runs"]["erm_te0_s0"])
    assert rows["SCMD_stale"]["envs"][0]["mean"] == pytest.approx(100 * bench["runs"]["scmd-stale_te0_s0"])
