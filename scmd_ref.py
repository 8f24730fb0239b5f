"""SCMD: Selective Cross-Modality Distillation via CLIP for Domain Generalization (Leng, Li, Wang; TMLR 2024).

A ResNet student learns from the source domains of a DomainBed dataset; a frozen CLIP teacher guides it.
Each step, only the hardest samples of the concatenated batch (highest student cross-entropy) are trained on,
with  L = L_CE + lambda1 * L_logits + lambda2 * L_CM  (spec sections 1-7).

Run:
    python scmd_ref.py                                            # SCMD on the embedded offline world
    python scmd_ref.py --dataset vlcs --test-env 2 --data-dir /data/domainbed
    python scmd_ref.py --dataset pacs --test-env 0 --algorithm scmd-no-cm       # an ablation (paper Table 3)
    python -m scmd.sweep launch --datasets pacs --n-hparams 5 --n-trials 3 --output-dir sweeps/pacs  # a sweep
    torchrun --standalone --nproc_per_node 2 scmd_ref.py --dataset pacs --test-env 0   # one run on 2 GPUs
    python scmd_ref.py --dataset vlcs --download                   # fetch a dataset first (needs a network)

The file reads top to bottom: settings, networks, the selection rule, the three loss terms, the SMA, one training
step, evaluation, and the DomainBed protocol loop. Plumbing (dataset table, data layout, weights, outputs,
checkpoints, torchrun) lives in scmd/. Ctrl-C or SIGTERM stops after a step with a checkpoint; rerun to resume.

Where the authors' code differs from the paper or is wasteful, the default reproduces the authors' code and a
flag offers the corrected variant: --teacher-renorm (CLIP normalisation for the teacher), --selection-horizon
steps (the selection cut-off relative to the real step count instead of a hard-coded 5000), --student-weights v1.
"""

from __future__ import annotations

import copy
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from scmd.settings import arg

ALGORITHMS = {
    #                 selection, L_logits, L_CM      (the paper's ablation: which terms are on)
    "erm":            (False,    False,    False),
    "kd":             (False,    True,     False),
    "scmd-no-cm":     (True,     True,     False),
    "scmd-no-select": (False,    True,     True),
    "scmd":           (True,     True,     True),
}  # fmt: skip
# All ablations use the same --prompt; the authors' SCMD_no_CM/Baseline classes had a typo'd "this is a photo a {}".
SCMD_PROMPT = "this is a photo of a {}"  # the template SCMD distils from (spec 3, "Prompts")
ZERO_SHOT_PROMPT = "a photo of a {}"  # the template of the paper's Table 1 teacher row
SMA_START_ITER = 300  # hard-coded in the authors' code for SCMD (spec 6)
THETA_INIT = math.log(1 / 0.07)  # learnable logit scale of L_CM, as CLIP's init
THETA_MAX = math.log(100.0)  # clamp after every step: exp(theta) in [1, 100]
THETA_LR = 1e-4


# =========================================================================================================
# 0. Settings (None: the dataset's default, from its entry in scmd/datasets.py)
# =========================================================================================================


