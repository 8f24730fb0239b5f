"""Where the time of one SCMD training step goes, phase by phase, for each algorithm of the ablation, for the
authors' compute pattern and for candidate optimisations (bench/README.md: columns, phases, output).

    python bench/step_breakdown.py --scale tiny                       # embedded world's models, CPU here
    python bench/step_breakdown.py --scale full --device cuda         # ResNet-50 + ViT-B-32-quickgelu, 224 px
    python bench/step_breakdown.py --scale full --device cpu --steps 2 --warmup 1
    python bench/step_breakdown.py --scale full --device cuda --compile   # adds the torch.compile variant

Every configuration's trainer comes from scmd_ref.build_models with scmd_ref.py's own settings (SCALES, then
--algorithm, --selector, --selection-losses, the batch size) and random weights: a step costs the same whatever
the weight values (the losses are meaningless; the random student's frozen BatchNorm statistics are set from one
batch, as pretrained ones would be, so that activations stay in fp16 range). The step is the trainer's own update,
its parts (per_sample_ce, the selector and its tracker, losses with the teacher, optimise with the SMA) wrapped in
timers; a phase's time excludes the phases timed inside it, `other` is the rest of the step. CUDA: events around
each phase, one synchronisation per step (--timing sync: around every phase); CPU: time.perf_counter.

Columns: erm, kd, scmd-no-select, scmd: the loop as it is. authors: SCMD with the authors' compute pattern (text
tower twice per step under autocast, unstable torch.sort on the device, no tracker, SMA rebuilt each step from a
cloned state_dict; the same values). scmd+stale: --selection-losses stale. scmd+channels_last, +bf16,
+async_select, +compile: candidate optimisations of the loop (CUDA but channels_last; combine with +).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import scmd_ref as S  # noqa: E402
from scmd import models as M  # noqa: E402
from scmd import run as R  # noqa: E402
from scmd import settings as ST  # noqa: E402
from scmd import world  # noqa: E402
from scmd.datasets import DATASETS  # noqa: E402
from scmd.errors import UsageError  # noqa: E402

PHASES = ["data", "selection_pass", "ranking", "bookkeeping", "teacher", "student_fwd_loss", "backward_optim",
          "sma", "other"]
PHASE_HELP = {
    "data": "host->device copy of the step's x and y as the loop does it (synthetic batch; pinned on CUDA)",
    "selection_pass": "no-grad fp32 student forward + per-sample CE on all N",
    "ranking": "the selector: device->host copy of the N losses (fastsel, tracker), top-k (fastsel.topk_desc or "
               "torch.sort), keep indices to the device (stale: the candidates' recorded losses instead)",
    "bookkeeping": "tracker.record (stale: tracker.record_kept of the kept rows' training CE)",
    "teacher": "CLIP teacher forward -> q (authors: + the text tower, twice per step)",
    "student_fwd_loss": "student forward on the (selected) batch + L_CE, L_logits, L_CM",
    "backward_optim": "zero_grad + scaled backward + scaler.step(Adam) + scaler.update + theta clamp",
    "sma": "SMA update (ours: in place with torch._foreach_*; authors: state_dict rebuilt)",
    "other": "total minus the phases above (Python glue, x[keep], y[keep])",
}
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
SCALES = {  # dataset, class names, scmd_ref.py flags (random weights: nothing is downloaded)
    "tiny": ("embedded", world.CLASSES, ["--student-weights", "none", "--teacher-weights", "none"]),
    "full": ("pacs", PACS_CLASSES, ["--student", "resnet50", "--student-weights", "none", "--teacher",
                                    "ViT-B-32-quickgelu", "--teacher-weights", "none", "--image-size", "224"]),
}
BASE_CONFIGS = ["erm", "kd", "scmd-no-select", "scmd", "authors"]
VARIANTS = ["channels_last", "bf16", "async_select", "compile", "stale"]
CUDA_ONLY = ("bf16", "async_select", "compile")
STALE = ["stale"] if S.fastsel is not None else []  # stale ranks by the losses fastsel's tracker records
# CUDA: each candidate alone, then the ones that keep results identical together
CUDA_DEFAULT_VARIANTS = ["channels_last", "bf16", "async_select", "channels_last+async_select", *STALE]
CPU_DEFAULT_VARIANTS = list(STALE)
STEP0 = S.SMA_START_ITER  # step of the first measured step: the SMA averages, selection is on (the steady state)
NOTE_WEIGHTS = ("random weights (no pretrained weights offline): the cost of a step does not depend on the weight "
                "values; losses are meaningless")


# --- timing ----------------------------------------------------------------------------------------------


class PhaseTimer:
    """One step's phases: CUDA events read after one synchronisation at the end of the step ('events'), or
    perf_counter (CPU; CUDA 'sync': a synchronisation around every phase). A nested phase is exclusive."""

    def __init__(self, device: torch.device, mode: str):
        self.events, self.sync = (device.type == "cuda" and mode == m for m in ("events", "sync"))

    def _mark(self):
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.segments, self.stack, self.t0 = [], [], self._mark()

    @contextmanager
    def __call__(self, name: str):
        seg = [name, self._mark(), None, self.stack[-1] if self.stack else None]
        self.stack.append(len(self.segments))
        self.segments.append(seg)
        try:
            yield
        finally:
            self.stack.pop()
            seg[2] = self._mark()

    def end(self) -> dict:
        t1 = self._mark()
        if self.events or self.sync:
            torch.cuda.synchronize()
        ms = (lambda a, b: a.elapsed_time(b)) if self.events else (lambda a, b: (b - a) * 1e3)
        out = defaultdict(float)
        for name, a, b, parent in self.segments:
            out[name] += ms(a, b)
            if parent is not None:
                out[self.segments[parent][0]] -= ms(a, b)
        out["total"] = ms(self.t0, t1)
        out["other"] = out["total"] - sum(v for k, v in out.items() if k not in ("total", "other"))
        return dict(out)


class Timed:
    """`inner` seen through the case's timer: calling it and its `methods` are timed as `phase`, and so is reading
    its `props` (the authors' t_hat runs the text tower); every other attribute passes through."""

    def __init__(self, case, inner, phase: str, methods=(), props=()):
        self.case, self.inner, self.phase, self.methods, self.props = case, inner, phase, methods, props

    def __call__(self, *args, **kwargs):
        with self.case.timer(self.phase):
            return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        if name in self.methods:
            return Timed(self.case, getattr(self.inner, name), self.phase)
        with self.case.timer(self.phase) if name in self.props else nullcontext():
            return getattr(self.inner, name)


def instrument(case) -> None:
    """Wrap the parts of case.trainer.update in timers (case.timer); the update itself is the trainer's."""
    tr = case.trainer
    tr.per_sample_ce = Timed(case, tr.per_sample_ce, "selection_pass")
    tr.losses = Timed(case, tr.losses, "student_fwd_loss")
    tr.optimise = Timed(case, tr.optimise, "backward_optim")
    tr.sma.update = Timed(case, tr.sma.update, "sma")
    if tr.teacher is not None:
        tr.teacher = Timed(case, tr.teacher, "teacher", props=("t_hat",))
    if getattr(tr.selector, "tracker", None) is not None:
        tr.selector.tracker = Timed(case, tr.selector.tracker, "bookkeeping", methods=("record", "record_kept"))
    tr.selector = Timed(case, tr.selector, "ranking", methods=("stale_keep",))


# --- what exists only here: the authors' compute pattern (same values, other cost), a device-side selector --


class AuthorsTeacher(nn.Module):
    """The authors' teacher: every call runs the image tower AND the text tower over all C prompts (under the
    caller's autocast), and L_CM encodes the prompts once more (reading `t_hat`). No renormalisation, as theirs."""

    def __init__(self, teacher: S.Teacher, tokens: torch.Tensor):
        super().__init__()
        self.clip, self.scale = teacher.clip, teacher.scale
        self.register_buffer("tokens", tokens.to(teacher.t_hat.device))

    @property
    def t_hat(self) -> torch.Tensor:
        e_txt = self.clip.encode_text(self.tokens)
        return e_txt / e_txt.norm(dim=-1, keepdim=True)

    def forward(self, x):
        e_img = self.clip.encode_image(x)
        return self.scale * (e_img / e_img.norm(dim=-1, keepdim=True)) @ self.t_hat.T


def authors_sma_update(sma: S.SMA, student: nn.Module):
    """The authors' SMA update of `sma`: a new state_dict of cloned tensors every step, loaded into its network."""

    @torch.no_grad()
    def update() -> None:
        sma.global_iter += 1
        averaging = sma.global_iter >= S.SMA_START_ITER
        sma.count += averaging
        avg = sma.net.state_dict()
        sma.net.load_state_dict({k: (avg[k].clone() * sma.count + v.clone()) / (1.0 + sma.count) if averaging
                                 else v.clone() for k, v in student.state_dict().items()
                                 if "num_batches_tracked" not in k})

    return update


class DeviceSelector:
    """Variant async_select (CUDA): the top-k stays on the device (select_hardest: the positions fastsel gives);
    the losses and kept positions go to pinned host memory without a host sync, and `flush` (here at the end of
    the step) records them in the tracker once copied."""

    def __init__(self, selector: S.Selector):
        self.p, self.tracker, self.pending = selector.p, selector.tracker, []

    def __call__(self, losses, domains, ids, step):
        keep = S.select_hardest(losses, int(len(losses) * self.p))
        if self.tracker is not None:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                    for t in (losses.detach().float(), keep)]
            ev = torch.cuda.Event()
            ev.record()
            self.pending.append((step, ids.numpy(), domains.numpy(), host, ev))
        return keep

    def flush(self) -> None:
        for step, ids, domains, (loss, keep), ev in self.pending:
            ev.synchronize()
            self.tracker.record(step, ids, domains, loss.numpy(), keep.numpy())
        self.pending = []


