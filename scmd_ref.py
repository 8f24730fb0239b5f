"""SCMD: Selective Cross-Modality Distillation via CLIP for Domain Generalization (Leng, Li, Wang; TMLR 2024).

A ResNet student learns from the source domains of a DomainBed dataset; a frozen CLIP teacher guides it.
Each step, only the hardest samples of the concatenated batch (highest student cross-entropy) are trained on,
with  L = L_CE + lambda1 * L_logits + lambda2 * L_CM  (spec sections 1-7).

Run:
    python scmd_ref.py                                            # SCMD on the embedded offline world
    python scmd_ref.py --dataset vlcs --test-env 2 --data-dir /data/domainbed
    python scmd_ref.py --dataset pacs --test-env 0 --algorithm erm --hparams-seed 1 --trial-seed 0
    python scmd_ref.py --dataset vlcs --download                   # fetch a dataset first (needs a network)

The file reads top to bottom as the algorithm: settings, networks, the selection rule, the three loss terms,
the SMA, one training step, evaluation, and the DomainBed protocol loop. Plumbing (data layout, outputs,
checkpoints) lives in the small modules under scmd/.

Where the authors' code differs from the paper or is wasteful, the default reproduces the authors' code and a
flag offers the corrected variant: --teacher-renorm (CLIP normalisation for the teacher), --selection-horizon
steps (the selection cut-off relative to the real step count instead of a hard-coded 5000), --student-weights v1.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scmd import data as D
from scmd import outputs as O
from scmd import world
from scmd.errors import DataError, RunFault, ScmdError, UsageError, one_line
from scmd.hparams import make_hparams, seed_hash

ALGORITHMS = {
    #                 selection, L_logits, L_CM      (the paper's ablation: which terms are on)
    "erm":            (False,    False,    False),
    "kd":             (False,    True,     False),
    "scmd-no-cm":     (True,     True,     False),
    "scmd-no-select": (False,    True,     True),
    "scmd":           (True,     True,     True),
}  # fmt: skip
# All ablations use the same --prompt; the authors' SCMD_no_CM/Baseline classes had a typo'd "this is a photo a {}".
DOMAINBED_ALGORITHM_NAME = {"erm": "ERM", "kd": "KD", "scmd-no-cm": "SCMD_no_CM", "scmd-no-select": "SCMD_no_select",
                            "scmd": "SCMD"}
SCMD_PROMPT = "this is a photo of a {}"  # the template SCMD distils from (spec 3, "Prompts")
ZERO_SHOT_PROMPT = "a photo of a {}"  # the template of the paper's Table 1 teacher row
SMA_START_ITER = 300  # hard-coded in the authors' code for SCMD (spec 6)
THETA_INIT = math.log(1 / 0.07)  # learnable logit scale of L_CM, as CLIP's init
THETA_MAX = math.log(100.0)  # clamp after every step: exp(theta) in [1, 100]
THETA_LR = 1e-4


# =========================================================================================================
# 0. Settings
# =========================================================================================================


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("protocol (DomainBed)")
    g.add_argument("--dataset", default="embedded",
                   help="embedded (offline synthetic world), vlcs, pacs, officehome, terraincognita, domainnet;\n"
                        "its defaults (steps, evaluation, image size, models): its entry in scmd.data.DATASETS")
    g.add_argument("--data-dir", default="./data", help="folder holding the dataset folders (DomainBed layout)")
    g.add_argument("--output-dir", default=None,
                   help="default: outputs/<dataset>_<algorithm>_te<env>_h<hp>_t<trial>_s<seed>_<hash of the "
                        "settings>")
    g.add_argument("--test-env", "--test_envs", "--test-envs", dest="test_env", type=int, nargs="+", default=None,
                   help="index of the held-out domain (one; default 0)")
    g.add_argument("--algorithm", default="scmd", help=f"one of {', '.join(ALGORITHMS)}")
    g.add_argument("--steps", type=int, default=None, help="training steps (default 5001)")
    g.add_argument("--checkpoint-freq", "--checkpoint_freq", dest="checkpoint_freq", type=int, default=None,
                   help="evaluate every N steps (default 300, DomainNet 1000)")
    g.add_argument("--seed", type=int, default=0, help="run seed (model init, sampling, augmentation)")
    g.add_argument("--trial-seed", "--trial_seed", dest="trial_seed", type=int, default=0,
                   help="seed of the in/out splits and of the random hparams")
    g.add_argument("--hparams-seed", "--hparams_seed", dest="hparams_seed", type=int, default=0,
                   help="0: SCMD defaults; otherwise a random-search draw")
    g.add_argument("--hparams", default=None, help='JSON overrides, e.g. \'{"lr": 3e-5, "worst_case_p": 0.25}\'')
    g.add_argument("--world-per-class", type=int, default=None,
                   help="generated datasets only (the embedded world): images per (domain, class) instead of the "
                        "full set (quick checks)")
    g.add_argument("--holdout-fraction", "--holdout_fraction", dest="holdout_fraction", type=float, default=0.2)
    g = p.add_argument_group("models")
    g.add_argument("--student", default=None,
                   help=f"resnet50 (default), resnet18, or {world.STUDENT_NAME} (the embedded world's)")
    g.add_argument("--student-weights", default=None,
                   help="v2 (ResNet-50 DEFAULT, as the authors), v1 (as DomainBed), none, or a state_dict file")
    g.add_argument("--teacher", default=None, help="open_clip model name (default ViT-B-32-quickgelu)")
    g.add_argument("--teacher-weights", default=None,
                   help="open_clip pretrained tag (default openai), a local file, or none (random; timing only)")
    g = p.add_argument_group("SCMD variants (defaults reproduce the authors' code)")
    g.add_argument("--selection-horizon", default=None,
                   help="N in the cut-off int(N*(1-last_k_epoch)); default 5000 as the authors' code, 'steps' for "
                        "the real step count")
    g.add_argument("--teacher-renorm", action="store_true",
                   help="feed the teacher CLIP-normalised images (the authors feed the ImageNet-normalised tensor)")
    g.add_argument("--image-size", type=int, default=None, help="input size (default: the dataset's; 224 on real data)")
    g.add_argument("--prompt", default=SCMD_PROMPT, help=f"class prompt template (default {SCMD_PROMPT!r})")
    g.add_argument("--selector", default="auto", choices=["auto", "fastsel", "torch"],
                   help="who ranks the losses: fastsel (Rust, CPU) or the torch reference; auto = fastsel if built")
    g.add_argument("--select-per-domain", action="store_true",
                   help="keep the top p of each domain's rows instead of the top p of the whole batch")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=None, help="data-loading worker processes per loader")
    g.add_argument("--eval-splits", choices=["all", "selection"], default="all",
                   help="all (DomainBed's records); selection: only what training-domain validation and the test "
                        "accuracy use (training envs' out-splits, test env's splits): with 4 domains and 20%% "
                        "out-splits, 40%% of the images")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: every evaluation)")
    g.add_argument("--resume", choices=["auto", "yes", "no"], default="auto",
                   help="auto: continue an unfinished run found in the output folder")
    g.add_argument("--allow-truncated-images", action="store_true", help="load truncated images padded (DomainBed)")
    g.add_argument("--download", action="store_true", help="download --dataset into --data-dir first (needs a network)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = p.parse_args(argv)
    return args


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Check arguments and fill dataset-dependent defaults; every problem is one clear UsageError."""
    args.dataset = D.canonical_dataset(args.dataset, list(D.DATASETS))
    if args.algorithm not in ALGORITHMS:
        raise UsageError(f"unknown --algorithm {args.algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
    if args.test_env is None:
        args.test_env = [0]
    if len(args.test_env) != 1:
        raise UsageError(f"SCMD holds out exactly one domain; got --test-env {args.test_env}")
    args.test_env = args.test_env[0]
    info = D.DATASETS[args.dataset]  # the dataset's protocol and defaults
    default_steps, default_freq = info.steps, info.checkpoint_freq
    args.student = args.student or info.student
    args.teacher = args.teacher or info.teacher
    args.selection_horizon = args.selection_horizon or "5000"
    args.steps = default_steps if args.steps is None else args.steps
    args.checkpoint_freq = args.checkpoint_freq or default_freq
    args.save_every = args.save_every or args.checkpoint_freq
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.checkpoint_freq < 1 or args.save_every < 1:
        raise UsageError("--checkpoint-freq and --save-every must be >= 1")
    if args.selection_horizon == "steps":
        args.selection_horizon = args.steps
    else:
        try:
            args.selection_horizon = int(args.selection_horizon)
        except ValueError:
            raise UsageError(f"--selection-horizon must be an integer or 'steps', got {args.selection_horizon!r}") \
                from None
    if args.world_per_class is not None and (info.generate is None or args.world_per_class < 5):
        raise UsageError("--world-per-class applies to generated datasets only (--dataset embedded) and needs >= 5 "
                         "images per class")
    if not 0.0 <= args.holdout_fraction < 1.0:
        raise UsageError(f"--holdout-fraction must be in [0, 1), got {args.holdout_fraction}")
    if args.prompt.count("{}") != 1:
        raise UsageError(f"--prompt must contain exactly one '{{}}' for the class name, got {args.prompt!r}")
    use_selection, use_logits, use_cm = ALGORITHMS[args.algorithm]
    if args.select_per_domain and not use_selection:
        raise UsageError(f"--select-per-domain needs an algorithm with selection; {args.algorithm} has none")
    if args.selector == "fastsel" and not fastsel_available():
        raise UsageError("--selector fastsel: the fastsel extension is not built; run `bash scripts/setup.sh`")
    if args.selector == "auto":
        args.selector = "fastsel" if fastsel_available() else "torch"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if args.workers is None:
        args.workers = 0 if info.in_memory else min(4, os.cpu_count() or 1)
    return args


def fastsel_available() -> bool:
    try:
        import fastsel  # noqa: F401
    except ImportError:
        return False
    return True


# =========================================================================================================
# 1. Networks (spec 2)
# =========================================================================================================


class Student(nn.Module):
    """ResNet featurizer (fc removed, dropout after pooling) + linear classifier.
    BatchNorm statistics are frozen: every BN layer stays in eval mode, its affine weights still train."""

    def __init__(self, backbone: nn.Module, n_classes: int, dropout: float):
        super().__init__()
        self.n_features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.featurizer = nn.Sequential(backbone, nn.Dropout(dropout))
        self.classifier = nn.Linear(self.n_features, n_classes)  # W f + b
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # frozen BN statistics (spec 2.1)
        return self

    def forward(self, x):
        return self.classifier(self.featurizer(x))


class Teacher(nn.Module):
    """Frozen CLIP. Zero-shot logits z_t = s_T * (e_img/|e_img|) . t_hat^T, with the class text features t_hat
    encoded once per run (the authors re-encode them twice per step; the values are constant)."""

    def __init__(self, clip: nn.Module, text_tokens: torch.Tensor, renorm: bool):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.renorm = renorm
        with torch.no_grad():
            e_txt = clip.encode_text(text_tokens.to(clip.logit_scale.device)).float()
            self.register_buffer("t_hat", F.normalize(e_txt, dim=-1))  # C x d, once per run
        self.scale = float(clip.logit_scale.exp())  # s_T (100 for OpenAI CLIP)
        mean_in, std_in = torch.tensor(D.IMAGENET_MEAN), torch.tensor(D.IMAGENET_STD)
        mean_clip, std_clip = torch.tensor(D.CLIP_MEAN), torch.tensor(D.CLIP_STD)
        # ImageNet-normalised -> CLIP-normalised, as one affine map per channel (used with --teacher-renorm)
        self.register_buffer("renorm_a", (std_in / std_clip).view(1, 3, 1, 1))
        self.register_buffer("renorm_b", ((mean_in - mean_clip) / std_clip).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)  # always eval

    @torch.no_grad()
    def forward(self, x):
        if self.renorm:
            x = x * self.renorm_a + self.renorm_b
        e_img = F.normalize(self.clip.encode_image(x).float(), dim=-1)
        return self.scale * e_img @ self.t_hat.T  # z_t


def build_student(args, n_classes: int, dropout: float) -> Student:
    import torchvision

    if args.student == world.STUDENT_NAME:  # the embedded world's narrow ResNet-18 (its own weights file)
        weights = args.student_weights or D.DATASETS[args.dataset].student_weights
        if weights in ("v1", "v2"):
            raise UsageError(f"--student {world.STUDENT_NAME} has no torchvision weights; pass a file or none")
        try:
            backbone = world.build_student(None if weights == "none" else weights)
        except (OSError, ValueError) as e:
            raise DataError(f"student weights: {e}") from None
        return Student(backbone, n_classes, dropout)
    if args.student not in ("resnet50", "resnet18"):
        raise UsageError(f"--student must be resnet50, resnet18 or {world.STUDENT_NAME}, got {args.student!r}")
    ctor = getattr(torchvision.models, args.student)
    enum = torchvision.models.ResNet50_Weights if args.student == "resnet50" else torchvision.models.ResNet18_Weights
    w = args.student_weights or D.DATASETS[args.dataset].student_weights
    if w in ("v1", "v2"):
        tag = "IMAGENET1K_V2" if w == "v2" else "IMAGENET1K_V1"
        if not hasattr(enum, tag):
            raise UsageError(f"{args.student} has no {tag} weights in torchvision; use v1, none or a file")
        backbone = ctor(weights=None)
        backbone.load_state_dict(_torchvision_weights(getattr(enum, tag)))
    elif w == "none":
        backbone = ctor(weights=None)
    else:
        backbone = ctor(weights=None)
        _load_state_dict_file(backbone, w, f"student {args.student}")
    return Student(backbone, n_classes, dropout)


def _torchvision_weights(weights) -> dict:
    """A torchvision weights enum's state_dict from the torch hub cache, fetched only if a network answers."""
    import socket

    fname = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not cached.exists():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            torch.hub.download_url_to_file(weights.url, str(cached), progress=True)
        except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
            raise DataError(f"student weights {fname} are not in the torch hub cache ({cached}) and could not be "
                            f"downloaded ({type(e).__name__}); download {weights.url} to that path (or set "
                            f"TORCH_HOME), or pass --student-weights FILE|none") from None
        finally:
            socket.setdefaulttimeout(old)
    return torch.load(cached, map_location="cpu", weights_only=True)


def _load_state_dict_file(module: nn.Module, path: str, what: str) -> None:
    if not Path(path).is_file():
        raise DataError(f"{what} weights file {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        module.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{what} weights file {path} does not fit the model: {one_line(e).splitlines()[0]}") from None


def load_clip(args, device) -> nn.Module:
    """The frozen open_clip teacher: a named model with an open_clip pretrained tag or a local weights file."""
    import open_clip

    world.register_teacher_config()  # the embedded world's tiny CLIP is an open_clip model name like any other
    pretrained = args.teacher_weights or D.DATASETS[args.dataset].teacher_weights
    if pretrained == "none":
        pretrained = None  # random init: for timing and tests only
    elif os.path.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
        if not Path(pretrained).is_file():
            raise DataError(f"teacher weights file {pretrained} not found")
    try:
        clip = open_clip.create_model(args.teacher, pretrained=pretrained)
    except RuntimeError as e:
        msg = one_line(e).splitlines()[0]
        if "state_dict" in msg or "size mismatch" in msg:
            raise DataError(f"teacher weights {pretrained} do not fit open_clip model {args.teacher}: {msg}") from None
        raise DataError(f"cannot build teacher {args.teacher} with weights {pretrained!r}: {msg}; "
                        f"offline, pass --teacher-weights /path/to/weights file") from None
    except Exception as e:  # noqa: BLE001 - unknown model names, missing downloads, ...
        raise DataError(f"cannot build teacher {args.teacher} with weights {pretrained!r} "
                        f"({type(e).__name__}: {one_line(e).splitlines()[0]}); offline, pass --teacher-weights FILE "
                        f"(an open_clip state_dict), and set HF_HUB_OFFLINE=1 to use only the local cache") from None
    return clip.to(device).eval().requires_grad_(False)


def class_prompts(template: str, class_names) -> list:
    return [template.format(c.replace("_", " ")) for c in class_names]  # folder name, '_' -> ' '


def tokenize(args, prompts):
    import open_clip

    tok = open_clip.get_tokenizer(args.teacher)
    if args.selector == "fastsel" and type(tok) is open_clip.tokenizer.SimpleTokenizer:
        import fastsel

        return torch.from_numpy(fastsel.PromptTokenizer().tokenize(prompts, tok.context_length))
    return tok(prompts)


# =========================================================================================================
# 2. Hard-sample selection (spec 4)
# =========================================================================================================


def select_hardest(losses: torch.Tensor, k: int) -> torch.Tensor:
    """The selection rule, torch reference: positions of the k largest per-sample losses, in descending loss
    order, ties broken by lower position (stable sort). NaN ranks above +inf; -0.0 and +0.0 tie.
    Equals torch.sort(losses, descending=True, stable=True).indices[:k]; fastsel.topk_desc must match it."""
    return torch.sort(losses, descending=True, stable=True).indices[:k]


def select_hardest_per_domain(losses: torch.Tensor, domains: torch.Tensor, p: float) -> torch.Tensor:
    """Variant (--select-per-domain): for each domain in ascending id, its int(n_d * p) hardest rows by the
    same rule, concatenated, so that no domain can crowd out the others."""
    keep = []
    for d in torch.unique(domains, sorted=True):
        rows = torch.nonzero(domains == d).flatten()
        keep.append(rows[select_hardest(losses[rows], int(len(rows) * p))])
    return torch.cat(keep)


class Selector:
    """Ranks the selection pass's losses with fastsel (Rust) or the torch reference; both return the same
    positions. Feeds the observational tracker (it never changes what is selected)."""

    def __init__(self, kind: str, per_domain: bool, p: float, tracker):
        self.kind, self.per_domain, self.p, self.tracker = kind, per_domain, p, tracker
        if kind == "fastsel":
            import fastsel

            self.fastsel = fastsel

    def __call__(self, losses: torch.Tensor, domains: torch.Tensor, ids: torch.Tensor, step: int) -> torch.Tensor:
        """losses: the N per-sample CEs (on the device); domains, ids: the rows' domain and sample ids (CPU)."""
        k = int(len(losses) * self.p)  # kept count floor(N * p)
        host = None
        if self.kind == "fastsel" or self.tracker is not None:
            host = losses.detach().float().cpu().numpy()  # one device->host copy of N floats
        if self.kind == "fastsel":
            if self.per_domain:
                keep = torch.from_numpy(self.fastsel.topk_per_domain(host, domains.numpy(), self.p))
            else:
                keep = torch.from_numpy(self.fastsel.topk_desc(host, k))
            keep = keep.to(losses.device)
        elif self.per_domain:
            keep = select_hardest_per_domain(losses, domains.to(losses.device), self.p)
        else:
            keep = select_hardest(losses, k)
        if self.tracker is not None:  # observational bookkeeping only
            self.tracker.record(step, ids.numpy(), domains.numpy(), host, keep.cpu().numpy())
        return keep


# =========================================================================================================
# 3. Loss terms (spec 3)
# =========================================================================================================


def kd_kl(student_logits: torch.Tensor, q: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(q || softmax(z / T)), 'batchmean' (sum over classes and samples, divided by n)."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), q, reduction="batchmean") * (T * T)


def cm_logits(f: torch.Tensor, projector: nn.Linear, theta: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """Cross-modal logits u = exp(theta) * (P f / |P f|) . t_hat^T: the student's projected image feature scored
    against CLIP's text features."""
    g = projector(f)
    g = g / g.norm(dim=-1, keepdim=True)  # plain division, no epsilon (as the authors)
    return theta.exp().to(g.dtype) * g @ t_hat.to(g.dtype).T


# =========================================================================================================
# 4. SMA: simple moving average of the student's weights (spec 6)
# =========================================================================================================


class SMA:
    """Before update #300 the SMA copy follows the student; from then on it is the uniform mean of the
    weights after updates #299..#t. Updated in place (the authors rebuild a state_dict each step; same values)."""

    def __init__(self, student: Student):
        self.net = copy.deepcopy(student)
        self.global_iter, self.count = 0, 0
        # (SMA tensor, live tensor) for every state_dict entry except num_batches_tracked: params and BN buffers
        live = student.state_dict(keep_vars=True)
        self.pairs = [(t.data, live[n].data) for n, t in self.net.state_dict(keep_vars=True).items()
                      if "num_batches_tracked" not in n]

    @torch.no_grad()
    def update(self) -> None:
        self.global_iter += 1
        dst, src = [a for a, _ in self.pairs], [b for _, b in self.pairs]
        if self.global_iter >= SMA_START_ITER:
            self.count += 1
            # SMA := (SMA * count + current) / (count + 1)
            torch._foreach_mul_(dst, float(self.count))
            torch._foreach_add_(dst, src)
            torch._foreach_div_(dst, float(self.count + 1))
        else:
            torch._foreach_copy_(dst, src)  # SMA := current


# =========================================================================================================
# 5. One training step (spec 1)
# =========================================================================================================


class SCMDTrainer:
    def __init__(self, args, hparams, student, teacher, n_envs, selector, device):
        self.args, self.hp, self.device = args, hparams, device
        self.use_selection, self.use_logits, self.use_cm = ALGORITHMS[args.algorithm]
        self.student, self.teacher, self.selector = student, teacher, selector
        self.lambda1, self.lambda2, self.T = hparams["lambda1"], hparams["lambda2"], hparams["temperature"]
        self.worst_case_p, self.last_k = hparams["worst_case_p"], hparams["last_k_epoch"]
        self.cutoff = int(args.selection_horizon * (1 - self.last_k))  # select iff step <= cutoff
        params = list(student.parameters())
        if self.use_cm:
            self.projector = nn.Linear(student.n_features, teacher.t_hat.shape[1], bias=False).to(device)  # P
            self.theta = nn.Parameter(torch.tensor([THETA_INIT], device=device))  # learnable log logit scale
            params += list(self.projector.parameters())
        groups = [{"params": params, "lr": hparams["lr"]}]
        if self.use_cm:
            groups.append({"params": [self.theta], "lr": THETA_LR})  # theta: its own lr, same weight decay
        self.optimizer = torch.optim.Adam(groups, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.sma = SMA(student)

    def selecting(self, step: int) -> bool:
        return self.use_selection and step <= self.cutoff  # switch-off rule step <= int(horizon * (1 - k))

    def update(self, x, y, domains, ids, step):
        # --- Hard-sample selection: rank the whole concatenated batch by the student's per-sample CE ----
        n_seen = len(y)
        if self.selecting(step):
            with torch.no_grad():  # fp32, train mode (BN frozen)
                ce_each = F.cross_entropy(self.student(x), y, reduction="none")
            keep = self.selector(ce_each, domains, ids, step)
            x, y = x[keep], y[keep]  # "the batch" is now the n = floor(N p) hardest samples
        # --- The three losses, on the (selected) batch ----------------------------------------------------
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
            f = self.student.featurizer(x)
            z_s = self.student.classifier(f)
            loss_ce = F.cross_entropy(z_s, y)  # L_CE
            loss = loss_ce
            zero = torch.zeros((), device=x.device)
            loss_logits, loss_cm = zero, zero
            if self.use_logits or self.use_cm:
                q = F.softmax(self.teacher(x) / self.T, dim=1).detach()  # teacher soft targets q = softmax(z_t/T)
            if self.use_logits:
                loss_logits = kd_kl(z_s, q, self.T)  # L_logits = T^2 KL(q || softmax(z_s/T))
                loss = loss + self.lambda1 * loss_logits
            if self.use_cm:
                u = cm_logits(f, self.projector, self.theta, self.teacher.t_hat)
                loss_cm = kd_kl(u, q, self.T)  # L_CM = T^2 KL(q || softmax(u/T))
                loss = loss + self.lambda2 * loss_cm  # L = L_CE + lambda1 L_logits + lambda2 L_CM
        # --- Optimiser step, theta clamp, SMA ----------------------------------------------------------
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.use_cm:
            with torch.no_grad():
                self.theta.clamp_(0.0, THETA_MAX)  # exp(theta) in [1, 100], every step
        self.sma.update()
        return {"loss": loss.detach(), "ce": loss_ce.detach(), "logits": loss_logits.detach(),
                "cm": loss_cm.detach(), "n": torch.tensor(float(len(y))), "N": torch.tensor(float(n_seen))}

    # --- everything a resumed run needs ------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = {"student": self.student.state_dict(), "sma": self.sma.net.state_dict(),
              "sma_global_iter": self.sma.global_iter, "sma_count": self.sma.count,
              "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        if self.use_cm:
            st["projector"] = self.projector.state_dict()
            st["theta"] = self.theta.detach().clone()
        return st

    def load_state_dict(self, st: dict) -> None:
        self.student.load_state_dict(st["student"])
        self.sma.net.load_state_dict(st["sma"])
        self.sma.global_iter, self.sma.count = st["sma_global_iter"], st["sma_count"]
        if self.use_cm:
            self.projector.load_state_dict(st["projector"])
            with torch.no_grad():
                self.theta.copy_(st["theta"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])


# =========================================================================================================
# 6. Evaluation and model selection (spec 9)
# =========================================================================================================


@torch.no_grad()
def accuracy(net, loader, device) -> float:
    """mean(argmax == y) of the SMA network (eval mode) over one split."""
    net.eval()
    correct, total = 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (net(x).argmax(1) == y).sum().item()
        total += len(y)
    net.train()
    return correct / max(total, 1)


@torch.no_grad()
def teacher_zero_shot(args, clip, index, store, device) -> list:
    """The teacher's zero-shot accuracy per domain, as the paper's Table 1 teacher row: clean images
    (no augmentation), CLIP normalisation, prompt 'a photo of a {}'."""
    tokens = tokenize(args, class_prompts(ZERO_SHOT_PROMPT, index.classes)).to(device)
    t_hat = F.normalize(clip.encode_text(tokens).float(), dim=-1)
    size = open_clip_image_size(clip)
    tf = D.eval_transform(size, D.CLIP_MEAN, D.CLIP_STD)
    accs = []
    for e in range(len(index.envs)):
        split = D.EvalSplit(store, e, np.arange(len(index.paths[e])), tf, augmented=False, seed=0, name=f"t{e}",
                            size=size, mean=D.CLIP_MEAN, std=D.CLIP_STD)
        correct = 0
        for x, y in D.eval_loader(split, 128, args.workers):
            z = F.normalize(clip.encode_image(x.to(device)).float(), dim=-1) @ t_hat.T
            correct += (z.argmax(1).cpu() == y).sum().item()
        accs.append(correct / len(split))
    return accs


def open_clip_image_size(clip) -> int:
    s = clip.visual.image_size
    return s[0] if isinstance(s, (tuple, list)) else int(s)


# =========================================================================================================
# 7. The protocol: data, loop, records (spec 7-9)
# =========================================================================================================


def main(argv=None) -> int:
    args = resolve_settings(parse_args(argv))
    hparams = make_hparams(args.dataset, args.hparams_seed, args.trial_seed, args.hparams,
                           lr=D.DATASETS[args.dataset].lr)
    fingerprint = run_fingerprint(args, hparams)
    if args.output_dir is None:  # the default name covers every setting that changes the result
        args.output_dir = (f"outputs/{args.dataset}_{args.algorithm}_te{args.test_env}_h{args.hparams_seed}"
                           f"_t{args.trial_seed}_s{args.seed}_{O.fingerprint_hash(fingerprint)}")
    out = Path(args.output_dir)
    O.prepare_output_dir(out)
    if (out / O.DONE).exists() and args.resume != "no":
        O.check_finished_run(out, fingerprint)  # a finished run is reused only if made with these settings
        print(f"[scmd] {out} holds a finished run with these settings; pass --resume no or another "
              f"--output-dir to run again", file=sys.stderr)
        return 0

    # --- seeding (as DomainBed's train script) ---------------------------------------------------------------
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    device = torch.device(args.device)

    # --- data ----------------------------------------------------------------------------------------------
    root = dataset_root(args)
    index = D.index_dataset(root, use_fastsel=args.selector == "fastsel")
    check_layout(args, index)
    n_envs, class_names = len(index.envs), index.classes
    train_envs = [e for e in range(n_envs) if e != args.test_env]
    image_size = image_size_for(args)
    in_memory = D.DATASETS[args.dataset].in_memory
    store = D.ImageStore(index, preload=in_memory, allow_truncated=args.allow_truncated_images, as_tensors=in_memory)
    splits = [D.in_out_split(len(index.paths[e]), args.holdout_fraction, args.trial_seed, e) for e in range(n_envs)]
    eval_loaders = []
    for e in range(n_envs):
        out_idx, in_idx = splits[e]
        if e == args.test_env:  # DomainBed reshuffles the test env's in-split (same content)
            in_idx = in_idx.copy()
            np.random.RandomState(seed_hash(args.trial_seed, e)).shuffle(in_idx)
        for name, idx in (("in", in_idx), ("out", out_idx)):
            if args.eval_splits == "selection" and name == "in" and e != args.test_env:
                continue  # only reported, never used for selection
            augmented = e != args.test_env  # DomainBed quirk: training envs are validated on augmented images
            tf = D.train_transform(image_size) if augmented else D.eval_transform(image_size)
            split = D.EvalSplit(store, e, idx, tf, augmented, args.seed, f"env{e}_{name}", image_size)
            eval_loaders.append((f"env{e}_{name}", D.eval_loader(split, 64, args.workers)))

    # --- models, selector, tracker -------------------------------------------------------------------
    student = build_student(args, len(class_names), hparams["resnet_dropout"]).to(device)
    use_selection, use_logits, use_cm = ALGORITHMS[args.algorithm]
    clip = load_clip(args, device)
    if open_clip_image_size(clip) != image_size:
        raise UsageError(f"teacher {args.teacher} expects {open_clip_image_size(clip)}px images, the student gets "
                         f"{image_size}px; SCMD feeds both the same tensor")
    teacher = None
    if use_logits or use_cm:
        teacher = Teacher(clip, tokenize(args, class_prompts(args.prompt, class_names)), args.teacher_renorm)
    tracker = make_tracker(args, index, train_envs) if use_selection else None
    selector = Selector(args.selector, args.select_per_domain, hparams["worst_case_p"], tracker)
    trainer = SCMDTrainer(args, hparams, student, teacher, n_envs, selector, device)

    # --- resume ------------------------------------------------------------------------------------------
    O.remove_stale_temps(out)
    start_step, records, window = 0, [], None
    ckpt = O.load_checkpoint(out / O.CKPT_LAST) if args.resume != "no" else None
    if args.resume == "yes" and ckpt is None:
        raise UsageError(f"--resume yes: no checkpoint in {out}")
    if ckpt is not None:
        if ckpt["fingerprint"] != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(ckpt["fingerprint"])
                          if fingerprint.get(k) != ckpt["fingerprint"].get(k))
            raise UsageError(f"{out} holds a run made with different settings ({', '.join(diff)}); "
                             f"use another --output-dir, or --resume no to start afresh there")
        trainer.load_state_dict(ckpt["trainer"])
        if tracker is not None:
            tracker.load_state_dict({k: (v.numpy() if torch.is_tensor(v) else v) for k, v in ckpt["tracker"].items()})
        O.set_rng_state(ckpt["rng"])
        start_step, window = ckpt["step"] + 1, ckpt["window"]
        records = [r for r in O.read_records(out / O.RESULTS) if r["step"] <= ckpt["step"]]
        O.rewrite_records(out / O.RESULTS, records)
        print(f"[scmd] resuming {out} at step {start_step} ({len(records)} records kept)", file=sys.stderr)
    elif (out / O.RESULTS).exists():
        (out / O.RESULTS).unlink()  # a run without a checkpoint starts afresh

    print_header(args, hparams, index, device)
    if ckpt is not None:
        teacher_acc = ckpt["teacher_zero_shot"]
    else:
        teacher_acc = teacher_zero_shot(args, clip, index, store, device)

    # --- training loop: one minibatch per training domain, concatenated in env order ----------------
    loaders = [D.train_loader(D.StepBatches(store, e, splits[e][1], hparams["batch_size"], args.seed, image_size),
                              start_step, args.workers, pin_memory=device.type == "cuda") for e in train_envs]
    iters = [iter(ld) for ld in loaders]
    window = window or new_window()
    pbar = progress(args, start_step)
    pending = []
    for step in range(start_step, args.steps):
        t0 = time.time()
        batches = [next(it) for it in iters]
        x = torch.cat([b[0].to(device, non_blocking=True) for b in batches])  # pinned -> async copies on CUDA
        y = torch.cat([b[1].to(device, non_blocking=True) for b in batches])
        ids = torch.cat([b[2] for b in batches])
        domains = torch.cat([torch.full((len(b[1]),), e, dtype=torch.int64) for e, b in zip(train_envs, batches)])
        pending.append((step, trainer.update(x, y, domains, ids, step)))
        window["time"] += time.time() - t0
        last = step == args.steps - 1
        evaluate_now = step % args.checkpoint_freq == 0 or last
        save_now = (step + 1) % args.save_every == 0 or evaluate_now
        if len(pending) >= 10 or save_now:
            flush_stats(pending, window, pbar)  # one device read per 10 steps; stops on a NaN/inf loss
            pending = []
        if evaluate_now:
            rec = evaluate(args, hparams, trainer, eval_loaders, step, window, splits, train_envs, device)
            records.append(rec)
            O.append_record(out / O.RESULTS, rec)
            window = new_window()
            sel = O.training_domain_selection(records, args.test_env, n_envs)
            if sel["record"] is rec:  # best so far by training-domain validation
                O.atomic_torch_save({"step": step, "sma": trainer.sma.net.state_dict(), "record": rec,
                                     "fingerprint": fingerprint}, out / O.CKPT_BEST)
            if pbar:
                pbar.write(f"step {step}: train-domain val {100 * sel['val_acc']:.1f}% (best), "
                           f"test-domain {100 * rec[f'env{args.test_env}_in_acc']:.1f}%")
        if save_now:
            O.atomic_torch_save({"step": step, "trainer": trainer.state_dict(), "rng": O.rng_state(),
                                 "tracker": tracker_state(tracker), "window": window, "fingerprint": fingerprint,
                                 "teacher_zero_shot": teacher_acc}, out / O.CKPT_LAST)
        if pbar:
            pbar.update(1)
    if pbar:
        pbar.close()

    # --- final report ------------------------------------------------------------------------------
    selected = O.training_domain_selection(records, args.test_env, n_envs)
    table = O.format_table(index.envs, args.test_env, selected, teacher_acc)
    summary = {"selected_step": selected["record"]["step"], "val_acc": selected["val_acc"],
               "test_env": args.test_env, "test_acc": selected["record"][f"env{args.test_env}_in_acc"],
               "envs": index.envs, "teacher_zero_shot": teacher_acc, "algorithm": args.algorithm,
               "hparams": hparams}
    if tracker is not None:
        report = json.loads(tracker.report_json())
        report["hardest_paths"] = {index.envs[d]: [index.global_path(i) for i in ids_]
                                   for d, ids_ in report_hardest(report).items()}
        O.atomic_write_bytes(out / "hardness.json", json.dumps(report, indent=1).encode())
        O.plot_kept_share(report, index.envs, hparams["worst_case_p"], out / "kept_share.png")
    O.atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    O.atomic_write_bytes(out / O.DONE, json.dumps(fingerprint, indent=1, sort_keys=True).encode())
    print(table)
    print(f"[scmd] results in {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# plumbing of main()


def dataset_root(args) -> Path:
    data_dir = Path(args.data_dir)
    info = D.DATASETS[args.dataset]
    if info.generate is not None:  # made on first use, deterministically
        return info.generate(data_dir, progress=not args.no_progress, n_per_class=args.world_per_class)
    root = data_dir / info.folder
    if args.download:
        from scmd.download import download_dataset

        root = download_dataset(args.dataset, data_dir)
    if not root.exists():
        raise DataError(f"dataset folder {root} not found; download it with `python scmd_ref.py --dataset "
                        f"{args.dataset} --download --data-dir {data_dir}` or point --data-dir at the folder that "
                        f"holds {info.folder}/")
    return root


def check_layout(args, index) -> None:
    expected = list(D.DATASETS[args.dataset].envs)
    if index.envs != expected:
        raise DataError(f"{index.root} has domains {index.envs}; {args.dataset} expects {expected}")
    if not 0 <= args.test_env < len(index.envs):
        raise UsageError(f"--test-env {args.test_env} is out of range: {args.dataset} has {len(index.envs)} "
                         f"domains (0..{len(index.envs) - 1}: {', '.join(index.envs)})")


def image_size_for(args) -> int:
    return args.image_size or D.DATASETS[args.dataset].image_size


def steps_per_epoch(splits, train_envs, batch_size) -> float:
    return min(len(splits[e][1]) / batch_size for e in train_envs)


def make_tracker(args, index, train_envs):
    n = index.n_samples
    if args.selector == "fastsel":
        import fastsel

        return fastsel.Tracker(n, len(index.envs), window=max(args.checkpoint_freq, 1))
    from scmd.tracking import Tracker

    return Tracker(n, len(index.envs), window=max(args.checkpoint_freq, 1))


def tracker_state(tracker):
    if tracker is None:
        return None
    return {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
            for k, v in tracker.state_dict().items()}


def report_hardest(report: dict) -> dict:
    return {int(d["domain"]): [h["sample_id"] for h in d["hardest"]] for d in report["domains"]}


def run_fingerprint(args, hparams) -> dict:
    keys = ["dataset", "algorithm", "test_env", "steps", "checkpoint_freq", "seed", "trial_seed", "hparams_seed",
            "holdout_fraction", "student", "student_weights", "teacher", "teacher_weights", "selection_horizon",
            "teacher_renorm", "prompt", "select_per_domain", "allow_truncated_images", "image_size",
            "world_per_class", "eval_splits"]
    fp = {k: getattr(args, k) for k in keys}
    fp["hparams"] = json.dumps(hparams, sort_keys=True)
    return fp


def record_fields(args, hparams, trainer, step) -> dict:
    """DomainBed's record fields (so its collect_results reads our folders) plus ours."""
    name = D.DATASETS[args.dataset].domainbed_name
    db_args = {"dataset": name, "algorithm": DOMAINBED_ALGORITHM_NAME[args.algorithm], "test_envs": [args.test_env],
               "data_dir": args.data_dir, "output_dir": args.output_dir, "hparams": args.hparams,
               "hparams_seed": args.hparams_seed, "trial_seed": args.trial_seed, "seed": args.seed,
               "steps": args.steps, "checkpoint_freq": args.checkpoint_freq,
               "holdout_fraction": args.holdout_fraction, "uda_holdout_fraction": 0, "task": "domain_generalization",
               "skip_model_save": False, "save_model_every_checkpoint": False}
    fields = {"args": db_args, "hparams": hparams, "selecting": trainer.selecting(step),
              "scmd_args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    if trainer.use_cm:
        fields["cm_logit_scale"] = float(trainer.theta.detach().exp())
    return fields


def new_window() -> dict:
    """Sums over the steps since the last evaluation record (saved in checkpoints)."""
    return {"loss": 0.0, "count": 0, "time": 0.0}


def evaluate(args, hparams, trainer, eval_loaders, step, window, splits, train_envs, device) -> dict:
    """One DomainBed record: accuracy of the SMA network on every env's in and out split."""
    rec = {"step": step, "epoch": step / steps_per_epoch(splits, train_envs, hparams["batch_size"]),
           "loss": window["loss"] / max(window["count"], 1), "step_time": window["time"] / max(window["count"], 1),
           "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0}
    for name, loader in eval_loaders:
        loader.batch_sampler.eval_step = step  # fixes the augmentation of training-env splits
        rec[f"{name}_acc"] = accuracy(trainer.sma.net, loader, device)
    rec.update(record_fields(args, hparams, trainer, step))
    return rec


def flush_stats(pending, window, pbar) -> None:
    """Read the last steps' losses from the device in one transfer; stop on a non-finite loss."""
    keys = ["loss", "ce", "logits", "cm", "n", "N"]
    vals = torch.stack([torch.stack([s[k].float().cpu() for k in keys]) for _, s in pending]).tolist()
    for (step, _), v in zip(pending, vals):
        if not all(math.isfinite(a) for a in v[:4]):
            raise RunFault(f"the loss became {v[0]} at step {step} (L_CE {v[1]}, L_logits {v[2]}, L_CM {v[3]}); "
                           f"stopped; records and the last checkpoint so far are kept (try a lower lr)")
        window["loss"] += v[0]
        window["count"] += 1
    if pbar:
        v = vals[-1]
        pbar.set_postfix_str(f"L {v[0]:.3f} CE {v[1]:.3f} logits {v[2]:.3f} CM {v[3]:.3f} n {int(v[4])}/{int(v[5])}")


def progress(args, start_step):
    if args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=args.steps, initial=start_step, desc=f"{args.algorithm} te{args.test_env}", dynamic_ncols=True,
                file=sys.stderr)


def print_header(args, hparams, index, device) -> None:
    print(f"[scmd] {args.algorithm} on {args.dataset} ({index.root}); held out: {index.envs[args.test_env]}; "
          f"device {device}; selector {args.selector}", file=sys.stderr)
    print("[scmd] hparams: " + ", ".join(f"{k}={v}" for k, v in hparams.items()), file=sys.stderr)


def cli(argv=None) -> int:
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


if __name__ == "__main__":
    sys.exit(cli())
