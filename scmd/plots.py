"""The figures a run writes next to its records: ``curves.png`` (the learning curve) and ``kept_share.png``
(which domains the selection kept). Each is rendered in memory with matplotlib's Agg backend and written
atomically (temporary file, fsync, rename), so a crash or a full disk never leaves half a PNG; a failed write
is one DataError naming the file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from scmd.outputs import atomic_write_bytes

DPI = 120
CURVES_SIZE = (7.0, 4.0)  # inches: 840 x 480 pixels at DPI
KEPT_SHARE_SIZE = (7.0, 3.5)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Render `fig` to PNG bytes, close it, then write the bytes atomically."""
    plt = _pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def _pct(value) -> float:
    return np.nan if value is None else 100.0 * float(value)


def plot_curves(records: Sequence[dict], envs: List[str], test_env: int, cutoff: Optional[int],
                selected_step: Optional[int], teacher_acc: Optional[List[float]], path: Path) -> None:
    """The run's learning curve against step: the training-domain validation accuracy (mean of the training
    envs' ``env{i}_out_acc``) and the held-out domain's in-split accuracy (``env{test_env}_in_acc``), from
    records as in results.jsonl; a vertical line at the selection cut-off (`cutoff`; None: no selection);
    a marker at `selected_step` (None: the step training-domain validation selects, first maximum); the
    teacher's zero-shot accuracy on the held-out domain as a horizontal line (`teacher_acc`: per-domain
    accuracies in [0, 1], or None)."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    if not records:
        return
    train_envs = [i for i in range(len(envs)) if i != test_env]
    steps = [int(r["step"]) for r in records]
    val = [float(np.mean([_pct(r.get(f"env{i}_out_acc")) for i in train_envs])) for r in records]
    test = [_pct(r.get(f"env{test_env}_in_acc")) for r in records]
    if selected_step is None:
        best = int(np.nanargmax(val)) if not np.all(np.isnan(val)) else 0
        selected_step = steps[best]
    held_out = envs[test_env]

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=CURVES_SIZE)
    ax.plot(steps, val, marker="o", markersize=3, color="tab:blue",
            label="training-domain validation (mean of the source out-splits)")
    ax.plot(steps, test, marker="o", markersize=3, color="tab:orange", label=f"held-out domain ({held_out}, in-split)")
    if selected_step in steps:
        k = steps.index(selected_step)
        ax.plot([selected_step, selected_step], [val[k], test[k]], linestyle="none", marker="*", markersize=12,
                color="black", label=f"selected step {selected_step}: held out {test[k]:.1f} %")
    if teacher_acc is not None:
        t = _pct(teacher_acc[test_env])
        ax.axhline(t, color="tab:green", linestyle="--", label=f"teacher zero-shot on {held_out}: {t:.1f} %")
    if cutoff is not None:
        if cutoff <= max(steps):
            ax.axvline(cutoff, color="grey", linestyle=":", label=f"selection cut-off (step {cutoff})")
        else:  # the run ended while still selecting: a line there would only stretch the axis
            ax.plot([], [], " ", label=f"selecting throughout (cut-off step {cutoff})")
    if len(steps) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100))
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Learning curve, {held_out} held out")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def plot_kept_share(report: dict, envs: List[str], p: float, path: Path) -> None:
    """Per-domain kept share (rows kept / rows seen) per step window, from the tracker's report. Without a
    domain preference every line would sit at p."""
    win = report["windows"]
    if not win:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=KEPT_SHARE_SIZE)
    xs = [w["first_step"] for w in win]
    for d, name in enumerate(envs):
        if any(w["rows_seen"][d] for w in win):
            ax.plot(xs, [np.nan if w["kept_share"][d] is None else w["kept_share"][d] for w in win], label=name)
    ax.axhline(p, color="grey", linestyle=":", label=f"p = {p}")
    ax.set_xlabel("step (window start)")
    ax.set_ylabel("kept share of the domain's rows")
    ax.set_title("Hard-sample selection by domain")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
