"""Accuracy benchmark on the embedded world: every algorithm x every held-out domain x several seeds.

    python bench/embedded_benchmark.py                      # 5 algorithms x 4 domains x 3 seeds
    python bench/embedded_benchmark.py --seeds 0 1 2 3 4 --parallel 2 --steps 1000

Each run is `scmd_ref.py --dataset embedded --algorithm A --test-env E --seed S --trial-seed S --eval-splits
selection` in its own output folder (finished runs are reused, so an interrupted benchmark continues). The test
accuracy of a run is DomainBed's training-domain validation choice: the held-out domain's in-split accuracy at
the record with the best mean out-split accuracy over the source domains. The table gives mean +- standard error
over seeds (np.std(ddof=0)/sqrt(n), DomainBed's convention) per held-out domain, for the mean over domains and
for the source domains' out-split accuracy at the selected step; the last block compares each algorithm with
ERM paired by (domain, seed). Writes JSON and a PNG next to the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["erm", "kd", "scmd-no-cm", "scmd-no-select", "scmd"]


def run_one(a, e, s, args) -> dict:
    out = Path(args.out) / f"{a}_te{e}_s{s}"
    summary = out / "summary.json"
    if not (out / "done").exists():
        cmd = [sys.executable, str(ROOT / "scmd_ref.py"), "--dataset", "embedded", "--algorithm", a, "--test-env",
               str(e), "--seed", str(s), "--trial-seed", str(s), "--output-dir", str(out), "--no-progress",
               "--data-dir", args.data_dir, "--eval-splits", args.eval_splits]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"run {out} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        print(f"  {a:<15} te{e} s{s}: {time.time() - t0:.0f}s", flush=True)
    return json.loads(summary.read_text())


def mean_se(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=0) / np.sqrt(len(xs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    p.add_argument("--envs", nargs="+", type=int, default=None, help="held-out domains (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="default: the world's default run length")
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--eval-splits", choices=["all", "selection"], default="selection",
                   help="scmd_ref.py --eval-splits; 'selection' skips the training envs' in-splits, which the "
                        "test accuracy never uses (same training, same selected step)")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "embedded"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from scmd import world

    world.ensure_dataset(args.data_dir)
    envs = args.envs if args.envs is not None else list(range(len(world.ENVIRONMENTS)))
    jobs = [(a, e, s) for s in args.seeds for e in envs for a in args.algorithms]
    print(f"{len(jobs)} runs, {args.parallel} at a time, {args.threads} thread(s) each", flush=True)
    t0 = time.time()
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: run_one(*j, args), jobs))
    acc = {(a, e, s): r["test_acc"] for (a, e, s), r in zip(jobs, results)}
    val = {(a, e, s): r["val_acc"] for (a, e, s), r in zip(jobs, results)}

    names = world.ENVIRONMENTS
    lines = [f"{'algorithm':<15}" + "".join(f"{names[e]:>15}" for e in envs) + f"{'mean':>15}"
             + f"{'source (val)':>15}"]
    table = {}
    for a in args.algorithms:
        cells = []
        for e in envs:
            m, se = mean_se([100 * acc[a, e, s] for s in args.seeds])
            cells.append(f"{m:>8.1f} ± {se:<4.1f}")
            table.setdefault(a, {})[names[e]] = {"mean": m, "se": se}
        m, se = mean_se([100 * np.mean([acc[a, e, s] for e in envs]) for s in args.seeds])
        table[a]["mean"] = {"mean": m, "se": se}
        vm, vse = mean_se([100 * np.mean([val[a, e, s] for e in envs]) for s in args.seeds])
        table[a]["source_val"] = {"mean": vm, "se": vse}
        lines.append(f"{a:<15}" + "".join(f"{c:>15}" for c in cells) + f"{m:>8.1f} ± {se:<4.1f}"
                     + f"{vm:>8.1f} ± {vse:<4.1f}")
    lines.append("")
    lines.append("paired difference to ERM over (domain, seed), percentage points: mean ± s.e. (n)")
    paired = {}
    for a in args.algorithms:
        if a == "erm" or "erm" not in args.algorithms:
            continue
        d = [100 * (acc[a, e, s] - acc["erm", e, s]) for e in envs for s in args.seeds]
        m, se = float(np.mean(d)), float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        paired[a] = {"mean": m, "se": se, "n": len(d)}
        lines.append(f"  {a:<15} {m:+6.2f} ± {se:.2f} ({len(d)})")
    text = "\n".join(lines)
    print(f"\nheld-out test accuracy (%), training-domain validation, mean ± s.e. over seeds {args.seeds}; "
          f"source (val) = mean out-split accuracy of the source domains at the selected step; "
          f"{time.time() - t0:.0f}s\n{text}")
    out = Path(args.out)
    (out / "benchmark.json").write_text(json.dumps(
        {"table": table, "paired_vs_erm": paired, "runs": {f"{a}_te{e}_s{s}": v for (a, e, s), v in acc.items()},
         "runs_source_val": {f"{a}_te{e}_s{s}": v for (a, e, s), v in val.items()},
         "settings": vars(args), "envs": [names[e] for e in envs]}, indent=1))
    plot(table, args.algorithms, [names[e] for e in envs], out / "benchmark.png")
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.png'}")


def plot(table, algorithms, env_names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = env_names + ["mean"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    w = 0.8 / len(algorithms)
    for i, a in enumerate(algorithms):
        ms = [table[a][c]["mean"] for c in cols]
        ses = [table[a][c]["se"] for c in cols]
        ax.bar(np.arange(len(cols)) + i * w, ms, w, yerr=ses, label=a, capsize=2)
    ax.set_xticks(np.arange(len(cols)) + w * (len(algorithms) - 1) / 2, cols)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Embedded world: test accuracy by held-out domain (± s.e. over seeds)")
    ax.legend(fontsize=8, ncol=len(algorithms))
    lo = min(table[a][c]["mean"] for a in algorithms for c in cols)
    ax.set_ylim(max(0, lo - 15), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
