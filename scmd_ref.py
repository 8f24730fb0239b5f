"""SCMD: Selective Cross-Modality Distillation via CLIP for Domain Generalization (Leng, Li, Wang; TMLR 2024).

A ResNet student learns from the source domains of a DomainBed dataset; a frozen CLIP teacher guides it.
Each step, only the hardest samples of the concatenated batch (highest student cross-entropy) are trained on,
with  L = L_CE + lambda1 * L_logits + lambda2 * L_CM.  "§N" below is section N of docs/algorithm.md.

Run:
    python scmd_ref.py                                            # SCMD on the embedded offline world
    python scmd_ref.py --dataset vlcs --test-env 2 --data-dir /data/domainbed
    python scmd_ref.py --dataset pacs --test-env 0 --algorithm scmd-no-cm       # an ablation (paper Table 3)
    python -m scmd.sweep launch --datasets pacs --n-hparams 5 --n-trials 3 --output-dir sweeps/pacs  # a sweep
    torchrun --standalone --nproc_per_node 2 scmd_ref.py --dataset pacs --test-env 0   # one run on 2 GPUs
    python scmd_ref.py --dataset vlcs --download                   # fetch a dataset first (needs a network)

The file reads top to bottom: settings, networks (§1), the selection rule (§2), the three loss terms (§3), the
SMA (§4), one training step (§5), evaluation (§6) and the DomainBed protocol loop (§7). Plumbing (dataset
table, data layout, weights, outputs, checkpoints) lives in scmd/; so do the variants that are not the paper's
step (torchrun: scmd/dist.py; --selection-losses stale: scmd/stale.py). Ctrl-C or SIGTERM stops after a step
with a checkpoint; rerun to resume.

Where the authors' code differs from the paper or is wasteful, the default reproduces the authors' code and a
flag offers the corrected variant (§9): --teacher-renorm (CLIP normalisation for the teacher),
--selection-horizon steps (the selection cut-off relative to the real step count instead of a hard-coded
5000), --student-weights v1.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C/SIGTERM before the first step (torch loading, data, models): one line, 130/143
    from scmd.startup import stop_during_start_up

    stop_during_start_up()

import copy
import math
import sys
from dataclasses import dataclass
from typing import List, Optional

from scmd.settings import arg

try:
    import fastsel  # optional Rust extension (CPU side): the same results as the references it is tested against
except ImportError:
    fastsel = None

ALGORITHMS = {
    #                 selection, L_logits, L_CM      (the paper's ablation: which terms are on)
    "erm":            (False,    False,    False),
    "kd":             (False,    True,     False),
    "scmd-no-cm":     (True,     True,     False),
    "scmd-no-select": (False,    True,     True),
    "scmd":           (True,     True,     True),
}  # fmt: skip
# All ablations use the same --prompt; the authors' SCMD_no_CM/Baseline classes had a typo'd "this is a photo a {}".
SCMD_PROMPT = "this is a photo of a {}"  # the class prompt SCMD distils from (§3)
TABLE1_TEACHER_PROMPT = "a photo of a {}"  # the prompt of the paper's Table 1 teacher row (zero-shot, §6)
SMA_START_ITER = 300  # hard-coded in the authors' code for SCMD (§4)
THETA_INIT = math.log(1 / 0.07)  # learnable logit scale of L_CM, as CLIP's init (§1.3)
THETA_MAX = math.log(100.0)  # clamp after every step: exp(theta) in [1, 100]
THETA_LR = 1e-4


# =========================================================================================================
# Settings (None: the dataset's default, from its entry in scmd/datasets.py; hparams: §8)
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
    selector: str = arg("auto", "who ranks the losses: fastsel (Rust, CPU) or select_hardest, the torch reference "
                                "it must match; auto: fastsel when installed", choices=["auto", "fastsel", "torch"])
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

    check_or_exit(Settings, sys.argv[1:], ALGORITHMS, __doc__, fastsel is not None)


import torch
import torch.nn as nn
import torch.nn.functional as F

from scmd import data as D
from scmd import models as M
from scmd import run as R
from scmd import settings as S
from scmd import stale
from scmd.dist import DIST
from scmd.stale import StaleSelector

# =========================================================================================================
# §1 Networks
# =========================================================================================================


class Student(nn.Module):
    """ResNet featurizer (fc removed, dropout after pooling) + linear classifier (§1.1).
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
                m.eval()  # frozen BN statistics
        return self

    def forward(self, x):
        return self.classifier(self.featurizer(x))