# --- cases: one configuration each, its trainer from scmd_ref.build_models -----------------------------------


@dataclass
class Case:
    name: str
    trainer: object
    settings: object  # scmd_ref.Settings, resolved
    hparams: dict
    selector: str = "n/a"
    tracker: str = "n/a"
    channels_last: bool = False
    timer: object = nullcontext  # the PhaseTimer of the current step (nullcontext: none)
    timings: dict = field(default_factory=lambda: defaultdict(list))
    losses: list = field(default_factory=list)
    skipped_steps: int = 0
    peak_mem_mb: Optional[float] = None


def bench_index(scale: str, n_classes: Optional[int] = None, n_samples: int = 10000) -> SimpleNamespace:
    """What build_models reads of a dataset index: the scale's domains and classes (n_classes: that many)."""
    dataset, classes, _ = SCALES[scale]
    if n_classes is not None and n_classes != len(classes):
        classes = [f"class {i}" for i in range(n_classes)]
    return SimpleNamespace(classes=list(classes), envs=list(DATASETS[dataset].envs), n_samples=n_samples)


def set_frozen_bn_stats(student: S.Student, x: torch.Tensor) -> None:
    """Random weights only: every BN's running statistics from one batch (momentum None: that batch's), then
    frozen again, as pretrained statistics would be."""
    bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum, m.training = None, True
    with torch.no_grad():
        student.featurizer(x)
    for m, momentum in zip(bns, saved):
        m.momentum, m.training = momentum, False  # frozen again


