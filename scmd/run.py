"""The plumbing of one run of scmd_ref.py: the device, the dataset folder and its DomainBed splits and loaders,
resume state, DomainBed records, the progress bar, stop signals and the final report files."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from scmd import data as D
from scmd import models as M
from scmd import outputs as O
from scmd.datasets import DATASETS
from scmd.dist import DIST
from scmd.errors import DataError, RunFault, ScmdError, UsageError, one_line
from scmd.hparams import seed_hash
from scmd.settings import DOMAINBED_ALGORITHM_NAME


def say(line: str) -> None:
    """A progress line on stderr (rank 0 only under torchrun)."""
    if DIST.main:
        print(line, file=sys.stderr)


@contextlib.contextmanager
def run_lock(out: Path):
    """One run per folder (held by rank 0 under torchrun); temp files of a killed run are removed under it."""
    if not DIST.main:
        yield
        return
    with O.run_lock(out):
        O.remove_stale_temps(out)
        yield


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------
# data: the folder, its index, the images, the in/out splits and the evaluation loaders (spec 8-9)


def dataset_root(s) -> Path:
    data_dir = Path(s.data_dir)
    info = DATASETS[s.dataset]
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    if info.generate is not None:  # made on first use, deterministically
        try:
            return info.generate(data_dir, progress=not s.no_progress, n_per_class=s.world_per_class)
        except OSError as e:
            raise DataError(f"cannot write the {s.dataset} dataset into {e.filename or data_dir}: {e.strerror}; "
                            f"pass a writable --data-dir") from None
    root = data_dir / info.folder
    if s.download:
        from scmd.download import download_dataset

        root = download_dataset(s.dataset, data_dir)
    if not root.exists():
        raise DataError(f"dataset folder {root} not found; download it with `python scmd_ref.py --dataset "
                        f"{s.dataset} --download --data-dir {data_dir}` or point --data-dir at the folder that "
                        f"holds {info.folder}/")
    return root


def load_data(s, out: Path, image_size: int) -> SimpleNamespace:
    """The index (checked against the dataset's table entry), the image store, every env's in/out split and
    the evaluation loaders (name, loader), in DomainBed's order."""
    index = D.index_dataset(dataset_root(s))
    expected = list(DATASETS[s.dataset].envs)
    if index.envs != expected:
        raise DataError(f"{index.root} has domains {index.envs}; {s.dataset} expects {expected}")
    n_envs = len(index.envs)
    splits = [D.in_out_split(len(index.paths[e]), s.holdout_fraction, s.trial_seed, e) for e in range(n_envs)]
    for e, (out_idx, in_idx) in enumerate(splits):
        if len(out_idx) == 0 or len(in_idx) == 0:
            raise UsageError(f"--holdout-fraction {s.holdout_fraction} leaves domain {index.envs[e]} "
                             f"({len(index.paths[e])} images) {'no validation' if len(out_idx) == 0 else 'no training'}"
                             f" images; choose a fraction between {1 / len(index.paths[e]):.3g} and "
                             f"{1 - 1 / len(index.paths[e]):.3g}")
    in_memory = DATASETS[s.dataset].in_memory
    truncated_log = out / O.TRUNCATED
    store = D.ImageStore(index, preload=in_memory, truncated="refuse" if s.refuse_truncated_images else "pad",
                         as_tensors=in_memory, truncated_log=str(truncated_log))
    eval_loaders = []
    for e in range(n_envs):
        out_idx, in_idx = splits[e]
        if e == s.test_env:  # DomainBed reshuffles the test env's in-split (same content)
            in_idx = in_idx.copy()
            np.random.RandomState(seed_hash(s.trial_seed, e)).shuffle(in_idx)
        for name, idx in (("in", in_idx), ("out", out_idx)):
            if s.eval_splits == "selection" and name == "in" and e != s.test_env:
                continue  # only reported, never used for selection
            augmented = e != s.test_env  # DomainBed quirk: training envs are validated on augmented images
            tf = D.train_transform(image_size) if augmented else D.eval_transform(image_size)
            split = D.EvalSplit(store, e, idx, tf, augmented, s.seed, f"env{e}_{name}", image_size)
            eval_loaders.append((f"env{e}_{name}", D.eval_loader(split, 64, s.workers, (DIST.rank, DIST.world))))
    train_envs = [e for e in range(n_envs) if e != s.test_env]
    return SimpleNamespace(index=index, store=store, splits=splits, eval_loaders=eval_loaders, train_envs=train_envs,
                           n_envs=n_envs, truncated_log=truncated_log)


def train_loaders(s, data, batch_size: int, image_size: int, start_step: int, device, lazy_until: int = -1) -> list:
    """One step-indexed loader per training env: the minibatch of step t is a function of (seed, env, t).
    In-memory batches of steps <= lazy_until come as D.LazyImages (pixels made only for the rows taken)."""
    return [iter(D.train_loader(D.StepBatches(data.store, e, data.splits[e][1], batch_size, s.seed, image_size,
                                              DIST.share(batch_size), lazy_until),
                                start_step, s.workers, pin_memory=device.type == "cuda")) for e in data.train_envs]


def steps_per_epoch(data, batch_size: int) -> float:
    return min(len(data.splits[e][1]) / batch_size for e in data.train_envs)


@torch.no_grad()
def teacher_zero_shot(s, clip, data, prompt: str, device) -> list:
    """The teacher's zero-shot accuracy per domain, as the paper's Table 1 teacher row: clean images
    (no augmentation), CLIP normalisation, prompt 'a photo of a {}'."""
    tokens = M.tokenize(s.teacher, M.class_prompts(prompt, data.index.classes)).to(device)
    t_hat = F.normalize(clip.encode_text(tokens).float(), dim=-1)
    size = M.image_size_of(clip)
    tf = D.eval_transform(size, D.CLIP_MEAN, D.CLIP_STD)
    accs = []
    for e in range(data.n_envs):
        split = D.EvalSplit(data.store, e, np.arange(len(data.index.paths[e])), tf, augmented=False, seed=0,
                            name=f"t{e}", size=size, mean=D.CLIP_MEAN, std=D.CLIP_STD)
        correct = 0
        for x, y in D.eval_loader(split, 128, s.workers):
            z = F.normalize(clip.encode_image(x.to(device)).float(), dim=-1) @ t_hat.T
            correct += (z.argmax(1).cpu() == y).sum().item()
        accs.append(correct / len(split))
    return accs


# ---------------------------------------------------------------------------------------------------------
# the hard-sample tracker (observational: it never changes what is selected)


def make_tracker(s, index):
    import fastsel

    return fastsel.Tracker(index.n_samples, len(index.envs), window=s.checkpoint_freq)


def tracker_state(tracker):
    if tracker is None:
        return None
    return {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
            for k, v in tracker.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# resume


def finished(out: Path, fingerprint: dict, resume: str) -> bool:
    """A finished folder is reused only when its done marker records these settings."""
    if (out / O.DONE).exists() and resume != "no":
        O.check_finished_run(out, fingerprint)
        say(f"[scmd] {out} holds a finished run with these settings; pass --resume no or another "
            f"--output-dir to run again")
        return True
    return False


def restore(out: Path, resume: str, fingerprint: dict, trainer, tracker):
    """(checkpoint or None, first step, records so far, window sums) of the run in `out`."""
    ckpt = O.load_checkpoint(out / O.CKPT_LAST) if resume != "no" else None
    if resume == "yes" and ckpt is None:
        raise UsageError(f"--resume yes: no checkpoint in {out}")
    if ckpt is None:  # a run without a checkpoint (or --resume no) starts afresh: nothing of an older run stays
        for name in (O.DONE, O.RESULTS, O.TRUNCATED, "summary.json", "hardness.json", "kept_share.png", O.CKPT_BEST):
            if DIST.main:
                (out / name).unlink(missing_ok=True)
        return None, 0, [], None
    if ckpt["fingerprint"] != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(ckpt["fingerprint"])
                      if fingerprint.get(k) != ckpt["fingerprint"].get(k))
        raise UsageError(f"{out} holds a run made with different settings ({', '.join(diff)}); use another "
                         f"--output-dir, or --resume no to start afresh there")
    load_trainer_state(trainer, ckpt["trainer"])
    if tracker is not None:
        tracker.load_state_dict({k: (v.numpy() if torch.is_tensor(v) else v) for k, v in ckpt["tracker"].items()})
    O.set_rng_state(ckpt["rng"])
    records = [r for r in O.read_records(out / O.RESULTS) if r["step"] <= ckpt["step"]]
    if DIST.main:
        O.rewrite_records(out / O.RESULTS, records)
    say(f"[scmd] resuming {out} at step {ckpt['step'] + 1} ({len(records)} records kept)")
    return ckpt, ckpt["step"] + 1, records, ckpt["window"]


def save_last(out: Path, step: int, trainer, tracker, window: dict, fingerprint: dict, teacher_acc) -> None:
    if DIST.main:
            O.atomic_torch_save({"step": step, "trainer": trainer_state(trainer), "rng": O.rng_state(),
                             "tracker": tracker_state(tracker), "window": window, "fingerprint": fingerprint,
                             "teacher_zero_shot": teacher_acc}, out / O.CKPT_LAST)


def add_record(out: Path, records: list, rec: dict, s, data, step: int, sma_net, fingerprint: dict) -> dict:
    """Appends an evaluation record; keeps the SMA weights of the best one by training-domain validation."""
    sel = O.training_domain_selection(records, s.test_env, data.n_envs)
    if DIST.main:
        O.append_record(out / O.RESULTS, rec)
        if sel["record"] is rec:
            O.atomic_torch_save({"step": step, "sma": sma_net.state_dict(), "record": rec, "fingerprint": fingerprint},
                                out / O.CKPT_BEST)
    return sel


# ---------------------------------------------------------------------------------------------------------
# records (DomainBed's fields, so its collect_results reads our folders, plus ours)


def trainer_state(t) -> dict:
    """Everything a resumed run needs of the trainer: student, SMA, optimiser, loss scaler, P and theta."""
    st = {"student": t.student.state_dict(), "sma": t.sma.net.state_dict(), "sma_global_iter": t.sma.global_iter,
          "sma_count": t.sma.count, "optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict()}
    if t.use_cm:
        st["projector"] = t.projector.state_dict()
        st["theta"] = t.theta.detach().clone()
    return st


def load_trainer_state(t, st: dict) -> None:
    t.student.load_state_dict(st["student"])
    t.sma.net.load_state_dict(st["sma"])
    t.sma.global_iter, t.sma.count = st["sma_global_iter"], st["sma_count"]
    if t.use_cm:
        t.projector.load_state_dict(st["projector"])
        with torch.no_grad():
            t.theta.copy_(st["theta"])
    t.optimizer.load_state_dict(st["optimizer"])
    t.scaler.load_state_dict(st["scaler"])


def new_window() -> dict:
    """Sums over the steps since the last evaluation record (saved in checkpoints)."""
    return {"loss": 0.0, "count": 0, "time": 0.0}


def record_head(s, hparams, data, step: int, window: dict, device) -> dict:
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"step": step, "epoch": step / steps_per_epoch(data, hparams["batch_size"]),
            "loss": window["loss"] / max(window["count"], 1), "step_time": window["time"] / max(window["count"], 1),
            "mem_gb": mem}


def record_tail(s, hparams, selecting: bool, cm_logit_scale) -> dict:
    db_args = {"dataset": DATASETS[s.dataset].domainbed_name, "algorithm": DOMAINBED_ALGORITHM_NAME[s.algorithm],
               "test_envs": [s.test_env], "data_dir": s.data_dir, "output_dir": s.output_dir, "hparams": s.hparams,
               "hparams_seed": s.hparams_seed, "trial_seed": s.trial_seed, "seed": s.seed, "steps": s.steps,
               "checkpoint_freq": s.checkpoint_freq, "holdout_fraction": s.holdout_fraction,
               "uda_holdout_fraction": 0, "task": "domain_generalization", "skip_model_save": False,
               "save_model_every_checkpoint": False}
    fields = {"args": db_args, "hparams": hparams, "selecting": selecting,
              "scmd_args": {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    if cm_logit_scale is not None:
        fields["cm_logit_scale"] = cm_logit_scale
    return fields


# ---------------------------------------------------------------------------------------------------------
# progress, loss statistics, stop signals


class Stats:
    """The last steps' losses, read from the device in one transfer every 10 steps (and before every
    evaluation or checkpoint); the time per step is measured between those reads, which wait for the device."""

    KEYS = ("loss", "ce", "logits", "cm", "n", "N")

    def __init__(self, s, start_step: int):
        self.pending, self.t_mark = [], time.time()
        self.pbar = None
        if not s.no_progress and DIST.main:
            from tqdm import tqdm

            self.pbar = tqdm(total=s.steps, initial=start_step, desc=f"{s.algorithm} te{s.test_env}",
                             dynamic_ncols=True, file=sys.stderr)

    def add(self, step: int, stats: dict, window: dict) -> None:
        self.pending.append((step, stats))
        if len(self.pending) >= 10:
            self.flush(window)

    def flush(self, window: dict) -> None:
        """Stops on a non-finite loss; adds the losses and the elapsed time to the window sums."""
        if self.pending:
            vals = torch.stack([torch.stack([st[k].float().cpu() for k in self.KEYS]) for _, st in self.pending])
            for (step, _), v in zip(self.pending, vals.tolist()):
                if not all(math.isfinite(a) for a in v[:4]):
                    raise RunFault(f"the loss became {v[0]} at step {step} (L_CE {v[1]}, L_logits {v[2]}, L_CM "
                                   f"{v[3]}); stopped; records and the last checkpoint so far are kept (try a lower "
                                   f"lr)")
                window["loss"] += v[0]
                window["count"] += 1
            if self.pbar:
                v = vals[-1].tolist()
                self.pbar.set_postfix_str(f"L {v[0]:.3f} CE {v[1]:.3f} logits {v[2]:.3f} CM {v[3]:.3f} "
                                          f"n {int(v[4])}/{int(v[5])}")
                self.pbar.update(len(self.pending))
        window["time"] += time.time() - self.t_mark
        self.pending = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_mark = time.time()

    def write(self, line: str) -> None:
        if self.pbar:
            self.pbar.write(line)

    def close(self) -> None:
        if self.pbar:
            self.pbar.close()


class StopSignals:
    """SIGINT, SIGTERM (what Slurm sends before it preempts or kills a job) and SIGUSR1 ask the run to stop:
    it finishes the current step, writes a checkpoint and exits with 128 + the signal number. A second Ctrl-C
    (SIGINT) stops at once; repeated SIGTERMs (Slurm and a launcher may both send one) change nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self):
        self.signum, self.old = None, {}
        for sig in self.SIGNALS:
            self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        # A signal to the whole process group (Slurm, Ctrl-C) also ends the loader workers; torch's SIGCHLD handler
        # would then raise in the middle of the step or of the checkpoint write. Without it the loader reports
        # the dead workers at the next batch, where the loop expects it.
        self.old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def name(self) -> str:
        return signal.Signals(self.signum).name


# ---------------------------------------------------------------------------------------------------------
# final report


def write_report(out: Path, s, hparams, data, records, teacher_acc, tracker, fingerprint) -> str:
    """summary.json, hardness.json and kept_share.png (selection runs), then the done marker; returns the table."""
    selected = O.training_domain_selection(records, s.test_env, data.n_envs)
    truncated = D.truncated_files(str(data.truncated_log))
    summary = {"selected_step": selected["record"]["step"], "val_acc": selected["val_acc"], "test_env": s.test_env,
               "test_acc": selected["record"][f"env{s.test_env}_in_acc"], "envs": data.index.envs,
               "teacher_zero_shot": teacher_acc, "algorithm": s.algorithm, "hparams": hparams,
               "truncated_images": len(truncated)}
    if tracker is not None:
        report = json.loads(tracker.report_json())
        report["hardest_paths"] = {data.index.envs[int(d["domain"])]: [data.index.global_path(h["sample_id"])
                                                                       for h in d["hardest"]]
                                   for d in report["domains"]}
        O.atomic_write_bytes(out / "hardness.json", json.dumps(report, indent=1).encode())
        O.plot_kept_share(report, data.index.envs, hparams["worst_case_p"], out / "kept_share.png")
    O.atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    O.atomic_write_bytes(out / O.DONE, json.dumps(fingerprint, indent=1, sort_keys=True).encode())
    if truncated:
        print(f"[scmd] warning: {len(truncated)} truncated image file(s) were loaded padded, as DomainBed does; "
              f"list in {data.truncated_log} (--refuse-truncated-images stops on them instead)", file=sys.stderr)
    return O.format_table(data.index.envs, s.test_env, selected, teacher_acc)


def stopped(out: Path, step: int, trainer, tracker, window, fingerprint, teacher_acc, stats, stop) -> int:
    """After a stop signal: the checkpoint of the last finished step, one line, exit status 128 + signal."""
    stats.flush(window)
    stats.close()
    if step >= 0:
        save_last(out, step, trainer, tracker, window, fingerprint, teacher_acc)
    where = f"after step {step}; checkpoint in {out}" if step >= 0 else "before the first step"
    if stop.requested:  # (torchrun: the ranks that got no signal stop with the one that did)
        say(f"scmd_ref.py: stopped by {stop.name()} {where}; rerun the same command to resume")
    return stop.exit_code() if stop.requested else 128 + signal.SIGTERM


def cli(main, argv=None) -> int:
    """Run main; a bad input or a run fault is one line on stderr and its exit status (--debug: traceback)."""
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        return main(argv)
    except ScmdError as e:
        if debug:
            raise
        print(f"scmd_ref.py: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("scmd_ref.py: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
