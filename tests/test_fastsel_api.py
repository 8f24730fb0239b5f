"""Bad inputs give TypeError/ValueError naming the argument, never a crash."""

import gzip

import numpy as np
import pytest

import fastsel

f32 = np.zeros(8, np.float32)
i64 = np.zeros(8, np.int64)


@pytest.mark.parametrize(
    "arg,exc,words",
    [
        ([1.0, 2.0], TypeError, ["losses", "numpy.ndarray", "list"]),
        (np.zeros(4, np.float64), TypeError, ["losses", "float32", "float64"]),
        (np.zeros(4, ">f4"), TypeError, ["losses", "float32"]),
        (np.zeros((2, 2), np.float32), ValueError, ["losses", "1-D", "(2, 2)"]),
        (np.zeros(8, np.float32)[::2], ValueError, ["losses", "C-contiguous"]),
        (None, TypeError, ["losses"]),
    ],
)
def test_topk_bad_arrays(arg, exc, words):
    with pytest.raises(exc) as info:
        fastsel.topk_desc(arg, 1)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("k", [-1, 9, 2**40])
def test_topk_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be in \[0, 8\]"):
        fastsel.topk_desc(f32, k)


def test_topk_k_not_int():
    with pytest.raises(TypeError):
        fastsel.topk_desc(f32, 1.5)


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan"), float("inf")])
def test_per_domain_bad_p(p):
    with pytest.raises(ValueError, match="p must be in"):
        fastsel.topk_per_domain(f32, i64, p)


def test_per_domain_bad_arrays():
    with pytest.raises(ValueError, match="same length"):
        fastsel.topk_per_domain(f32, i64[:3], 0.5)
    with pytest.raises(TypeError, match="domain_ids must have dtype int64, got int32"):
        fastsel.topk_per_domain(f32, i64.astype(np.int32), 0.5)


def test_tracker_bad_construction():
    for args, msg in [((0, 1), "n_samples"), ((5, 0), "n_domains"), ((5, 1, 0), "window"), ((5, 1, 10, 1.5), "ema")]:
        with pytest.raises(ValueError, match=msg):
            fastsel.Tracker(*args)


def test_tracker_bad_record():
    t = fastsel.Tracker(10, 2, 5)
    ok = dict(
        step=0,
        sample_ids=np.arange(3),
        domain_ids=np.zeros(3, np.int64),
        losses=np.ones(3, np.float32),
        kept=np.array([0], np.int64),
    )
    cases = [
        (dict(sample_ids=[0, 1, 2]), TypeError, "sample_ids must be a numpy.ndarray"),
        (dict(sample_ids=np.arange(3, dtype=np.int32)), TypeError, "sample_ids must have dtype int64"),
        (dict(losses=np.ones(3)), TypeError, "losses must have dtype float32"),
        (dict(kept=np.array([0.0])), TypeError, "kept must have dtype int64"),
        (dict(domain_ids=np.zeros(2, np.int64)), ValueError, "same length"),
        (dict(sample_ids=np.array([0, 1, 10])), ValueError, r"sample_ids\[2\] = 10 is out of range"),
        (dict(sample_ids=np.array([0, -1, 2])), ValueError, r"sample_ids\[1\] = -1"),
        (dict(domain_ids=np.array([0, 2, 0])), ValueError, r"domain_ids\[1\] = 2 is out of range"),
        (dict(kept=np.array([3])), ValueError, r"kept\[0\] = 3 is not a row position"),
        (dict(kept=np.array([1, 1])), ValueError, "repeats"),
        (dict(step=-1), ValueError, "step must be >= 0"),
        (dict(step=10**15), ValueError, "too large"),
        (dict(sample_ids=np.array([0, 0, 1]), domain_ids=np.array([0, 1, 0])), ValueError, "sample 0"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            t.record(**{**ok, **change})
    assert t.n_records == 0 and t.times_seen().sum() == 0
    t.record(**ok)
    with pytest.raises(ValueError, match="recorded earlier with domain 0"):
        t.record(**{**ok, "domain_ids": np.ones(3, np.int64)})


def test_tracker_bad_state():
    t = fastsel.Tracker(4, 2)
    with pytest.raises(TypeError, match="state must be a dict"):
        t.load_state_dict([1])
    good = t.state_dict()
    for change, exc, msg in [
        ({"n_samples": 5}, ValueError, "n_samples"),
        ({"ema": 0.5}, ValueError, "ema"),
        ({"version": 9}, ValueError, "version"),
        ({"times_seen": np.zeros(4, np.int32)}, TypeError, "times_seen"),
        ({"times_seen": np.zeros(3, np.int64)}, ValueError, "shape"),
        ({"times_seen": [0, 0, 0, 0]}, TypeError, "times_seen"),
        ({"times_seen": np.ones(4, np.int64)}, ValueError, "inconsistent"),
    ]:
        with pytest.raises(exc, match=msg):
            t.load_state_dict({**good, **change})
    bad = dict(good)
    del bad["ema_loss"]
    with pytest.raises(ValueError, match="missing"):
        t.load_state_dict(bad)


def test_index_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        fastsel.index_domainbed(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        fastsel.index_domainbed(str(f))
    with pytest.raises(TypeError):
        fastsel.index_domainbed(3)


def test_tokenizer_bad_args(tmp_path):
    tok = fastsel.PromptTokenizer()
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tok.tokenize(["a", 3])
    with pytest.raises(TypeError, match="texts must be a list of str, got int"):
        tok.tokenize(3)
    with pytest.raises(ValueError, match="context_length"):
        tok.tokenize(["a"], 0)
    # non-ASCII text is tokenised (tests/test_fastsel_prompts.py checks the ids against open_clip)
    assert tok.tokenize(["café", "a\udc80"]).shape == (2, 77)
    # tokenize_clean hands the text to Rust as it is: a lone surrogate cannot go
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.tokenize_clean(["a\udc80"])
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        fastsel.PromptTokenizer("/nonexistent/missing.gz")
    plain = tmp_path / "plain.txt.gz"
    plain.write_text("#version\nh e\n")
    with pytest.raises(ValueError, match="cannot decompress BPE vocabulary .*plain.txt.gz"):
        fastsel.PromptTokenizer(plain)
    latin1 = tmp_path / "latin1.txt.gz"
    latin1.write_bytes(gzip.compress(b"#version\n\xe9 e\n"))
    with pytest.raises(ValueError, match="latin1.txt.gz.* is not UTF-8 text"):
        fastsel.PromptTokenizer(latin1)
    tiny = tmp_path / "tiny.txt.gz"
    tiny.write_bytes(gzip.compress(b"#version\nh e\n"))
    small = fastsel.PromptTokenizer(tiny)
    # 512 byte symbols, "he", "" (the empty last line, as in open_clip), then the special tokens
    assert (small.vocab_size, small.sot_token_id, small.eot_token_id) == (516, 514, 515)
    assert isinstance(small, fastsel.PromptTokenizer) and repr(small).startswith("PromptTokenizer(bpe_path=")
    h = ord("h") - ord("!")  # byte symbols start at '!'
    assert small.tokenize("HEH").tolist()[0][:5] == [514, 512, 256 + h, 515, 0]  # "he", "h</w>"
