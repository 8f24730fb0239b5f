"""The algorithm pieces of scmd_ref.py against the spec: loss convention, theta, SMA, frozen BN, selection
counts and horizon, shapes. Tiny networks on CPU; each test says what it proves."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsel
import scmd_ref as S
from scmd import stale
from scmd.stale import StaleSelector


class TinyBackbone(nn.Module):
    """A ResNet-shaped stand-in (conv, BN, pooling, fc) small enough for hundreds of CPU steps."""

    def __init__(self, width=8, n_out=5):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, n_out)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(h)


class FixedTeacher(nn.Module):
    """Teacher interface used by the trainer: t_hat (C x d) and zero-shot logits z_t = 100 * e . t_hat^T."""

    def __init__(self, n_classes=4, dim=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("t_hat", F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1))
        self.proj = nn.Linear(3, dim).requires_grad_(False)

    def forward(self, x):
        return 100 * F.normalize(self.proj(x.mean((2, 3))), dim=-1) @ self.t_hat.T


def make_trainer(algorithm="scmd", horizon=5000, hp=None, n_classes=4, losses="fresh", tracker=None, kind="torch"):
    torch.manual_seed(0)
    hparams = {"lambda1": 0.5, "lambda2": 0.5, "temperature": 3.0, "worst_case_p": 0.2, "last_k_epoch": 0.25,
               "lr": 1e-2, "weight_decay": 0.0, "batch_size": 32, "resnet_dropout": 0.0}
    hparams.update(hp or {})
    student = S.Student(TinyBackbone(), n_classes, hparams["resnet_dropout"])
    selector = S.Selector(hparams["worst_case_p"], False, fastsel if kind == "fastsel" else None, tracker)
    trainer_class = S.SCMDTrainer
    if losses == "stale":
        selector, trainer_class = StaleSelector(selector, tracker, 0), stale.variant(S.SCMDTrainer)
    return trainer_class(student, FixedTeacher(n_classes), selector, hparams, algorithm, horizon, torch.device("cpu"))


def batch(n=96, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    domains = torch.arange(n) // (n // 3)
    return x, y, domains, torch.arange(n)


def test_kd_loss_is_batchmean_kl_q_to_student_times_T_squared():
    # hand computation: T^2 * (1/n) sum_i sum_c q_ic (log q_ic - log softmax(z_i/T)_c)
    g = torch.Generator().manual_seed(1)
    z_s, z_t, T = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 4, 3.0
    q = torch.softmax(z_t / T, 1)
    p_log = torch.log_softmax(z_s / T, 1)
    hand = T * T * sum(float((q[i] * (q[i].log() - p_log[i])).sum()) for i in range(5)) / 5
    assert S.kd_kl(z_s, q, T).item() == pytest.approx(hand, rel=1e-6)
    # the direction matters: KL(q||p) != KL(p||q) here
    reverse = T * T * float((p_log.exp() * (p_log - q.log())).sum()) / 5
    assert abs(hand - reverse) > 1e-3


def test_cm_logits_scale_normalised_projection_against_text_features():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(4, 10, generator=g)
    P = nn.Linear(10, 6, bias=False)
    t_hat = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    theta = torch.tensor([math.log(20.0)])
    u = S.cm_logits(f, P, theta, t_hat)
    gf = P(f) / P(f).norm(dim=-1, keepdim=True)
    assert torch.allclose(u, 20.0 * gf @ t_hat.T, atol=1e-5)
    assert u.abs().max() <= 20.0 + 1e-4  # cosine similarities times the scale


def test_theta_has_its_own_lr_and_is_clamped_to_0_ln100_every_step():
    tr = make_trainer(hp={"lr": 1e-2})
    groups = tr.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["params"] == [tr.theta] and groups[1]["lr"] == 1e-4
    assert groups[0]["lr"] == 1e-2 and all(g["weight_decay"] == 0.0 for g in groups)
    assert tr.theta.item() == pytest.approx(math.log(1 / 0.07))
    x, y, d, ids = batch()
    with torch.no_grad():
        tr.theta.fill_(10.0)  # beyond ln 100
    tr.update(x, y, d, ids, 0)
    assert tr.theta.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        tr.theta.fill_(-3.0)
    tr.update(x, y, d, ids, 1)
    assert tr.theta.item() == 0.0


@pytest.mark.slow
def test_sma_is_uniform_mean_of_iterates_from_update_299():
    tr = make_trainer(algorithm="erm", hp={"lr": 1e-2})
    snaps = []
    for step in range(304):
        x, y, d, ids = batch(seed=step % 7)
        tr.update(x, y, d, ids, step)
        if step >= 298:  # 0-based step 298 is update #299
            snaps.append({k: v.clone() for k, v in tr.student.state_dict().items()})
    assert tr.sma.count == 304 - 299
    sma = tr.sma.net.state_dict()
    for k, v in sma.items():
        if "num_batches_tracked" in k:
            continue
        mean = torch.stack([s[k].double() for s in snaps]).mean(0)
        assert torch.allclose(v.double(), mean, atol=1e-6), k
    # before update #299 the SMA simply follows the student
    tr2 = make_trainer(algorithm="erm")
    for step in range(5):
        tr2.update(*batch(seed=step), step)
    for k, v in tr2.sma.net.state_dict().items():
        assert torch.equal(v, tr2.student.state_dict()[k])


def test_batchnorm_running_stats_never_change():
    tr = make_trainer()
    before = {k: v.clone() for k, v in tr.student.state_dict().items() if "running" in k}
    for step in range(5):
        tr.update(*batch(seed=step), step)
    tr.student.train()  # .train() must keep BN frozen too
    assert all(not m.training for m in tr.student.modules() if isinstance(m, nn.BatchNorm2d))
    for k, v in before.items():
        assert torch.equal(tr.student.state_dict()[k], v), k
    # ... while the BN affine weights do train
    assert tr.student.featurizer[0].bn.weight.requires_grad


@pytest.mark.parametrize("n,p,k", [(96, 0.2, 19), (96, 0.25, 24), (96, 0.3, 28), (160, 0.2, 32), (160, 0.25, 40),
                                   (160, 0.3, 48)])
def test_kept_count_table(n, p, k):
    tr = make_trainer(hp={"worst_case_p": p})
    stats = tr.update(*batch(n=n), 0)
    assert int(stats["n"]) == k and int(stats["N"]) == n


@pytest.mark.parametrize("last_k,cutoff", [(0.25, 3750), (0.2, 4000), (0.4, 3000)])
def test_selection_horizon_switch(last_k, cutoff):
    tr = make_trainer(hp={"last_k_epoch": last_k})
    assert tr.cutoff == cutoff
    assert tr.selecting(cutoff) and not tr.selecting(cutoff + 1)
    assert int(tr.update(*batch(), cutoff)["n"]) == 19
    assert int(tr.update(*batch(), cutoff + 1)["n"]) == 96
    # --selection-horizon steps: relative to the real run length
    assert make_trainer(horizon=1000, hp={"last_k_epoch": last_k}).cutoff == int(1000 * (1 - last_k))


@pytest.mark.parametrize("algorithm,selects,logits,cm", [
    ("erm", False, False, False), ("kd", False, True, False), ("scmd-no-cm", True, True, False),
    ("scmd-no-select", False, True, True), ("scmd", True, True, True)])
def test_ablations_differ_only_in_their_terms(algorithm, selects, logits, cm):
    tr = make_trainer(algorithm=algorithm)
    st = tr.update(*batch(), 0)
    assert (int(st["n"]) == 19) == selects
    assert (st["logits"].item() != 0.0) == logits
    assert (st["cm"].item() != 0.0) == cm
    assert hasattr(tr, "projector") == cm


def test_selection_trains_on_the_highest_ce_samples():
    tr = make_trainer(algorithm="scmd-no-cm")
    x, y, d, ids = batch()
    with torch.no_grad():
        ce = F.cross_entropy(tr.student(x), y, reduction="none")
    chosen = []
    tr.selector = lambda losses, dom, i, step: chosen.append(S.select_hardest(losses, 19)) or chosen[-1]
    tr.update(x, y, d, ids, 0)
    expected = set(torch.topk(ce, 19).indices.tolist())
    assert set(chosen[0].tolist()) == expected


def test_select_hardest_matches_the_documented_torch_order():
    # torch-selection-semantics: NaN first, +inf next, -0.0 == +0.0 ties in index order, -inf last
    v = torch.tensor([1, float("nan"), -0.0, 2, 0.0, -float("inf"), 2, float("inf"), float("nan"), 1, -0.0, 0.0])
    assert S.select_hardest(v, 12).tolist() == [1, 8, 7, 3, 6, 0, 9, 2, 4, 10, 11, 5]
    assert S.select_hardest(v, 0).tolist() == []


def test_per_domain_selection_keeps_top_p_of_each_domain():
    losses = torch.tensor([5.0, 4, 3, 2, 1, 0, 10, 9, 8, 7, 6, 5.5])
    domains = torch.tensor([0] * 6 + [1] * 6)
    keep = S.select_hardest_per_domain(losses, domains, 0.5)
    assert keep.tolist() == [0, 1, 2, 6, 7, 8]


def test_student_and_projector_shapes_for_resnet50():
    import torchvision

    st = S.Student(torchvision.models.resnet50(weights=None), 7, 0.0)
    assert st.n_features == 2048
    assert tuple(st.classifier.weight.shape) == (7, 2048) and st.classifier.bias is not None
    with torch.no_grad():
        assert st(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    hp = {"lambda1": 0.5, "lambda2": 0.5, "temperature": 3.0, "worst_case_p": 0.2, "last_k_epoch": 0.25,
          "lr": 5e-5, "weight_decay": 0.0, "batch_size": 32, "resnet_dropout": 0.0}
    tr = S.SCMDTrainer(st, FixedTeacher(7, 512), S.Selector(0.2), hp, "scmd", 5000, torch.device("cpu"))
    assert tuple(tr.projector.weight.shape) == (512, 2048) and tr.projector.bias is None


def _no_selection_pass(*args):
    raise AssertionError("stale selection must not run the selection pass")


@pytest.mark.parametrize("kind", ["torch", "fastsel"])
def test_stale_selection_ranks_candidates_by_their_last_recorded_training_ce(kind):
    """--selection-losses stale: no selection pass; the kept rows are the candidates with the largest recorded CE
    (never-scored first, ties in the order of numpy's permutation drawn from (seed, step)), and the tracker then
    holds each kept sample's CE from this step's training forward, before the update."""
    tracker = fastsel.Tracker(150, 3)
    tr = make_trainer(losses="stale", tracker=tracker, kind=kind)
    tr.per_sample_ce = _no_selection_pass
    k = int(96 * 0.2)
    x, y, dom, _ = batch(seed=1)
    ids = torch.arange(96)
    before = copy.deepcopy(tr.student)
    out = tr.update(x, y, dom, ids, 0)
    assert int(out["n"]) == k
    # step 0: nothing is scored yet, so every candidate ties and the kept rows are the permutation's first k
    keep0 = np.random.default_rng((0, 0)).permutation(96)[:k]
    assert tracker.times_seen()[:96].tolist() == [1] * 96 and tracker.times_scored()[keep0].tolist() == [1] * k
    assert sorted(np.flatnonzero(tracker.times_scored())) == sorted(keep0.tolist())
    with torch.no_grad():
        ce = F.cross_entropy(before(x[keep0]), y[keep0], reduction="none")
    torch.testing.assert_close(torch.from_numpy(tracker.last_loss()[keep0]), ce)
    chosen = []
    inner = tr.selector.stale_keep
    tr.selector.stale_keep = lambda *a: chosen.append(inner(*a)) or chosen[-1]
    # step 1: the 19 scored samples and 77 never-scored ones (ids 0..95 not kept at step 0, and 100..118)
    ids1 = torch.cat([torch.from_numpy(keep0), torch.from_numpy(np.setdiff1d(np.arange(96), keep0)),
                      torch.arange(100, 119)])
    dom1 = torch.cat([dom[ids1[:96]], torch.arange(19) % 3])
    x1, y1, _, _ = batch(seed=2, n=115)
    pre = tracker.last_loss()[ids1.numpy()]
    tr.update(x1, y1, dom1, ids1, 1)
    assert np.isnan(pre[chosen[0].numpy()]).all()  # never-scored candidates rank first
    # step 2: only scored samples (38, repeated to 96 rows): the kept rows are those with the k largest CEs
    ids2 = torch.from_numpy(np.resize(np.flatnonzero(tracker.times_scored()), 96))
    dom2 = torch.from_numpy(tracker.sample_domain()[ids2.numpy()])
    last = tracker.last_loss()[ids2.numpy()]
    tr.update(x1[:96], y1[:96], dom2, ids2, 2)
    kept = chosen[1].numpy()
    rest = np.setdiff1d(np.arange(96), kept)
    assert len(kept) == k and not np.isnan(last).any()
    assert last[kept].min() >= last[rest].max()
    assert list(last[kept]) == sorted(last[kept], reverse=True)


def test_fresh_selection_scores_every_row_and_keeps_the_selection_pass_top_k():
    """The faithful mode is the paper's: the kept rows are the top k of the selection pass, and the tracker only
    records (every row carries its selection-pass loss; nothing recorded is read back)."""
    tracker = fastsel.Tracker(150, 3)
    tr = make_trainer(tracker=tracker, kind="fastsel")
    x, y, dom, ids = batch(seed=3)
    with torch.no_grad():
        ce = F.cross_entropy(tr.student(x), y, reduction="none")
    class WriteOnly:  # the tracker as the fresh selector sees it: any read fails the test
        def record(self, *a):
            tracker.record(*a)

    tr.selector.tracker = WriteOnly()
    tr.update(x, y, dom, ids, 0)
    assert tracker.times_scored()[:96].tolist() == tracker.times_seen()[:96].tolist() == [1] * 96
    sel = tracker.times_selected()[:96].astype(bool)
    assert sorted(np.flatnonzero(sel)) == sorted(S.select_hardest(ce, int(96 * 0.2)).tolist())
