"""Pretraining of the embedded world's checkpoints (run through ``python -m scmd.world build``).

* Teacher: open_clip ``CLIP`` (config ``assets/embedded_teacher.json``) trained with the symmetric
  InfoNCE loss (open_clip's ``ClipLoss``) on captioned images rendered on the fly -- a stand-in for
  CLIP's web pretraining: all world classes plus ``EXTRA_CLASSES``, the four dataset styles plus
  ``EXTRA_STYLES``, backdrops independent of the class, and varied caption templates (style, object
  colour and backdrop words, or none). The learnable logit scale gets no weight decay, its own
  learning rate (the run is ~1000x shorter than CLIP's) and CLIP's clamp at ln(100).
* Student: ``world.build_student(None)`` trained with cross-entropy on ``EXTRA_CLASSES`` only, photo
  style only (a stand-in for ImageNet pretraining), ImageNet normalisation.

Every batch is a pure function of (seed, batch index), whatever the number of data workers, so a build
that is killed resumes from its last saved state (``<checkpoint>.resume.pt``) on the same batches.
Both runs use bf16 autocast on the CPU (CLIP itself was trained in mixed precision).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from torchvision import transforms

from scmd import data as D
from scmd import world
from scmd.outputs import atomic_torch_save

# ---------------------------------------------------------------------------------------------------------
# Settings (fixed; `build` is deterministic up to floating-point thread scheduling)

TEACHER_SEED = 1234
TEACHER_STEPS = 4800
TEACHER_BATCH = 128
TEACHER_REUSE = 8  # each rendered image is used in 8 consecutive steps (new augmentation and caption)
TEACHER_COLOUR_AUG_P = 0.5  # share of images given DomainBed's colour augmentation (hue, grayscale), with a
# caption that names no colour: web images come in every colour balance, and SCMD feeds its teacher such images
TEACHER_LR = 3e-3  # AdamW, betas (0.9, 0.98), eps 1e-6 as in CLIP; warmup then cosine to 0
TEACHER_WARMUP = 100
TEACHER_WD = 0.1  # on matrices/kernels only: not on biases, norms or the logit scale
TEACHER_SCALE_LR = 1e-2  # own lr for the log logit scale (no weight decay), clamped to [0, ln 100]
TEACHER_DATASET_STYLE_P = 0.8  # share of images in the four dataset styles (rest: EXTRA_STYLES)
TEACHER_WORLD_CLASS_P = 0.7  # share of images showing a world class (rest: EXTRA_CLASSES): common objects

STUDENT_SEED = 4321
STUDENT_STEPS = 800
STUDENT_BATCH = 128
STUDENT_REUSE = 2
STUDENT_LR = 0.1  # SGD momentum 0.9, nesterov, weight decay 5e-4; warmup then cosine to 0
STUDENT_WARMUP = 30
STUDENT_VAL_PER_CLASS = 40

STYLE_WORDS = {
    "photo": ["photo", "photograph", "picture", "snapshot", "photo"],
    "sketch": ["sketch", "pencil sketch", "drawing", "pencil drawing", "line drawing", "doodle"],
    "cartoon": ["cartoon", "clipart", "illustration", "cartoon drawing", "comic drawing"],
    "painting": ["painting", "oil painting", "art painting", "artwork", "blurry painting"],
    "pixel_art": ["pixel art", "pixelated image", "8-bit sprite"],
    "silhouette": ["silhouette", "black silhouette", "shadow shape"],
    "neon": ["neon sign", "neon drawing", "glowing outline"],
    "blueprint": ["blueprint", "technical drawing", "white outline drawing on blue"],
    "mosaic": ["mosaic", "tile mosaic", "mosaic artwork"],
    "bw_photo": ["black and white photo", "grayscale photo", "monochrome picture"],
    "watercolor": ["watercolor", "watercolor painting", "pale painting"],
}
PATTERN_WORDS = {
    "plain": "plain", "striped": "striped", "checkered": "checkered", "dotted": "polka dot", "grid": "grid",
    "diagonal": "diagonal striped", "wavy": "wavy", "brick": "brick",
}
_COLOURLESS = {"sketch", "silhouette", "blueprint", "neon", "bw_photo"}  # object colour not shown
GENERIC_TEMPLATES = [  # web captions that do not describe the depiction
    "a photo of a {c}", "this is a photo of a {c}", "a picture of a {c}", "an image of a {c}", "a {c}", "{c}",
    "look at this {c}", "my {c}", "the {c}", "a nice {c}",
]
STYLE_TEMPLATES = [
    "a {s} of a {c}", "this is a {s} of a {c}", "a {s} of the {c}", "{c}, {s}", "a {s} showing a {c}",
    "a small {s} of a {c}", "a {c} in a {s}",
]
BACKDROP_TEMPLATES = [
    "a {s} of a {c} on a {bc} background", "a {s} of a {c} on a {p} background",
    "a {s} of a {c} on a {p} {bc} background", "a {c} in front of a {p} {bc} wall, {s}", "a {c} on {bc}",
]
COLOUR_TEMPLATES = ["a {s} of a {oc} {c}", "a {oc} {c} in a {s}", "this is a {s} of a {oc} {c}", "a {oc} {c}",
                    "a photo of a {oc} {c}", "a {s} of a {oc} {c} on a {bc} background"]


def caption(meta: Dict[str, str], r: np.random.RandomState, colourless: bool = False) -> str:
    """A web-like caption; ``colourless``: one that names no colour (the image's colours were altered)."""
    c = meta["cls"].replace("_", " ")
    fields = {"c": c, "s": STYLE_WORDS[meta["style"]][r.randint(len(STYLE_WORDS[meta["style"]]))],
              "bc": meta["bg_colour"], "p": PATTERN_WORDS[meta["pattern"]], "oc": meta["obj_colour"]}
    u = r.rand() * (0.75 if colourless else 1.0)
    if u < 0.45:  # most web captions just name the object
        t = GENERIC_TEMPLATES[r.randint(len(GENERIC_TEMPLATES))]
    elif u < 0.75:
        t = STYLE_TEMPLATES[r.randint(len(STYLE_TEMPLATES))]
    elif u < 0.875 or meta["style"] in _COLOURLESS:
        t = BACKDROP_TEMPLATES[r.randint(len(BACKDROP_TEMPLATES))]
    else:
        t = COLOUR_TEMPLATES[r.randint(len(COLOUR_TEMPLATES))]
    text = t.format(**fields)
    return text + "." if r.rand() < 0.3 else text


# ---------------------------------------------------------------------------------------------------------
# On-the-fly data


def teacher_scene(seed: int) -> world.Scene:
    r = np.random.RandomState(seed)
    pool = world.CLASSES if r.rand() < TEACHER_WORLD_CLASS_P else world.EXTRA_CLASSES
    cls = pool[r.randint(len(pool))]
    if r.rand() < TEACHER_DATASET_STYLE_P:
        style = world.DATASET_STYLES[r.randint(len(world.DATASET_STYLES))]
    else:
        style = world.EXTRA_STYLES[r.randint(len(world.EXTRA_STYLES))]
    pattern = world.PATTERNS[r.randint(len(world.PATTERNS))]
    colour = world.COLOUR_NAMES[r.randint(len(world.COLOUR_NAMES))]
    return world.Scene(cls, style, pattern, colour, seed=int(r.randint(2**31)))


def student_scene(seed: int) -> Tuple[world.Scene, int]:
    r = np.random.RandomState(seed)
    y = r.randint(len(world.EXTRA_CLASSES))
    pattern = world.PATTERNS[r.randint(len(world.PATTERNS))]
    colour = world.COLOUR_NAMES[r.randint(len(world.COLOUR_NAMES))]
    return world.Scene(world.EXTRA_CLASSES[y], "photo", pattern, colour, seed=int(r.randint(2**31))), y


class RenderedBatches(IterableDataset):
    """Chunk k (k = 0 .. n_chunks-1) renders ``batch_size`` images from seeds (seed, k, i) and yields them
    as ``reuse`` batches (same images, fresh augmentation, caption and order each time). Workers take
    chunks k = id, id + n, ... and DataLoader interleaves them in order, so the stream does not depend on
    the number of workers."""

    def __init__(self, kind: str, seed: int, n_chunks: int, batch_size: int, reuse: int = 1, start_chunk: int = 0):
        super().__init__()
        self.kind, self.seed, self.n_chunks, self.batch_size, self.reuse = kind, seed, n_chunks, batch_size, reuse
        self.start_chunk = start_chunk
        norm = (D.CLIP_MEAN, D.CLIP_STD) if kind == "teacher" else (D.IMAGENET_MEAN, D.IMAGENET_STD)
        # light augmentation: the run is short, and strong augmentation slowed learning more than it helped
        aug = [transforms.RandomResizedCrop(world.IMAGE_SIZE, scale=(0.8, 1.0)), transforms.RandomHorizontalFlip()]
        if kind == "teacher":
            aug += [transforms.ColorJitter(0.2, 0.2, 0.2)]
        self.transform = transforms.Compose(aug + [transforms.ToTensor(), transforms.Normalize(*norm)])
        self.colour_transform = transforms.Compose([  # DomainBed's training augmentation (docs/algorithm.md §7.3)
            transforms.RandomResizedCrop(world.IMAGE_SIZE, scale=(0.7, 1.0)), transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.3), transforms.RandomGrayscale(), transforms.ToTensor(),
            transforms.Normalize(*norm)])
        self.tokenizer = None

    def make(self, k: int) -> list:
        imgs, metas, ys = [], [], []
        for i in range(self.batch_size):
            s = world.stable_seed(self.kind, self.seed, k, i)
            if self.kind == "teacher":
                img, meta = world.render(teacher_scene(s))
                metas.append(meta)
            else:
                scene, y = student_scene(s)
                img, _ = world.render(scene)
                ys.append(y)
            imgs.append(img)
        out = []
        for use in range(self.reuse):
            torch.manual_seed(world.stable_seed(self.kind, self.seed, k, use, "aug"))
            r = np.random.RandomState(world.stable_seed(self.kind, self.seed, k, use, "order"))
            order = r.permutation(self.batch_size) if use else np.arange(self.batch_size)
            coloured = (r.rand(self.batch_size) < TEACHER_COLOUR_AUG_P if self.kind == "teacher"
                        else np.zeros(self.batch_size, bool))
            x = torch.stack([(self.colour_transform if c else self.transform)(imgs[j])
                             for j, c in zip(order, coloured)])
            if self.kind == "teacher":
                if self.tokenizer is None:
                    import open_clip

                    world.register_teacher_config()
                    self.tokenizer = open_clip.get_tokenizer(world.TEACHER_MODEL_NAME)
                caps = [caption(metas[j], r, colourless=c) for j, c in zip(order, coloured)]
                out.append((x, self.tokenizer(caps), caps))
            else:
                out.append((x, torch.tensor([ys[j] for j in order])))
        return out

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for k in range(self.start_chunk + wid, self.n_chunks, nw):
            yield self.make(k)


