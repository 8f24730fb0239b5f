"""How stale are the losses that --selection-losses stale ranks by, and how much of the fresh top-k does it keep?

    python bench/stale_selection.py                      # embedded world, held out 0, seed 0, the selecting steps
    python bench/stale_selection.py --test-env 3 --steps 1000

Runs scmd_ref.py's own training loop (`scmd_ref.main`) with --selection-losses stale and, at every selecting step,
also computes what the faithful mode would have ranked: the selection pass's per-sample CE on the same batch with the
same weights (under a saved and restored RNG state, so the run itself is the stale run unchanged). Prints and saves
(JSON) per window of steps and overall:
  - the overlap |stale top-k  ∩  fresh top-k| / k of the kept row positions (1.0: the same kept set; a random
    choice of k of N rows gives k/N on average, printed as the chance level);
  - the age of the ranking losses: step minus the step at which each candidate's recorded CE was measured, median
    over the kept rows and over every scored candidate;
  - the share of candidates never scored (ranked first, in a random order).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import scmd_ref as S  # noqa: E402
from scmd import data as D  # noqa: E402
from scmd.stale import StaleStep  # noqa: E402


class Probe:
    """Wraps the stale variant's update (scmd.stale.StaleStep): before each selecting step, the fresh ranking of the
    same batch."""

    def __init__(self, window: int):
        self.window, self.rows = window, []
        self.scored_at = None  # step at which each sample's recorded CE was measured

    def wrap(self, update):
        probe = self

        def probed_update(tr, x, y, domains, ids, step):
            if not tr.selecting(step):
                return update(tr, x, y, domains, ids, step)
            sel = tr.selector
            if probe.scored_at is None:
                probe.scored_at = np.full(sel.tracker.n_samples, -1, np.int64)
            rng = torch.get_rng_state()
            full = x.all() if isinstance(x, D.LazyImages) else x  # (the run itself augments only the kept rows)
            fresh = S.select_hardest(tr.per_sample_ce(full, y).float().cpu(), int(len(y) * tr.worst_case_p)).numpy()
            torch.set_rng_state(rng)  # the run stays the stale run
            stale = sel.stale_keep(domains, ids, step).numpy()
            at = probe.scored_at[ids.numpy()]
            age = np.where(at >= 0, step - at, -1)
            probe.rows.append({"step": step, "overlap": len(np.intersect1d(stale, fresh)) / len(fresh),
                               "chance": len(fresh) / len(y), "age_kept": age[stale].tolist(),
                               "age_scored": age[age >= 0].tolist(), "unscored": float(np.mean(at < 0))})
            out = update(tr, x, y, domains, ids, step)
            probe.scored_at[ids.numpy()[stale]] = step  # record_kept just stored these rows' CE of this step
            return out

        return probed_update


def summarise(rows) -> dict:
    ages_kept = [a for r in rows for a in r["age_kept"] if a >= 0]
    ages = [a for r in rows for a in r["age_scored"]]
    return {"steps": len(rows), "overlap_mean": float(np.mean([r["overlap"] for r in rows])),
            "chance": float(np.mean([r["chance"] for r in rows])),
            "age_kept_median": float(np.median(ages_kept)) if ages_kept else None,
            "age_scored_median": float(np.median(ages)) if ages else None,
            "age_scored_p90": float(np.percentile(ages, 90)) if ages else None,
            "unscored_share": float(np.mean([r["unscored"] for r in rows]))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--test-env", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3751, help="default: every selecting step of the protocol (0..3750)")
    p.add_argument("--window", type=int, default=250, help="steps per row of the printed table")
    p.add_argument("--world-per-class", type=int, default=None, help="a partial embedded world (quick checks)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stale_selection.json"))
    a = p.parse_args(argv)
    if a.steps < 1 or a.window < 1:
        raise SystemExit("stale_selection: --steps and --window must be >= 1")
    probe = Probe(a.window)
    update = StaleStep.update
    StaleStep.update = probe.wrap(update)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = S.main(["--dataset", a.dataset, "--data-dir", a.data_dir, "--test-env", str(a.test_env), "--seed",
                           str(a.seed), "--trial-seed", str(a.seed), "--steps", str(a.steps), "--checkpoint-freq",
                           str(10**6), "--selection-losses", "stale", "--no-progress", "--output-dir", tmp]
                          + (["--world-per-class", str(a.world_per_class)] if a.world_per_class else []))
    finally:
        StaleStep.update = update  # (a caller in the same process trains unprobed again)
    if code != 0 or not probe.rows:
        raise SystemExit(f"stale_selection: the run failed ({code}) or never selected")
    windows = []
    for w0 in range(0, probe.rows[-1]["step"] + 1, a.window):
        rows = [r for r in probe.rows if w0 <= r["step"] < w0 + a.window]
        if rows:
            windows.append({"first_step": w0, **summarise(rows)})
    result = {"benchmark": "stale_selection", "settings": vars(a), "overall": summarise(probe.rows),
              "windows": windows}
    print(f"{'steps':>11} {'overlap':>8} {'chance':>7} {'age kept':>9} {'age all':>8} {'p90 age':>8} {'unscored':>9}")
    for w in windows + [{"first_step": "all", **result["overall"]}]:
        span = f"{w['first_step']}+" if w["first_step"] != "all" else "all"

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        print(f"{span:>11} {w['overlap_mean']:8.3f} {w['chance']:7.3f} {f(w['age_kept_median'], '9.0f')} "
              f"{f(w['age_scored_median'], '8.0f')} {f(w['age_scored_p90'], '8.0f')} {w['unscored_share']:9.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