def make_case(scale: str, index, name: str, batch: int, device: torch.device, seed: int = 0,
              selector: str = "auto", timed: bool = True) -> Case:
    """One configuration: a trainer from scmd_ref.build_models (seeded alike: the same initial student in every
    case), its parts wrapped in timers (timed=False: the plain trainer, for the equality test)."""
    algorithm, *variants = name.split("+")
    authors = algorithm == "authors"
    for v in variants:
        if v not in VARIANTS or (v in CUDA_ONLY and device.type != "cuda"):
            raise SystemExit(f"step_breakdown: {name}: variant {v!r} is unknown or needs CUDA (known: "
                             f"{', '.join(VARIANTS)}; CUDA only: {', '.join(CUDA_ONLY)})")
    if "async_select" in variants and "stale" in variants:
        raise SystemExit(f"step_breakdown: {name}: async_select ranks fresh losses, stale has none")
    dataset, _, flags = SCALES[scale]  # scmd_ref.py's settings; selection never switches off (the steady state)
    argv = ["--dataset", dataset, *flags, "--algorithm", "scmd" if authors else algorithm, "--selector",
            "torch" if authors else selector, "--seed", str(seed), "--hparams", json.dumps({"batch_size": batch}),
            "--selection-horizon", str(10**9), "--selection-losses", "stale" if "stale" in variants else "fresh"]
    try:
        s, hp = ST.resolve(ST.parse(S.Settings, argv, ""), S.ALGORITHMS, S.fastsel is not None)
    except UsageError as e:
        raise SystemExit(f"step_breakdown: {name}: {e}") from None
    R.seed_everything(seed)
    tr, _ = S.build_models(s, hp, index, device)
    calibration = torch.randn(4, 3, s.image_size, s.image_size, generator=torch.Generator().manual_seed(seed + 1))
    set_frozen_bn_stats(tr.student, calibration.to(device))
    case = Case(name, tr, s, hp, channels_last="channels_last" in variants)
    if case.channels_last:
        tr.student.to(memory_format=torch.channels_last)
    tr.sma = S.SMA(tr.student)  # of the calibrated (channels_last) student
    tr.sma.global_iter = S.SMA_START_ITER - 1  # time the averaging branch (the steady state), not the copy
    if tr.use_selection:
        case.selector = "fastsel.topk_desc" if tr.selector.fastsel else "torch.sort stable"
        case.tracker = "fastsel.Tracker" if tr.selector.tracker is not None else "skipped: fastsel is not installed"
    if authors:
        tokens = M.tokenize(s.teacher, M.class_prompts(s.prompt, index.classes), S.fastsel)
        tr.teacher, tr.sma.update = AuthorsTeacher(tr.teacher, tokens), authors_sma_update(tr.sma, tr.student)
        p = hp["worst_case_p"]  # the authors' ranking: unstable sort on the device, no tracker

        def authors_selector(losses, domains, ids, step):
            return torch.sort(losses, descending=True).indices[:int(len(losses) * p)]

        tr.selector = authors_selector
        case.selector, case.tracker = "torch.sort unstable, on the device (authors)", "n/a"
    if "bf16" in variants:
        tr.amp_dtype, tr.scaler = torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False)  # no loss scaling
    if "compile" in variants:
        tr.student.featurizer = torch.compile(tr.student.featurizer, dynamic=False)
    if "async_select" in variants and tr.use_selection:
        tr.selector = DeviceSelector(tr.selector)
        case.selector = "torch.sort stable, on the device (no host sync)"
        case.tracker += ", fed asynchronously" if tr.selector.tracker is not None else ""
    if timed:
        instrument(case)
    return case


