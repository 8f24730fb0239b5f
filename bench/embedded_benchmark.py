"""Accuracy benchmark on the embedded world: every algorithm x every held-out domain x several seeds, at the
protocol of every dataset (5001 steps, evaluation every 300, selection cut-off 3750, the spec's hparams).

    python bench/embedded_benchmark.py --parallel 2 --threads 1     # 5 algorithms x 4 domains x 3 seeds
    python bench/embedded_benchmark.py --report                     # the table of the runs finished so far
    python bench/embedded_benchmark.py --algorithms scmd scmd-stale # --selection-losses stale against the paper's

The benchmark is a sweep of scmd.sweep over the one dataset `embedded`, launched by its local launcher: each run
is `scmd_ref.py --dataset embedded --algorithm A --test-env E --hparams-seed 0 --trial-seed S --seed S --eval-splits
selection` (the run seed is the trial seed here, not DomainBed's seed_hash, so that seed S is the same run in every
benchmark) in its own folder `<out>/<world version>_<settings>/<A>_te<E>_s<S>`, with the sweep's log, exit code
and sweep file. A finished folder is reused only when its recorded settings equal the requested ones (an
unfinished one continues from its checkpoint), so an interrupted benchmark continues, a benchmark with other
settings never reuses these runs, and `python -m scmd.sweep status|collect --output-dir <that folder>` work on
it (collect: the Table-1 form). Runs are scheduled seed by seed, erm and scmd first within a seed, so that a
partial benchmark already holds paired comparisons.

The test accuracy of a run is DomainBed's training-domain validation choice: the held-out domain's in-split
accuracy at the record with the best mean out-split accuracy over the source domains. The table gives mean +-
standard error over seeds (np.std(ddof=0)/sqrt(n), DomainBed's convention) per held-out domain, for the mean
over domains and for the source domains' out-split accuracy at the selected step; then each algorithm's paired
difference to ERM over (domain, seed) with its standard error, and the per-domain kept share of the selecting
algorithms. Writes benchmark.json (with WORLD_VERSION and the commit), benchmark.png (the table),
curves.png (held-out and source accuracy against step, mean over seeds, erm / scmd-no-select / scmd, the
selection cut-off marked) and kept_share.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["erm", "kd", "scmd-no-cm", "scmd-no-select", "scmd"]  # table order (the default set)
# variants: a benchmark name -> (scmd_ref.py --algorithm, extra flags), and the algorithm they are paired with
VARIANTS = {"scmd-stale": ("scmd", ["--selection-losses", "stale"], "scmd")}
KNOWN = ALGORITHMS + list(VARIANTS)
SCHEDULE = ["erm", "scmd", "scmd-stale", "scmd-no-select", "kd", "scmd-no-cm"]  # run order: main comparison first
CURVE_ALGORITHMS = ["erm", "scmd-no-select", "scmd", "scmd-stale"]


def run_dir(args, a, e, s) -> Path:
    return Path(args.out) / args.tag / f"{a}_te{e}_s{s}"


def sweep_run(args, a, e, s):
    """The run as one of scmd.sweep's: hparams seed 0 (the defaults), run seed = trial seed = s, its own folder."""
    from scmd import sweep

    algorithm, extra, _ = VARIANTS.get(a, (a, [], None))
    extra = [*extra, "--eval-splits", args.eval_splits, *(["--steps", str(args.steps)] if args.steps else []),
             *(["--world-per-class", str(args.world_per_class)] if args.world_per_class else [])]
    return sweep.make_run("embedded", algorithm, e, 0, s, s, args.data_dir, extra, Path(args.out) / args.tag,
                          run_dir(args, a, e, s).name)


def load_run(out: Path):
    """(summary, records, hardness) of a finished run, or None."""
    if not (out / "done").exists():
        return None
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    hard = out / "hardness.json"
    return json.loads((out / "summary.json").read_text()), recs, json.loads(hard.read_text()) if hard.exists() else None