class Teacher(nn.Module):
    """Frozen CLIP (§1.2). Zero-shot logits z_t = s_T * (e_img/|e_img|) . t_hat^T, with the class text features
    t_hat encoded once per run (the authors re-encode them twice per step; the values are constant)."""

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
# §2 Hard-sample selection
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
    """Keeps the floor(N p) hardest of the N rows (or of each domain's rows). fastsel's top-k when it is given,
    else the torch reference above: both return the same positions. A tracker (fastsel.Tracker) only observes
    what was seen and kept; it never changes the selection."""

    def __init__(self, p: float, per_domain: bool = False, fastsel=None, tracker=None):
        self.p, self.per_domain, self.fastsel, self.tracker = p, per_domain, fastsel, tracker

    def rank(self, losses: torch.Tensor, domains: torch.Tensor, host=None) -> torch.Tensor:
        """Positions of the kept rows (host: the losses as a float32 numpy array, for fastsel)."""
        if self.fastsel is None:
            if self.per_domain:
                return select_hardest_per_domain(losses, domains.to(losses.device), self.p)
            return select_hardest(losses, int(len(losses) * self.p))  # k = floor(N p)
        if self.per_domain:
            return torch.from_numpy(self.fastsel.topk_per_domain(host, domains.numpy(), self.p))
        return torch.from_numpy(self.fastsel.topk_desc(host, int(len(host) * self.p)))

    def __call__(self, losses: torch.Tensor, domains: torch.Tensor, ids: torch.Tensor, step: int) -> torch.Tensor:
        """losses: the N per-sample CEs (on the device); domains, ids: the rows' domain and sample ids (CPU)."""
        host = losses.detach().float().cpu().numpy() if self.fastsel or self.tracker else None  # one N-float copy
        keep = self.rank(losses, domains, host).to(losses.device)
        if self.tracker is not None:  # observational bookkeeping only
            self.tracker.record(step, ids.numpy(), domains.numpy(), host, keep.cpu().numpy())
        return keep


# =========================================================================================================
# §3 Loss terms
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
# §4 SMA: simple moving average of the student's weights
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
# §5 One training step
# =========================================================================================================