def synthetic_batches(index, image_size: int, batch: int, count: int, seed: int) -> list:
    """(x, y, domains, ids) as the loop's step batches (one minibatch per training env in env order, env 0 held
    out), random contents, in host memory."""
    g = torch.Generator().manual_seed(seed + 2)
    n_envs, per_env = len(index.envs), index.n_samples // len(index.envs)
    domains = torch.arange(1, n_envs).repeat_interleave(batch)
    return [(torch.randn(len(domains), 3, image_size, image_size, generator=g),
             torch.randint(0, len(index.classes), (len(domains),), generator=g), domains,
             domains * per_env + torch.randint(0, per_env, (len(domains),), generator=g)) for _ in range(count)]


def run_step(case: Case, batch: tuple, step: int, tm, device: torch.device) -> dict:
    """One loop step: x and y to the device (domains and ids stay on the host, as in the loop), then the update."""
    x, y, domains, ids = batch
    with tm("data"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    case.timer = tm
    out = case.trainer.update(x, y, domains, ids, step)
    flush = getattr(case.trainer.selector, "flush", None)  # async_select
    if flush is not None:
        with tm("bookkeeping"):
            flush()
    return out


# --- machine, summaries, table, plot ---------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    info = {"cpu_model": next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
                              platform.processor()),
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "load_avg_1m": os.getloadavg()[0], "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(), "gpu_name": None, "gpu_driver": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device.index or 0)
        info.update(gpu_name=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}", cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["gpu_driver"] = r.stdout.split()[device.index or 0] if r.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    return info


