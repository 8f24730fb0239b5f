"""The plumbing of one run of scmd_ref.py: the output folder, seeding, the device, the dataset folder with its
DomainBed splits and loaders (Data), the run's state with its verbs (Run: restore, log, add_record, save, stopped,
finish), the progress bar, stop signals and the one-line error exit."""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scmd import data as D
from scmd import outputs as O
from scmd import startup
from scmd.datasets import DATASETS
from scmd.dist import DIST
from scmd.errors import DataError, RunFault, ScmdError, UsageError, one_line, write_cause
from scmd.hparams import seed_hash
from scmd.plots import plot_curves, plot_kept_share
from scmd.settings import DOMAINBED_ALGORITHM_NAME


def say(line: str) -> None:
    """A progress line on stderr (rank 0 only under torchrun)."""
    if DIST.main:
        print(line, file=sys.stderr)


@contextlib.contextmanager
def output_folder(path: str):
    """The run's folder, created and proven writable, held for the whole run (one run per folder; held by rank 0
    under torchrun); temporary files of a killed run are removed under the lock."""
    out = Path(path)
    if not DIST.main:
        yield out
        return
    O.prepare_output_dir(out)
    with O.run_lock(out):
        O.remove_stale_temps(out)
        yield out


def seed_everything(seed: int) -> None:
    """DomainBed's train script: Python, numpy and torch seeded with the run seed; deterministic cuDNN."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


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
# data: the folder, its index, the images, the in/out splits and the loaders (§7)


def dataset_root(dataset: str, data_dir: str, download: bool = False, world_per_class=None,
                 progress: bool = True) -> Path:
    """The dataset's folder under data_dir: generated on first use (the embedded world), downloaded (--download),
    or found; a missing folder says how to get it."""
    data_dir = Path(data_dir)
    info = DATASETS[dataset]
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    if info.generate is not None:  # made on first use, deterministically
        try:
            return info.generate(data_dir, progress=progress, n_per_class=world_per_class)
        except OSError as e:
            raise DataError(f"cannot write the {dataset} dataset into {e.filename or data_dir}: {write_cause(e)}; "
                            f"free space or pass a writable --data-dir") from None
    root = data_dir / info.folder
    if download:
        from scmd.download import download_dataset

        root = download_dataset(dataset, data_dir)
    if not root.exists():
        raise DataError(f"dataset folder {root} not found; download it with `python scmd_ref.py --dataset "
                        f"{dataset} --download --data-dir {data_dir}` or point --data-dir at the folder that "
                        f"holds {info.folder}/")
    return root


class Data:
    """One dataset as a run uses it: the index (checked against the dataset's table entry), the image store, every
    env's in/out split (DomainBed's), the step-indexed training minibatches and the evaluation loaders."""

    def __init__(self, dataset: str, root: Path, holdout_fraction: float, trial_seed: int, test_env: int, seed: int,
                 image_size: int, eval_splits: str, workers: int, refuse_truncated: bool, out: Path, fastsel=None):
        self.index = index = D.index_dataset(root, fastsel)
        expected = list(DATASETS[dataset].envs)
        if index.envs != expected:
            raise DataError(f"{index.root} has domains {index.envs}; {dataset} expects {expected}")
        self.n_envs = n_envs = len(index.envs)
        self.splits = [D.in_out_split(len(index.paths[e]), holdout_fraction, trial_seed, e) for e in range(n_envs)]
        for e, (out_idx, in_idx) in enumerate(self.splits):
            if len(out_idx) == 0 or len(in_idx) == 0:
                n = len(index.paths[e])
                raise UsageError(f"--holdout-fraction {holdout_fraction} leaves domain {index.envs[e]} ({n} images) "
                                 f"{'no validation' if len(out_idx) == 0 else 'no training'} images; choose a "
                                 f"fraction between {1 / n:.3g} and {1 - 1 / n:.3g}")
        in_memory = DATASETS[dataset].in_memory
        self.truncated_log = out / O.TRUNCATED
        self.store = D.ImageStore(index, preload=in_memory, truncated="refuse" if refuse_truncated else "pad",
                                  as_tensors=in_memory, truncated_log=str(self.truncated_log))
        self.test_env, self.seed, self.image_size, self.workers = test_env, seed, image_size, workers
        self.train_envs = [e for e in range(n_envs) if e != test_env]
        self.evaluated = []  # (name, loader) of every evaluated split, in DomainBed's order
        for e in range(n_envs):
            out_idx, in_idx = self.splits[e]
            if e == test_env:  # DomainBed reshuffles the test env's in-split (same content)
                in_idx = in_idx.copy()
                np.random.RandomState(seed_hash(trial_seed, e)).shuffle(in_idx)
            for name, idx in (("in", in_idx), ("out", out_idx)):
                if eval_splits == "selection" and name == "in" and e != test_env:
                    continue  # only reported, never used for selection
                augmented = e != test_env  # DomainBed quirk: training envs are validated on augmented images
                tf = D.train_transform(image_size) if augmented else D.eval_transform(image_size)
                split = D.EvalSplit(self.store, e, idx, tf, augmented, seed, f"env{e}_{name}", image_size)
                self.evaluated.append((f"env{e}_{name}", D.eval_loader(split, 64, workers, (DIST.rank, DIST.world))))

    def step_batches(self, batch_size: int, start_step: int, device, lazy_until: int = -1):
        """The (x, y, domains, ids) of every step from start_step: one minibatch per training env, concatenated in
        env order on `device`; the minibatch of step t is a function of (seed, env, t). In-memory batches of steps
        <= lazy_until come as D.LazyImages (pixels made only for the rows taken)."""
        iters = [iter(D.train_loader(D.StepBatches(self.store, e, self.splits[e][1], batch_size, self.seed,
                                                   self.image_size, DIST.share(batch_size), lazy_until),
                                     start_step, self.workers, pin_memory=device.type == "cuda"))
                 for e in self.train_envs]
        while True:
            parts = [next(it) for it in iters]
            x = D.cat_images([b[0] for b in parts], device)  # pinned -> async copies on CUDA
            y = torch.cat([b[1].to(device, non_blocking=True) for b in parts])
            ids = torch.cat([b[2] for b in parts])
            domains = torch.cat([torch.full((len(b[1]),), e, dtype=torch.int64)
                                 for e, b in zip(self.train_envs, parts)])
            yield x, y, domains, ids

    def eval_loaders(self, step: int) -> list:
        """(name, loader) of every evaluated split; training envs' splits are augmented with draws fixed by step."""
        for _, loader in self.evaluated:
            loader.batch_sampler.eval_step = step
        return self.evaluated

    def clip_loaders(self, size: int) -> list:
        """One loader per env over all its images, clean and CLIP-normalised (the Table 1 teacher row)."""
        tf = D.eval_transform(size, D.CLIP_MEAN, D.CLIP_STD)
        return [D.eval_loader(D.EvalSplit(self.store, e, np.arange(len(self.index.paths[e])), tf, augmented=False,
                                          seed=0, name=f"t{e}", size=size, mean=D.CLIP_MEAN, std=D.CLIP_STD),
                              128, self.workers, (DIST.rank, DIST.world)) for e in range(self.n_envs)]

    def steps_per_epoch(self, batch_size: int) -> float:
        return min(len(self.splits[e][1]) / batch_size for e in self.train_envs)


