"""Sweeps: DomainBed's grid of scmd_ref.py runs on this machine, on several GPUs or on a Slurm cluster (submitit),
their status, and DomainBed's results tables (the form of the paper's Table 1).

    python -m scmd.sweep launch --datasets vlcs pacs --algorithms erm scmd --n-hparams 5 --n-trials 3 \\
        --data-dir /data/domainbed --output-dir sweeps/table1 --launcher slurm --slurm-partition gpu
    python -m scmd.sweep status --output-dir sweeps/table1
    python -m scmd.sweep collect --output-dir sweeps/table1 [--format text|markdown|latex|json]

The grid is datasets x algorithms x test envs (default: each env held out in turn) x hparams seeds
(0 = the defaults, 1.. = random search) x trial seeds; each run's seed is DomainBed's
seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed), with DomainBed's dataset and algorithm
names, so runs line up with DomainBed's. Every run has its own folder, named by every setting that changes
its result; launching again skips finished runs, resumes unfinished ones (scmd_ref.py resumes exactly) and
never deletes anything. Arguments after `--` go to every scmd_ref.py run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from scmd import outputs as O
from scmd.datasets import DATASETS, canonical_dataset
from scmd.errors import DataError, ScmdError, UsageError, write_cause
from scmd.hparams import seed_hash
from scmd.settings import DOMAINBED_ALGORITHM_NAME

ROOT = Path(__file__).resolve().parent.parent
SWEEP_FILE = "sweep.json"  # a run's place in the grid and its command, written by `launch`
EXIT_FILE = "exit_code"  # the exit status of the run's last process, written by the launcher
LOG_FILE = "log.txt"
STOPPED = (130, 138, 143)  # stopped by a signal after a checkpoint: resumable, not failed


@dataclass
class Run:
    dataset: str
    algorithm: str
    test_env: int
    hparams_seed: int
    trial_seed: int
    seed: int
    out: str
    argv: List[str]  # scmd_ref.py's arguments
    fingerprint: dict
    gpus: int = 1  # > 1: one run on that many GPUs, started with torchrun (one process per GPU)

    @property
    def name(self) -> str:
        return Path(self.out).name


# ---------------------------------------------------------------------------------------------------------
# the grid


def plan(a) -> List[Run]:
    """Every run of the grid, its folder named by the fingerprint of the settings scmd_ref.py resolves."""
    sys.path.insert(0, str(ROOT))
    import scmd_ref
    from scmd import settings as S

    datasets = [canonical_dataset(d, list(DATASETS)) for d in a.datasets]
    algorithms = [S._canonical_algorithm(x, scmd_ref.ALGORITHMS) for x in a.algorithms]
    if a.n_hparams < 1 or a.n_trials < 1:
        raise UsageError(f"--n-hparams and --n-trials must be >= 1, got {a.n_hparams} and {a.n_trials}")
    runs = []
    for ds in datasets:
        envs = DATASETS[ds].envs
        test_envs = list(range(len(envs))) if a.test_envs is None else a.test_envs
        bad = [e for e in test_envs if not 0 <= e < len(envs)]
        if bad:
            raise UsageError(f"--test-envs {bad} out of range: {ds} has {len(envs)} domains (0..{len(envs) - 1})")
        for alg, te, h, t in itertools.product(algorithms, test_envs, range(a.n_hparams), range(a.n_trials)):
            seed = seed_hash(DATASETS[ds].domainbed_name, DOMAINBED_ALGORITHM_NAME[alg], [te], h, t)
            extra = (["--steps", str(a.steps)] if a.steps else []) + (["--hparams", a.hparams] if a.hparams else [])
            runs.append(make_run(ds, alg, te, h, t, seed, a.data_dir, [*extra, *a.extra], Path(a.output_dir),
                                 None, getattr(a, "gpus_per_run", 1)))
    return runs


def make_run(dataset: str, algorithm: str, test_env: int, hparams_seed: int, trial_seed: int, seed: int,
             data_dir: str, extra: List[str], output_dir: Path, name: Optional[str] = None, gpus: int = 1) -> Run:
    """One run: its scmd_ref.py arguments, the fingerprint of the settings they resolve to, and its folder
    (`name`, or <dataset>_<algorithm>_te_h_t_s_<fingerprint hash>) under output_dir."""
    sys.path.insert(0, str(ROOT))
    import scmd_ref
    from scmd import settings as S

    argv = ["--dataset", dataset, "--algorithm", algorithm, "--test-env", str(test_env), "--hparams-seed",
            str(hparams_seed), "--trial-seed", str(trial_seed), "--seed", str(seed), "--data-dir", data_dir,
            "--no-progress", *extra]
    s, hp = S.resolve(S.parse(scmd_ref.Settings, argv, scmd_ref.__doc__), scmd_ref.ALGORITHMS,
                      scmd_ref.fastsel is not None)
    fp = S.fingerprint(s, hp)
    name = name or S.run_name(s, fp)
    out = output_dir / name
    return Run(dataset, algorithm, test_env, hparams_seed, trial_seed, seed, str(out),
               [*argv, "--output-dir", str(out)], fp, gpus)


def command(run: Run) -> List[str]:
    launcher = [sys.executable] if run.gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(run.gpus)]  # torchrun
    return [*launcher, str(ROOT / "scmd_ref.py"), *run.argv]


# ---------------------------------------------------------------------------------------------------------
# a run's state


def state(out: Path) -> str:
    """done / running / failed / unfinished (stopped or killed; resumable) / new."""
    if (out / O.DONE).exists():
        return "done"
    if (out / O.LOCK).exists():
        from filelock import FileLock, Timeout

        lock = FileLock(str(out / O.LOCK))
        try:
            lock.acquire(timeout=0)
            lock.release()
        except Timeout:
            return "running"
    code = _exit_code(out)
    if code is not None and code != 0 and code not in STOPPED:
        return "failed"
    if (out / O.CKPT_LAST).exists():
        return "unfinished"
    return "new"


def _exit_code(out: Path) -> Optional[int]:
    try:
        return int((out / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def last_error(out: Path) -> str:
    try:
        lines = [ln for ln in (out / LOG_FILE).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
    return (errors or lines or ["(empty log)"])[-1][:300]


def _check_reuse(run: Run) -> None:
    """A finished folder is reused only when its done marker records this run's settings."""
    out = Path(run.out)
    if (out / O.DONE).exists():
        try:
            O.check_finished_run(out, run.fingerprint)
        except UsageError as e:
            raise UsageError(f"sweep run {run.name}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# launchers (each an existing engine: subprocesses in a thread pool, or submitit)


def run_process(run: Run, env: Dict[str, str]) -> int:
    """One scmd_ref.py process of a run, its output in the run's log, its exit status in the run's folder."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXIT_FILE).unlink(missing_ok=True)
    with open(out / LOG_FILE, "ab", buffering=0) as log:  # unbuffered: a failed write fails here, not at close
        try:
            header = memoryview(f"\n$ {shlex.join(command(run))}\n".encode())
            while header:
                header = header[log.write(header):]
        except OSError as e:
            raise DataError(f"cannot write {out / LOG_FILE}: {write_cause(e)}; free space, then launch again") \
                from None
        # its own session: a signal to the launcher reaches each run once, forwarded by stop_children
        proc = subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                start_new_session=True)
        _CHILDREN.add(proc)
        try:
            code = proc.wait()
        finally:
            _CHILDREN.discard(proc)
    O.atomic_write_bytes(out / EXIT_FILE, f"{code}\n".encode())
    return code


_CHILDREN: set = set()
_STOPPING = threading.Event()


def stop_children(timeout: float = 300) -> None:
    """SIGTERM to every running scmd_ref.py process (each finishes its step and writes a checkpoint), then wait."""
    _STOPPING.set()
    procs = list(_CHILDREN)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def launch_local(runs: List[Run], jobs: int, threads: int, gpus: Optional[List[str]] = None) -> Dict[str, int]:
    """`jobs` runs at once (local), or one run per GPU (or per group of --gpus-per-run GPUs) at a time (multi_gpu:
    CUDA_VISIBLE_DEVICES per run)."""
    import queue

    slots: queue.Queue[Optional[str]] = queue.Queue()
    for g in (gpus if gpus is not None else [None] * jobs):
        slots.put(g)
    results, lock, t0 = {}, threading.Lock(), time.time()

    def one(run: Run) -> None:
        gpu = slots.get()
        try:
            if _STOPPING.is_set():
                return
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            start = time.time()
            code = run_process(run, env)
            with lock:
                results[run.name] = code
                what = "done" if code == 0 else f"exit {code}: {last_error(Path(run.out))}"
                print(f"[sweep] {len(results)}/{len(runs)} {run.name}: {what} ({time.time() - start:.0f} s; "
                      f"{time.time() - t0:.0f} s in all)", flush=True)
        finally:
            slots.put(gpu)

    workers = len(gpus) if gpus is not None else jobs
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for f in [pool.submit(one, r) for r in runs]:
            f.result()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM to the launcher: every run stops with a checkpoint
        stop_children()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return results


class SlurmRun:
    """A run as a submitit job: on preemption or timeout submitit calls `checkpoint`, which stops the scmd_ref.py
    process with SIGTERM (it writes a checkpoint) and requeues the same job, which then resumes."""

    def __init__(self, run: Run, threads: int):
        self.run, self.threads = run, threads

    def __call__(self) -> int:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        code = run_process(self.run, env)
        if code != 0:
            raise RuntimeError(f"{self.run.name}: scmd_ref.py exited {code}: {last_error(Path(self.run.out))}")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        stop_children(timeout=120)
        return submitit.helpers.DelayedSubmission(SlurmRun(self.run, self.threads))


def launch_slurm(runs: List[Run], a) -> list:
    try:
        import submitit
    except ImportError:
        raise UsageError("--launcher slurm needs submitit: pip install submitit") from None
    folder = Path(a.output_dir) / "slurm"
    ex = submitit.AutoExecutor(folder=str(folder), cluster=a.submitit_cluster)
    params = {"timeout_min": a.slurm_time, "cpus_per_task": a.slurm_cpus_per_run, "slurm_array_parallelism":
              a.slurm_max_parallel, "name": "scmd"}
    if a.submitit_cluster != "local":
        params.update(slurm_partition=a.slurm_partition, gpus_per_node=a.slurm_gpus_per_run or a.gpus_per_run)
        extra = dict(kv.split("=", 1) for kv in a.slurm_param)
        if extra:
            params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    jobs = ex.submit_array([SlurmRun(r, a.threads) for r in runs])
    print(f"[sweep] submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0]}; submitit's logs in "
          f"{folder}; `python -m scmd.sweep status --output-dir {a.output_dir}` follows them")
    return jobs


def launch(a) -> int:
    return launch_runs(plan(a), a)


def launch_runs(runs: List[Run], a) -> int:
    """Start the runs that are not done or running (a: the launch options), after checking every finished folder
    holds these settings; writes each run's sweep file first, so that `status` and `collect` see every run."""
    for r in runs:
        _check_reuse(r)
    if a.launcher == "slurm" and not a.dry_run:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise UsageError("--launcher slurm needs submitit: pip install submitit") from None
    states = {r.name: state(Path(r.out)) for r in runs}
    todo = [r for r in runs if states[r.name] not in ("done", "running")]
    counts = {k: sum(v == k for v in states.values()) for k in ("done", "running", "unfinished", "failed", "new")}
    print(f"[sweep] {len(runs)} runs in {a.output_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
          + f"; {len(todo)} to run")
    if a.dry_run:
        for r in todo:
            print(shlex.join(command(r)))
        return 0
    for r in runs:  # every planned run is visible to status, started or not
        Path(r.out).mkdir(parents=True, exist_ok=True)
        O.atomic_write_bytes(Path(r.out) / SWEEP_FILE, json.dumps(asdict(r), indent=1).encode())
    if not todo:
        return 0
    if a.launcher == "slurm":
        launch_slurm(todo, a)
        return 0
    gpus = None
    if a.launcher == "multi_gpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            gpus = [g for g in visible.split(",") if g.strip()]
        else:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())]
        if not gpus:
            raise UsageError("--launcher multi_gpu: no GPU is visible here; use --launcher local")
        g = a.gpus_per_run
        if len(gpus) < g:
            raise UsageError(f"--gpus-per-run {g}: only {len(gpus)} GPU(s) visible here")
        gpus = [",".join(gpus[i:i + g]) for i in range(0, len(gpus) - g + 1, g)]  # one group per run at a time
    results = launch_local(todo, a.jobs, a.threads, gpus)
    failed = sorted(n for n, c in results.items() if c != 0)
    if failed:
        print(f"[sweep] {len(failed)} run(s) did not finish: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}"
              f"; `python -m scmd.sweep status --output-dir {a.output_dir}` shows why", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# status


def sweep_runs(output_dir: Path) -> List[dict]:
    if not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} is not a folder")
    runs = []
    for f in sorted(output_dir.glob(f"*/{SWEEP_FILE}")):
        try:
            runs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return runs