@dataclass
class Settings:
    dataset: str = arg("embedded", "a dataset of scmd/datasets.py; embedded: the offline synthetic world")
    data_dir: str = arg("./data", "folder holding the dataset folders (DomainBed layout)", "--data_dir")
    output_dir: Optional[str] = arg(None, "default: outputs/<dataset>_<algorithm>_te<env>_h<hp>_t<trial>_s<seed>_"
                                          "<hash of every setting that changes the result>", "--output_dir")
    test_env: Optional[List[int]] = arg(None, "index of the held-out domain (one; default 0)", "--test_envs",
                                        "--test-envs", type=int, nargs="+")
    algorithm: str = arg("scmd", f"one of {', '.join(ALGORITHMS)}, or DomainBed's names (SCMD, ERM, ...)")
    steps: Optional[int] = arg(None, "training steps (default 5001)", type=int)
    checkpoint_freq: Optional[int] = arg(None, "evaluate every N steps (default 300)", "--checkpoint_freq", type=int)
    seed: int = arg(0, "run seed (model init, sampling, augmentation)")
    trial_seed: int = arg(0, "seed of the in/out splits and of the random hparams", "--trial_seed")
    hparams_seed: int = arg(0, "0: SCMD's defaults; otherwise a random-search draw", "--hparams_seed")
    hparams: Optional[str] = arg(None, 'JSON overrides, e.g. \'{"lr": 3e-5}\'; the authors\' sweep JSON works too')
    holdout_fraction: float = arg(0.2, "share of each domain held out for validation", "--holdout_fraction")
    world_per_class: Optional[int] = arg(None, "generated datasets: images per (domain, class), quick checks", type=int)
    student: Optional[str] = arg(None, "resnet50 (default), resnet18, or the embedded world's embedded_student")
    student_weights: Optional[str] = arg(None, "v2 (ResNet-50 DEFAULT, as the authors), v1 (as DomainBed), none, "
                                               "or a state_dict file")
    teacher: Optional[str] = arg(None, "open_clip model name (default ViT-B-32-quickgelu)")
    teacher_weights: Optional[str] = arg(None, "open_clip pretrained tag (default openai), a local file, or none")
    selection_horizon: str = arg("5000", "N in the selection cut-off int(N*(1-last_k_epoch)); 5000 as the authors' "
                                         "code, 'steps' for the real step count")
    teacher_renorm: bool = arg(False, "feed the teacher CLIP-normalised images (the authors: ImageNet-normalised)")
    image_size: Optional[int] = arg(None, "input size of student and teacher (default 224)", type=int)
    prompt: str = arg(SCMD_PROMPT, "class prompt template, one '{}' for the class name")
    selector: str = arg("fastsel", "who ranks the losses: fastsel (Rust, CPU) or select_hardest, the torch reference "
                                   "it must match", choices=["fastsel", "torch"])
    select_per_domain: bool = arg(False, "keep the top p of each domain's rows instead of the top p of the batch")
    selection_losses: str = arg("fresh", "what the selection ranks: fresh (the paper: a no-grad pass over the batch) "
                                         "or stale (each candidate's last recorded training CE; no extra pass)",
                                choices=["fresh", "stale"])
    device: str = arg("auto", "auto, cpu, cuda, cuda:N")
    workers: Optional[int] = arg(None, "loader worker processes (default 0 in memory, else 4)", type=int)
    eval_splits: str = arg("all", "all (DomainBed's records), or selection: only the splits that training-domain "
                                  "validation and the test accuracy use", choices=["all", "selection"])
    save_every: Optional[int] = arg(None, "checkpoint every N steps (default: every evaluation)", type=int)
    resume: str = arg("auto", "auto: continue an unfinished run of the output folder", choices=["auto", "yes", "no"])
    refuse_truncated_images: bool = arg(False, "stop on a truncated image (default: load it padded, as DomainBed)")
    download: bool = arg(False, "download --dataset into --data-dir first (needs a network)")
    no_progress: bool = arg(False, "no progress bar")
    debug: bool = arg(False, "show Python tracebacks")