# ---------------------------------------------------------------------------------------------------------
# one run's state: resume, records, checkpoints, stop, final report


def finished(out: Path, fingerprint: dict, resume: str) -> bool:
    """A finished folder is reused only when its done marker records these settings."""
    if (out / O.DONE).exists() and resume != "no":
        O.check_finished_run(out, fingerprint)
        say(f"[scmd] {out} holds a finished run with these settings; pass --resume no or another "
            f"--output-dir to run again")
        return True
    return False


def record_fields(s, hparams: dict) -> dict:
    """The fields every record of the run repeats: DomainBed's args (so its collect_results reads our folders), the
    hparams, and every setting of ours."""
    db_args = {"dataset": DATASETS[s.dataset].domainbed_name, "algorithm": DOMAINBED_ALGORITHM_NAME[s.algorithm],
               "test_envs": [s.test_env], "data_dir": s.data_dir, "output_dir": s.output_dir, "hparams": s.hparams,
               "hparams_seed": s.hparams_seed, "trial_seed": s.trial_seed, "seed": s.seed, "steps": s.steps,
               "checkpoint_freq": s.checkpoint_freq, "holdout_fraction": s.holdout_fraction,
               "uda_holdout_fraction": 0, "task": "domain_generalization", "skip_model_save": False,
               "save_model_every_checkpoint": False}
    return {"args": db_args, "hparams": hparams,
            "scmd_args": {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool, type(None)))}}