def _batches(ds: RenderedBatches, workers: int) -> Iterator:
    for chunk in _loader(ds, workers):
        yield from chunk


def _worker_init(_):
    torch.set_num_threads(1)


def _loader(ds: RenderedBatches, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=_worker_init,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class _Resume:
    """Training state saved about every ``RESUME_SECONDS`` next to the output, so that a build that is killed
    continues where it stopped (batches are a pure function of the chunk index, so the continuation sees
    the same data) instead of starting over."""

    def __init__(self, out: Path, reuse: int, **tag):
        self.path, self.reuse, self.last = out.with_suffix(".resume.pt"), reuse, time.time()
        self.tag = {k: str(v) for k, v in dict(tag, reuse=reuse).items()}

    def due(self, next_step: int, steps: int) -> bool:
        return next_step % self.reuse == 0 and next_step < steps and time.time() - self.last > RESUME_SECONDS

    def load(self, model, opt) -> Tuple[int, dict]:
        if not self.path.is_file():
            return 0, {}
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("tag") != self.tag:
            return 0, {}
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        return int(state["step"]), state["extra"]

    def save(self, step: int, model, opt, extra: dict) -> None:
        atomic_torch_save({"tag": self.tag, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                           "extra": extra}, self.path)
        self.last = time.time()

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


RESUME_SECONDS = 60.0  # save the training state about once a minute, at a chunk boundary


def _default_workers() -> int:
    return 1 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 2) - 1)