if __name__ == "__main__":  # --help and a bad setting answer at once: the settings are checked before torch loads
    from scmd.settings import check_or_exit

    check_or_exit(Settings, sys.argv[1:], ALGORITHMS, __doc__)


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from scmd import data as D
from scmd import models as M
from scmd import outputs as O
from scmd import run as R
from scmd import settings as S
from scmd.dist import DIST

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
    """Ranks per-sample losses with fastsel (Rust) or the torch reference; both return the same positions.
    fresh (the paper): the selection pass's losses; the tracker only observes. stale (--selection-losses stale):
    each candidate's latest CE that the tracker recorded from the training forward of a step it was kept in;
    never-scored samples first (NaN ranks first, so each sample gets a loss as early as possible, as InfoBatch
    trains unseen samples), ties in a random order drawn from (seed, step), which keeps resume exact."""

    def __init__(self, kind: str, per_domain: bool, p: float, tracker, seed: int = 0):
        self.kind, self.per_domain, self.p, self.tracker, self.seed = kind, per_domain, p, tracker, seed
        self.fastsel = __import__("fastsel") if kind == "fastsel" else None

    def rank(self, losses: torch.Tensor, host, domains: torch.Tensor) -> torch.Tensor:
        """Positions of the kept rows: the top floor(N p) of the batch (or per domain), by the rule above."""
        if self.kind == "fastsel" and self.per_domain:
            return torch.from_numpy(self.fastsel.topk_per_domain(host, domains.numpy(), self.p))
        if self.kind == "fastsel":
            return torch.from_numpy(self.fastsel.topk_desc(host, int(len(host) * self.p)))  # k = floor(N p)
        if self.per_domain:
            return select_hardest_per_domain(losses, domains.to(losses.device), self.p)
        return select_hardest(losses, int(len(losses) * self.p))

    def __call__(self, losses: torch.Tensor, domains: torch.Tensor, ids: torch.Tensor, step: int) -> torch.Tensor:
        """Fresh: losses are the N per-sample CEs (on the device); domains, ids: the rows' domain and sample ids."""
        host = losses.detach().float().cpu().numpy() if self.fastsel or self.tracker else None  # one N-float copy
        keep = self.rank(losses, host, domains).to(losses.device)
        if self.tracker is not None:  # observational bookkeeping only
            self.tracker.record(step, ids.numpy(), domains.numpy(), host, keep.cpu().numpy())
        return keep

    def stale_keep(self, domains: torch.Tensor, ids: torch.Tensor, step: int) -> torch.Tensor:
        """Stale: rank the candidates by their last recorded CE (NaN where never scored); no forward pass."""
        perm = np.random.default_rng((self.seed, step)).permutation(len(ids))  # random order among ties
        host = self.tracker.last_loss()[ids.numpy()[perm]]
        return torch.from_numpy(perm)[self.rank(torch.from_numpy(host), host, domains[perm])]

    def observe(self, step: int, domains, ids, keep, kept_ce: torch.Tensor) -> None:
        """Stale: every candidate counts as seen, the kept ones as selected with their training CE."""
        self.tracker.record_kept(step, ids.numpy(), domains.numpy(), keep.cpu().numpy(),
                                 kept_ce.detach().float().cpu().numpy())


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
    def __init__(self, s, hparams, student, teacher, selector, device):
        self.device = device
        self.use_selection, self.use_logits, self.use_cm = ALGORITHMS[s.algorithm]
        self.stale = s.selection_losses == "stale"
        self.student, self.teacher, self.selector = student, teacher, selector
        self.lambda1, self.lambda2, self.T = hparams["lambda1"], hparams["lambda2"], hparams["temperature"]
        self.worst_case_p, self.last_k = hparams["worst_case_p"], hparams["last_k_epoch"]
        self.cutoff = int(s.selection_horizon * (1 - self.last_k))  # select iff step <= cutoff
        params = list(student.parameters())
        if self.use_cm:
            self.projector = nn.Linear(student.n_features, teacher.t_hat.shape[1], bias=False).to(device)  # P
            self.theta = nn.Parameter(torch.tensor([THETA_INIT], device=device))  # learnable log logit scale
            params += list(self.projector.parameters())
        groups = [{"params": params, "lr": hparams["lr"]}]
        if self.use_cm:
            groups.append({"params": [self.theta], "lr": THETA_LR})  # theta: its own lr, same weight decay
        self.optimizer = torch.optim.Adam(groups, lr=hparams["lr"], weight_decay=hparams["weight_decay"])
        self.amp, self.amp_dtype = device.type == "cuda", torch.float16  # mixed precision on CUDA
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.sma = SMA(student)
        self.sizes = ()  # rows of each domain in the step batch (set by build_models; read under torchrun only)

    def selecting(self, step: int) -> bool:
        return self.use_selection and step <= self.cutoff  # switch-off rule step <= int(horizon * (1 - k))

    def update(self, x, y, domains, ids, step):
        """x, y, domains, ids: this process's rows of the step batch (all rows without torchrun)."""
        n_seen, selecting, g = len(y), self.selecting(step), self.sizes  # g: each domain's rows in the step batch
        if selecting:  # (torchrun: every rank ranks the whole step batch, so the kept ids are one process's)
            domains, ids = DIST.gather_rows(domains, g), DIST.gather_rows(ids, g)
            if self.stale:  # --- selection by each candidate's last recorded CE: no extra pass ---------------
                keep = self.selector.stale_keep(domains, ids, step).to(x.device)
            else:  # --- hard-sample selection: rank the whole concatenated batch ------------------------------
                keep = self.selector(DIST.gather_rows(self.per_sample_ce(x, y), g), domains, ids, step)
            mine = DIST.local_keep(keep, g)
            x, y = x[mine], y[mine]  # "the batch" is now the n = floor(N p) hardest samples
        share = DIST.share_of(len(y), len(keep) if selecting else sum(g))  # n_r / n (1 without torchrun)
        loss, loss_ce, loss_logits, loss_cm, z_s = self.losses(x, y) if len(y) else [x.new_zeros(())] * 5
        if selecting and self.stale:  # the kept rows' CE before this update: what later steps rank them by
            ce = F.cross_entropy(z_s.detach().float(), y, reduction="none") if len(y) else z_s.new_zeros(0)
            self.selector.observe(step, domains, ids, keep, DIST.kept_in_order(ce, keep, g))
        self.optimise(loss * share if DIST.on else loss)
        return DIST.step_stats(share, (loss, loss_ce, loss_logits, loss_cm), len(y), n_seen)

    @torch.no_grad()
    def per_sample_ce(self, x, y):
        """The ranking loss: the current student's per-sample CE, fp32, train mode (BN frozen)."""
        return F.cross_entropy(self.student(x), y, reduction="none")

    def losses(self, x, y):
        """The three losses on the (selected) batch, under fp16 autocast on CUDA."""
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            f = self.student.featurizer(x)
            z_s = self.student.classifier(f)
            loss_ce = F.cross_entropy(z_s, y)  # L_CE
            loss = loss_ce
            loss_logits = loss_cm = torch.zeros((), device=x.device)  # (terms that are off)
            if self.use_logits or self.use_cm:
                q = F.softmax(self.teacher(x) / self.T, dim=1).detach()  # teacher soft targets q = softmax(z_t/T)
            if self.use_logits:
                loss_logits = kd_kl(z_s, q, self.T)  # L_logits = T^2 KL(q || softmax(z_s/T))
                loss = loss + self.lambda1 * loss_logits
            if self.use_cm:
                u = cm_logits(f, self.projector, self.theta, self.teacher.t_hat)
                loss_cm = kd_kl(u, q, self.T)  # L_CM = T^2 KL(q || softmax(u/T))
                loss = loss + self.lambda2 * loss_cm  # L = L_CE + lambda1 L_logits + lambda2 L_CM
        return loss, loss_ce, loss_logits, loss_cm, z_s

    def optimise(self, loss) -> None:
        """Adam step (loss scaling on CUDA), theta clamp, SMA update."""
        self.optimizer.zero_grad(set_to_none=True)
        scaled = self.scaler.scale(loss)
        if scaled.requires_grad:  # (a torchrun rank without kept rows has no graph: its gradient is 0)
            scaled.backward()
        DIST.sum_gradients([p for grp in self.optimizer.param_groups for p in grp["params"]])  # torchrun only
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.use_cm:
            with torch.no_grad():
                self.theta.clamp_(0.0, THETA_MAX)  # exp(theta) in [1, 100], every step
        self.sma.update()


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
    correct, total = DIST.sum(torch.tensor([correct, total], dtype=torch.float64, device=device)).tolist()
    return correct / max(total, 1)  # (torchrun: each rank evaluates its share of the batches)