class SCMDTrainer:
    def __init__(self, student, teacher, selector, hparams: dict, algorithm: str, selection_horizon: int, device):
        self.device = device
        self.use_selection, self.use_logits, self.use_cm = ALGORITHMS[algorithm]
        self.student, self.teacher, self.selector = student, teacher, selector
        self.lambda1, self.lambda2, self.T = hparams["lambda1"], hparams["lambda2"], hparams["temperature"]
        self.worst_case_p, self.last_k = hparams["worst_case_p"], hparams["last_k_epoch"]
        self.cutoff = int(selection_horizon * (1 - self.last_k))  # select iff step <= cutoff (§2)
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

    def selecting(self, step: int) -> bool:
        return self.use_selection and step <= self.cutoff  # switch-off rule step <= int(horizon * (1 - k))

    def update(self, x, y, domains, ids, step) -> dict:
        """One step on the concatenated batch: x, y the N rows; domains, ids each row's domain and sample id."""
        n_seen = len(y)
        if self.selecting(step):  # hard-sample selection (§2)
            ce = self.per_sample_ce(x, y)  # the current student's CE of each of the N rows, no grad
            keep = self.selector(ce, domains, ids, step)  # positions of the floor(N p) highest CEs
            x, y = x[keep], y[keep]  # "the batch" is now the n = floor(N p) hardest samples
        loss, loss_ce, loss_logits, loss_cm, _ = self.losses(x, y)  # L = L_CE + lambda1 L_logits + lambda2 L_CM
        self.optimise(loss)  # Adam step, theta clamp, SMA update
        return self.stats((loss, loss_ce, loss_logits, loss_cm), len(y), n_seen)

    @torch.no_grad()
    def per_sample_ce(self, x, y):
        """The ranking loss: the current student's per-sample CE, fp32, train mode (BN frozen)."""
        return F.cross_entropy(self.student(x), y, reduction="none")

    def losses(self, x, y):
        """The three losses on the (selected) batch (§3), under fp16 autocast on CUDA."""
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
        """Adam step (loss scaling on CUDA), theta clamp, SMA update (§5)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.use_cm:
            with torch.no_grad():
                self.theta.clamp_(0.0, THETA_MAX)  # exp(theta) in [1, 100], every step (§1.3)
        self.sma.update()

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def stats(self, losses, n: int, n_seen: int) -> dict:
        """The step's loss terms (left on the device: no transfer per step) and its trained and seen row counts."""
        loss, ce, logits, cm = (t.detach() for t in losses)
        return {"loss": loss, "ce": ce, "logits": logits, "cm": cm, "n": torch.tensor(float(n)),
                "N": torch.tensor(float(n_seen))}


# =========================================================================================================
# §6 Evaluation and model selection
# =========================================================================================================


@torch.no_grad()
def accuracy(net, loader, device) -> float:
    """mean(argmax net(x) == y) over one split, net in eval mode (the SMA network, or the teacher)."""
    net.eval()
    correct, total = 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (net(x).argmax(1) == y).sum().item()
        total += len(y)
    net.train()
    return DIST.fraction(correct, total)  # (torchrun: each process evaluates its share of the batches)


def evaluate(net, loaders, device) -> dict:
    """The SMA network's accuracy on every evaluated split (env{i}_in, env{i}_out), as DomainBed's records."""
    return {f"{name}_acc": accuracy(net, loader, device) for name, loader in loaders}


def teacher_zero_shot(clip, tokens, loaders, device) -> list:
    """The paper's Table 1 teacher row: CLIP's zero-shot accuracy per domain on clean, CLIP-normalised images,
    with the Table 1 prompt (tokens)."""
    teacher = Teacher(clip, tokens, renorm=False)
    return [accuracy(teacher, loader, device) for loader in loaders]


# =========================================================================================================
# §7 The protocol: models, data, loop, records
# =========================================================================================================


def build_models(s, hparams, index, device):
    """The trainer (student, frozen teacher, selector and its tracker) and the CLIP model; every tensor on
    `device`. Variants beside the paper's step: torchrun (scmd/dist.py), stale selection losses (scmd/stale.py)."""
    student = Student(M.student_backbone(s.student, s.student_weights), len(index.classes), hparams["resnet_dropout"])
    student.to(device)
    use_selection, use_logits, use_cm = ALGORITHMS[s.algorithm]
    clip = M.load_clip(s.teacher, s.teacher_weights, torch.device("cpu"), s.image_size)  # text features: on the CPU
    teacher = None
    if use_logits or use_cm:
        tokens = M.tokenize(s.teacher, M.class_prompts(s.prompt, index.classes), fastsel)
        teacher = Teacher(clip, tokens, s.teacher_renorm).to(device)  # also its t_hat and renorm buffers
    clip.to(device)
    tracker = fastsel.Tracker(index.n_samples, len(index.envs), window=s.checkpoint_freq) \
        if fastsel is not None and use_selection else None  # per-sample bookkeeping (hardness.json), observational
    ranker = fastsel if s.selector != "torch" else None  # --selector torch: select_hardest, even with fastsel
    selector, trainer_class = Selector(hparams["worst_case_p"], s.select_per_domain, ranker, tracker), SCMDTrainer
    if s.selection_losses == "stale":  # variant: rank by recorded training CEs, no selection pass
        selector, trainer_class = StaleSelector(selector, tracker, s.seed), stale.variant(trainer_class)
    if DIST.on:  # torchrun: the same step on several processes
        trainer_class = DIST.variant(trainer_class, [hparams["batch_size"]] * (len(index.envs) - 1))
    trainer = trainer_class(student, teacher, selector, hparams, s.algorithm, s.selection_horizon, device)
    return trainer, clip


