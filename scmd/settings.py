"""Command-line settings: a dataclass whose fields carry their own help becomes an argparse parser, and every
setting is checked before any work is done. Imports no torch, so ``--help`` and a bad flag answer at once.

Every problem is one ``UsageError`` line naming the setting, the allowed range and the fix."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import string
import sys
from typing import Any, Optional, Sequence

from scmd.datasets import DATASETS, canonical_dataset
from scmd.errors import UsageError
from scmd.hparams import make_hparams

SEED_MAX = 2**32 - 1  # numpy's seed range (torch's is wider)
MIN_IMAGE_SIZE = 32  # a ResNet downsamples by 32: below this its last stage sees less than one pixel
MAX_WORKERS = 256
DEVICE_SYNTAX = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
# DomainBed's class names of our algorithms (written to results.jsonl, and in its sweep seeds)
DOMAINBED_ALGORITHM_NAME = {"erm": "ERM", "kd": "KD", "scmd-no-cm": "SCMD_no_CM", "scmd-no-select": "SCMD_no_select",
                            "scmd": "SCMD"}
# settings that do not change a run's result (they are left out of its fingerprint)
RUN_ONLY = ("data_dir", "output_dir", "device", "workers", "save_every", "resume", "download", "no_progress", "debug",
            "selector")


def arg(default: Any, help: str, *aliases: str, type: Optional[type] = None, **kw: Any) -> Any:
    """A settings field: its default and its help (shown by --help); aliases are extra flag spellings."""
    return dataclasses.field(default=default, metadata={"help": help, "aliases": aliases, "type": type, "kw": kw})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other bad input (argparse prints usage + 2 lines)
        raise UsageError(f"{message} (see --help)")


def parser_for(cls, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog="scmd_ref.py", description=description, formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata["aliases"]]
        kw = dict(f.metadata["kw"])
        if isinstance(f.default, bool):
            kw["action"] = "store_true"
        else:
            kw["type"] = f.metadata["type"] or (type(f.default) if f.default is not None else str)
        default = f" (default {f.default})" if f.default not in (None, False) else ""
        p.add_argument(*flags, dest=f.name, default=f.default, help=f.metadata["help"] + default, **kw)
    return p


def parse(cls, argv: Optional[Sequence[str]], doc: str):
    return cls(**vars(parser_for(cls, doc.split("\n\n")[0]).parse_args(argv)))


def check_or_exit(cls, argv: Sequence[str], algorithms: dict, doc: str, has_fastsel: bool) -> None:
    """--help, or the one-line error of a bad setting and exit status 2; returns when the settings are good."""
    try:
        resolve(parse(cls, argv, doc), algorithms, has_fastsel)
    except UsageError as e:
        print(f"scmd_ref.py: error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# checks and dataset defaults


def _in_range(name: str, value, low, high) -> None:
    if not low <= value <= high:
        raise UsageError(f"{name} must be in [{low}, {high}], got {value}")


def check_prompt(template: str) -> None:
    """Exactly one positional '{}' (the class name) and no other replacement field."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise UsageError(f"--prompt {template!r} is not a valid template ({e}); write it like 'a photo of a {{}}'") \
            from None
    if fields != [("", "", None)]:
        raise UsageError(f"--prompt must hold exactly one '{{}}' for the class name and no other '{{...}}' field, "
                         f"got {template!r}; write it like 'a photo of a {{}}'")