def train_seconds(recs) -> float:
    """Training time of a run (evaluation excluded): each record's mean step time times its window's steps."""
    steps = [-1] + [r["step"] for r in recs]
    return float(sum(r["step_time"] * (b - a) for r, a, b in zip(recs, steps, steps[1:])))


def mean_se(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=0) / np.sqrt(len(xs)))


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def report(args, envs, names, world_version) -> None:
    runs = {}
    for a in args.algorithms:
        for e in envs:
            for s in args.seeds:
                r = load_run(run_dir(args, a, e, s))
                if r is not None:
                    runs[a, e, s] = r
    total = len(args.algorithms) * len(envs) * len(args.seeds)
    acc = {k: r[0]["test_acc"] for k, r in runs.items()}
    val = {k: r[0]["val_acc"] for k, r in runs.items()}
    complete = [a for a in args.algorithms if all((a, e, s) in acc for e in envs for s in args.seeds)]
    lines = [f"{'algorithm':<15}" + "".join(f"{names[e]:>15}" for e in envs) + f"{'mean':>15}{'source (val)':>15}"]
    table = {}
    for a in args.algorithms:
        cells, row = [], {}
        for e in envs:
            xs = [100 * acc[a, e, s] for s in args.seeds if (a, e, s) in acc]
            if xs:
                m, se = mean_se(xs)
                row[names[e]] = {"mean": m, "se": se, "n": len(xs)}
                cells.append(f"{m:.1f} ± {se:.1f}" + ("" if len(xs) == len(args.seeds) else f" ({len(xs)})"))
            else:
                cells.append("-")
        if a in complete:
            row["mean"] = dict(zip(["mean", "se"], mean_se([100 * np.mean([acc[a, e, s] for e in envs])
                                                             for s in args.seeds])))
            row["source_val"] = dict(zip(["mean", "se"], mean_se([100 * np.mean([val[a, e, s] for e in envs])
                                                                   for s in args.seeds])))
            tail = f"{row['mean']['mean']:.1f} ± {row['mean']['se']:.1f}", \
                f"{row['source_val']['mean']:.1f} ± {row['source_val']['se']:.1f}"
        else:
            tail = ("-", "-")
        table[a] = row
        lines.append(f"{a:<15}" + "".join(f"{c:>15}" for c in cells) + f"{tail[0]:>15}{tail[1]:>15}")
    lines += ["", "paired difference to ERM (and of a variant to its algorithm) over (domain, seed), percentage "
                  "points: mean ± s.e. (n pairs)"]
    paired = {}
    for a in args.algorithms:
        for base in (["erm", VARIANTS[a][2]] if a in VARIANTS else ["erm"]):
            pairs = [100 * (acc[a, e, s] - acc[base, e, s]) for e in envs for s in args.seeds
                     if a != base and (a, e, s) in acc and (base, e, s) in acc]
            if pairs:
                m = float(np.mean(pairs))
                se = float(np.std(pairs, ddof=1) / np.sqrt(len(pairs))) if len(pairs) > 1 else float("nan")
                paired[a if base == "erm" else f"{a} - {base}"] = {"mean": m, "se": se, "n": len(pairs)}
                lines.append(f"  {a if base == 'erm' else f'{a} vs {base}':<15} {m:+6.2f} ± {se:.2f} ({len(pairs)})")
    secs = {a: [train_seconds(runs[a, e, s][1]) for e in envs for s in args.seeds if (a, e, s) in runs]
            for a in args.algorithms}
    lines += ["", "training time per run (evaluation excluded), median over the finished runs, seconds"]
    lines += [f"  {a:<15} {np.median(v):7.0f} ({len(v)})" for a, v in secs.items() if v]
    kept = kept_shares(runs, envs, names)
    if kept:
        lines += ["", "kept share of each source domain's rows while selecting (p = 0.2 if no domain is preferred), "
                      "mean over seeds; rows: algorithm, held-out domain"]
        for (a, e), shares in kept.items():
            lines.append(f"  {a:<15} {names[e]:<10} " + "  ".join(f"{d} {v:.3f}" for d, v in shares.items()))
    text = "\n".join(lines)
    print(f"\n{len(runs)} of {total} runs finished ({args.tag}, commit {git_commit()})\n"
          f"held-out test accuracy (%), training-domain validation, mean ± s.e. over seeds {args.seeds} (a count in "
          f"brackets: seeds finished so far); source (val) = mean out-split accuracy of the source domains at the "
          f"selected step\n{text}")
    out = Path(args.out) / args.tag
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(
        {"world_version": world_version, "commit": git_commit(), "finished": len(runs), "total": total,
         "table": table, "paired_vs_erm": paired,
         "kept_share": {f"{a}_te{e}": v for (a, e), v in kept.items()},
         "runs": {f"{a}_te{e}_s{s}": v for (a, e, s), v in acc.items()},
         "runs_source_val": {f"{a}_te{e}_s{s}": v for (a, e, s), v in val.items()},
         "runs_train_seconds": {f"{a}_te{e}_s{s}": train_seconds(r[1]) for (a, e, s), r in runs.items()},
         "settings": {k: v for k, v in vars(args).items() if k not in ("report", "dry_run")},
         "envs": [names[e] for e in envs]},
        indent=1))
    plot_table(table, args.algorithms, [names[e] for e in envs], out / "benchmark.png")
    plot_curves(runs, args, envs, names, out / "curves.png")
    if kept:
        plot_kept(kept, names, out / "kept_share.png")
    print(f"wrote {out / 'benchmark.json'}, benchmark.png, curves.png" + (", kept_share.png" if kept else ""))