# =========================================================================================================
# 7. The protocol: data, loop, records (spec 7-9)
# =========================================================================================================


def main(argv=None) -> int:
    s, hparams = S.resolve(S.parse(Settings, argv, __doc__), ALGORITHMS)
    fingerprint = S.fingerprint(s, hparams)
    if s.output_dir is None:  # the default name covers every setting that changes the result
        s.output_dir = (f"outputs/{s.dataset}_{s.algorithm}_te{s.test_env}_h{s.hparams_seed}_t{s.trial_seed}"
                        f"_s{s.seed}_{O.fingerprint_hash(fingerprint)}")
    out = Path(s.output_dir)
    O.prepare_output_dir(out)
    with R.run_lock(out), R.StopSignals() as stop:  # one run per folder; SIGTERM/SIGINT stop after a step
        if R.finished(out, fingerprint, s.resume):
            return 0
        return train(s, hparams, fingerprint, out, stop)


def build_models(s, hparams, index, device):
    """Student, frozen teacher, selector and tracker, and the trainer that holds them; every tensor on `device`."""
    student = Student(M.student_backbone(s.student, s.student_weights), len(index.classes), hparams["resnet_dropout"])
    student.to(device)
    use_selection, use_logits, use_cm = ALGORITHMS[s.algorithm]
    clip = M.load_clip(s.teacher, s.teacher_weights, torch.device("cpu"), s.image_size)  # text features: on the CPU
    teacher = None
    if use_logits or use_cm:
        tokens = M.tokenize(s.teacher, M.class_prompts(s.prompt, index.classes))
        teacher = Teacher(clip, tokens, s.teacher_renorm).to(device)  # also its t_hat and renorm buffers
    clip.to(device)
    tracker = R.make_tracker(s, index) if use_selection else None
    selector = Selector(s.selector, s.select_per_domain, hparams["worst_case_p"], tracker, s.seed)
    trainer = SCMDTrainer(s, hparams, student, teacher, selector, device)
    trainer.sizes = [hparams["batch_size"]] * (len(index.envs) - 1)
    return trainer, clip, tracker


