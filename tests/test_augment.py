"""scmd.augment (DomainBed's training augmentation on batched tensors) against torchvision itself:

* pixels: given the same parameters, every op and the whole pipeline give torchvision's functional result
  on each sample (float32, within 1e-5), and stay close to the PIL pipeline that real datasets use;
* distributions: over many draws, the crop boxes, flips, jitter factors, op orders and grayscale choices
  have the distributions of torchvision's own ``RandomResizedCrop.get_params``, ``ColorJitter.get_params``
  and ``RandomHorizontalFlip`` / ``RandomGrayscale`` draws (two-sample KS and chi-square tests), and the same
  tests reject a draw with a wrong hue range, a fixed op order or a wrong crop scale.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from scmd import augment as A
from scmd import data as D

TOL = 1e-5


def _images(n=24, h=32, w=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    x[0] = 128  # grey: hue undefined (max == min)
    x[1, 0] = 255  # saturated channels, ties between channels
    x[1, 1] = 255
    x[2, :, :8] = 0  # black region
    return x


def _reference(img_u8: torch.Tensor, p: A.Params, k: int, size: int) -> torch.Tensor:
    """Sample k through torchvision's functional ops, in torchvision's order of the pipeline."""
    x = img_u8.float() / 255.0
    x = TF.resized_crop(x, int(p.top[k]), int(p.left[k]), int(p.height[k]), int(p.width[k]), [size, size],
                        interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)
    if p.flip[k]:
        x = TF.hflip(x)
    ops = {A.BRIGHTNESS: TF.adjust_brightness, A.CONTRAST: TF.adjust_contrast, A.SATURATION: TF.adjust_saturation,
           A.HUE: TF.adjust_hue}
    for op in p.order[k].tolist():
        x = ops[op](x, float(p.factors[k, op]))
    if p.gray[k]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return TF.normalize(x, D.IMAGENET_MEAN, D.IMAGENET_STD)


@pytest.mark.parametrize("op", [A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE])
def test_each_colour_op_matches_torchvision(op):
    x = _images().float() / 255.0
    lo, hi = (-0.5, 0.5) if op == A.HUE else (0.0, 2.0)  # beyond the jitter ranges too
    factors = torch.linspace(lo, hi, len(x))
    ours = A.COLOUR_OPS[op](x.clone(), factors)
    fn = {A.BRIGHTNESS: TF.adjust_brightness, A.CONTRAST: TF.adjust_contrast, A.SATURATION: TF.adjust_saturation,
          A.HUE: TF.adjust_hue}[op]
    ref = torch.stack([fn(x[k], float(factors[k])) for k in range(len(x))])
    assert (ours - ref).abs().max().item() < TOL


def test_crops_match_torchvision_resized_crop_up_and_down():
    imgs = _images(h=40, w=36).float() / 255.0
    p = A.draw_params(np.random.default_rng(1), len(imgs), 40, 36)
    for size in (32, 48):  # downscaling (antialias matters) and upscaling
        ours = A.resized_crops(imgs, p, size)
        for k in range(len(imgs)):
            ref = TF.resized_crop(imgs[k], int(p.top[k]), int(p.left[k]), int(p.height[k]), int(p.width[k]),
                                  [size, size], antialias=True)
            assert (ours[k] - ref).abs().max().item() < TOL


def test_whole_pipeline_matches_torchvision_per_sample():
    imgs = _images(n=64)
    p = A.draw_params(np.random.default_rng(2), len(imgs), 32, 32)
    assert p.flip.any() and (~p.flip).any() and p.gray.any()
    assert len({tuple(o) for o in p.order.tolist()}) > 10  # many different op orders in one batch
    ours = A.apply(imgs, p, 32, D.IMAGENET_MEAN, D.IMAGENET_STD)
    ref = torch.stack([_reference(imgs[k], p, k, 32) for k in range(len(imgs))])
    assert ours.shape == (64, 3, 32, 32) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < 4 * TOL  # normalised units: 1/std ~ 4.4 x pixel units


def test_pipeline_is_close_to_the_pil_pipeline_of_real_datasets():
    """The PIL pipeline rounds to uint8 after every colour op; with the same parameters the two differ by
    that rounding only (a few grey levels), not by a different operation."""
    imgs = _images(n=32, seed=3)
    p = A.draw_params(np.random.default_rng(3), len(imgs), 32, 32)
    ours = A.apply(imgs, p, 32, (0, 0, 0), (1, 1, 1))
    diffs = []
    for k in range(len(imgs)):
        pil = Image.fromarray(imgs[k].permute(1, 2, 0).numpy())
        pil = TF.resized_crop(pil, int(p.top[k]), int(p.left[k]), int(p.height[k]), int(p.width[k]), [32, 32],
                              antialias=True)
        if p.flip[k]:
            pil = TF.hflip(pil)
        ops = {A.BRIGHTNESS: TF.adjust_brightness, A.CONTRAST: TF.adjust_contrast,
               A.SATURATION: TF.adjust_saturation, A.HUE: TF.adjust_hue}
        for op in p.order[k].tolist():
            pil = ops[op](pil, float(p.factors[k, op]))
        if p.gray[k]:
            pil = TF.rgb_to_grayscale(pil, num_output_channels=3)
        diffs.append((ours[k] - TF.to_tensor(pil)).abs().mean().item())
    assert np.median(diffs) < 3 / 255, diffs


def test_test_env_transform_matches_torchvision_resize():
    imgs = _images(h=40, w=28)
    ours = A.resize_normalize(imgs, 32, D.CLIP_MEAN, D.CLIP_STD)
    for k in range(len(imgs)):
        ref = TF.normalize(TF.resize(imgs[k].float() / 255.0, [32, 32], antialias=True), D.CLIP_MEAN, D.CLIP_STD)
        assert (ours[k] - ref).abs().max().item() < 4 * TOL
    same = A.resize_normalize(_images(), 32, (0, 0, 0), (1, 1, 1))  # already the right size: only /255
    assert torch.equal(same, _images().float() / 255.0)


def test_params_are_a_pure_function_of_the_generator_seed():
    a = A.draw_params(np.random.default_rng((0, 1, 2)), 96, 32, 32)
    b = A.draw_params(np.random.default_rng((0, 1, 2)), 96, 32, 32)
    c = A.draw_params(np.random.default_rng((0, 1, 3)), 96, 32, 32)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    assert not np.array_equal(a.factors, c.factors)


# ---------------------------------------------------------------------------------------------------------
# Distributions against torchvision's own parameter draws

N_DRAWS = 6000
ALPHA_KS = 1.95  # two-sample KS critical value c(alpha) at alpha ~ 1e-3


def _ks_rejects(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))
    return d.max() > ALPHA_KS * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def _chi2_rejects(a: np.ndarray, b: np.ndarray) -> bool:
    """Two-sample chi-square homogeneity test on categorical samples, at alpha ~ 1e-3 (Wilson-Hilferty
    approximation of the critical value), over categories seen at least 5 times in all."""
    cats, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ca = np.bincount(inv[: len(a)], minlength=len(cats)).astype(float)
    cb = np.bincount(inv[len(a):], minlength=len(cats)).astype(float)
    keep = ca + cb >= 5
    ca, cb = ca[keep], cb[keep]
    tot = ca + cb
    ea, eb = tot * ca.sum() / tot.sum(), tot * cb.sum() / tot.sum()
    stat = ((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum()
    k = len(tot) - 1
    if k < 1:
        return False
    z = 3.09  # one-sided normal quantile at 1e-3
    crit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat > crit


@pytest.fixture(scope="module")
def torchvision_draws():
    """N_DRAWS parameter sets from torchvision's own transforms (the global torch RNG, as in DomainBed)."""
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    jitter = transforms.ColorJitter(0.3, 0.3, 0.3, 0.3)
    crops, factors, orders, flips, grays = [], [], [], [], []
    for _ in range(N_DRAWS):
        crops.append(transforms.RandomResizedCrop.get_params(img, [0.7, 1.0], [3 / 4, 4 / 3]))
        flips.append(bool(torch.rand(1) < 0.5))  # RandomHorizontalFlip's draw
        fn_idx, b, c, s, h = transforms.ColorJitter.get_params(jitter.brightness, jitter.contrast,
                                                                jitter.saturation, jitter.hue)
        orders.append(fn_idx.tolist())
        factors.append((b, c, s, h))
        grays.append(bool(torch.rand(1) < 0.1))  # RandomGrayscale's draw
    crops = np.array(crops)
    return {"top": crops[:, 0], "left": crops[:, 1], "height": crops[:, 2], "width": crops[:, 3],
            "factors": np.array(factors), "order": np.array(orders), "flip": np.array(flips), "gray": np.array(grays)}