class Run:
    """What a run checkpoints, stops and reports with: its folder and settings fingerprint, the trainer (and the
    selector's tracker), the records so far, the loss/time sums since the last record, the progress bar and the
    teacher's zero-shot accuracy. Rank 0 writes (torchrun)."""

    def __init__(self, out: Path, fingerprint: dict, trainer, stop, fields: dict, steps: int, envs: list,
                 test_env: int, progress: bool = True):
        self.out, self.fingerprint, self.trainer, self.stop, self.fields = out, fingerprint, trainer, stop, fields
        self.tracker = getattr(trainer.selector, "tracker", None)
        self.envs, self.test_env, self.steps = envs, test_env, steps
        self.records, self.window, self.teacher_acc = [], _new_window(), None
        self.progress, self.stats = progress, None

    # --- start ----------------------------------------------------------------------------------------------
    def restore(self, resume: str) -> int:
        """Loads the folder's checkpoint (trainer, tracker, RNG, records, sums); returns the first step to run."""
        out = self.out
        ckpt = O.load_checkpoint(out / O.CKPT_LAST) if resume != "no" else None
        if resume == "yes" and ckpt is None:
            raise UsageError(f"--resume yes: no checkpoint in {out}")
        if ckpt is None:  # a run without a checkpoint (or --resume no) starts afresh: nothing of an older run stays
            for name in (O.DONE, O.RESULTS, O.TRUNCATED, "summary.json", "hardness.json", "kept_share.png",
                         "curves.png", O.CKPT_BEST):
                if DIST.main:
                    (out / name).unlink(missing_ok=True)
            return self._start(0)
        if ckpt["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in set(self.fingerprint) | set(ckpt["fingerprint"])
                          if self.fingerprint.get(k) != ckpt["fingerprint"].get(k))
            raise UsageError(f"{out} holds a run made with different settings ({', '.join(diff)}); use another "
                             f"--output-dir, or --resume no to start afresh there")
        load_trainer_state(self.trainer, ckpt["trainer"])
        if self.tracker is not None:
            self.tracker.load_state_dict({k: (v.numpy() if torch.is_tensor(v) else v)
                                          for k, v in ckpt["tracker"].items()})
        O.set_rng_state(ckpt["rng"])
        self.records = [r for r in O.read_records(out / O.RESULTS) if r["step"] <= ckpt["step"]]
        if DIST.main:
            O.rewrite_records(out / O.RESULTS, self.records)
        self.window, self.teacher_acc = ckpt["window"], ckpt["teacher_zero_shot"]
        say(f"[scmd] resuming {out} at step {ckpt['step'] + 1} ({len(self.records)} records kept)")
        return self._start(ckpt["step"] + 1)

    def _start(self, step: int) -> int:
        a = self.fields["scmd_args"]
        self.stats = Stats(self.steps, step, f"{a['algorithm']} te{a['test_env']}", self.progress)
        return step

    # --- every step -----------------------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        self.stop.starting = False  # the loop runs: a signal now stops after a step, with a checkpoint
        return DIST.any(self.stop.requested)  # (torchrun: a signal to one rank stops every rank after this step)

    def next_batch(self, batches):
        """The next step batch, or None when a stop signal also ended the loader workers."""
        if self.stats.t_mark is None:
            self.stats.restart_clock()  # the time per step counts from the first step batch on
        try:
            return next(batches)
        except Exception:
            if self.stop.requested:
                return None
            raise

    def log(self, step: int, stats: dict, flush: bool = False) -> None:
        """The step's losses (read from the device every 10 steps, and at a flush); stops on a NaN/inf loss."""
        self.stats.add(step, stats, self.window)
        if flush:
            self.stats.flush(self.window)

    # --- every evaluation and checkpoint ----------------------------------------------------------------------
    def add_record(self, step: int, accs: dict, epoch: float) -> None:
        """Appends the evaluation record; keeps the SMA weights of the best one by training-domain validation;
        redraws curves.png."""
        t, w = self.trainer, self.window
        device = t.device
        rec = {"step": step, "epoch": epoch, "loss": w["loss"] / max(w["count"], 1),
               "step_time": w["time"] / max(w["count"], 1),
               "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
               **accs, **self.fields, "selecting": t.selecting(step)}
        if t.use_cm:
            rec["cm_logit_scale"] = float(t.theta.detach().exp())
        self.records.append(rec)
        sel = O.training_domain_selection(self.records, self.test_env, len(self.envs))
        if DIST.main:
            O.append_record(self.out / O.RESULTS, rec)
            if sel["record"] is rec:
                O.atomic_torch_save({"step": step, "sma": t.sma.net.state_dict(), "record": rec,
                                     "fingerprint": self.fingerprint}, self.out / O.CKPT_BEST)
            plot_curves(self.records, self.envs, self.test_env, t.cutoff if t.use_selection else None,
                        sel["record"]["step"], self.teacher_acc, self.out / "curves.png")
        self.window = _new_window()
        self.stats.write(f"step {step}: train-domain val {100 * sel['val_acc']:.1f}% (best), "
                         f"test-domain {100 * rec[f'env{self.test_env}_in_acc']:.1f}%")

    def save(self, step: int) -> None:
        """checkpoint_last.pt: everything the run needs to continue after `step` exactly as if never stopped."""
        if DIST.main:
            O.atomic_torch_save({"step": step, "trainer": trainer_state(self.trainer), "rng": O.rng_state(),
                                 "tracker": tracker_state(self.tracker), "window": self.window,
                                 "fingerprint": self.fingerprint, "teacher_zero_shot": self.teacher_acc},
                                self.out / O.CKPT_LAST)
        self.stats.restart_clock()

    # --- the end ------------------------------------------------------------------------------------------------
    def stopped(self, step: int) -> int:
        """After a stop signal: the checkpoint of the last finished step, one line, exit status 128 + signal."""
        self.stats.flush(self.window)
        self.stats.close()
        if step >= 0:
            self.save(step)
        where = f"after step {step}; checkpoint in {self.out}" if step >= 0 else "before the first step"
        if self.stop.requested:  # (torchrun: the ranks that got no signal stop with the one that did)
            say(f"scmd_ref.py: stopped by {self.stop.name()} {where}; rerun the same command to resume")
        return self.stop.exit_code() if self.stop.requested else 128 + signal.SIGTERM

    def finish(self, hparams: dict, data: Data) -> int:
        """summary.json, hardness.json and kept_share.png (with a tracker), then the done marker; prints the table."""
        self.stats.close()
        if not DIST.main:
            return 0
        out, envs = self.out, self.envs
        selected = O.training_domain_selection(self.records, self.test_env, len(envs))
        truncated = D.truncated_files(str(data.truncated_log))
        summary = {"selected_step": selected["record"]["step"], "val_acc": selected["val_acc"],
                   "test_env": self.test_env, "test_acc": selected["record"][f"env{self.test_env}_in_acc"],
                   "envs": envs, "teacher_zero_shot": self.teacher_acc,
                   "algorithm": self.fields["scmd_args"]["algorithm"], "hparams": hparams,
                   "truncated_images": len(truncated)}
        if self.tracker is not None:
            report = json.loads(self.tracker.report_json())
            report["hardest_paths"] = {envs[int(d["domain"])]: [data.index.global_path(h["sample_id"])
                                                                for h in d["hardest"]] for d in report["domains"]}
            O.atomic_write_bytes(out / "hardness.json", json.dumps(report, indent=1).encode())
            plot_kept_share(report, envs, hparams["worst_case_p"], out / "kept_share.png")
        O.atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
        O.atomic_write_bytes(out / O.DONE, json.dumps(self.fingerprint, indent=1, sort_keys=True).encode())
        if truncated:
            print(f"[scmd] warning: {len(truncated)} truncated image file(s) were loaded padded, as DomainBed "
                  f"does; list in {data.truncated_log} (--refuse-truncated-images stops on them instead)",
                  file=sys.stderr)
        print(O.format_table(envs, self.test_env, selected, self.teacher_acc))
        print(f"[scmd] results in {out}")
        return 0