def train(s, hparams, fingerprint, out, stop) -> int:
    device = DIST.start(R.device_for(s.device))  # torchrun: this rank's GPU (nccl) or the CPU (gloo)
    random.seed(s.seed)  # seeding as DomainBed's train script
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    # --- data, models, selector, tracker ---------------------------------------------------------------------
    data = R.load_data(s, out, s.image_size)
    trainer, clip, tracker = build_models(s, hparams, data.index, device)

    # --- resume ------------------------------------------------------------------------------------------
    ckpt, start_step, records, window = R.restore(out, s.resume, fingerprint, trainer, tracker)
    R.say(f"[scmd] {s.algorithm} on {s.dataset} ({data.index.root}); held out: {data.index.envs[s.test_env]}; "
          f"device {device}; selector {s.selector}; {DIST.world} process(es)\n[scmd] hparams: "
          + ", ".join(f"{k}={v}" for k, v in hparams.items()))
    teacher_acc = ckpt["teacher_zero_shot"] if ckpt else R.teacher_zero_shot(s, clip, data, ZERO_SHOT_PROMPT,
                                                                             device)  # Table 1's teacher row

    # --- training loop: one minibatch per training domain, concatenated in env order ----------------
    kept_only = trainer.cutoff if trainer.stale else -1  # stale selection: only the kept rows get augmented
    iters = R.train_loaders(s, data, hparams["batch_size"], s.image_size, start_step, device, kept_only)
    window = window or R.new_window()
    stats = R.Stats(s, start_step)
    for step in range(start_step, s.steps):
        if DIST.any(stop.requested):  # finish where the last step ended: checkpoint, one line, resume exactly later
            return R.stopped(out, step - 1, trainer, tracker, window, fingerprint, teacher_acc, stats, stop)
        try:
            batches = [next(it) for it in iters]
        except Exception:
            if stop.requested:  # the signal also reached the loader workers
                return R.stopped(out, step - 1, trainer, tracker, window, fingerprint, teacher_acc, stats, stop)
            raise
        x = D.cat_images([b[0] for b in batches], device)  # pinned -> async copies on CUDA
        y = torch.cat([b[1].to(device, non_blocking=True) for b in batches])
        ids = torch.cat([b[2] for b in batches])
        domains = torch.cat([torch.full((len(b[1]),), e, dtype=torch.int64) for e, b in zip(data.train_envs, batches)])
        stats.add(step, trainer.update(x, y, domains, ids, step), window)
        evaluate_now = step % s.checkpoint_freq == 0 or step == s.steps - 1
        save_now = (step + 1) % s.save_every == 0 or evaluate_now
        if save_now:
            stats.flush(window)  # stops on a NaN/inf loss
        if evaluate_now:
            rec = R.record_head(s, hparams, data, step, window, device)
            for name, loader in data.eval_loaders:
                loader.batch_sampler.eval_step = step  # fixes the augmentation of training-env splits
                rec[f"{name}_acc"] = accuracy(trainer.sma.net, loader, device)
            scale = float(trainer.theta.detach().exp()) if trainer.use_cm else None
            rec.update(R.record_tail(s, hparams, trainer.selecting(step), scale))
            records.append(rec)
            sel = R.add_record(out, records, rec, s, data, step, trainer.sma.net, fingerprint)  # + best SMA weights
            window = R.new_window()
            stats.write(f"step {step}: train-domain val {100 * sel['val_acc']:.1f}% (best), "
                        f"test-domain {100 * rec[f'env{s.test_env}_in_acc']:.1f}%")
        if save_now:
            R.save_last(out, step, trainer, tracker, window, fingerprint, teacher_acc)
            stats.restart_clock()
    stats.close()
    if DIST.main:
        print(R.write_report(out, s, hparams, data, records, teacher_acc, tracker, fingerprint))
        print(f"[scmd] results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(R.cli(main))
