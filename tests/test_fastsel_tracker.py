"""fastsel.Tracker vs the pure-numpy oracle tests/tracker_oracle.py: bit-identical arrays, equal JSON, for
sequences of `record` (every row scored: fresh selection losses) and `record_kept` (only the kept rows scored:
stale selection losses) steps, valid and invalid."""

import json

import numpy as np
import pytest
import tracker_oracle as tracking
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsel

LOSSES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 2.5, np.inf, -np.inf, np.nan]),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
)
EMAS = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(0, 1))


def bits(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float32:
        return a.view(np.uint32)
    if a.dtype == np.float64:
        return a.view(np.uint64)
    return a


def assert_same(a, b, top=5):
    for name in (
        "times_seen",
        "times_selected",
        "times_scored",
        "last_loss",
        "ema_loss",
        "sample_domain",
        "window_rows_seen",
        "window_rows_kept",
    ):
        x, y = getattr(a, name)(), getattr(b, name)()
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=name)
    assert a.n_records == b.n_records
    assert json.loads(a.report_json(top)) == json.loads(b.report_json(top))


@st.composite
def runs(draw):
    n_samples = draw(st.integers(1, 25))
    n_domains = draw(st.integers(1, 4))
    window = draw(st.integers(1, 8))
    ema = draw(EMAS)
    domain_of = np.array(
        draw(st.lists(st.integers(0, n_domains - 1), min_size=n_samples, max_size=n_samples)), np.int64
    )
    records = []
    for _ in range(draw(st.integers(0, 8))):
        step = draw(st.integers(0, 40))
        n = draw(st.integers(0, 12))
        ids = np.array(draw(st.lists(st.integers(0, n_samples - 1), min_size=n, max_size=n)), np.int64)
        losses = np.array(draw(st.lists(LOSSES, min_size=n, max_size=n)), np.float32)
        perm = draw(st.permutations(list(range(n))))
        kept = np.array(perm[: draw(st.integers(0, n))], np.int64)
        bad = draw(st.sampled_from([None] * 6 + ["id", "dom", "kept", "dup", "len"]))
        only_kept = draw(st.booleans())  # record_kept: only the kept rows carry a loss
        dom = domain_of[ids]
        if bad == "id":
            ids = np.append(ids, n_samples)
            dom = np.append(dom, 0)
            losses = np.append(losses, np.float32(1))
        elif bad == "dom":
            dom = np.append(dom, n_domains)
            ids = np.append(ids, 0)
            losses = np.append(losses, np.float32(1))
        elif bad == "kept":
            kept = np.append(kept, len(ids))
        elif bad == "dup" and len(kept):
            kept = np.append(kept, kept[0])
        kept_losses = np.array(draw(st.lists(LOSSES, min_size=len(kept), max_size=len(kept))), np.float32)
        if bad == "len" and only_kept:
            kept_losses = np.append(kept_losses, np.float32(1))
        elif bad == "len":
            losses = losses[:-1]
        rec = (step, ids, dom.astype(np.int64), kept_losses if only_kept else losses, kept.astype(np.int64), bad)
        records.append(rec + (only_kept,))
    return (n_samples, n_domains, window, ema), records


def apply(tr, rec):
    step, ids, dom, losses, kept, bad, only_kept = rec
    try:
        if only_kept:
            tr.record_kept(step, ids, dom, kept, losses)
        else:
            tr.record(step, ids, dom, losses, kept)
    except ValueError:
        return "ValueError"
    return None


@settings(max_examples=150, deadline=None)
@given(runs(), st.integers(0, 6))
def test_parity_with_numpy_reference(run, top):
    cfg, records = run
    a, b = fastsel.Tracker(*cfg), tracking.Tracker(*cfg)
    for rec in records:
        ra, rb = apply(a, rec), apply(b, rec)
        assert ra == rb
        if rec[5] in ("id", "dom", "kept") or (rec[5] == "dup" and len(rec[4]) > 1) or (
            rec[5] == "len" and (rec[6] or len(rec[1]) > 0)
        ):
            assert ra == "ValueError"
    assert_same(a, b, top)


@settings(max_examples=60, deadline=None)
@given(runs(), st.data())
def test_resume_across_implementations(run, data):
    cfg, records = run
    cut = data.draw(st.integers(0, len(records)))
    full = fastsel.Tracker(*cfg)
    for rec in records:
        apply(full, rec)
    # crash after `cut` records, resume in either implementation from the other's state
    for first, second in (
        (fastsel.Tracker, tracking.Tracker),
        (tracking.Tracker, fastsel.Tracker),
        (fastsel.Tracker, fastsel.Tracker),
    ):
        t1 = first(*cfg)
        for rec in records[:cut]:
            apply(t1, rec)
        t2 = second(*cfg)
        t2.load_state_dict(t1.state_dict())
        for rec in records[cut:]:
            apply(t2, rec)
        assert_same(full, t2)


