"""Where the time of one SCMD training step goes, phase by phase, for each algorithm of the ablation and for the
authors' compute pattern.

    python bench/step_breakdown.py --scale tiny                       # embedded world's models, CPU here
    python bench/step_breakdown.py --scale full --device cuda         # ResNet-50 + ViT-B-32-quickgelu, 224 px
    python bench/step_breakdown.py --scale full --device cpu --steps 2 --warmup 1
    python bench/step_breakdown.py --scale full --device cuda --compile   # adds the torch.compile variant

Weights are random (no pretrained weights are downloaded): a step costs the same whatever the weight values, so
the timings hold for the real run; the loss values printed are meaningless. The frozen BatchNorm statistics of the
random student are set from one synthetic batch (as pretrained statistics would) so that activations stay in fp16
range on CUDA; this changes no cost.

The step is the loop's step: the real `scmd_ref.SCMDTrainer.update`, whose parts (per_sample_ce, the selector,
losses, optimise; the teacher, the tracker and the SMA inside them) are wrapped by timers (`instrument`);
tests/test_bench_steps.py checks that a timed step gives the bit-identical losses and weights of an untimed one.
Timing: CUDA events around each phase, one synchronisation at the end of each step (events mode, default on CUDA:
a phase's time is the GPU time between its two events; host-only phases show their host time when the GPU is idle
and ~0 when it is hidden behind queued GPU work); `--timing sync` synchronises around every phase instead
(host view, slower); on CPU `time.perf_counter`. Phases that run several times in a step are summed.
A phase's time excludes the phases timed inside it (ranking excludes bookkeeping, student_fwd_loss the teacher,
backward_optim the SMA). `other` = total minus the named phases (Python glue, x[keep]).

Configurations (columns):
  erm, kd, scmd-no-select, scmd   the loop as it is (scmd_ref.SCMDTrainer), with our selector and tracker
  authors                         SCMD with the authors' compute pattern: text tower run twice per step under
                                  autocast (for z_t and for L_CM), unstable torch.sort on the device, no tracker,
                                  SMA rebuilt each step from a cloned state_dict + load_state_dict (same values)
  scmd+channels_last, scmd+bf16, scmd+pinned, scmd+compile
                                  candidate optimisations of our loop, measured in the same run (CUDA by default)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import scmd_ref as S  # noqa: E402
from scmd import models as M  # noqa: E402
from scmd.hparams import make_hparams  # noqa: E402

PHASES = ["data", "selection_pass", "ranking", "bookkeeping", "teacher", "student_fwd_loss", "backward_optim",
          "sma", "other"]
PHASE_HELP = {
    "data": "host->device copy of the step's batch (x, y, domains) as the loop does it (synthetic batch)",
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
BASE_CONFIGS = ["erm", "kd", "scmd-no-select", "scmd", "authors"]
VARIANTS = ["channels_last", "bf16", "pinned", "async_select", "compile", "stale"]
CUDA_ONLY = ("bf16", "pinned", "async_select", "compile")
# default CUDA columns: each candidate alone, then the ones that keep results identical, together
CUDA_DEFAULT_VARIANTS = ["channels_last", "bf16", "pinned", "async_select", "channels_last+pinned+async_select",
                         "stale"]
CPU_DEFAULT_VARIANTS = ["stale"]  # --selection-losses stale: rank by recorded losses, no selection pass
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
STEP0 = S.SMA_START_ITER  # step index of the first timed step (any value <= the selection cut-off)
NOTE_WEIGHTS = ("random weights (no pretrained weights offline): the cost of a step does not depend on the weight "
                "values; losses are meaningless")


# =========================================================================================================
# Timing
# =========================================================================================================


class PhaseTimer:
    """Per-step phase timer. CUDA events (read after one synchronisation at the end of the step), or
    perf_counter (CPU; or CUDA with a synchronisation around every phase in 'sync' mode)."""

    def __init__(self, device: torch.device, mode: str):
        self.events = device.type == "cuda" and mode == "events"
        self.sync = device.type == "cuda" and mode == "sync"
        self.segments: list = []
        self.t0 = None

    def _mark(self):
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.events else (b - a) * 1e3

    def begin(self) -> None:
        self.segments, self.stack = [], []
        self.t0 = self._mark()

    @contextmanager
    def __call__(self, name: str):
        """A phase; one opened inside another is subtracted from it (exclusive times)."""
        seg = [name, self._mark(), None, self.stack[-1] if self.stack else None]
        self.segments.append(seg)
        self.stack.append(len(self.segments) - 1)
        try:
            yield
        finally:
            self.stack.pop()
            seg[2] = self._mark()

    def end(self) -> Dict[str, float]:
        t1 = self._mark()
        if self.events or self.sync:
            torch.cuda.synchronize()
        out: Dict[str, float] = defaultdict(float)
        elapsed = [self._ms(a, b) for _, a, b, _ in self.segments]
        for (name, _, _, parent), ms in zip(self.segments, elapsed):
            out[name] += ms
            if parent is not None:
                out[self.segments[parent][0]] -= ms
        out["total"] = self._ms(self.t0, t1)
        out["other"] = out["total"] - sum(v for k, v in out.items() if k not in ("total", "other"))
        return dict(out)


class NullTimer:
    """The same interface, timing nothing (used by the equality test)."""

    @contextmanager
    def __call__(self, name: str):
        yield


# =========================================================================================================
# Timers around the parts of the real SCMDTrainer.update
# =========================================================================================================


def _timed(case, name: str, fn):
    def wrapper(*args, **kwargs):
        with case.timer(name):
            return fn(*args, **kwargs)

    return wrapper


class TimedTeacher:
    """The trainer's teacher, its forward (and, for the authors, the second text pass of L_CM) timed."""

    def __init__(self, case, teacher):
        self.case, self.inner = case, teacher

    def __call__(self, x):
        with self.case.timer("teacher"):
            return self.inner(x)

    @property
    def t_hat(self):
        with self.case.timer("teacher"):
            return self.inner.t_hat


