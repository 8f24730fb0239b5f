"""SCMD hyperparameters: defaults and DomainBed-style random search (spec section 10).

Each hparam is drawn from its own ``numpy.random.RandomState(seed_hash(seed_hash(hparams_seed,
trial_seed), name))``; ``hparams_seed == 0`` gives the defaults. ``--hparams`` JSON overrides are
applied afterwards and may only name known hparams.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, Tuple

import numpy as np

from scmd.errors import UsageError


def seed_hash(*args: Any) -> int:
    """DomainBed's seed_hash: md5 of the Python repr of the argument tuple, modulo 2**31."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


Draw = Callable[[np.random.RandomState], Any]


SPEC_LR = 5e-5  # the authors' default lr; the random search draws from {3e-5, 5e-5}


def _registry(dataset: str, lr: float = SPEC_LR) -> Dict[str, Tuple[Any, Draw]]:
    """name -> (default, random draw). Values as in the authors' hparams registry for SCMD. A dataset whose
    table entry sets another default ``lr`` gets the lr search scaled alike ({0.6 lr, lr})."""
    if dataset == "domainnet":
        batch = (32, lambda r: int(2 ** r.uniform(3, 5)))
    else:
        batch = (32, lambda r: int(2 ** r.uniform(4.9, 5.1)))
    scale = lr / SPEC_LR
    lr_entry = (lr, lambda r: r.choice([3e-5 * scale, 5e-5 * scale]))  # x * 1.0 == x: the spec's values
    return {
        "lambda1": (0.5, lambda r: r.uniform(0.5, 1.0)),  # weight of L_logits
        "lambda2": (0.5, lambda r: r.uniform(0.5, 1.0)),  # weight of L_CM
        "temperature": (3.0, lambda r: r.uniform(2, 5)),  # T, shared by both KD terms
        "worst_case_p": (0.2, lambda r: r.choice([0.2, 0.25, 0.3])),  # fraction of the batch kept
        "last_k_epoch": (0.25, lambda r: r.uniform(0.2, 0.4)),  # final fraction trained on full batches
        "lr": lr_entry,
        "weight_decay": (0.0, lambda r: r.choice([1e-4, 1e-6])),
        "batch_size": batch,  # per training domain
        "resnet_dropout": (0.0, lambda r: r.choice([0.0, 0.1, 0.5])),
    }


HPARAM_NAMES = tuple(_registry("vlcs"))


def _plain(v: Any) -> Any:
    """numpy scalars -> Python scalars (so hparams serialise to JSON unchanged)."""
    return v.item() if isinstance(v, np.generic) else v


def make_hparams(dataset: str, hparams_seed: int, trial_seed: int, overrides: str | None = None,
                 lr: float = SPEC_LR) -> dict:
    """Defaults (hparams_seed 0) or a random-search draw, then the JSON overrides. ``lr``: the dataset's default
    lr (its table entry; the spec's 5e-5 but for a documented deviation)."""
    reg = _registry(dataset, lr)
    if hparams_seed == 0:
        hp = {name: default for name, (default, _) in reg.items()}
    else:
        outer = seed_hash(hparams_seed, trial_seed)
        hp = {name: _plain(draw(np.random.RandomState(seed_hash(outer, name)))) for name, (_, draw) in reg.items()}
    if overrides:
        try:
            extra = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise UsageError(f"--hparams is not valid JSON ({e.msg} at char {e.pos}): {overrides!r}") from None
        if not isinstance(extra, dict):
            raise UsageError(f"--hparams must be a JSON object such as '{{\"lr\": 3e-5}}', got {overrides!r}")
        unknown = sorted(set(extra) - set(reg))
        if unknown:
            raise UsageError(f"unknown hparam(s) {unknown} in --hparams; known: {sorted(reg)}")
        for k, v in extra.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UsageError(f"hparam {k!r} must be a number, got {v!r}")
            hp[k] = v
    check_hparams(hp)
    return hp


def check_hparams(hp: dict) -> None:
    """Reject values that would make the algorithm meaningless, with the fix in the message."""
    if not 0.0 < hp["worst_case_p"] <= 1.0:
        raise UsageError(f"worst_case_p must be in (0, 1] (the kept fraction), got {hp['worst_case_p']}")
    if not 0.0 <= hp["last_k_epoch"] <= 1.0:
        raise UsageError(f"last_k_epoch must be in [0, 1], got {hp['last_k_epoch']}")
    if not hp["temperature"] > 0:
        raise UsageError(f"temperature must be > 0, got {hp['temperature']}")
    if int(hp["batch_size"]) != hp["batch_size"] or hp["batch_size"] < 1:
        raise UsageError(f"batch_size must be a positive integer, got {hp['batch_size']}")
    if not hp["lr"] > 0:
        raise UsageError(f"lr must be > 0, got {hp['lr']}")
    if hp["weight_decay"] < 0:
        raise UsageError(f"weight_decay must be >= 0, got {hp['weight_decay']}")
    if not 0.0 <= hp["resnet_dropout"] < 1.0:
        raise UsageError(f"resnet_dropout must be in [0, 1), got {hp['resnet_dropout']}")
    for name in ("lambda1", "lambda2"):
        if hp[name] < 0:
            raise UsageError(f"{name} must be >= 0, got {hp[name]}")
    hp["batch_size"] = int(hp["batch_size"])