def _new_window() -> dict:
    """Sums over the steps since the last evaluation record (saved in checkpoints)."""
    return {"loss": 0.0, "count": 0, "time": 0.0}


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


def tracker_state(tracker):
    if tracker is None:
        return None
    return {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
            for k, v in tracker.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# progress, loss statistics, stop signals


class Stats:
    """The last steps' losses, read from the device in one transfer every 10 steps (and before every
    evaluation or checkpoint); the time per step is measured between those reads, which wait for the device."""

    KEYS = ("loss", "ce", "logits", "cm", "n", "N")

    def __init__(self, steps: int, start_step: int, desc: str, progress: bool = True):
        self.pending, self.t_mark = [], None  # the clock starts with the first step batch
        self.pbar = None
        if progress and DIST.main:
            from tqdm import tqdm

            self.pbar = tqdm(total=steps, initial=start_step, desc=desc, dynamic_ncols=True, file=sys.stderr)

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
        if self.t_mark is not None:
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
    """During start-up (until the loop's first step) a signal ends the run at once, as scmd/startup.py says. Then
    SIGINT, SIGTERM (what Slurm sends before it preempts or kills a job) and SIGUSR1 ask the run to stop:
    it finishes the current step, writes a checkpoint and exits with 128 + the signal number. A second Ctrl-C
    (SIGINT) stops at once; repeated SIGTERMs (Slurm and a launcher may both send one) change nothing."""

    SIGNALS = startup.SIGNALS

    def __enter__(self):
        self.signum, self.old, self.starting = None, {}, True
        for sig in self.SIGNALS:
            self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.starting:  # before the loop's first step: one line and exit at once (scmd/startup.py)
            startup.stop(signum, frame)
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