class TimedTracker:
    def __init__(self, case, tracker):
        self.case, self.inner = case, tracker

    def record(self, *args):
        with self.case.timer("bookkeeping"):
            return self.inner.record(*args)

    def record_kept(self, *args):
        with self.case.timer("bookkeeping"):
            return self.inner.record_kept(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class TimedSelector:
    def __init__(self, case, selector):
        self.case, self.inner = case, selector

    def __call__(self, *args):
        with self.case.timer("ranking"):
            return self.inner(*args)

    def stale_keep(self, *args):
        with self.case.timer("ranking"):
            return self.inner.stale_keep(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def instrument(case) -> None:
    """Wrap the parts of case.trainer.update in timers (case.timer); the update itself is the loop's."""
    tr = case.trainer
    tr.per_sample_ce = _timed(case, "selection_pass", tr.per_sample_ce)
    tr.losses = _timed(case, "student_fwd_loss", tr.losses)
    tr.optimise = _timed(case, "backward_optim", tr.optimise)
    tr.sma.update = _timed(case, "sma", tr.sma.update)
    if tr.teacher is not None:
        tr.teacher = TimedTeacher(case, tr.teacher)
    sel = tr.selector
    if getattr(sel, "tracker", None) is not None:
        sel.tracker = TimedTracker(case, sel.tracker)
    tr.selector = TimedSelector(case, sel)


class AuthorsSelector:
    """The authors' ranking: an unstable torch.sort on the device, no bookkeeping."""

    def __init__(self, p: float):
        self.p, self.tracker = p, None

    def __call__(self, losses, domains, ids, step):
        return torch.sort(losses, descending=True).indices[:int(len(losses) * self.p)]


class DeviceSelector:
    """Variant async_select (CUDA): the selection stays on the device (torch stable sort = the same positions as
    fastsel.topk_desc); the tracker's inputs are staged without a host sync (DeferredRecords)."""

    def __init__(self, p: float, deferred):
        self.p, self.deferred, self.tracker = p, deferred, None

    def __call__(self, losses, domains, ids, step):
        keep = S.select_hardest(losses, int(len(losses) * self.p))
        if self.deferred.tracker is not None:
            self.deferred.stage(step, ids, domains, losses, keep)
        return keep


# =========================================================================================================
# The authors' compute pattern (same values as ours, different cost)
# =========================================================================================================


class AuthorsTeacher(nn.Module):
    """The authors' teacher: every call runs the image tower AND the text tower over all C prompts (under the
    caller's autocast), and L_CM encodes the prompts once more (reading `t_hat`). No renormalisation, as theirs."""

    def __init__(self, teacher: S.Teacher, tokens: torch.Tensor):
        super().__init__()
        self.clip, self.scale = teacher.clip, teacher.scale
        self.register_buffer("tokens", tokens.to(teacher.t_hat.device))

    @property
    def t_hat(self) -> torch.Tensor:  # the authors' second text pass, for L_CM
        return self.text_features()

    def text_features(self) -> torch.Tensor:
        e_txt = self.clip.encode_text(self.tokens)
        return e_txt / e_txt.norm(dim=-1, keepdim=True)

    def forward(self, x):
        e_img = self.clip.encode_image(x)
        e_img = e_img / e_img.norm(dim=-1, keepdim=True)
        return self.scale * e_img @ self.text_features().T


class AuthorsSMA:
    """The authors' SMA update: a new state_dict of cloned tensors every step, loaded into the SMA network."""

    def __init__(self, sma: S.SMA, student: nn.Module):
        self.net, self.student = sma.net, student
        self.global_iter, self.count = sma.global_iter, sma.count

    @torch.no_grad()
    def update(self) -> None:
        self.global_iter += 1
        live, avg = self.student.state_dict(), self.net.state_dict()
        new = {}
        if self.global_iter >= S.SMA_START_ITER:
            self.count += 1
            for name, cur in live.items():
                if "num_batches_tracked" not in name:
                    new[name] = (avg[name].detach().clone() * self.count + cur.detach().clone()) / (1.0 + self.count)
        else:
            for name, cur in live.items():
                if "num_batches_tracked" not in name:
                    new[name] = cur.detach().clone()
        self.net.load_state_dict(new)


class DeferredRecords:
    """Variant async_select (CUDA): the selection stays on the device (torch stable sort = the same positions as
    fastsel.topk_desc) and the tracker's inputs are copied to pinned host memory without blocking; `flush` records
    them once their copy event has completed (the loop would flush at the next step or at flush_stats)."""

    def __init__(self, tracker):
        self.tracker, self.pending = tracker, []

    def stage(self, step, ids, domains, losses, keep) -> None:
        host = []
        for t in (domains, losses.detach().float(), keep):
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host.append(h)
        ev = torch.cuda.Event()
        ev.record()
        self.pending.append((step, ids.numpy(), host, ev))

    def flush(self) -> None:
        for step, ids, (d, loss, keep), ev in self.pending:
            ev.synchronize()
            self.tracker.record(step, ids, d.numpy(), loss.numpy(), keep.numpy())
        self.pending = []


# =========================================================================================================
# Models and cases
# =========================================================================================================


@dataclass
class Models:
    """What every configuration shares: the frozen teacher (built once) and the initial student."""

    scale: str
    device: torch.device
    image_size: int
    class_names: List[str]
    n_envs: int
    clip: nn.Module
    tokens: torch.Tensor
    teacher: S.Teacher
    base_student: S.Student  # on the device, BN statistics set
    student_name: str
    teacher_name: str


@dataclass
class Case:
    name: str
    algorithm: str
    trainer: S.SCMDTrainer
    authors: bool = False
    channels_last: bool = False
    pinned: bool = False
    deferred: Optional[DeferredRecords] = None
    selector_desc: str = "n/a"
    tracker_desc: str = "n/a"
    timer: object = field(default_factory=lambda: NullTimer())  # the PhaseTimer of the current step
    timings: Dict[str, list] = field(default_factory=lambda: defaultdict(list))
    losses: list = field(default_factory=list)
    skipped_steps: int = 0
    peak_mem_mb: Optional[float] = None


def world_module():
    """scmd.world if it provides what the tiny scale needs, else None."""
    try:
        from scmd import world
    except ImportError:
        return None
    needed = ("build_student", "register_teacher_config", "TEACHER_MODEL_NAME", "IMAGE_SIZE", "CLASSES",
              "ENVIRONMENTS")
    return world if all(hasattr(world, a) for a in needed) else None


def set_frozen_bn_stats(student: S.Student, x: torch.Tensor) -> None:
    """Random weights only: set every BN's running statistics from one batch (momentum None = exact batch stats),
    then freeze again. Stands in for pretrained statistics so activations stay in range (fp16)."""
    bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        student.featurizer(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
        m.num_batches_tracked.zero_()
    student.train()  # BN back to eval (frozen)


def build_models(scale: str, device: torch.device, seed: int = 0, n_classes: Optional[int] = None,
                 calib_batch: int = 16) -> Models:
    import open_clip
    import torchvision

    torch.manual_seed(seed)
    if scale == "tiny":
        world = world_module()
        if world is None:
            raise SystemExit("step_breakdown: --scale tiny needs scmd.world with build_student, "
                             "register_teacher_config, TEACHER_MODEL_NAME, IMAGE_SIZE (not there yet)")
        world.register_teacher_config()
        teacher_name, image_size, names = world.TEACHER_MODEL_NAME, int(world.IMAGE_SIZE), list(world.CLASSES)
        n_envs = len(world.ENVIRONMENTS)
        backbone, student_name = world.build_student(None), getattr(world, "STUDENT_ARCH", "world student")
    elif scale == "full":
        teacher_name, image_size, names, n_envs = "ViT-B-32-quickgelu", 224, list(PACS_CLASSES), 4
        backbone, student_name = torchvision.models.resnet50(weights=None), "resnet50"
    else:
        raise SystemExit(f"step_breakdown: unknown --scale {scale!r} (tiny or full)")
    if n_classes is not None and n_classes != len(names):
        names = [f"class {i}" for i in range(n_classes)]
    clip = open_clip.create_model(teacher_name, pretrained=None).to(device).eval().requires_grad_(False)
    if M.image_size_of(clip) != image_size:
        raise SystemExit(f"teacher {teacher_name} expects {M.image_size_of(clip)} px, student {image_size}")
    tokens = M.tokenize(teacher_name, M.class_prompts(S.SCMD_PROMPT, names)).to(device)
    teacher = S.Teacher(clip, tokens, renorm=False)
    student = S.Student(backbone, len(names), 0.0).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    set_frozen_bn_stats(student, torch.randn(calib_batch, 3, image_size, image_size, generator=g).to(device))
    return Models(scale, device, image_size, names, n_envs, clip, tokens, teacher, student, student_name,
                  teacher_name)


def pick_selector(kind: str) -> str:
    try:
        import fastsel
    except ImportError:
        fastsel = None
    has = fastsel is not None and hasattr(fastsel, "topk_desc")
    if kind == "auto":
        return "fastsel" if has else "torch"
    if kind == "fastsel" and not has:
        raise SystemExit("step_breakdown: --selector fastsel: fastsel.topk_desc is not built")
    return kind


def make_tracker(kind: str, n_samples: int, n_envs: int):
    """(tracker or None, description)."""
    if kind == "none":
        return None, "none (--tracker none)"
    if kind in ("auto", "fastsel"):
        try:
            import fastsel

            if hasattr(fastsel, "Tracker"):
                return fastsel.Tracker(n_samples, n_envs, window=300), "fastsel.Tracker"
        except ImportError:
            pass
        if kind == "fastsel":
            raise SystemExit("step_breakdown: --tracker fastsel: fastsel.Tracker is not built")
    return None, "skipped: fastsel.Tracker is not available"


def make_case(models: Models, name: str, batch: int, seed: int = 0, selector: str = "torch",
              tracker: str = "none", n_samples: int = 10000, timed: bool = True) -> Case:
    """One configuration: a fresh trainer from the shared initial student (same weights for every case), its parts
    wrapped in timers (timed=False: the plain trainer, for the equality test)."""
    algorithm, *variants = name.split("+")
    authors = algorithm == "authors"
    algo = "scmd" if authors else algorithm
    if algo not in S.ALGORITHMS:
        raise SystemExit(f"step_breakdown: unknown configuration {name!r}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"step_breakdown: unknown variant {v!r} in {name!r}; known: {', '.join(VARIANTS)}")
        if v in CUDA_ONLY and models.device.type != "cuda":
            raise SystemExit(f"step_breakdown: the {v} variant needs CUDA")
    dev = models.device
    torch.manual_seed(seed)
    student = copy.deepcopy(models.base_student)
    if "channels_last" in variants:
        student = student.to(memory_format=torch.channels_last)  # before the trainer: SMA/optimizer see these
    hp = make_hparams("vlcs", 0, 0)
    hp["batch_size"] = batch
    stale = "stale" in variants
    args = argparse.Namespace(algorithm=algo, selection_horizon=10**9,  # always selecting (steady state)
                              selection_losses="stale" if stale else "fresh")
    use_selection = S.ALGORITHMS[algo][0]
    if stale and not use_selection:
        raise SystemExit(f"step_breakdown: the stale variant needs an algorithm with selection, not {algo}")
    trk, trk_desc = (None, "n/a") if (authors or not use_selection) else make_tracker(
        "fastsel" if stale else tracker, n_samples, models.n_envs)  # stale ranks by the tracker's losses
    sel = S.Selector("torch" if authors else selector, False, hp["worst_case_p"], trk, seed)
    use_teacher = S.ALGORITHMS[algo][1] or S.ALGORITHMS[algo][2]
    tr = S.SCMDTrainer(args, hp, student, models.teacher if use_teacher else None, sel, dev)
    tr.sma.global_iter = S.SMA_START_ITER - 1  # time the averaging branch (the steady state), not the copy
    case = Case(name, algo, tr, authors=authors, channels_last="channels_last" in variants,
                pinned="pinned" in variants, tracker_desc=trk_desc)
    if use_selection:
        case.selector_desc = ("torch.sort unstable, on the device (authors)" if authors else
                              "fastsel.topk_desc" if sel.kind == "fastsel" else "torch.sort stable")
    if authors:
        tr.teacher = AuthorsTeacher(models.teacher, models.tokens)
        tr.sma = AuthorsSMA(tr.sma, tr.student)
        tr.selector = AuthorsSelector(hp["worst_case_p"])
    if "bf16" in variants:
        tr.amp_dtype = torch.bfloat16
        tr.scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling
    if "compile" in variants:
        tr.student.featurizer = torch.compile(tr.student.featurizer, dynamic=False)
    if "async_select" in variants and use_selection:
        case.deferred = DeferredRecords(trk)
        tr.selector = DeviceSelector(hp["worst_case_p"], case.deferred)
        case.selector_desc = "torch.sort stable, on the device (no host sync)"
        case.tracker_desc = f"{trk_desc}, fed asynchronously" if trk is not None else trk_desc
    if timed:
        instrument(case)
    return case


@dataclass
class HostBatch:
    x: torch.Tensor
    y: torch.Tensor
    domains: torch.Tensor
    ids: torch.Tensor


def synthetic_batches(models: Models, batch: int, count: int, seed: int, n_samples: int) -> List[HostBatch]:
    """The loop's concatenated batch (one minibatch per training env, env order), random contents, host memory."""
    g = torch.Generator().manual_seed(seed + 2)
    n_train, s = models.n_envs - 1, models.image_size
    per_env = n_samples // models.n_envs
    out = []
    for _ in range(count):
        n = batch * n_train
        x = torch.randn(n, 3, s, s, generator=g)
        y = torch.randint(0, len(models.class_names), (n,), generator=g)
        domains = torch.arange(1, n_train + 1).repeat_interleave(batch)  # env ids, test env 0 held out
        ids = domains * per_env + torch.randint(0, per_env, (n,), generator=g)  # global sample ids
        out.append(HostBatch(x, y, domains, ids))
    return out


def run_step(case: Case, hb: HostBatch, step: int, tm, device: torch.device) -> dict:
    """One loop step: the batch's host->device copy (as the loop), then the (timed) update."""
    with tm("data"):
        x = hb.x.to(device, non_blocking=True)
        y = hb.y.to(device, non_blocking=True)
        domains = hb.domains.to(device)
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    case.timer = tm
    out = case.trainer.update(x, y, domains, hb.ids, step)
    if case.deferred is not None and case.deferred.tracker is not None:
        with tm("bookkeeping"):  # conservative: at the end of the same step
            case.deferred.flush()
    return out


# =========================================================================================================
# Environment description
# =========================================================================================================


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        load = os.getloadavg()
        info["load_avg_1m"] = load[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        idx = device.index if device.type == "cuda" and device.index is not None else 0
        p = torch.cuda.get_device_properties(idx)
        info.update(gpu_name=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}", cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["gpu_driver"] = r.stdout.strip().splitlines()[idx] if r.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info["gpu_driver"] = None
    else:
        info.update(gpu_name=None, gpu_driver=None)
    return info


def versions() -> dict:
    import torchvision

    v = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "numpy": np.__version__}
    try:
        import open_clip

        v["open_clip"] = open_clip.__version__
    except ImportError:
        v["open_clip"] = None
    try:
        import fastsel

        v["fastsel"] = getattr(fastsel, "__version__", "unknown")
    except ImportError:
        v["fastsel"] = None
    return v


# =========================================================================================================
# Summaries, table, plot
# =========================================================================================================


def summarise(values: list) -> dict:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def med(result: dict, case: str, phase: str) -> float:
    s = result["configs"][case]["phases"].get(phase)
    return s["median"] if s and s.get("n") else 0.0


def mean(result: dict, case: str, phase: str) -> float:
    s = result["configs"][case]["phases"].get(phase)
    return s["mean"] if s and s.get("n") else 0.0


def format_table(result: dict) -> str:
    """Median ms of each phase; the % is the phase's share of the step from the means (shares add up to 100%,
    medians need not add up to the median total)."""
    names = list(result["configs"])
    w = max(17, *(len(n) + 2 for n in names))
    lines = [f"{'median ms (% of mean step)':<28}" + "".join(f"{n:>{w}}" for n in names)]
    for ph in [*PHASES, "total"]:
        row = f"{ph:<28}"
        for n in names:
            s = result["configs"][n]["phases"].get(ph)
            if not s or not s.get("n"):
                row += f"{'-':>{w}}"
                continue
            tot = mean(result, n, "total")
            pct = "" if ph == "total" else f" ({100 * s['mean'] / tot:4.1f}%)" if tot > 0 else ""
            row += f"{s['median']:>{w - len(pct)}.2f}{pct}"
        lines.append(row)
    return "\n".join(lines)


def derived(result: dict) -> dict:
    """The issue's targets and the before/after ratios of the optimisations."""
    c = result["configs"]
    d = {}
    if "scmd" in c:
        tot = med(result, "scmd", "total")
        rb = med(result, "scmd", "ranking") + med(result, "scmd", "bookkeeping")
        d["scmd_rank_bookkeeping_share_pct"] = 100 * rb / tot if tot else None
        if "erm" in c:
            d["scmd_over_erm_step"] = tot / med(result, "erm", "total")
        if "authors" in c:
            d["authors_over_scmd_step"] = med(result, "authors", "total") / tot
            for ph in ("teacher", "sma", "ranking"):
                ours = med(result, "scmd", ph)
                d[f"authors_over_scmd_{ph}"] = med(result, "authors", ph) / ours if ours else None
            d["sma_ms_ours_vs_authors"] = [med(result, "scmd", "sma"), med(result, "authors", "sma")]
            d["teacher_ms_ours_vs_authors"] = [med(result, "scmd", "teacher"), med(result, "authors", "teacher")]
        for n in c:
            if n.startswith("scmd+"):
                d[f"{n}_over_scmd_step"] = med(result, n, "total") / tot
    return d


def plot(result: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no PNG"
    names = list(result["configs"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 3), 5))
    bottom = np.zeros(len(names))
    cmap = plt.get_cmap("tab20")
    for i, ph in enumerate(PHASES):  # means: the phases of a step add up to its total
        vals = np.maximum(np.array([mean(result, n, ph) for n in names]), 0.0)
        if not vals.any():
            continue
        ax.bar(names, vals, bottom=bottom, label=ph, color=cmap(i))
        bottom += vals
    s = result["settings"]
    ax.set_ylabel("mean ms per step (stacked phases)")
    ax.set_title(f"SCMD step breakdown: {s['scale']} scale, {result['device']}, batch {s['n_train_envs']}x"
                 f"{s['batch']} ({result['machine'].get('gpu_name') or result['machine']['cpu_model']})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# =========================================================================================================
# Main
# =========================================================================================================


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "full"], default="tiny",
                   help="tiny: embedded world's student+teacher (32 px); full: ResNet-50 + ViT-B-32-quickgelu, 224 px")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=32, help="per training domain (3 training domains)")
    p.add_argument("--n-classes", type=int, default=None,
                   help="number of class prompts (default: world's 8 / PACS 7); the authors' text cost grows with it")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default CUDA 100, CPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default CUDA 10, CPU 3)")
    p.add_argument("--configs", default=None,
                   help=f"comma list; default {','.join(BASE_CONFIGS)} + the --variants of scmd")
    p.add_argument("--variants", default=None,
                   help=f"comma list of scmd variants to add ({', '.join(VARIANTS)}; combine with +); default: "
                        f"CUDA {','.join(CUDA_DEFAULT_VARIANTS)}; CPU {','.join(CPU_DEFAULT_VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="add the scmd+compile variant (CUDA; slow warm-up)")
    p.add_argument("--selector", choices=["auto", "fastsel", "torch"], default="auto",
                   help="ranking of our configs: auto = fastsel.topk_desc if built, else torch.sort (stable)")
    p.add_argument("--tracker", choices=["auto", "fastsel", "none"], default="auto",
                   help="bookkeeping: fastsel.Tracker if built, else skipped")
    p.add_argument("--timing", choices=["events", "sync"], default="events", help="CUDA timing mode (see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU); 1 on a shared, oversubscribed machine (OpenMP threads that "
                        "wait for each other make steps up to 10x slower there)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/step_breakdown_<scale>_<device>.json)"
                                                "; the PNG goes next to it")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-config progress lines")
    return p.parse_args(argv)


def resolve(args) -> argparse.Namespace:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"step_breakdown: --device {args.device}: no CUDA device here")
    cuda = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else (100 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("step_breakdown: --steps >= 1, --warmup >= 0, --batch >= 1")
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    else:
        configs = list(BASE_CONFIGS)
        variants = args.variants.split(",") if args.variants is not None else (
            list(CUDA_DEFAULT_VARIANTS) if cuda else list(CPU_DEFAULT_VARIANTS))
        if args.compile:
            variants.append("compile")
        for v in variants:
            v = v.strip()
            if not v:
                continue
            for part in v.split("+"):
                if part not in VARIANTS:
                    raise SystemExit(f"step_breakdown: unknown variant {part!r}; known: {', '.join(VARIANTS)}")
                if part in CUDA_ONLY and not cuda:
                    raise SystemExit(f"step_breakdown: variant {part} needs CUDA")
            configs.append(f"scmd+{v}")
    args.configs = configs
    dev_tag = "cuda" if cuda else "cpu"
    args.out = Path(args.out or ROOT / "bench" / "results" / f"step_breakdown_{args.scale}_{dev_tag}.json")
    return args


def main(argv=None) -> dict:
    args = resolve(parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.deterministic = True  # as the loop (spec 7)
    torch.backends.cudnn.benchmark = False
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"[bench] {NOTE_WEIGHTS}")
    t_build = time.perf_counter()
    models = build_models(args.scale, device, args.seed, args.n_classes)
    selector = pick_selector(args.selector)
    n_samples = 10000
    cases = [make_case(models, name, args.batch, args.seed, selector, args.tracker, n_samples)
             for name in args.configs]
    batches = synthetic_batches(models, args.batch, min(4, args.warmup + args.steps), args.seed, n_samples)
    pinned = [HostBatch(b.x.pin_memory(), b.y.pin_memory(), b.domains.pin_memory(), b.ids)
              for b in batches] if any(c.pinned for c in cases) else None
    log(f"[bench] built {len(cases)} configs in {time.perf_counter() - t_build:.1f} s: {', '.join(args.configs)}")
    tm = PhaseTimer(device, args.timing)
    cuda = device.type == "cuda"
    for case in cases:  # warm-up (cudnn/allocator/compile), then reset the peak-memory counter per case
        t = time.perf_counter()
        for i in range(args.warmup):
            hb = (pinned if case.pinned else batches)[i % len(batches)]
            run_step(case, hb, STEP0 + i, NullTimer(), device)
        if cuda:
            torch.cuda.synchronize()
        log(f"[bench] warm-up {case.name}: {args.warmup} steps, {time.perf_counter() - t:.1f} s")
    # timed steps, interleaved over the configurations (a drifting machine affects all alike)
    for i in range(args.steps):
        for case in cases:
            hb = (pinned if case.pinned else batches)[(args.warmup + i) % len(batches)]
            scale_before = case.trainer.scaler.get_scale() if case.trainer.scaler.is_enabled() else None
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            tm.begin()
            out = run_step(case, hb, STEP0 + args.warmup + i, tm, device)
            r = tm.end()
            for k, v in r.items():
                case.timings[k].append(v)
            case.losses.append(float(out["loss"]))
            if scale_before is not None and case.trainer.scaler.get_scale() < scale_before:
                case.skipped_steps += 1
            if cuda:
                case.peak_mem_mb = max(case.peak_mem_mb or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
        if (i + 1) % max(1, args.steps // 5) == 0:
            log(f"[bench] timed step {i + 1}/{args.steps}")

    result = {
        "benchmark": "step_breakdown",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "machine": machine_info(device),
        "versions": versions(),
        "settings": {"scale": args.scale, "batch": args.batch, "n_train_envs": models.n_envs - 1,
                     "N": args.batch * (models.n_envs - 1),
                     "kept_n": int(args.batch * (models.n_envs - 1) * make_hparams("vlcs", 0, 0)["worst_case_p"]),
                     "image_size": models.image_size, "n_classes": len(models.class_names),
                     "student": models.student_name, "teacher": models.teacher_name, "steps": args.steps,
                     "warmup": args.warmup, "timing": "perf_counter" if not cuda else f"cuda {args.timing}",
                     "selector": selector, "seed": args.seed, "hparams": make_hparams("vlcs", 0, 0),
                     "cudnn_deterministic": True, "cudnn_benchmark": False, "amp": "fp16 autocast + GradScaler"
                     if cuda else "off (CPU, as the loop)", "sma_branch": "averaging (global_iter >= 300)",
                     "weights": "random", "configs": args.configs},
        "notes": [NOTE_WEIGHTS,
                  "frozen BN statistics of the random student set from one synthetic batch (cost unchanged)",
                  "data = host->device copy of a synthetic batch as the loop does it (pageable memory unless "
                  "+pinned); the augmentation pipeline is timed by bench/data_loading.py",
                  "the authors' vendored CLIP also computes unused per-layer token maps; open_clip does not, so "
                  "'authors' underestimates their teacher cost"],
        "phase_help": PHASE_HELP,
        "configs": {},
    }
    for case in cases:
        phases = {ph: summarise(case.timings.get(ph, [])) for ph in [*PHASES, "total"]}
        result["configs"][case.name] = {
            "algorithm": case.algorithm, "pattern": "authors" if case.authors else "ours",
            "selector": case.selector_desc, "tracker": case.tracker_desc,
            "amp_dtype": str(case.trainer.amp_dtype).replace("torch.", ""), "variants": case.name.split("+")[1:],
            "channels_last": case.channels_last, "pinned": case.pinned,
            "phases": phases, "loss_last": case.losses[-1] if case.losses else None,
            "nonfinite_losses": sum(not math.isfinite(v) for v in case.losses),
            "skipped_optimizer_steps": case.skipped_steps, "peak_mem_mb": case.peak_mem_mb,
        }
        if case.skipped_steps:
            result["notes"].append(f"{case.name}: GradScaler skipped {case.skipped_steps} optimizer steps "
                                   f"(inf/nan gradients with random weights): its backward_optim is underestimated")
    sel_trk = {n: c["tracker"] for n, c in result["configs"].items() if c["tracker"] != "n/a"}
    if any("skipped" in t for t in sel_trk.values()):
        result["notes"].append("bookkeeping skipped: fastsel.Tracker is not importable")
    result["derived"] = derived(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    png = args.out.with_suffix(".png")
    note = None if args.no_plot else plot(result, png)
    print_report(result, args.out, None if (args.no_plot or note) else png, note)
    return result


def print_report(result: dict, out: Path, png: Optional[Path], note: Optional[str]) -> None:
    s, m = result["settings"], result["machine"]
    print(f"SCMD step breakdown -- {s['scale']} scale ({s['student']} + {s['teacher']}, {s['image_size']} px, "
          f"{s['n_classes']} classes), batch {s['n_train_envs']}x{s['batch']} = {s['N']} (kept {s['kept_n']}), "
          f"{s['steps']} timed steps after {s['warmup']} warm-up, {s['timing']}")
    print(f"device {result['device']}: {m.get('gpu_name') or m['cpu_model']} ({m['cpu_count']} CPUs, "
          f"{m['torch_threads']} torch threads); selector {s['selector']}")
    for n in result["notes"]:
        print(f"note: {n}")
    print(format_table(result))
    d = result["derived"]
    if d.get("scmd_rank_bookkeeping_share_pct") is not None:
        print(f"target: SCMD ranking (with the losses' d2h copy) + bookkeeping = "
              f"{d['scmd_rank_bookkeeping_share_pct']:.2f}% of the step (target <= 1%)")
    if "scmd_over_erm_step" in d:
        print(f"target: SCMD step / ERM step = {d['scmd_over_erm_step']:.3f} (target <= 0.75 on CUDA)")
    if "authors_over_scmd_step" in d:
        print(f"target: authors' pattern / our SCMD step = {d['authors_over_scmd_step']:.3f} "
              f"(teacher x{d['authors_over_scmd_teacher'] or float('nan'):.2f}, "
              f"SMA x{d['authors_over_scmd_sma'] or float('nan'):.2f})")
    for k, v in d.items():
        if k.startswith("scmd+"):
            print(f"variant: {k.replace('_over_scmd_step', '')} step / scmd step = {v:.3f} "
                  f"({'pays' if v < 0.97 else 'no gain' if v < 1.03 else 'slower'})")
    print(f"JSON: {out}" + (f"\nPNG: {png}" if png else "") + (f"\n({note})" if note else ""))


if __name__ == "__main__":
    main()
