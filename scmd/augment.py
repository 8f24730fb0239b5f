"""DomainBed's training augmentation on a batch of in-memory image tensors, with an independent random draw
per sample (docs/algorithm.md §7.3).

The pipeline and its distributions are torchvision's (the ones DomainBed composes):

1. ``RandomResizedCrop(size, scale=(0.7, 1.0))``, ratio (3/4, 4/3), bilinear with antialias;
2. ``RandomHorizontalFlip(0.5)``;
3. ``ColorJitter(0.3, 0.3, 0.3, 0.3)``: brightness, contrast and saturation factors U(0.7, 1.3), hue shift
   U(-0.3, 0.3), applied in a random order of the four (torchvision's ``randperm(4)``);
4. ``RandomGrayscale(0.1)``;
5. ImageNet normalisation.

torchvision's v2 transforms draw one set of parameters per call, i.e. per batch; DomainBed draws per image.
Here the parameters of every sample are drawn up front (``draw_params``, from a numpy ``Generator`` the
caller seeds, so a batch stays a pure function of its seed) and the ops run on the whole batch
(``apply``). Each op computes what torchvision's functional op computes on a float tensor given the same
parameter; ``tests/test_augment.py`` checks the pixels against torchvision and the parameter distributions
against ``transforms.RandomResizedCrop.get_params`` / ``ColorJitter.get_params``.

Only the PIL pipeline in ``scmd.data`` reproduces DomainBed byte for byte on real datasets (PIL rounds to
uint8 after every colour op); this one is for datasets held in memory as equally sized images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALE = (0.7, 1.0)  # RandomResizedCrop(scale=(0.7, 1.0)) in DomainBed
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default ratio
JITTER = 0.3  # ColorJitter(0.3, 0.3, 0.3, 0.3)
P_FLIP, P_GRAY = 0.5, 0.1
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # ColorJitter's op ids (the order randperm(4) permutes)


@dataclass
class Params:
    """Per-sample parameters of one batch (arrays of length n)."""

    top: np.ndarray  # crop box: row, column, height, width (RandomResizedCrop.get_params)
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray  # bool
    factors: np.ndarray  # (n, 4): brightness, contrast, saturation factors and the hue shift
    order: np.ndarray  # (n, 4): permutation of the four colour ops
    gray: np.ndarray  # bool

    def take(self, rows) -> Params:
        """The parameters of the given rows (an index array or a slice), in that order."""
        return Params(*(v[rows] for v in vars(self).values()))


def draw_params(rng: np.random.Generator, n: int, img_h: int, img_w: int) -> Params:
    """Draw n independent parameter sets with torchvision's rules: the crop tries 10 random boxes
    (area share U(SCALE), log-uniform aspect in RATIO, rounded sides, uniform position) and falls back to
    a centre crop clipped to RATIO."""
    area = img_h * img_w
    target = area * rng.uniform(*SCALE, size=(n, 10))
    aspect = np.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), size=(n, 10)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # Python's round(): half to even, as np.rint
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= img_w) & (h > 0) & (h <= img_h)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(n), first]
    height, width = h[np.arange(n), first], w[np.arange(n), first]
    u_top, u_left = rng.random(n), rng.random(n)  # uniform position among the valid offsets
    in_ratio = img_w / img_h
    if in_ratio < RATIO[0]:
        fb_w, fb_h = img_w, int(round(img_w / RATIO[0]))
    elif in_ratio > RATIO[1]:
        fb_h, fb_w = img_h, int(round(img_h * RATIO[1]))
    else:
        fb_w, fb_h = img_w, img_h
    height, width = np.where(found, height, fb_h), np.where(found, width, fb_w)
    top = np.where(found, np.floor(u_top * (img_h - height + 1)), (img_h - fb_h) // 2).astype(np.int64)
    left = np.where(found, np.floor(u_left * (img_w - width + 1)), (img_w - fb_w) // 2).astype(np.int64)
    flip = rng.random(n) < P_FLIP
    factors = np.stack([rng.uniform(1 - JITTER, 1 + JITTER, n) for _ in range(3)]
                       + [rng.uniform(-JITTER, JITTER, n)], axis=1)
    order = np.argsort(rng.random((n, 4)), axis=1)  # a uniform random permutation per sample
    gray = rng.random(n) < P_GRAY
    return Params(top, left, height, width, flip, factors, order, gray)


# ---------------------------------------------------------------------------------------------------------
# The ops on float images in [0, 1], shape (n, 3, H, W); factors have shape (n,)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, _grayscale(x), factor)


def adjust_hue(x, shift):
    """RGB -> HSV, h := (h + shift) mod 1, HSV -> RGB (torchvision's formulas)."""
    r, g, b = x.unbind(1)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = h + shift.view(-1, 1, 1)
    h = h - torch.floor(h)  # (h + shift) mod 1
    # HSV -> RGB in closed form: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 h) mod 6 with
    # n = (5, 3, 1) for (R, G, B); equal to torchvision's six-sector table
    k = _HUE_OFFSETS.to(x.dtype) + 6.0 * h.unsqueeze(1)
    k = k - 6.0 * torch.floor(k / 6.0)
    return maxc.unsqueeze(1) - (maxc * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


COLOUR_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}


def resized_crops(x: torch.Tensor, p: Params, size: int) -> torch.Tensor:
    """Each sample's crop box resized to size x size, bilinear with antialias (torchvision's resized_crop)."""
    out = [F.interpolate(x[k:k + 1, :, t:t + h, l_:l_ + w], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)
           for k, (t, l_, h, w) in enumerate(zip(p.top.tolist(), p.left.tolist(), p.height.tolist(), p.width.tolist()))]
    return torch.cat(out)


def apply(images: torch.Tensor, p: Params, size: int, mean, std) -> torch.Tensor:
    """images: uint8 (n, 3, H, W). Returns the augmented, normalised float32 batch (n, 3, size, size)."""
    x = resized_crops(images.float().div_(255.0), p, size)
    flip = torch.from_numpy(p.flip)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    factors = torch.from_numpy(p.factors).float()
    order = torch.from_numpy(p.order)
    for pos in range(4):  # each sample's own order of the four colour ops
        for op, fn in COLOUR_OPS.items():
            rows = torch.nonzero(order[:, pos] == op).flatten()
            if len(rows):
                x[rows] = fn(x[rows], factors[rows, op])
    gray = torch.from_numpy(p.gray)
    x = torch.where(gray.view(-1, 1, 1, 1), _grayscale(x).expand_as(x), x)
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def resize_normalize(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """The test-env transform: Resize((size, size)) (bilinear, antialias), then normalisation."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std)