def _ours(mutate=None) -> A.Params:
    p = A.draw_params(np.random.default_rng(123), N_DRAWS, 32, 32)
    if mutate:
        mutate(p)
    return p


def _order_codes(order: np.ndarray) -> np.ndarray:
    perms = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    return np.array([perms[tuple(o)] for o in order.tolist()])


def _differs(p: A.Params, ref: dict) -> list:
    """The names of the parameters whose distribution differs from torchvision's."""
    bad = []
    for name in ("height", "width", "top", "left"):
        if _chi2_rejects(getattr(p, name), ref[name]):
            bad.append(name)
    if _chi2_rejects(p.height * 100 + p.width, ref["height"] * 100 + ref["width"]):
        bad.append("box shape")
    for j, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
        if _ks_rejects(p.factors[:, j], ref["factors"][:, j]):
            bad.append(name)
    if _chi2_rejects(_order_codes(p.order), _order_codes(ref["order"])):
        bad.append("order")
    if _chi2_rejects(p.flip.astype(int), ref["flip"].astype(int)):
        bad.append("flip")
    if _chi2_rejects(p.gray.astype(int), ref["gray"].astype(int)):
        bad.append("gray")
    return bad


def test_parameter_distributions_match_torchvision(torchvision_draws):
    assert _differs(_ours(), torchvision_draws) == []


def _hue_range_05(p):
    p.factors[:, 3] *= 0.5 / 0.3


def _fixed_order(p):
    p.order[:] = np.arange(4)


def _swap_two_ops(p):  # a bias towards one order: op 0 always before op 1
    swap = p.order.argsort(1)[:, 0] > p.order.argsort(1)[:, 1]
    p.order[swap] = p.order[swap][:, ::-1]


def _crop_scale_05(p):
    old = A.SCALE
    A.SCALE = (0.5, 1.0)
    try:
        q = A.draw_params(np.random.default_rng(7), N_DRAWS, 32, 32)
    finally:
        A.SCALE = old
    p.height, p.width, p.top, p.left = q.height, q.width, q.top, q.left


def _gray_02(p):
    p.gray = np.random.default_rng(9).random(N_DRAWS) < 0.2


@pytest.mark.parametrize("mutate,expected", [(_hue_range_05, "hue"), (_fixed_order, "order"),
                                             (_swap_two_ops, "order"), (_crop_scale_05, "height"),
                                             (_gray_02, "gray")])
def test_the_distribution_test_detects_a_wrong_draw(torchvision_draws, mutate, expected):
    assert expected in _differs(_ours(mutate), torchvision_draws)
