"""The step-time benchmarks: timing the parts of SCMDTrainer.update changes none of its results, and the
benchmark scripts write well-formed JSON with every phase. Tiny settings (embedded world's models, a few
images per domain) on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import scmd_ref as S
from bench import data_loading as dl
from bench import step_breakdown as sb
from scmd import run as R

CPU = torch.device("cpu")
BATCH = 4  # per training domain: N = 12, kept 2
N_SAMPLES = 1000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads stall each other (10x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def index():
    return sb.bench_index("tiny", n_samples=N_SAMPLES)


def _batches(index, case):
    return sb.synthetic_batches(index, case.settings.image_size, BATCH, 3, seed=0)


def _same_trainer_state(a, b, exact=True):
    check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-6))
    sa, sb_ = R.trainer_state(a), R.trainer_state(b)
    for part in ("student", "sma", "projector"):
        if part in sa:
            for k, v in sa[part].items():
                assert check(v, sb_[part][k]), f"{part}.{k} differs"
    if "theta" in sa:
        assert check(sa["theta"], sb_["theta"])
    assert a.sma.global_iter == b.sma.global_iter and a.sma.count == b.sma.count
    for pa, pb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        for k in pa:
            assert check(pa[k], pb[k]), f"optimizer state {k} differs"


def _same_tracker(ta, tb):
    if ta is None:
        return
    sa, sb_ = ta.state_dict(), tb.state_dict()
    assert sa.keys() == sb_.keys()
    for k in sa:
        u, v = np.asarray(sa[k]), np.asarray(sb_[k])
        assert np.array_equal(u, v, equal_nan=u.dtype.kind == "f"), f"tracker {k} differs"


def _selectors():
    return ["torch", "fastsel"] if S.fastsel is not None else ["torch"]


@pytest.mark.parametrize("algorithm,selector", [("erm", "torch"), ("kd", "torch"), ("scmd-no-select", "torch")]
                         + [(a, s) for a in ("scmd", "scmd+stale") for s in _selectors()])
def test_timed_step_is_trainer_update(index, algorithm, selector):
    """Same models, seed and batches: the plain SCMDTrainer.update and the benchmark's timed one give bit-identical
    losses, weights, SMA, optimizer state and tracker records, and every phase of the step is timed."""
    if algorithm == "scmd+stale" and S.fastsel is None:
        pytest.skip("--selection-losses stale ranks by fastsel's tracker, and fastsel is not installed")
    a = sb.make_case("tiny", index, algorithm, BATCH, CPU, selector=selector, timed=False)
    b = sb.make_case("tiny", index, algorithm, BATCH, CPU, selector=selector)
    tm = sb.PhaseTimer(CPU, "events")
    for i, batch in enumerate(_batches(index, a)):
        step = sb.STEP0 + i
        ra = a.trainer.update(*batch, step)
        tm.begin()
        rb = sb.run_step(b, batch, step, tm, CPU)
        phases = tm.end()
        for k in ra:
            assert torch.equal(ra[k], rb[k]), f"step {i}: {k} {ra[k]} != {rb[k]}"
        assert set(phases) <= {*sb.PHASES, "total"}
        expect = ({"data", "student_fwd_loss", "backward_optim", "sma"} | ({"teacher"} if algorithm != "erm" else set())
                  | ({"selection_pass", "ranking"} if algorithm == "scmd" else set())
                  | ({"ranking", "bookkeeping"} if algorithm == "scmd+stale" else set()))
        assert expect <= set(phases), (algorithm, sorted(phases))
        if algorithm == "scmd+stale":  # no selection pass: the recorded losses are ranked instead
            assert "selection_pass" not in phases
    selecting = algorithm.startswith("scmd") and algorithm != "scmd-no-select"
    assert int(rb["N"]) == 3 * BATCH and int(rb["n"]) == (int(3 * BATCH * 0.2) if selecting else 3 * BATCH)
    _same_trainer_state(a.trainer, b.trainer)
    _same_tracker(a.trainer.selector.tracker, b.trainer.selector.tracker)


def test_authors_pattern_computes_the_same_step(index):
    """The authors' compute pattern (text tower per step, unstable sort, rebuilt SMA) gives our values: only the
    cost differs (CPU, fp32)."""
    ours = sb.make_case("tiny", index, "scmd", BATCH, CPU, selector="torch", timed=False)
    auth = sb.make_case("tiny", index, "authors", BATCH, CPU)
    tm = sb.PhaseTimer(CPU, "events")
    for i, batch in enumerate(_batches(index, ours)):
        ra = ours.trainer.update(*batch, sb.STEP0 + i)
        tm.begin()
        rb = sb.run_step(auth, batch, sb.STEP0 + i, tm, CPU)
        phases = tm.end()
        for k in ra:
            assert torch.allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6), f"step {i}: {k}"
        assert "teacher" in phases and "sma" in phases and "bookkeeping" not in phases
    _same_trainer_state(ours.trainer, auth.trainer, exact=False)


@pytest.fixture(scope="module")
def breakdown(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sb.json"
    sb.main(["--scale", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out),
             "--quiet"])
    return out


def test_step_breakdown_json_has_every_phase(breakdown):
    d = json.loads(breakdown.read_text())
    assert d["benchmark"] == "step_breakdown" and d["device"] == "cpu"
    for key in ("cpu_model", "cpu_count", "gpu_name", "gpu_driver"):
        assert key in d["machine"]
    for key in ("python", "torch", "torchvision", "open_clip", "fastsel"):
        assert key in d["versions"]
    assert d["settings"]["scale"] == "tiny" and d["settings"]["N"] == 6 and d["settings"]["steps"] == 2
    assert any("random weights" in n for n in d["notes"])
    assert list(d["configs"]) == sb.BASE_CONFIGS + [f"scmd+{v}" for v in sb.CPU_DEFAULT_VARIANTS]
    timed = {  # phases that must have been timed in every step
        "erm": {"data", "student_fwd_loss", "backward_optim", "sma"},
        "kd": {"data", "teacher", "student_fwd_loss", "backward_optim", "sma"},
        "scmd-no-select": {"data", "teacher", "student_fwd_loss", "backward_optim", "sma"},
        "scmd": {"data", "selection_pass", "ranking", "teacher", "student_fwd_loss", "backward_optim", "sma"},
        "authors": {"data", "selection_pass", "ranking", "teacher", "student_fwd_loss", "backward_optim", "sma"},
        "scmd+stale": {"data", "ranking", "bookkeeping", "teacher", "student_fwd_loss", "backward_optim", "sma"},
    }
    for name, cfg in d["configs"].items():
        assert set(cfg["phases"]) == {*sb.PHASES, "total"}, name
        for ph in timed[name] | {"total", "other"}:
            s = cfg["phases"][ph]
            assert s["n"] == 2 and s["p10"] <= s["median"] <= s["p90"], (name, ph)
        for ph in set(sb.PHASES) - timed[name] - {"other", "bookkeeping"}:
            assert cfg["phases"][ph]["n"] == 0, (name, ph)  # not part of that algorithm's step
        assert np.isfinite(cfg["loss_last"])
    if "skipped" not in d["configs"]["scmd"]["tracker"]:
        assert d["configs"]["scmd"]["phases"]["bookkeeping"]["n"] == 2
    for key in ("scmd_rank_bookkeeping_share_pct", "scmd_over_erm_step", "authors_over_scmd_step"):
        assert key in d["derived"]
    assert breakdown.with_suffix(".png").stat().st_size > 1000


def test_data_loading_json(tmp_path, breakdown):
    rng = np.random.default_rng(0)
    for e in range(3):
        for c in range(2):
            folder = tmp_path / "W" / f"env{e}" / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "dl.json"
    dl.main(["--dataset-root", str(tmp_path / "W"), "--image-size", "32", "--batch", "2", "--steps", "2",
             "--warmup", "1", "--workers", "0", "1", "--step-json", str(breakdown), "--out", str(out)])
    d = json.loads(out.read_text())
    assert [r["workers"] for r in d["results"]] == [0, 1]
    for r in d["results"]:
        assert r["images_per_step"] == 4 and r["images_per_s"] > 0 and r["image_shape"] == [3, 32, 32]
        assert "bound" in r["verdict"] or "serial" in r["verdict"]
    assert d["model"]["config"] == "scmd" and d["model"]["N"] == 6


def test_data_loading_kept_share(tmp_path):
    """--kept-share times a stale selecting step's pipeline: floor(N p) rows come out, of the world's size."""
    out = tmp_path / "kept.json"
    dl.main(["--data-dir", str(tmp_path), "--n-per-class", "2", "--batch", "5", "--steps", "2", "--warmup", "0",
             "--workers", "0", "--kept-share", "0.2", "--out", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["images_per_step"] == 3 and r["images_per_s"] > 0  # floor(15 * 0.2)
    with pytest.raises(SystemExit, match="kept-share"):
        dl.main(["--dataset-root", str(tmp_path), "--kept-share", "0.2"])


def test_stale_selection_probe_runs_on_the_lazy_loop(tmp_path):
    """bench/stale_selection.py ranks the same batch fresh (full pixels) beside the stale run (kept rows only)."""
    from bench import stale_selection
    from scmd.stale import StaleStep

    update = StaleStep.update
    out = tmp_path / "stale.json"
    r = stale_selection.main(["--data-dir", str(tmp_path), "--world-per-class", "5", "--steps", "6", "--window", "3",
                              "--out", str(out)])
    assert json.loads(out.read_text())["overall"] == r["overall"]
    assert [w["first_step"] for w in r["windows"]] == [0, 3]
    assert r["overall"]["chance"] == pytest.approx(19 / 96)  # floor(96 p) of 3 x 32 candidates, p = 0.2
    assert 0 <= r["overall"]["overlap_mean"] <= 1 and 0 < r["overall"]["unscored_share"] <= 1
    assert StaleStep.update is update  # the probe is gone afterwards: later runs train unprobed