def resolve(s, algorithms: dict, has_fastsel: bool) -> tuple:
    """Fill the dataset's defaults into the settings and check every one; returns (settings, hparams).
    has_fastsel: whether the Rust extension is importable (only --selector fastsel and stale losses need it)."""
    s.dataset = canonical_dataset(s.dataset, list(DATASETS))
    info = DATASETS[s.dataset]
    s.algorithm = _canonical_algorithm(s.algorithm, algorithms)
    if s.test_env is None:
        s.test_env = [0]
    if len(s.test_env) != 1:
        raise UsageError(f"SCMD holds out exactly one domain; got --test-env {' '.join(map(str, s.test_env))}")
    s.test_env = s.test_env[0]
    if not 0 <= s.test_env < len(info.envs):
        raise UsageError(f"--test-env {s.test_env} is out of range: {s.dataset} has {len(info.envs)} domains "
                         f"(0..{len(info.envs) - 1}: {', '.join(info.envs)})")
    s.steps = info.steps if s.steps is None else s.steps
    s.checkpoint_freq = info.checkpoint_freq if s.checkpoint_freq is None else s.checkpoint_freq
    s.save_every = s.checkpoint_freq if s.save_every is None else s.save_every
    for name in ("steps", "checkpoint_freq", "save_every"):
        if getattr(s, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("seed", "trial_seed", "hparams_seed"):
        _in_range(f"--{name.replace('_', '-')}", getattr(s, name), 0, SEED_MAX)
    if s.selection_horizon == "steps":
        s.selection_horizon = s.steps
    else:
        try:
            s.selection_horizon = int(s.selection_horizon)
        except ValueError:
            raise UsageError(f"--selection-horizon must be an integer or 'steps', got {s.selection_horizon!r}") \
                from None
        _in_range("--selection-horizon", s.selection_horizon, 1, 10**9)
    if s.world_per_class is not None:
        if info.generate is None:
            raise UsageError(f"--world-per-class applies to generated datasets only (--dataset embedded), not "
                             f"{s.dataset}")
        _in_range("--world-per-class", s.world_per_class, 5, 10_000)
    if not 0.0 < s.holdout_fraction < 1.0:
        raise UsageError(f"--holdout-fraction must be in (0, 1) (the share of each domain kept for validation), "
                         f"got {s.holdout_fraction}")
    s.image_size = info.image_size if s.image_size is None else s.image_size
    _in_range("--image-size", s.image_size, MIN_IMAGE_SIZE, 4096)
    check_prompt(s.prompt)
    s.student = s.student or info.student
    s.student_weights = s.student_weights or info.student_weights
    s.teacher = s.teacher or info.teacher
    s.teacher_weights = s.teacher_weights or info.teacher_weights
    use_selection = algorithms[s.algorithm][0]
    if s.select_per_domain and not use_selection:
        raise UsageError(f"--select-per-domain needs an algorithm with selection; {s.algorithm} has none")
    if s.selection_losses == "stale" and not use_selection:
        raise UsageError(f"--selection-losses stale needs an algorithm with selection (scmd, scmd-no-cm); "
                         f"{s.algorithm} has none")
    if not has_fastsel and s.selector == "fastsel":
        raise UsageError("--selector fastsel: the fastsel extension is not installed; build it with `bash "
                         "scripts/setup.sh` (needs cargo), or use --selector torch (the same selection)")
    if not has_fastsel and s.selection_losses == "stale":
        raise UsageError("--selection-losses stale ranks by the per-sample losses that fastsel's tracker records, and "
                         "the fastsel extension is not installed; build it with `bash scripts/setup.sh` (needs cargo)")
    if not DEVICE_SYNTAX.match(s.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {s.device!r}")
    s.workers = (0 if info.in_memory else min(4, os.cpu_count() or 1)) if s.workers is None else s.workers
    _in_range("--workers", s.workers, 0, MAX_WORKERS)
    hparams = make_hparams(s.dataset, s.hparams_seed, s.trial_seed, s.hparams, lr=info.lr,
                           ours={"student": s.student, "teacher": s.teacher})
    n_train = len(info.envs) - 1
    if use_selection:  # the kept count floor(N p) of the concatenated batch, and of each domain's rows
        n_kept = int(hparams["batch_size"] * n_train * hparams["worst_case_p"])
        per_domain = int(hparams["batch_size"] * hparams["worst_case_p"])
        if n_kept < 1 or (s.select_per_domain and per_domain < 1):
            what = "each domain's" if n_kept >= 1 else "the"
            raise UsageError(f"worst_case_p {hparams['worst_case_p']} keeps no sample of {what} batch (batch_size "
                             f"{hparams['batch_size']} x {n_train} domains); raise worst_case_p or batch_size")
    return s, hparams


def _canonical_algorithm(name: str, algorithms: dict) -> str:
    """Our names (scmd, scmd-no-cm, ...) or DomainBed's class names (SCMD, SCMD_no_CM, ERM), any case."""
    key = name.lower().replace("_", "-")
    if key not in algorithms:
        raise UsageError(f"unknown --algorithm {name!r}; choose one of: {', '.join(algorithms)} (DomainBed's names "
                         f"SCMD, ERM, ... work too)")
    return key


def default_output_dir(s, fingerprint: dict) -> str:
    """outputs/<dataset>_<algorithm>_te<env>_h<hp>_t<trial>_s<seed>_<hash of every setting that changes the result>"""
    return f"outputs/{run_name(s, fingerprint)}"


def run_name(s, fingerprint: dict) -> str:
    return (f"{s.dataset}_{s.algorithm}_te{s.test_env}_h{s.hparams_seed}_t{s.trial_seed}_s{s.seed}_"
            f"{fingerprint_hash(fingerprint)}")


def fingerprint_hash(fingerprint: dict) -> str:
    """Six hex digits naming a run's settings (in the default output folder name)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:6]


def fingerprint(s, hparams: dict) -> dict:
    """Every setting that changes a run's result, and its hparams: the identity of its output folder."""
    fp = {k: v for k, v in dataclasses.asdict(s).items() if k not in RUN_ONLY}
    if fp.get("selection_losses") == "fresh":  # the paper's selection: the identity runs had before the option
        del fp["selection_losses"]
    fp["hparams"] = json.dumps(hparams, sort_keys=True)
    return fp