def kept_shares(runs, envs, names) -> dict:
    """(algorithm, held-out env) -> {source domain: kept share}, mean over the seeds finished."""
    acc = {}
    for (a, e, _s), (_summary, _recs, hard) in runs.items():
        if hard is None:
            continue
        for d in hard["domains"]:
            if d["kept_share"] is not None:
                acc.setdefault((a, e), {}).setdefault(names[d["domain"]], []).append(d["kept_share"])
    return {k: {d: float(np.mean(v)) for d, v in sorted(ds.items())} for k, ds in sorted(acc.items())}


def plot_table(table, algorithms, env_names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = env_names + ["mean"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    w = 0.8 / len(algorithms)
    for i, a in enumerate(algorithms):
        ms = [table[a].get(c, {}).get("mean", np.nan) for c in cols]
        ses = [table[a].get(c, {}).get("se", 0.0) for c in cols]
        ax.bar(np.arange(len(cols)) + i * w, ms, w, yerr=ses, label=a, capsize=2)
    ax.set_xticks(np.arange(len(cols)) + w * (len(algorithms) - 1) / 2, cols)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Embedded world: test accuracy by held-out domain (± s.e. over seeds)")
    ax.legend(fontsize=8, ncol=len(algorithms))
    lows = [table[a][c]["mean"] for a in algorithms for c in cols if c in table[a]]
    ax.set_ylim(max(0, min(lows, default=0) - 15), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs, args, envs, names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(envs), figsize=(3.2 * len(envs), 5.6), sharex=True, squeeze=False)
    cutoff = None
    for j, e in enumerate(envs):
        for a in [a for a in CURVE_ALGORITHMS if a in args.algorithms]:
            curves = []
            for s in args.seeds:
                if (a, e, s) not in runs:
                    continue
                recs = runs[a, e, s][1]
                src = [k for k in range(len(names)) if k != e]
                curves.append([(r["step"], 100 * r[f"env{e}_in_acc"],
                                100 * np.mean([r[f"env{k}_out_acc"] for k in src])) for r in recs])
                sel = [r["step"] for r in recs if r.get("selecting")]
                if sel and a == "scmd":
                    cutoff = max(sel[-1], cutoff or 0)
            if not curves:
                continue
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves])
            axes[0, j].plot(arr[0, :, 0], arr[:, :, 1].mean(0), label=f"{a} ({len(curves)})")
            axes[1, j].plot(arr[0, :, 0], arr[:, :, 2].mean(0), label=a)
        axes[0, j].set_title(f"held out: {names[e]}")
        axes[1, j].set_xlabel("step")
    for ax in axes.flat:
        if cutoff is not None:
            ax.axvline(cutoff, color="grey", linestyle=":", linewidth=1)
    axes[0, 0].set_ylabel("held-out in-split acc (%)")
    axes[1, 0].set_ylabel("source out-split acc (%)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Embedded world: accuracy against step, mean over seeds (dotted: last selecting evaluation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kept(kept, names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(kept)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(keys), 3.5))
    w = 0.8 / len(names)
    for i, d in enumerate(names):
        ax.bar(np.arange(len(keys)) + i * w, [kept[k].get(d, np.nan) for k in keys], w, label=d)
    ax.axhline(0.2, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(keys)) + w * (len(names) - 1) / 2, [f"{a}\nte {names[e]}" for a, e in keys],
                  fontsize=7)
    ax.set_ylabel("kept share of the domain's rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    p.add_argument("--envs", nargs="+", type=int, default=None, help="held-out domains (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="default: the dataset's protocol (5001)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--eval-splits", choices=["all", "selection"], default="selection",
                   help="scmd_ref.py --eval-splits; 'selection' skips the training envs' in-splits, which the "
                        "test accuracy never uses (same training, same selected step)")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "embedded"))
    p.add_argument("--report", action="store_true", help="only print and save the table of the finished runs")
    p.add_argument("--world-per-class", type=int, default=None,
                   help="a partial world (N images per domain and class; quick checks, a folder of its own)")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs to do")
    args = p.parse_args(argv)
    unknown = sorted(set(args.algorithms) - set(KNOWN))
    if unknown or args.parallel < 1 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        print(f"embedded_benchmark.py: error: unknown algorithms {unknown} (choose from {KNOWN}), or "
              f"--parallel/--threads/--steps below 1", file=sys.stderr)
        raise SystemExit(2)
    sys.path.insert(0, str(ROOT))
    from scmd import world

    part = f"_n{args.world_per_class}" if args.world_per_class else ""
    args.tag = f"{world.WORLD_VERSION}{part}_steps{args.steps or 'default'}_eval-{args.eval_splits}"
    envs = args.envs if args.envs is not None else list(range(len(world.ENVIRONMENTS)))
    names = world.ENVIRONMENTS
    if not args.report:
        world.ensure_dataset(args.data_dir, n_per_class=args.world_per_class)
        from types import SimpleNamespace

        from scmd import sweep
        from scmd.errors import ScmdError

        order = [a for a in SCHEDULE if a in args.algorithms]
        launch = SimpleNamespace(launcher="local", dry_run=args.dry_run, output_dir=str(Path(args.out) / args.tag),
                                 jobs=args.parallel, threads=args.threads, gpus_per_run=1)
        t0 = time.time()
        try:
            runs = [sweep_run(args, a, e, s) for s in args.seeds for a in order for e in envs]  # seed by seed
            print(f"{len(runs)} runs, {args.parallel} at a time, {args.threads} thread(s) each, in "
                  f"{launch.output_dir}; commit {git_commit()}", flush=True)
            code = sweep.launch_runs(runs, launch)
        except ScmdError as err:
            print(f"embedded_benchmark.py: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        if args.dry_run:
            return
        print(f"launch finished in {time.time() - t0:.0f}s", flush=True)
        if code != 0:
            raise SystemExit(code)
    report(args, envs, names, world.WORLD_VERSION)


if __name__ == "__main__":
    main()