def versions() -> dict:
    v = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "open_clip", "fastsel"):
        try:
            v[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            v[name] = None
    return v


def summarise(values: list) -> dict:
    a = np.asarray(values, dtype=float)
    return {"n": int(a.size), "median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "mean": float(a.mean()), "min": float(a.min()),
            "max": float(a.max())} if a.size else {"n": 0}


def stat(result: dict, case: str, phase: str, key: str = "median") -> float:
    s = result["configs"][case]["phases"][phase]
    return s[key] if s["n"] else 0.0


def format_table(result: dict) -> str:
    """Median ms of each phase; the % is its share of the step from the means (shares add up to 100%, medians
    need not add up to the median total)."""
    names = list(result["configs"])
    w = max(17, *(len(n) + 2 for n in names))
    lines = [f"{'median ms (% of mean step)':<28}" + "".join(f"{n:>{w}}" for n in names)]
    for ph in [*PHASES, "total"]:
        row = f"{ph:<28}"
        for n in names:
            med, mean, tot = stat(result, n, ph), stat(result, n, ph, "mean"), stat(result, n, "total", "mean")
            pct = f" ({100 * mean / tot:4.1f}%)" if ph != "total" and tot > 0 else ""
            row += f"{med:>{w - len(pct)}.2f}{pct}" if result["configs"][n]["phases"][ph]["n"] else f"{'-':>{w}}"
        lines.append(row)
    return "\n".join(lines)


def derived(result: dict) -> dict:
    """The targets, and each variant's step time against scmd's."""
    c, tot, d = result["configs"], stat(result, "scmd", "total"), {}
    if not tot:
        return d
    d["scmd_rank_bookkeeping_share_pct"] = 100 * (stat(result, "scmd", "ranking") +
                                                  stat(result, "scmd", "bookkeeping")) / tot
    if "erm" in c:
        d["scmd_over_erm_step"] = tot / stat(result, "erm", "total")
    if "authors" in c:
        d["authors_over_scmd_step"] = stat(result, "authors", "total") / tot
        for ph in ("teacher", "sma", "ranking"):
            ours = stat(result, "scmd", ph)
            d[f"authors_over_scmd_{ph}"] = stat(result, "authors", ph) / ours if ours else None
    d.update({f"{n}_over_scmd_step": stat(result, n, "total") / tot for n in c if n.startswith("scmd+")})
    return d


def plot(result: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no PNG"
    names, s, m = list(result["configs"]), result["settings"], result["machine"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 3), 5))
    bottom = np.zeros(len(names))
    for i, ph in enumerate(PHASES):  # means: the phases of a step add up to its total
        vals = np.maximum([stat(result, n, ph, "mean") for n in names], 0.0)
        if vals.any():
            ax.bar(names, vals, bottom=bottom, label=ph, color=plt.get_cmap("tab20")(i))
            bottom += vals
    ax.set_ylabel("mean ms per step (stacked phases)")
    ax.set_title(f"SCMD step breakdown: {s['scale']} scale, {result['device']}, batch {s['n_train_envs']}x"
                 f"{s['batch']} ({m['gpu_name'] or m['cpu_model']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- command line ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default="tiny",
                   help="tiny: embedded world's student+teacher (32 px); full: ResNet-50 + ViT-B-32-quickgelu, 224 px")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=32, help="per training domain (3 training domains)")
    p.add_argument("--n-classes", type=int, default=None,
                   help="number of class prompts (default: world's 8 / PACS 7); the authors' text cost grows with it")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default CUDA 100, CPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default CUDA 10, CPU 3)")
    p.add_argument("--configs", default=None, help=f"comma list; default {','.join(BASE_CONFIGS)} + the --variants")
    p.add_argument("--variants", default=None,
                   help=f"comma list of scmd variants to add ({', '.join(VARIANTS)}; combine with +); default: "
                        f"CUDA {','.join(CUDA_DEFAULT_VARIANTS)}; CPU {','.join(CPU_DEFAULT_VARIANTS) or 'none'}")
    p.add_argument("--compile", action="store_true", help="add the scmd+compile variant (CUDA; slow warm-up)")
    p.add_argument("--selector", choices=["auto", "fastsel", "torch"], default="auto",
                   help="scmd_ref.py's --selector of our configs (auto: fastsel.topk_desc if installed, else the "
                        "stable torch.sort)")
    p.add_argument("--timing", choices=["events", "sync"], default="events", help="CUDA timing mode (see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU); 1 on a shared, oversubscribed machine (OpenMP threads that "
                        "wait for each other make steps up to 10x slower there)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/step_breakdown_<scale>_<device>.json)"
                                                "; the PNG goes next to it")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    args.steps = args.steps if args.steps is not None else (100 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps >= 1, --warmup >= 0, --batch >= 1")
    if args.configs:
        args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    else:
        variants = args.variants.split(",") if args.variants is not None else (
            CUDA_DEFAULT_VARIANTS if cuda else CPU_DEFAULT_VARIANTS)
        args.configs = BASE_CONFIGS + [f"scmd+{v.strip()}" for v in [*variants, *["compile"] * args.compile]
                                       if v.strip()]
    args.out = Path(args.out or ROOT / "bench" / "results" / f"step_breakdown_{args.scale}_{'cuda' if cuda else 'cpu'}"
                                                             f".json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"[bench] {NOTE_WEIGHTS}")
    t0 = time.perf_counter()
    index = bench_index(args.scale, args.n_classes)
    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights" for every case: the note above says so
    cases = [make_case(args.scale, index, n, args.batch, device, args.seed, args.selector) for n in args.configs]
    logging.disable(logging.NOTSET)
    s, hp = cases[0].settings, cases[0].hparams
    batches = synthetic_batches(index, s.image_size, args.batch, min(4, args.warmup + args.steps), args.seed)
    if cuda:  # the loop's loaders pin their batches on CUDA
        batches = [(x.pin_memory(), y.pin_memory(), d, i) for x, y, d, i in batches]
    log(f"[bench] built {len(cases)} configs in {time.perf_counter() - t0:.1f} s: {', '.join(args.configs)}")
    tm = PhaseTimer(device, args.timing)
    for i in range(args.warmup + args.steps):  # warm-up, then timed steps, interleaved over the configurations
        timed = i >= args.warmup  # (a drifting machine affects all alike)
        for case in cases:
            scaler = case.trainer.scaler
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            if not timed:
                run_step(case, batches[i % len(batches)], STEP0 + i, nullcontext, device)
                continue
            tm.begin()
            out = run_step(case, batches[i % len(batches)], STEP0 + i, tm, device)
            for k, v in tm.end().items():
                case.timings[k].append(v)
            case.losses.append(float(out["loss"]))
            case.skipped_steps += scale_before is not None and scaler.get_scale() < scale_before
            if cuda:
                case.peak_mem_mb = max(case.peak_mem_mb or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
        if i + 1 == args.warmup or (timed and (i + 1 - args.warmup) % max(1, args.steps // 5) == 0):
            log(f"[bench] step {i + 1}/{args.warmup + args.steps} ({args.warmup} warm-up), "
                f"{time.perf_counter() - t0:.1f} s")

    n_train = len(index.envs) - 1
    selector = args.selector if args.selector != "auto" else "fastsel" if S.fastsel else "torch"
    notes = [NOTE_WEIGHTS, "frozen BN statistics of the random student set from one synthetic batch (cost unchanged)",
             "data = host->device copy of a synthetic batch as the loop does it (pinned host memory on CUDA, as "
             "its loaders); the augmentation pipeline is timed by bench/data_loading.py",
             "the authors' vendored CLIP also computes unused per-layer token maps; open_clip does not, so "
             "'authors' underestimates their teacher cost"]
    notes += [f"{c.name}: GradScaler skipped {c.skipped_steps} optimizer steps (inf/nan gradients with random "
              f"weights): its backward_optim is underestimated" for c in cases if c.skipped_steps]
    notes += ["bookkeeping skipped: fastsel is not installed (no tracker)"] * any("skipped" in c.tracker for c in cases)
    result = {
        "benchmark": "step_breakdown", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device), "machine": machine_info(device), "versions": versions(),
        "settings": {"scale": args.scale, "batch": args.batch, "n_train_envs": n_train, "N": args.batch * n_train,
                     "kept_n": int(args.batch * n_train * hp["worst_case_p"]), "image_size": s.image_size,
                     "n_classes": len(index.classes), "student": s.student, "teacher": s.teacher, "steps": args.steps,
                     "warmup": args.warmup, "timing": f"cuda {args.timing}" if cuda else "perf_counter",
                     "selector": selector, "seed": args.seed, "hparams": hp, "cudnn_deterministic": True,
                     "cudnn_benchmark": False,
                     "amp": "fp16 autocast + GradScaler" if cuda else "off (CPU, as the loop)",
                     "sma_branch": f"averaging (global_iter >= {S.SMA_START_ITER})", "weights": "random",
                     "configs": args.configs},
        "notes": notes, "phase_help": PHASE_HELP,
        "configs": {c.name: {
            "algorithm": c.settings.algorithm, "pattern": "authors" if c.name.startswith("authors") else "ours",
            "selector": c.selector, "tracker": c.tracker, "variants": c.name.split("+")[1:],
            "amp_dtype": str(c.trainer.amp_dtype)[6:] if c.trainer.amp else "off", "channels_last": c.channels_last,
            "phases": {ph: summarise(c.timings.get(ph, [])) for ph in [*PHASES, "total"]},
            "loss_last": c.losses[-1], "nonfinite_losses": sum(not math.isfinite(v) for v in c.losses),
            "skipped_optimizer_steps": int(c.skipped_steps), "peak_mem_mb": c.peak_mem_mb} for c in cases},
    }
    result["derived"] = d = derived(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    png_note = None if args.no_plot else plot(result, args.out.with_suffix(".png"))

    m = result["machine"]
    print(f"SCMD step breakdown -- {args.scale} scale ({s.student} + {s.teacher}, {s.image_size} px, "
          f"{len(index.classes)} classes), batch {n_train}x{args.batch} = {args.batch * n_train} (kept "
          f"{result['settings']['kept_n']}), {args.steps} timed steps after {args.warmup} warm-up, "
          f"{result['settings']['timing']}")
    print(f"device {device}: {m['gpu_name'] or m['cpu_model']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch "
          f"threads); selector {selector}")
    print("\n".join(f"note: {n}" for n in notes))
    print(format_table(result))
    if "scmd_rank_bookkeeping_share_pct" in d:
        print(f"target: SCMD ranking (with the losses' d2h copy) + bookkeeping = "
              f"{d['scmd_rank_bookkeeping_share_pct']:.2f}% of the step (target <= 1%)")
    if "scmd_over_erm_step" in d:
        print(f"target: SCMD step / ERM step = {d['scmd_over_erm_step']:.3f} (target <= 0.75 on CUDA)")
    if "authors_over_scmd_step" in d:
        print(f"target: authors' pattern / our SCMD step = {d['authors_over_scmd_step']:.3f} (teacher "
              f"x{d['authors_over_scmd_teacher'] or math.nan:.2f}, SMA x{d['authors_over_scmd_sma'] or math.nan:.2f})")
    for k, v in d.items():
        if k.startswith("scmd+"):
            print(f"variant: {k.replace('_over_scmd_step', '')} step / scmd step = {v:.3f} "
                  f"({'pays' if v < 0.97 else 'no gain' if v < 1.03 else 'slower'})")
    print(f"JSON: {args.out}" + ("" if args.no_plot else f"\n({png_note})" if png_note else
                                 f"\nPNG: {args.out.with_suffix('.png')}"))
    return result


if __name__ == "__main__":
    main()
