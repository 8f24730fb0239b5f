"""DomainBed data protocol (docs/algorithm.md §7): dataset layout, env/class order, in/out splits,
augmentations and loaders.

One deliberate difference from DomainBed's loaders: the minibatch of every step is a pure function of
(run seed, env, step) -- which samples are drawn (uniformly, with replacement, as DomainBed's
``RandomSampler(replacement=True)``) and the random augmentation of each. The same run therefore gives
the same batches whatever the worker count, and a run resumed after a crash sees exactly the batches
it would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision import transforms

from scmd import augment
from scmd.errors import DataError, write_cause
from scmd.hparams import seed_hash

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------------
# Indexing: env order, class order, ImageFolder file order (§7.1)


@dataclass
class DomainIndex:
    root: Path
    envs: List[str]
    classes: List[str]
    paths: List[List[str]]  # per env, ImageFolder order
    labels: List[np.ndarray]  # per env, int64
    offsets: List[int] = field(default_factory=list)  # global sample id of each env's first image

    def __post_init__(self) -> None:
        self.offsets = [0]
        for p in self.paths[:-1]:
            self.offsets.append(self.offsets[-1] + len(p))

    @property
    def n_samples(self) -> int:
        return sum(len(p) for p in self.paths)

    def global_path(self, sample_id: int) -> str:
        env = int(np.searchsorted(self.offsets, sample_id, side="right")) - 1
        return self.paths[env][sample_id - self.offsets[env]]


def index_imagefolder(root: str) -> dict:
    """The reference indexer, which fastsel.index_domainbed must equal: the envs are the sorted sub-folders of
    `root` (os.scandir, folders only, as DomainBed), each env a torchvision ImageFolder (its sorted class folders,
    its file order and extension filter). Returns {"envs", "classes", "paths", "labels"}; raises
    FileNotFoundError (no env folder, an env without class folders, a class without images) or ValueError (an env
    whose class folders differ from the first env's)."""
    from torchvision.datasets import ImageFolder

    envs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not envs:
        raise FileNotFoundError(f"dataset root {root} contains no environment folders")
    classes, paths, labels = None, [], []
    for env in envs:
        folder = ImageFolder(os.path.join(root, env))  # FileNotFoundError: no class folder, or a class without images
        if classes is None:
            classes = folder.classes
        elif folder.classes != classes:
            raise ValueError(f"environment {os.path.join(root, env)} has different class folders from the first "
                             f"environment {os.path.join(root, envs[0])}: missing "
                             f"{sorted(set(classes) - set(folder.classes))}, extra "
                             f"{sorted(set(folder.classes) - set(classes))}")
        paths.append([p for p, _ in folder.samples])
        labels.append(np.asarray([t for _, t in folder.samples], dtype=np.int64))
    return {"envs": envs, "classes": classes, "paths": paths, "labels": labels}


def index_dataset(root: Path, fastsel=None) -> DomainIndex:
    """Envs (sorted folders), classes (of the first env) and each env's files in torchvision ImageFolder's order:
    by fastsel when it is given (tests/test_fastsel_indexing.py holds it equal to index_imagefolder), else by the
    reference. Errors name the path."""
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder")
    try:
        r = fastsel.index_domainbed(str(root)) if fastsel is not None else index_imagefolder(str(root))
    except (OSError, ValueError) as e:
        raise DataError(str(e)) from None
    return DomainIndex(root, list(r["envs"]), list(r["classes"]), [list(p) for p in r["paths"]],
                       [np.asarray(lab, dtype=np.int64) for lab in r["labels"]])


# ---------------------------------------------------------------------------------------------------------
# In/out splits (§7.2)


def in_out_split(n: int, holdout_fraction: float, trial_seed: int, env_i: int) -> tuple:
    """DomainBed's split_dataset: shuffle range(n) with RandomState(seed_hash(trial_seed, env));
    the first int(n * holdout_fraction) keys are 'out' (validation), the rest 'in'."""
    keys = np.arange(n)
    np.random.RandomState(seed_hash(trial_seed, env_i)).shuffle(keys)
    n_out = int(n * holdout_fraction)
    return keys[:n_out], keys[n_out:]


# ---------------------------------------------------------------------------------------------------------
# Transforms (§7.3)


def train_transform(size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.7, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
        transforms.RandomGrayscale(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def load_rgb(path: str, truncated: str = "refuse", log: Optional[str] = None) -> Image.Image:
    """Open an image as RGB, or fail naming the file. A truncated file is loaded padded (``truncated="pad"``,
    DomainBed's ``LOAD_TRUNCATED_IMAGES = True``) and its path appended to ``log``, or refused."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is over PIL's decompression-bomb limit ({e}); shrink or remove the "
                        f"file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if "truncated" not in str(e) or truncated != "pad":
            hint = " (DomainBed loads it padded: rerun without --refuse-truncated-images)" if "truncated" in str(e) \
                else ""
            raise DataError(f"cannot read image {path}: {e}{hint}") from None
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}, even padded: {e}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    if log is not None and path not in _TRUNCATED_SEEN:
        _TRUNCATED_SEEN.add(path)
        try:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # one line per write: workers share it
            try:
                os.write(fd, (path + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise DataError(f"cannot write {log}: {write_cause(e)}; free space or pass another --output-dir (the "
                            f"run can be resumed: rerun the same command)") from None
    return img


_TRUNCATED_SEEN: set = set()  # per process: each truncated file is logged once


def truncated_files(log: str) -> List[str]:
    """The distinct files listed in a truncated-images log (several loader processes append to it)."""
    if not os.path.exists(log):
        return []
    return sorted(set(Path(log).read_text().split("\n")) - {""})


class ImageStore:
    """Paths -> PIL images; optionally decoded once and kept in memory (small datasets). With ``as_tensors``
    (all images of one size) each env is one uint8 tensor (n, 3, H, W) that ``scmd.augment`` works on.
    ``truncated``: "pad" (DomainBed) or "refuse"; padded files are listed in ``truncated_log``."""

    def __init__(self, index: DomainIndex, preload: bool, truncated: str = "refuse", as_tensors: bool = False,
                 truncated_log: Optional[str] = None):
        self.index = index
        self.truncated, self.truncated_log = truncated, truncated_log
        self.cache = None
        self.tensors = None
        if preload or as_tensors:
            self.cache = [[self._load(p) for p in env_paths] for env_paths in index.paths]
        if as_tensors:
            self.tensors = [_stack_images(imgs, paths) for imgs, paths in zip(self.cache, index.paths)]

    def _load(self, path: str) -> Image.Image:
        return load_rgb(path, self.truncated, self.truncated_log)

    def get(self, env: int, i: int) -> Image.Image:
        if self.cache is not None:
            return self.cache[env][i]
        return self._load(self.index.paths[env][i])


def _stack_images(imgs: List[Image.Image], paths: List[str]) -> torch.Tensor:
    size = imgs[0].size
    for im, p in zip(imgs, paths):
        if im.size != size:
            raise DataError(f"{p} is {im.size[0]}x{im.size[1]} px, {paths[0]} is {size[0]}x{size[1]}: a dataset "
                            f"augmented in memory needs images of one size")
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in imgs])).permute(0, 3, 1, 2).contiguous()


class _OwnRng:
    """Run augmentations on the CPU generator with per-sample seeds, leaving the global RNG as it was.
    The state is saved and restored once per batch; reseeding the CPU generator directly gives the same
    stream as ``torch.manual_seed`` (which also seeds every accelerator and costs ~20x more per sample)."""

    def __enter__(self):
        self.state = torch.get_rng_state()
        return self

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
        return False

    @staticmethod
    def augment(tf, img: Image.Image, seed: int) -> torch.Tensor:
        torch.default_generator.manual_seed(seed)
        return tf(img)


# ---------------------------------------------------------------------------------------------------------
# Loaders (§7.4)


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is that step's minibatch of one training env: `batch_size` samples drawn uniformly with
    replacement from the env's in-split, each augmented with its own seed. Returns (x, y, sample_ids)."""

    def __init__(self, store: ImageStore, env: int, in_idx: np.ndarray, batch_size: int, seed: int, size: int,
                 rows: slice = slice(None), lazy_until: int = -1):
        self.store, self.env, self.in_idx, self.batch_size, self.seed = store, env, in_idx, batch_size, seed
        self.size, self.rows = size, rows  # rows: this process's share of the batch (torchrun), drawn as one
        self.lazy_until = lazy_until  # in-memory steps <= this return LazyImages (stale selection: kept rows only)
        self.tf = train_transform(size)

    def __len__(self) -> int:  # only a sampler bound; the loader asks for steps, not positions
        return 2**62

    def __getitem__(self, step: int):
        rng = np.random.default_rng((self.seed, self.env, step))
        rows = self.in_idx[rng.integers(0, len(self.in_idx), self.batch_size)]
        if self.store.tensors is not None:  # the whole batch at once, one parameter draw per sample
            imgs = self.store.tensors[self.env][torch.from_numpy(rows)]
            params = augment.draw_params(rng, len(rows), imgs.shape[2], imgs.shape[3])
            imgs, params = imgs[self.rows], params.take(self.rows)
            x = LazyImages([(imgs, params)], self.size)
            x = x if step <= self.lazy_until else x.all()
        else:
            aug_seeds = rng.integers(0, 2**62, self.batch_size)[self.rows]
            with _OwnRng() as r:
                x = torch.stack([r.augment(self.tf, self.store.get(self.env, int(i)), int(s))
                                 for i, s in zip(rows, aug_seeds)])
        rows = rows[self.rows]
        y = torch.from_numpy(self.store.index.labels[self.env][rows])
        ids = torch.from_numpy(rows + self.store.index.offsets[self.env])
        return x, y, ids


class LazyImages:
    """Step-batch rows of in-memory images whose pixels are made only when rows are taken (``x[rows]``): the
    uint8 source images and each row's augmentation parameters, drawn for the whole batch, so a taken row has
    exactly the pixels it has in the full batch. Stale selection ranks before it needs any pixel, so it
    augments only the kept rows (~20 % of the batch)."""

    def __init__(self, parts: list, size: int, device: Optional[torch.device] = None):
        self.parts, self.size = parts, size  # parts: [(uint8 (n, 3, H, W), Params)], one per training env
        self.device = device or torch.device("cpu")

    def __len__(self) -> int:
        return sum(len(imgs) for imgs, _ in self.parts)

    def to(self, device, non_blocking: bool = False) -> LazyImages:
        return LazyImages(self.parts, self.size, torch.device(device))

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """The augmented, normalised float32 rows (a 1-d index tensor), in that order, on this batch's device."""
        rows = rows.cpu()
        out = torch.empty((len(rows), 3, self.size, self.size))
        start = 0
        for imgs, params in self.parts:  # (envs may differ in image size)
            mine = (rows >= start) & (rows < start + len(imgs))
            if mine.any():
                local = (rows[mine] - start).numpy()
                out[mine] = augment.apply(imgs[torch.from_numpy(local)], params.take(local), self.size,
                                          IMAGENET_MEAN, IMAGENET_STD)
            start += len(imgs)
        return out.to(self.device, non_blocking=True)

    def all(self) -> torch.Tensor:
        """Every row (the full batch), each part augmented at once."""
        return torch.cat([augment.apply(imgs, params, self.size, IMAGENET_MEAN, IMAGENET_STD)
                          for imgs, params in self.parts]).to(self.device, non_blocking=True)


def cat_images(parts: list, device: torch.device):
    """The step batch of the training envs, concatenated in env order on `device` (pinned host memory makes
    the copies asynchronous on CUDA); LazyImages stay lazy."""
    if all(isinstance(p, LazyImages) for p in parts):
        return LazyImages([q for p in parts for q in p.parts], parts[0].size, device)
    return torch.cat([p.to(device, non_blocking=True) for p in parts])


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        step = self.start
        while True:
            yield step
            step += 1


def train_loader(dataset: StepBatches, start_step: int, workers: int, pin_memory: bool = False):
    """An infinite loader of one env's minibatches, beginning at `start_step`."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=_Steps(start_step), num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
    )


class EvalSplit(torch.utils.data.Dataset):
    """One split (in or out) of one env, for evaluation. Keys are (eval_step, position): training envs are
    evaluated on augmented images, as in DomainBed, with a seed fixed by (run seed, eval step, env, position)
    (by its batch's first position on in-memory tensors)."""

    def __init__(self, store: ImageStore, env: int, idx: np.ndarray, tf, augmented: bool, seed: int, name: str,
                 size: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.store, self.env, self.idx, self.tf = store, env, idx, tf
        self.augmented, self.seed, self.name = augmented, seed, name
        self.size, self.mean, self.std = size, mean, std

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):  # a whole batch at once (DataLoader uses it when present): one RNG save/restore
        labels = self.store.index.labels[self.env]
        if self.store.tensors is not None:
            rows = self.idx[[pos for _, pos in keys]]
            imgs = self.store.tensors[self.env][torch.from_numpy(rows)]
            if self.augmented:
                eval_step, first = keys[0]
                rng = np.random.default_rng(seed_hash(self.seed, "eval", eval_step, self.name, first))
                x = augment.apply(imgs, augment.draw_params(rng, len(rows), imgs.shape[2], imgs.shape[3]),
                                  self.size, self.mean, self.std)
            else:
                x = augment.resize_normalize(imgs, self.size, self.mean, self.std)
            return list(zip(x.unbind(0), labels[rows].tolist()))
        with _OwnRng() as r:
            out = []
            for eval_step, pos in keys:
                i = int(self.idx[pos])
                img = self.store.get(self.env, i)
                if self.augmented:
                    x = r.augment(self.tf, img, seed_hash(self.seed, "eval", eval_step, self.name, pos))
                else:
                    x = self.tf(img)
                out.append((x, int(labels[i])))
            return out


class _EvalKeys(torch.utils.data.Sampler):
    """The split's batches; under torchrun rank r takes batches r, r + W, ... (shard = (r, W))."""

    def __init__(self, n: int, batch: int, shard=(0, 1)):
        self.n, self.batch, self.eval_step, self.shard = n, batch, 0, shard

    def __len__(self) -> int:
        return len(range(self.shard[0], (self.n + self.batch - 1) // self.batch, self.shard[1]))

    def __iter__(self):
        for s in range(self.shard[0] * self.batch, self.n, self.batch * self.shard[1]):
            yield [(self.eval_step, p) for p in range(s, min(s + self.batch, self.n))]


def eval_loader(split: EvalSplit, batch: int, workers: int, shard=(0, 1)) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(split, batch_sampler=_EvalKeys(len(split), batch, shard), num_workers=workers)