# ---------------------------------------------------------------------------------------------------------
# Teacher


def encode_text_truncated(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed on the first L = (last end-of-text position + 1) tokens only.
    Exact (test_world checks it): the text transformer is causal and pools at the end-of-text token, so
    the padding after it never reaches the output. Our captions are < 25 tokens of the 77, so training
    is ~5x cheaper on the text side."""
    from open_clip.transformer import text_global_pool

    n = int(tokens.argmax(-1).max()) + 1
    t = tokens[:, :n]
    x = model.token_embedding(t) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, t, model.text_pool_type)
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection


def train_teacher(steps: int = TEACHER_STEPS, batch_size: int = TEACHER_BATCH, seed: int = TEACHER_SEED,
                  workers: Optional[int] = None, out: Path = world.TEACHER_WEIGHTS, log=print) -> dict:
    import open_clip
    from open_clip.loss import ClipLoss

    workers = _default_workers() if workers is None else workers
    torch.manual_seed(seed)
    world.register_teacher_config()
    model = open_clip.create_model(world.TEACHER_MODEL_NAME)  # random init, the architecture that is loaded
    model.train()
    model.visual.to(memory_format=torch.channels_last)  # faster CPU convolutions; same weights
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if n != "logit_scale":
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": TEACHER_WD, "base_lr": TEACHER_LR},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": TEACHER_LR},
              {"params": [model.logit_scale], "weight_decay": 0.0, "base_lr": TEACHER_SCALE_LR}]
    opt = torch.optim.AdamW(groups, lr=TEACHER_LR, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[teacher] {world.TEACHER_MODEL_NAME}: {n_params / 1e6:.2f}M params; {steps} steps x {batch_size} "
        f"captioned images rendered on the fly, each used {TEACHER_REUSE}x ({workers} data workers, "
        f"{torch.get_num_threads()} threads)")
    resume = _Resume(out, seed=seed, steps=steps, batch=batch_size, reuse=TEACHER_REUSE, lr=TEACHER_LR)
    start, extra = resume.load(model, opt)
    losses, before = extra.get("losses", []), extra.get("seconds", 0.0)
    if start:
        log(f"[teacher] resuming at step {start} from {resume.path}")
    t0 = time.time() - before
    ds = RenderedBatches("teacher", seed, math.ceil(steps / TEACHER_REUSE), batch_size, TEACHER_REUSE,
                         start_chunk=start // TEACHER_REUSE)
    for step, (x, tok, caps) in enumerate(_batches(ds, workers), start=start):
        if step == steps:
            break
        f = _lr_factor(step, steps, TEACHER_WARMUP)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision, as CLIP (fp16 there)
            img_f = model.encode_image(x.contiguous(memory_format=torch.channels_last))
            txt_f = encode_text_truncated(model, tok)
        img_f, txt_f = F.normalize(img_f.float(), dim=-1), F.normalize(txt_f.float(), dim=-1)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step == 0:
            log(f"[teacher] example captions: {caps[:4]}")
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"[teacher] step {step:4d}  loss {np.mean(losses[-50:]):.3f}  logit scale "
                f"{model.logit_scale.exp().item():6.2f}  {el:5.0f}s  {(step + 1) * batch_size / el:5.0f} img/s")
        if resume.due(step + 1, steps):
            resume.save(step + 1, model, opt, {"losses": losses, "seconds": time.time() - t0})
    elapsed = time.time() - t0
    first_loss = losses[0]
    stats = {"steps": steps, "batch_size": batch_size, "images_rendered": steps * batch_size // TEACHER_REUSE,
             "train_seconds": round(elapsed, 1), "loss_first": round(first_loss, 4),
             "loss_last50": round(float(np.mean(losses[-50:])), 4),
             "logit_scale": round(model.logit_scale.exp().item(), 3)}
    model.eval()
    model.visual.to(memory_format=torch.contiguous_format)
    world.save_compact(model.state_dict(), out, metadata={"model": world.TEACHER_MODEL_NAME, "seed": str(seed),
                                                          **{k: str(v) for k, v in stats.items()}})
    resume.done()
    log(f"[teacher] saved {out} ({out.stat().st_size / 1e6:.2f} MB): {stats}")
    return stats


# ---------------------------------------------------------------------------------------------------------
# Student


def _student_val(batch_per_class: int = STUDENT_VAL_PER_CLASS):
    tf = D.eval_transform(world.IMAGE_SIZE)
    xs, ys = [], []
    for y, cls in enumerate(world.EXTRA_CLASSES):
        for i in range(batch_per_class):
            r = np.random.RandomState(world.stable_seed("student-val", cls, i))
            scene = world.Scene(cls, "photo", world.PATTERNS[r.randint(8)], world.COLOUR_NAMES[r.randint(8)],
                                seed=int(r.randint(2**31)))
            xs.append(tf(world.render(scene)[0]))
            ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def _accuracy(model, x, y, bs: int = 256) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])
    return (pred == y).float().mean().item()


def train_student(steps: int = STUDENT_STEPS, batch_size: int = STUDENT_BATCH, seed: int = STUDENT_SEED,
                  workers: Optional[int] = None, out: Path = world.STUDENT_WEIGHTS, log=print) -> dict:
    workers = _default_workers() if workers is None else workers
    torch.manual_seed(seed)
    model = world.build_student(None).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=STUDENT_LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    xv, yv = _student_val()
    log(f"[student] {world.STUDENT_ARCH}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; "
        f"{steps} steps x {batch_size} photo-style images of {len(world.EXTRA_CLASSES)} extra classes; "
        f"validation {len(yv)} fixed images")
    resume = _Resume(out, seed=seed, steps=steps, batch=batch_size, reuse=STUDENT_REUSE, lr=STUDENT_LR)
    start, extra = resume.load(model, opt)
    losses, accs, before = extra.get("losses", []), extra.get("accs", []), extra.get("seconds", 0.0)
    if start:
        log(f"[student] resuming at step {start} from {resume.path}")
    t0 = time.time() - before
    ds = RenderedBatches("student", seed, math.ceil(steps / STUDENT_REUSE), batch_size, STUDENT_REUSE,
                         start_chunk=start // STUDENT_REUSE)
    for step, (x, y) in enumerate(_batches(ds, workers), start=start):
        if step == steps:
            break
        for g in opt.param_groups:
            g["lr"] = STUDENT_LR * _lr_factor(step, steps, STUDENT_WARMUP)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append((logits.argmax(1) == y).float().mean().item())
        if step % 50 == 0 or step == steps - 1:
            log(f"[student] step {step:4d}  loss {np.mean(losses[-50:]):.3f}  train acc {np.mean(accs[-50:]):.3f}"
                f"  {time.time() - t0:5.0f}s")
        if resume.due(step + 1, steps):
            resume.save(step + 1, model, opt, {"losses": losses, "accs": accs, "seconds": time.time() - t0})
    elapsed = time.time() - t0
    val = _accuracy(model, xv, yv)
    stats = {"steps": steps, "batch_size": batch_size, "train_seconds": round(elapsed, 1),
             "loss_last50": round(float(np.mean(losses[-50:])), 4),
             "train_acc_last50": round(float(np.mean(accs[-50:])), 4), "val_acc": round(val, 4)}
    world.save_compact(model.state_dict(), out, metadata={
        "arch": world.STUDENT_ARCH, "classes": ",".join(world.EXTRA_CLASSES), "seed": str(seed),
        **{k: str(v) for k, v in stats.items()}})
    resume.done()
    log(f"[student] saved {out} ({out.stat().st_size / 1e6:.2f} MB): {stats}")
    return stats


# ---------------------------------------------------------------------------------------------------------
# Zero-shot check


def _load_env(root: Path, env: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """An env's images as one uint8 tensor (n, 3, H, W) and their labels."""
    xs, ys = [], []
    for y, cls in enumerate(world.CLASSES):
        for p in sorted((root / env / cls).glob("*.png")):
            xs.append(np.asarray(D.load_rgb(str(p)), dtype=np.uint8))
            ys.append(y)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


@torch.no_grad()
def zero_shot(model, tokenizer, data_dir, envs: Sequence[str] = tuple(world.ENVIRONMENTS),
              n_per_class: Optional[int] = None, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Accuracy per env of argmax_c cos(image, "this is a photo of a {c}"), with CLIP normalisation,
    ImageNet normalisation (what SCMD feeds the teacher) and ImageNet normalisation after DomainBed's
    training augmentation as scmd_ref.py applies it on this world (scmd.augment, one draw per image);
    plus the mean max-probability of the teacher's T=3 soft targets."""
    from scmd import augment

    root = world.ensure_dataset(data_dir, n_per_class=n_per_class)
    prompts = [world.CHECKED_PROMPT.format(c.replace("_", " ")) for c in world.CLASSES]
    txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    scale = model.logit_scale.exp()
    size = world.IMAGE_SIZE
    res: Dict[str, Dict[str, float]] = {}
    for k, env in enumerate(envs):
        res[env] = {}
        imgs, y = _load_env(root, env)
        inputs = {
            "clip": augment.resize_normalize(imgs, size, D.CLIP_MEAN, D.CLIP_STD),
            "imagenet": augment.resize_normalize(imgs, size, D.IMAGENET_MEAN, D.IMAGENET_STD),
            "imagenet_trainaug": augment.apply(  # DomainBed's training transform (docs/algorithm.md §7.3)
                imgs, augment.draw_params(np.random.default_rng((seed, k)), len(imgs), *imgs.shape[2:]), size,
                D.IMAGENET_MEAN, D.IMAGENET_STD),
        }
        for name, x in inputs.items():
            logits = torch.cat([scale * F.normalize(model.encode_image(x[i:i + 512]), dim=-1) @ txt.T
                                for i in range(0, len(x), 512)])
            res[env][name] = round((logits.argmax(1) == y).float().mean().item(), 4)
            if name == "imagenet":
                res[env]["T3_maxprob_imagenet"] = round(F.softmax(logits / 3, 1).max(1).values.mean().item(), 3)
    return res


def format_zero_shot(res: Dict[str, Dict[str, float]]) -> List[str]:
    cols = ["clip", "imagenet", "imagenet_trainaug", "T3_maxprob_imagenet"]
    lines = [f"{'env':10s}" + "".join(f"{c:>22s}" for c in cols)]
    for env, r in res.items():
        lines.append(f"{env:10s}" + "".join(f"{r[c]:22.4f}" for c in cols))
    lines.append(f"{'mean':10s}" + "".join(f"{np.mean([r[c] for r in res.values()]):22.4f}" for c in cols))
    return lines


def check(data_dir="data", weights=None, log=print) -> Dict[str, Dict[str, float]]:
    model, tokenizer = world.load_teacher(weights)
    log(f"[check] teacher {weights or world.TEACHER_WEIGHTS}: logit scale {model.logit_scale.exp().item():.2f}; "
        f"zero-shot with prompt {world.CHECKED_PROMPT.format('{class}')!r} on {data_dir}/{world.DATASET_DIRNAME}")
    res = zero_shot(model, tokenizer, data_dir)
    for line in format_zero_shot(res):
        log("[check] " + line)
    return res


# The world's design criteria (fixed before any algorithm is compared on it)
TEACHER_MIN_CLIP = 0.90  # zero-shot accuracy on every domain, CLIP preprocessing
TEACHER_MIN_TRAINAUG = 0.85  # ... on what SCMD feeds it: ImageNet-normalised, DomainBed-augmented
ERM_SOURCE_VAL_RANGE = (0.80, 0.95)  # ERM's final source-domain validation accuracy: trained, not solved


def shortcut_shares(n_per_env: int = 4000) -> Dict[str, Dict[str, float]]:
    """For every env, the share of its scenes whose backdrop follows each env's class -> backdrop mapping (from
    the scene definitions, without rendering). Its own mapping: about NUISANCE_STRENGTH; another env's: chance."""
    res: Dict[str, Dict[str, float]] = {}
    for env in world.ENVIRONMENTS:
        scenes = [(ci, world.dataset_scene(env, ci, i)) for ci in range(len(world.CLASSES))
                  for i in range(n_per_env // len(world.CLASSES))]
        res[env] = {other: float(np.mean([(sc.pattern, sc.bg_colour) == world.backdrop_of(other, ci)
                                          for ci, sc in scenes])) for other in world.ENVIRONMENTS}
    return res


def erm_source_val(data_dir: str, run: bool, log=print) -> Dict[str, float]:
    """ERM's mean source out-split accuracy at its last evaluation, per held-out env, from `scmd_ref.py
    --algorithm erm` runs at the dataset's protocol (seed 0; runs already finished with these settings are
    reused). With run=False only finished runs are read."""
    import subprocess
    import sys

    root = world.ASSETS_DIR.parent
    res = {}
    for e, env in enumerate(world.ENVIRONMENTS):
        out = root / "outputs" / f"world_check_erm_te{e}"
        if run:
            cmd = [sys.executable, str(root / "scmd_ref.py"), "--algorithm", "erm", "--test-env", str(e),
                   "--output-dir", str(out), "--data-dir", str(data_dir), "--eval-splits", "selection", "--no-progress"]
            log(f"[check] {' '.join(cmd[1:])}")
            subprocess.run(cmd, check=True)
        recs = out / "results.jsonl"
        if not (out / "done").exists():
            continue
        last = [json.loads(line) for line in recs.read_text().splitlines() if line.strip()][-1]
        res[env] = float(np.mean([last[f"env{k}_out_acc"] for k in range(len(world.ENVIRONMENTS)) if k != e]))
    return res


def check_premises(data_dir="data", run_erm: bool = False, log=print) -> bool:
    """Print every design criterion of the world with its measured value; True if all hold."""
    ok = True

    def verdict(name: str, good: bool, detail: str) -> None:
        nonlocal ok
        ok &= good
        log(f"[premise] {'PASS' if good else 'FAIL'}  {name}: {detail}")

    zs = check(data_dir, log=log)
    worst_clip = min(zs.values(), key=lambda r: r["clip"])
    worst_aug = min(zs.values(), key=lambda r: r["imagenet_trainaug"])
    verdict(f"teacher zero-shot >= {TEACHER_MIN_CLIP:.0%} on every domain (CLIP preprocessing)",
            all(r["clip"] >= TEACHER_MIN_CLIP for r in zs.values()),
            ", ".join(f"{e} {100 * r['clip']:.1f}%" for e, r in zs.items()) + f" (min {100 * worst_clip['clip']:.1f}%)")
    verdict(f"teacher zero-shot >= {TEACHER_MIN_TRAINAUG:.0%} on every domain (ImageNet-normalised, augmented)",
            all(r["imagenet_trainaug"] >= TEACHER_MIN_TRAINAUG for r in zs.values()),
            ", ".join(f"{e} {100 * r['imagenet_trainaug']:.1f}%" for e, r in zs.items())
            + f" (min {100 * worst_aug['imagenet_trainaug']:.1f}%)")
    student = world.build_student()
    overlap = sorted(set(world.CLASSES) & set(world.EXTRA_CLASSES))
    verdict("student pretrained only on classes outside the task",
            not overlap and student.fc.out_features == len(world.EXTRA_CLASSES),
            f"{student.fc.out_features} pretraining classes {world.EXTRA_CLASSES[:3]}...; shared with the task: "
            f"{overlap or 'none'}")
    shares = shortcut_shares()
    own = {e: shares[e][e] for e in world.ENVIRONMENTS}
    foreign = max(shares[e][o] for e in world.ENVIRONMENTS for o in world.ENVIRONMENTS if o != e)
    verdict("every domain keeps its own class -> backdrop shortcut, absent from the others",
            all(own[e] > 0.5 for e in own) and foreign < 0.05,
            "own-mapping share " + ", ".join(f"{e} {100 * v:.0f}%" for e, v in own.items())
            + f"; another domain's mapping: at most {100 * foreign:.1f}%")
    erm = erm_source_val(data_dir, run_erm, log=log)
    lo, hi = ERM_SOURCE_VAL_RANGE
    if len(erm) == len(world.ENVIRONMENTS):
        verdict(f"ERM at the dataset's protocol ends at {lo:.0%}-{hi:.0%} source-domain validation accuracy",
                all(lo <= v <= hi for v in erm.values()),
                ", ".join(f"held out {e}: {100 * v:.1f}%" for e, v in erm.items()))
    else:
        ok = False
        log(f"[premise] ----  ERM source-domain validation: {len(erm)} of {len(world.ENVIRONMENTS)} runs finished; "
            f"`python -m scmd.world check --erm` runs them (about 4 min each on one core)")
    return ok


# ---------------------------------------------------------------------------------------------------------


def build(only: Optional[str] = None, data_dir="data", out_dir: Path = world.ASSETS_DIR) -> None:
    """Train the checkpoints into ``out_dir`` (default assets/), each with a log of its figures next to it."""
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) - 1)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fn, path in [("teacher", train_teacher, out_dir / world.TEACHER_WEIGHTS.name),
                           ("student", train_student, out_dir / world.STUDENT_WEIGHTS.name)]:
        if only in (None, name):
            with open(path.with_suffix(".log"), "a" if path.with_suffix(".resume.pt").exists() else "w") as fh:
                def log(msg, fh=fh):
                    print(msg, flush=True)
                    fh.write(msg + "\n")
                    fh.flush()
                fn(out=path, log=log)
                if name == "teacher":
                    check(data_dir, weights=path, log=log)