def main(argv=None) -> int:
    s, hparams = S.resolve(S.parse(Settings, argv, __doc__), ALGORITHMS, fastsel is not None)
    fingerprint = S.fingerprint(s, hparams)
    s.output_dir = s.output_dir or S.default_output_dir(s, fingerprint)
    with R.output_folder(s.output_dir) as out, R.StopSignals() as stop:  # one run per folder; a signal stops it
        if R.finished(out, fingerprint, s.resume):
            return 0
        return train(s, hparams, fingerprint, out, stop)


def train(s, hparams, fingerprint, out, stop) -> int:
    device = DIST.start(R.device_for(s.device))  # torchrun: this process's GPU (nccl) or the CPU (gloo)
    R.seed_everything(s.seed)  # as DomainBed's train script (§7.5)
    if fastsel is None:
        R.say("[scmd] fastsel (the Rust extension) is not installed: torch ranks the losses, torchvision's "
              "ImageFolder indexes the data, open_clip tokenises; no per-sample bookkeeping (hardness.json)")
    root = R.dataset_root(s.dataset, s.data_dir, s.download, s.world_per_class, progress=not s.no_progress)
    data = R.Data(s.dataset, root, s.holdout_fraction, s.trial_seed, s.test_env, s.seed, s.image_size, s.eval_splits,
                  s.workers, s.refuse_truncated_images, out, fastsel)
    trainer, clip = build_models(s, hparams, data.index, device)
    run = R.Run(out, fingerprint, trainer, stop, R.record_fields(s, hparams), s.steps, data.index.envs, s.test_env,
                progress=not s.no_progress)
    start_step = run.restore(s.resume)
    R.say(f"[scmd] {s.algorithm} on {s.dataset} ({data.index.root}); held out: {data.index.envs[s.test_env]}; "
          f"device {device}; selector {'fastsel' if trainer.selector.fastsel else 'torch'}; {DIST.world} "
          f"process(es)\n[scmd] hparams: " + ", ".join(f"{k}={v}" for k, v in hparams.items()))
    if run.teacher_acc is None:  # once per run (kept in the checkpoints)
        tokens = M.tokenize(s.teacher, M.class_prompts(TABLE1_TEACHER_PROMPT, data.index.classes), fastsel)
        run.teacher_acc = teacher_zero_shot(clip, tokens, data.clip_loaders(M.image_size_of(clip)), device)

    # --- training loop: one minibatch per training domain, concatenated in env order (§7.4) ----------------
    kept_only = trainer.cutoff if s.selection_losses == "stale" else -1  # stale: only the kept rows are augmented
    batches = data.step_batches(hparams["batch_size"], start_step, device, kept_only)
    for step in range(start_step, s.steps):
        batch = None if run.stop_requested() else run.next_batch(batches)  # None: stopped by a signal
        if batch is None:
            return run.stopped(step - 1)  # checkpoint of the last finished step; the rerun resumes exactly
        x, y, domains, ids = batch
        evaluating = step % s.checkpoint_freq == 0 or step == s.steps - 1  # after the step's update (§7.5)
        saving = evaluating or (step + 1) % s.save_every == 0
        run.log(step, trainer.update(x, y, domains, ids, step), flush=saving)  # stops on a NaN/inf loss
        if evaluating:
            run.add_record(step, evaluate(trainer.sma.net, data.eval_loaders(step), device),
                           epoch=step / data.steps_per_epoch(hparams["batch_size"]))
        if saving:
            run.save(step)
    return run.finish(hparams, data)


if __name__ == "__main__":
    sys.exit(R.cli(main))