def test_semantics_by_hand():
    t = fastsel.Tracker(6, 2, window=10, ema=0.5)
    t.record(3, np.array([1, 1, 4]), np.array([0, 0, 1]), np.array([2, 4, 1], np.float32), np.array([1]))
    t.record(12, np.array([4, 5]), np.array([1, 1]), np.array([3, np.nan], np.float32), np.array([0, 1]))
    assert t.times_seen().tolist() == [0, 2, 0, 0, 2, 1]
    assert t.times_selected().tolist() == [0, 1, 0, 0, 1, 1]
    assert t.ema_loss()[1] == 3.0 and t.ema_loss()[4] == 2.0
    assert np.isnan(t.ema_loss()[0]) and np.isnan(t.last_loss()[0]) and np.isnan(t.ema_loss()[5])
    assert t.last_loss()[1] == 4.0
    assert t.window_rows_seen().tolist() == [[2, 1], [0, 2]]
    assert t.window_rows_kept().tolist() == [[1, 0], [0, 2]]
    rep = json.loads(t.report_json(top=2))
    assert rep["settings"] == {"n_samples": 6, "n_domains": 2, "window": 10, "ema": 0.5, "top": 2}
    assert rep["domains"][0]["kept_share"] == 0.5
    # NaN EMA ranks hardest, then by EMA descending
    assert [h["sample_id"] for h in rep["domains"][1]["hardest"]] == [5, 4]
    assert rep["domains"][1]["hardest"][0]["ema_loss"] == "NaN"
    assert [w["window"] for w in rep["windows"]] == [0, 1]
    assert rep["windows"][1]["kept_share"] == [None, 1.0]


def test_empty_window_grid_and_repr():
    t = fastsel.Tracker(3, 2)
    assert t.window_rows_seen().shape == (0, 2)
    assert "n_samples=3" in repr(t)
    t.record(250, np.array([0]), np.array([1]), np.array([1], np.float32), np.zeros(0, np.int64))
    assert t.window_rows_seen().shape == (3, 2)


@pytest.mark.parametrize("impl", [fastsel.Tracker, tracking.Tracker])
def test_state_dict_contents(impl):
    t = impl(5, 2, 7, 0.25)
    sd = t.state_dict()
    assert sd["version"] == 2 and sd["n_samples"] == 5 and sd["window"] == 7 and sd["ema"] == 0.25
    assert sd["times_seen"].dtype == np.int64 and sd["last_loss"].dtype == np.float32
    assert sd["ema_loss"].dtype == np.float64 and sd["window_rows_seen"].shape == (0, 2)
    assert sd["times_scored"].dtype == np.int64


@pytest.mark.parametrize("impl", [fastsel.Tracker, tracking.Tracker])
def test_version_1_state_loads_with_every_row_scored(impl):
    """A checkpoint written before times_scored existed (every row carried its loss) still resumes."""
    t = impl(4, 2, 10, 0.5)
    t.record(0, np.array([1, 2]), np.array([0, 1]), np.array([1, 2], np.float32), np.array([0]))
    sd = t.state_dict()
    del sd["times_scored"]
    sd["version"] = 1
    u = impl(4, 2, 10, 0.5)
    u.load_state_dict(sd)
    assert u.times_scored().tolist() == u.times_seen().tolist() == [0, 1, 1, 0]


def test_record_kept_scores_only_the_kept_rows_by_hand():
    t = fastsel.Tracker(5, 2, window=10, ema=0.5)
    t.record(0, np.array([1]), np.array([0]), np.array([2], np.float32), np.array([0]))
    # rows: samples 1, 2, 3, 1; rows 3 and 2 are kept: kept_losses[j] is row kept[j]'s loss
    t.record_kept(1, np.array([1, 2, 3, 1]), np.array([0, 1, 1, 0]), np.array([3, 2]), np.array([4, 5], np.float32))
    assert t.times_seen().tolist() == [0, 3, 1, 1, 0]
    assert t.times_selected().tolist() == [0, 2, 0, 1, 0]
    assert t.times_scored().tolist() == [0, 2, 0, 1, 0]
    last = t.last_loss()
    assert last[1] == 4.0 and last[3] == 5.0 and np.isnan(last[2])  # sample 2: seen, never scored
    assert t.ema_loss()[1] == 3.0 and t.ema_loss()[3] == 5.0
    assert t.window_rows_kept().tolist() == [[2, 1]] and t.window_rows_seen().tolist() == [[3, 2]]
    with pytest.raises(ValueError, match="kept and kept_losses must have the same length"):
        t.record_kept(2, np.array([1]), np.array([0]), np.array([0]), np.zeros(2, np.float32))


@pytest.mark.parametrize("impl", [fastsel.Tracker, tracking.Tracker])
def test_nan_ema_is_canonical(impl):
    t = impl(2, 1, 10, 1.0)
    neg_nan = np.array([-np.nan], np.float32)
    t.record(0, np.array([0]), np.array([0]), neg_nan, np.zeros(0, np.int64))
    t.record(1, np.array([0, 1, 1]), np.array([0, 0, 0]), np.array([-np.inf, 1, np.inf], np.float32), np.array([0]))
    assert t.ema_loss().view(np.uint64)[0] == np.array([np.nan]).view(np.uint64)[0]
    assert t.ema_loss().view(np.uint64)[1] == np.array([np.nan]).view(np.uint64)[0]  # 1.0 * 1 + 0.0 * inf
    assert t.last_loss().view(np.uint32)[0] == np.array([-np.inf], np.float32).view(np.uint32)[0]