def status(a) -> int:
    runs = sweep_runs(Path(a.output_dir))
    if not runs:
        raise UsageError(f"{a.output_dir} holds no sweep runs (launch writes one {SWEEP_FILE} per run)")
    table: Dict[tuple, Dict[str, int]] = {}
    failed = []
    for r in runs:
        st = state(Path(r["out"]))
        table.setdefault((r["dataset"], r["algorithm"]), {}).setdefault(st, 0)
        table[(r["dataset"], r["algorithm"])][st] += 1
        if st == "failed":
            failed.append(r)
    cols = ["done", "running", "unfinished", "failed", "new"]
    print(f"{'dataset':<16}{'algorithm':<16}" + "".join(f"{c:>11}" for c in cols))
    for (ds, alg), c in sorted(table.items()):
        print(f"{ds:<16}{alg:<16}" + "".join(f"{c.get(k, 0):>11}" for k in cols))
    for r in failed:
        out = Path(r["out"])
        print(f"failed: {r['out']} (exit {_exit_code(out)}): {last_error(out)}; log {out / LOG_FILE}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# collect: DomainBed's model selection and tables


STALE_SUFFIX = "_stale"  # collect's row of runs with --selection-losses stale (e.g. SCMD_stale)


def load_records(output_dir: Path) -> List[dict]:
    """Every record of every run folder (a sweep's, or any folder of scmd_ref.py runs), with its folder. Runs
    with --selection-losses stale are a row of their own (algorithm name + _stale), never mixed with the paper's."""
    recs = []
    for f in sorted(output_dir.glob(f"*/{O.RESULTS}")):
        for r in O.read_records(f):
            if r.get("scmd_args", {}).get("selection_losses") == "stale":
                r["args"] = {**r["args"], "algorithm": r["args"]["algorithm"] + STALE_SUFFIX}
            recs.append({**r, "_folder": str(f.parent)})
    return recs


def training_domain_acc(run_records: List[dict]) -> Optional[dict]:
    """DomainBed's IIDAccuracySelectionMethod.run_acc: the record that scmd.outputs.training_domain_selection picks
    (the best mean out-split accuracy of the training envs, the first maximum); its test env in-split accuracy."""
    if not run_records:
        return None
    te = run_records[0]["args"]["test_envs"][0]
    n_envs = len([k for k in run_records[0] if k.startswith("env") and k.endswith("_out_acc")])
    sel = O.training_domain_selection(run_records, te, n_envs)
    return {"val_acc": sel["val_acc"], "test_acc": sel["record"][f"env{te}_in_acc"]}


def oracle_acc(run_records: List[dict]) -> Optional[dict]:
    """DomainBed's OracleSelectionMethod.run_acc: the last step's record, scored on the test env's out-split."""
    if not run_records:
        return None
    last = sorted(run_records, key=lambda r: r["step"])[-1]
    te = last["args"]["test_envs"][0]
    return {"val_acc": last[f"env{te}_out_acc"], "test_acc": last[f"env{te}_in_acc"]}


SELECTIONS = {"training-domain validation": training_domain_acc, "test-domain validation (oracle)": oracle_acc}


def sweep_accs(records: List[dict], run_acc) -> Dict[tuple, float]:
    """(dataset, algorithm, test_env, trial_seed) -> the test accuracy of the hparams seed with the best
    validation accuracy (DomainBed's sweep_acc: its sort is stable and then reversed, so of equal validation
    accuracies the one listed last wins; we list hparams seeds in ascending order)."""
    groups: Dict[tuple, Dict[int, List[dict]]] = {}
    for r in records:
        a = r["args"]
        if len(a["test_envs"]) != 1:
            continue
        key = (a["dataset"], a["algorithm"], a["test_envs"][0], a["trial_seed"])
        groups.setdefault(key, {}).setdefault(a["hparams_seed"], []).append(r)
    out = {}
    for key, by_hp in groups.items():
        accs = [acc for h in sorted(by_hp) if (acc := run_acc(by_hp[h])) is not None]
        if accs:
            out[key] = sorted(accs, key=lambda x: x["val_acc"])[::-1][0]["test_acc"]
    return out


def mean_se(values: Sequence[float]):
    """DomainBed's format_mean: 100 x mean, and 100 x std(values / sqrt(n)) (ddof 0), i.e. the standard error."""
    if not values:
        return None, None
    v = np.asarray(values, dtype=float)
    return 100 * float(np.mean(v)), 100 * float(np.std(v / np.sqrt(len(v))))


def tables(output_dir: Path) -> dict:
    """Per selection method: per dataset a row per algorithm (mean +/- s.e. over trials per held-out env, and the
    average of the env means), and the averages table (per trial, the mean over the held-out envs; then mean
    +/- s.e. over trials). A cell is complete when every run the sweep planned for it is done; incomplete cells
    are marked, and an average over a missing cell is not given. Run folders without a sweep file (e.g. the
    embedded benchmark's) count with the runs their records come from."""
    records = load_records(output_dir)
    planned = sweep_runs(output_dir)
    db_name = {ds: info.domainbed_name for ds, info in DATASETS.items()}
    ours = {v: k for k, v in db_name.items()}
    expected: Dict[tuple, List[dict]] = {}
    for r in planned:
        stale = r.get("fingerprint", {}).get("selection_losses") == "stale"
        alg = DOMAINBED_ALGORITHM_NAME[r["algorithm"]] + (STALE_SUFFIX if stale else "")
        expected.setdefault((db_name[r["dataset"]], alg, r["test_env"]), []).append(r)
    datasets = sorted({k[0] for k in expected} | {r["args"]["dataset"] for r in records})
    names = [n + v for n in DOMAINBED_ALGORITHM_NAME.values() for v in ("", STALE_SUFFIX)]
    algorithms = [n for n in names
                  if any(k[1] == n for k in expected) or any(r["args"]["algorithm"] == n for r in records)]
    out = {"selection": {}}
    for sel_name, run_acc in SELECTIONS.items():
        accs = sweep_accs(records, run_acc)
        per_ds, averages = {}, {}
        for ds in datasets:
            n_envs = len(DATASETS[ours[ds]].envs) if ds in ours else 1 + max(k[2] for k in accs if k[0] == ds)
            rows = {}
            for alg in algorithms:
                cells, complete_all = [], True
                for te in range(n_envs):
                    vals = [v for (d, a, e, t), v in sorted(accs.items()) if (d, a, e) == (ds, alg, te)]
                    folders = {r["out"] for r in expected.get((ds, alg, te), [])} | {
                        r["_folder"] for r in records if (r["args"]["dataset"], r["args"]["algorithm"],
                                                          r["args"]["test_envs"][0]) == (ds, alg, te)}
                    complete = bool(folders) and all(state(Path(f)) == "done" for f in folders)
                    m, se = mean_se(vals)
                    cells.append({"mean": m, "se": se, "n": len(vals), "complete": complete})
                    complete_all &= complete
                avg = None if any(c["mean"] is None for c in cells) else float(np.mean([c["mean"] for c in cells]))
                rows[alg] = {"envs": cells, "avg": avg, "complete": complete_all}
                trial_means = []
                trials = sorted({t for (d, a, e, t) in accs if (d, a) == (ds, alg)})
                for t in trials:
                    vals = [accs.get((ds, alg, te, t)) for te in range(n_envs)]
                    if all(v is not None for v in vals):
                        trial_means.append(float(np.mean(vals)))
                m, se = mean_se(trial_means)
                averages.setdefault(alg, {})[ds] = {"mean": m, "se": se, "n": len(trial_means),
                                                    "complete": complete_all and len(trial_means) == len(trials)}
            per_ds[ds] = {"envs": DATASETS[ours[ds]].envs if ds in ours else list(range(n_envs)), "rows": rows}
        for by_ds in averages.values():
            means = [by_ds[d]["mean"] for d in datasets]
            by_ds["Avg"] = {"mean": None if None in means else float(np.mean(means)),
                            "complete": all(by_ds[d]["complete"] for d in datasets)}
        out["selection"][sel_name] = {"datasets": per_ds, "averages": averages}
    out["dataset_order"], out["algorithms"] = datasets, algorithms
    return out


def _cell(c: dict, fmt: str) -> str:
    if c.get("mean") is None:
        return "X"
    pm = {"latex": " $\\pm$ ", "markdown": " ± "}.get(fmt, " +/- ")
    s = f"{c['mean']:.1f}" + (f"{pm}{c['se']:.1f}" if c.get("se") is not None else "")
    return s if c.get("complete", True) else s + " *"


def _render(header: List[str], rows: List[List[str]], fmt: str, title: str) -> str:
    if fmt == "markdown":
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    elif fmt == "latex":
        lines = [f"% {title}", "\\begin{tabular}{l" + "c" * (len(header) - 1) + "}", "\\toprule",
                 " & ".join(header) + " \\\\", "\\midrule"]
        lines += [" & ".join(r).replace("_", "\\_") + " \\\\" for r in rows] + ["\\bottomrule", "\\end{tabular}"]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_tables(t: dict, fmt: str) -> str:
    parts = []
    for sel_name, sel in t["selection"].items():
        for ds, d in sel["datasets"].items():
            header = ["Algorithm", *map(str, d["envs"]), "Avg"]
            rows = [[alg, *[_cell(c, fmt) for c in r["envs"]],
                     _cell({"mean": r["avg"], "complete": r["complete"]}, fmt)] for alg, r in d["rows"].items()]
            parts.append(_render(header, rows, fmt, f"{ds}, model selection: {sel_name}"))
        header = ["Algorithm", *t["dataset_order"], "Avg"]
        rows = [[alg, *[_cell(by_ds[ds], fmt) for ds in t["dataset_order"]], _cell(by_ds["Avg"], fmt)]
                for alg, by_ds in sel["averages"].items()]
        parts.append(_render(header, rows, fmt, f"Averages (Table 1), model selection: {sel_name}"))
    parts.append("* incomplete: not every planned run of the cell is done; X: no result")
    return "\n\n".join(parts)


def collect(a) -> int:
    out = Path(a.output_dir)
    if not out.is_dir():
        raise UsageError(f"--output-dir {out} is not a folder")
    t = tables(out)
    if not t["dataset_order"]:
        raise UsageError(f"{out} holds no results.jsonl records")
    text = json.dumps(t, indent=1) if a.format == "json" else format_tables(t, a.format)
    print(text)
    return 0


# ---------------------------------------------------------------------------------------------------------
# command line


def parse(argv: Optional[Sequence[str]]):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv

    class P(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"{message} (see --help)")

    p = P(prog="python -m scmd.sweep", description=__doc__.split("\n\n")[0],
          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    la = sub.add_parser("launch", help="run the grid (skips finished runs, resumes unfinished ones)")
    la.add_argument("--datasets", nargs="+", default=["embedded"])
    la.add_argument("--algorithms", nargs="+", default=["erm", "scmd"])
    la.add_argument("--test-envs", type=int, nargs="+", default=None, help="default: every env, one at a time")
    la.add_argument("--n-hparams", type=int, default=5, help="hparams seeds 0..N-1 (0: the defaults)")
    la.add_argument("--n-trials", type=int, default=3, help="trial seeds 0..N-1")
    la.add_argument("--steps", type=int, default=None, help="default: each dataset's protocol (5001)")
    la.add_argument("--hparams", default=None, help="JSON passed to every run (e.g. the authors' sweep JSON)")
    la.add_argument("--data-dir", default="./data")
    la.add_argument("--output-dir", required=True)
    la.add_argument("--launcher", choices=["local", "multi_gpu", "slurm"], default="local")
    la.add_argument("--jobs", type=int, default=1, help="local: runs at once")
    la.add_argument("--threads", type=int, default=1, help="torch threads per run")
    la.add_argument("--dry-run", action="store_true", help="print the commands of the runs to do")
    la.add_argument("--slurm-partition", default=None)
    la.add_argument("--slurm-time", type=int, default=24 * 60, help="minutes per job before Slurm stops it (the "
                                                                    "run is requeued and resumes)")
    la.add_argument("--gpus-per-run", type=int, default=1, help="multi_gpu, slurm: GPUs of one run; > 1 starts it "
                                                                "with torchrun, one process per GPU")
    la.add_argument("--slurm-gpus-per-run", type=int, default=None, help="GPUs a Slurm job asks for (default: "
                                                                         "--gpus-per-run)")
    la.add_argument("--slurm-cpus-per-run", type=int, default=8)
    la.add_argument("--slurm-max-parallel", type=int, default=64, help="array jobs at once")
    la.add_argument("--slurm-param", action="append", default=[], metavar="K=V", help="extra sbatch parameter")
    la.add_argument("--submitit-cluster", choices=["slurm", "local", "debug"], default="slurm",
                    help=argparse.SUPPRESS)  # submitit's executor; local/debug: tests without Slurm
    for name in ("status", "collect"):
        sp = sub.add_parser(name, help="counts per state and the failed runs' errors" if name == "status" else
                            "DomainBed's results tables (training-domain and oracle model selection)")
        sp.add_argument("--output-dir", required=True)
        if name == "collect":
            sp.add_argument("--format", choices=["text", "markdown", "latex", "json"], default="text")
    a = p.parse_args(argv)
    a.extra = extra
    if a.cmd == "launch":
        if a.jobs < 1 or a.threads < 1 or a.gpus_per_run < 1:
            raise UsageError(f"--jobs, --threads and --gpus-per-run must be >= 1, got {a.jobs}, {a.threads} and "
                             f"{a.gpus_per_run}")
        if a.gpus_per_run > 1 and a.launcher == "local":
            raise UsageError("--gpus-per-run needs --launcher multi_gpu or slurm (--launcher local runs use no GPU)")
        bad = [kv for kv in a.slurm_param if "=" not in kv]
        if bad:
            raise UsageError(f"--slurm-param takes K=V, got {bad[0]!r}")
        if a.launcher == "slurm" and a.submitit_cluster == "slurm" and not a.slurm_partition:
            raise UsageError("--launcher slurm needs --slurm-partition")
    return a


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the runs stop with checkpoints
    try:
        a = parse(argv)
        return {"launch": launch, "status": status, "collect": collect}[a.cmd](a)
    except ScmdError as e:
        print(f"python -m scmd.sweep: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("python -m scmd.sweep: stopped; the running runs wrote checkpoints: launch again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy: submitit pickles SlurmRun by reference to
    # scmd.sweep then (by value, a class of __main__ drags this module's locks and events along and fails)
    from scmd import sweep as _module

    try:
        sys.exit(_module.main())
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
