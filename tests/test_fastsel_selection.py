"""fastsel selection == torch.sort(descending=True, stable=True) on every input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastsel

SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38]


def torch_ref(losses: np.ndarray, k: int) -> np.ndarray:
    return torch.sort(torch.from_numpy(losses), descending=True, stable=True).indices[:k].numpy()


def test_reference_vector_from_spec():
    v = np.array([1, np.nan, -0.0, 2, 0.0, -np.inf, 2, np.inf, np.nan, 1, -0.0, 0.0], np.float32)
    assert fastsel.topk_desc(v, 12).tolist() == [1, 8, 7, 3, 6, 0, 9, 2, 4, 10, 11, 5]
    assert fastsel.topk_desc(v, 12).tolist() == torch_ref(v, 12).tolist()


# Losses drawn from a small palette (many ties, signed zeros, infinities, NaNs with any
# payload/sign) or from all float32 values.
palette = st.sampled_from(SPECIAL + [float(np.float32(-np.nan))])
floats = st.one_of(palette, st.floats(width=32, allow_nan=True, allow_infinity=True))


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(0, 300), elements=floats),
    st.floats(0, 1),
)
def test_topk_matches_torch(losses, frac):
    k = int(len(losses) * frac)
    got = fastsel.topk_desc(losses, k)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, torch_ref(losses, k))


@pytest.mark.parametrize("n", [96, 160, 1024, 8192, 70_000])
def test_topk_large_with_ties(n):
    rng = np.random.default_rng(n)
    losses = rng.choice(np.array(SPECIAL, np.float32), size=n)
    for k in (0, 1, n // 4, n):
        np.testing.assert_array_equal(fastsel.topk_desc(losses, k), torch_ref(losses, k))
    losses = rng.standard_normal(n).astype(np.float32)
    np.testing.assert_array_equal(fastsel.topk_desc(losses, n // 4), torch_ref(losses, n // 4))


def test_readonly_input_is_fine():
    v = np.arange(10, dtype=np.float32)
    v.setflags(write=False)
    assert fastsel.topk_desc(v, 3).tolist() == [9, 8, 7]


def torch_per_domain(losses, domains, p):
    out = []
    for d in sorted(set(domains.tolist())):
        rows = np.flatnonzero(domains == d)
        order = torch.sort(torch.from_numpy(losses[rows]), descending=True, stable=True).indices.numpy()
        out.extend(rows[order][: int(len(rows) * p)].tolist())
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 200).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float32, n, elements=floats),
            hnp.arrays(np.int64, n, elements=st.integers(-2, 5)),
        )
    ),
    st.floats(0, 1),
)
def test_topk_per_domain_matches_torch(arrays, p):
    losses, domains = arrays
    assert fastsel.topk_per_domain(losses, domains, p).tolist() == torch_per_domain(losses, domains, p)
