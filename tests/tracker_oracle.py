"""Pure-numpy test oracle of :class:`fastsel.Tracker` (hard-sample bookkeeping).

Same constructor, methods, arrays (dtype and bits) and JSON report as the Rust tracker; the
Hypothesis parity test in ``tests/test_fastsel_tracker.py`` holds the two together. With fresh
selection losses (``record``) the bookkeeping never feeds back into selection; with stale ones
(``record_kept``, only the kept rows carry a loss) ``last_loss`` is what later steps rank by.

Per sample: ``times_seen`` (+1 per row, duplicates count twice), ``times_selected`` (+1 per kept
row), ``times_scored`` (+1 per row that carries a loss), ``last_loss`` (float32, the later row
wins), ``ema_loss`` (float64; the first recorded loss sets it, then ``ema * prev + (1 - ema) * loss``
row by row; a NaN loss makes it NaN for good, stored as the canonical quiet NaN so that the bits do
not depend on the arithmetic that produced it). Samples without a recorded loss have NaN losses.
Per window ``step // window`` and domain: rows seen and kept.

JSON report: floats are shortest round-trip numbers; NaN and infinities are written as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``; a share with no rows is ``null``. "hardest"
lists, per domain, the scored samples with the largest ``ema_loss`` (NaN first, like torch's
descending sort; ties, including -0.0/+0.0, by lower id). Only windows with rows are listed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Union

import numpy as np

STATE_VERSION = 2
MAX_WINDOW_CELLS = 1 << 26


def _json_float(x: float) -> Union[float, str]:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(x)


def _share(kept: int, seen: int) -> Union[float, str, None]:
    return None if seen == 0 else _json_float(kept / seen)


def _array1(x: Any, name: str, dtype: type) -> np.ndarray:
    want = np.dtype(dtype)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of dtype {want}, got {type(x).__name__}")
    if x.dtype != want:
        raise TypeError(f"{name} must have dtype {want}, got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return x


class Tracker:
    def __init__(self, n_samples: int, n_domains: int, window: int = 100, ema: float = 0.9) -> None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if n_domains < 1:
            raise ValueError(f"n_domains must be >= 1, got {n_domains}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        ema = float(ema)
        if not 0.0 <= ema <= 1.0:
            raise ValueError(f"ema must be in [0, 1], got {ema}")
        if n_domains > MAX_WINDOW_CELLS:
            raise ValueError(f"n_domains must be <= {MAX_WINDOW_CELLS}, got {n_domains}")
        self.n_samples = int(n_samples)
        self.n_domains = int(n_domains)
        self.window = int(window)
        self.ema = ema
        self.n_records = 0
        self._times_seen = np.zeros(self.n_samples, np.int64)
        self._times_selected = np.zeros(self.n_samples, np.int64)
        self._times_scored = np.zeros(self.n_samples, np.int64)
        self._last_loss = np.full(self.n_samples, np.nan, np.float32)
        self._ema_loss = np.full(self.n_samples, np.nan, np.float64)
        self._sample_domain = np.full(self.n_samples, -1, np.int64)
        self._seen = np.zeros((0, self.n_domains), np.int64)
        self._kept = np.zeros((0, self.n_domains), np.int64)

    def record(
        self,
        step: int,
        sample_ids: np.ndarray,
        domain_ids: np.ndarray,
        losses: np.ndarray,
        kept: np.ndarray,
    ) -> None:
        s = _array1(sample_ids, "sample_ids", np.int64)
        d = _array1(domain_ids, "domain_ids", np.int64)
        loss = _array1(losses, "losses", np.float32)
        k = _array1(kept, "kept", np.int64)
        n = len(s)
        if len(d) != n or len(loss) != n:
            raise ValueError(
                f"sample_ids, domain_ids and losses must have the same length, got {n}, {len(d)} and {len(loss)}"
            )
        is_kept = self._validate(int(step), s, d, k)
        self._apply(int(step), s, d, is_kept, list(loss))

    def record_kept(
        self,
        step: int,
        sample_ids: np.ndarray,
        domain_ids: np.ndarray,
        kept: np.ndarray,
        kept_losses: np.ndarray,
    ) -> None:
        s = _array1(sample_ids, "sample_ids", np.int64)
        d = _array1(domain_ids, "domain_ids", np.int64)
        k = _array1(kept, "kept", np.int64)
        kl = _array1(kept_losses, "kept_losses", np.float32)
        if len(d) != len(s):
            raise ValueError(f"sample_ids and domain_ids must have the same length, got {len(s)} and {len(d)}")
        if len(kl) != len(k):
            raise ValueError(f"kept and kept_losses must have the same length, got {len(k)} and {len(kl)}")
        is_kept = self._validate(int(step), s, d, k)
        scored: List[Any] = [None] * len(s)
        for p, x in zip(k.tolist(), kl):
            scored[p] = x
        self._apply(int(step), s, d, is_kept, scored)

    def _validate(self, step: int, s: np.ndarray, d: np.ndarray, k: np.ndarray) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n = len(s)
        w = step // self.window
        if (w + 1) * self.n_domains > MAX_WINDOW_CELLS:
            raise ValueError(f"step {step} is too large for window {self.window}")
        bad = np.flatnonzero((s < 0) | (s >= self.n_samples))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"sample_ids[{r}] = {int(s[r])} is out of range [0, {self.n_samples})")
        bad = np.flatnonzero((d < 0) | (d >= self.n_domains))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"domain_ids[{r}] = {int(d[r])} is out of range [0, {self.n_domains})")
        first: Dict[int, int] = {}
        for r in range(n):
            si, di = int(s[r]), int(d[r])
            known = int(self._sample_domain[si])
            if known >= 0 and known != di:
                raise ValueError(f"domain_ids[{r}] = {di} but sample {si} was recorded earlier with domain {known}")
            r0 = first.setdefault(si, r)
            if int(d[r0]) != di:
                raise ValueError(f"sample {si} appears with two domain_ids in one batch")
        is_kept = np.zeros(n, bool)
        for j, p in enumerate(k.tolist()):
            if not 0 <= p < n:
                raise ValueError(f"kept[{j}] = {p} is not a row position in [0, {n})")
            if is_kept[p]:
                raise ValueError(f"kept[{j}] = {p} repeats a position")
            is_kept[p] = True
        return is_kept

    def _apply(self, step: int, s: np.ndarray, d: np.ndarray, is_kept: np.ndarray, scored: List[Any]) -> None:
        w = step // self.window
        if w >= self._seen.shape[0]:
            grow = w + 1 - self._seen.shape[0]
            self._seen = np.concatenate([self._seen, np.zeros((grow, self.n_domains), np.int64)])
            self._kept = np.concatenate([self._kept, np.zeros((grow, self.n_domains), np.int64)])
        keep_w = 1.0 - self.ema
        for r in range(len(s)):
            si, di = int(s[r]), int(d[r])
            self._sample_domain[si] = di
            x = scored[r]
            if x is not None:
                if self._times_scored[si] == 0:
                    e = float(x)
                else:
                    e = self.ema * float(self._ema_loss[si]) + keep_w * float(x)
                # NaN sign/payload after arithmetic is not portable: store the canonical NaN.
                self._ema_loss[si] = math.nan if math.isnan(e) else e
                self._times_scored[si] += 1
                self._last_loss[si] = x
            self._times_seen[si] += 1
            self._seen[w, di] += 1
            if is_kept[r]:
                self._times_selected[si] += 1
                self._kept[w, di] += 1
        self.n_records += 1

    # accessors (copies)
    def times_seen(self) -> np.ndarray:
        return self._times_seen.copy()

    def times_selected(self) -> np.ndarray:
        return self._times_selected.copy()

    def times_scored(self) -> np.ndarray:
        return self._times_scored.copy()

    def last_loss(self) -> np.ndarray:
        return self._last_loss.copy()

    def ema_loss(self) -> np.ndarray:
        return self._ema_loss.copy()

    def sample_domain(self) -> np.ndarray:
        return self._sample_domain.copy()

    def window_rows_seen(self) -> np.ndarray:
        return self._seen.copy()

    def window_rows_kept(self) -> np.ndarray:
        return self._kept.copy()

    def _hardest(self, d: int, top: int) -> List[int]:
        ids = np.flatnonzero((self._times_scored > 0) & (self._sample_domain == d)).tolist()

        def key(i: int):
            e = float(self._ema_loss[i])
            return (0, 0.0, i) if math.isnan(e) else (1, -e, i)

        return sorted(ids, key=key)[:top]

    def report(self, top: int = 10) -> Dict[str, Any]:
        if top < 0:
            raise ValueError(f"top must be >= 0, got {top}")
        dom_seen = self._seen.sum(axis=0)
        dom_kept = self._kept.sum(axis=0)
        seen_mask = self._times_seen > 0
        domains = []
        for d in range(self.n_domains):
            hardest = [
                {
                    "sample_id": i,
                    "ema_loss": _json_float(float(self._ema_loss[i])),
                    "last_loss": _json_float(float(self._last_loss[i])),
                    "times_seen": int(self._times_seen[i]),
                    "times_selected": int(self._times_selected[i]),
                }
                for i in self._hardest(d, top)
            ]
            domains.append(
                {
                    "domain": d,
                    "rows_seen": int(dom_seen[d]),
                    "rows_kept": int(dom_kept[d]),
                    "kept_share": _share(int(dom_kept[d]), int(dom_seen[d])),
                    "samples_seen": int(np.count_nonzero(seen_mask & (self._sample_domain == d))),
                    "hardest": hardest,
                }
            )
        windows = []
        for w in range(self._seen.shape[0]):
            seen = [int(x) for x in self._seen[w]]
            kept = [int(x) for x in self._kept[w]]
            if not any(seen):
                continue
            windows.append(
                {
                    "window": w,
                    "first_step": w * self.window,
                    "last_step": (w + 1) * self.window - 1,
                    "rows_seen": seen,
                    "rows_kept": kept,
                    "kept_share": [_share(k, s) for k, s in zip(kept, seen)],
                }
            )
        return {
            "format": "fastsel.tracker.report/1",
            "settings": {
                "n_samples": self.n_samples,
                "n_domains": self.n_domains,
                "window": self.window,
                "ema": _json_float(self.ema),
                "top": top,
            },
            "records": self.n_records,
            "rows_seen": int(dom_seen.sum()),
            "rows_kept": int(dom_kept.sum()),
            "domains": domains,
            "windows": windows,
        }

    def report_json(self, top: int = 10) -> str:
        return json.dumps(self.report(top), allow_nan=False)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "n_samples": self.n_samples,
            "n_domains": self.n_domains,
            "window": self.window,
            "ema": self.ema,
            "n_records": self.n_records,
            "times_seen": self.times_seen(),
            "times_selected": self.times_selected(),
            "times_scored": self.times_scored(),
            "last_loss": self.last_loss(),
            "ema_loss": self.ema_loss(),
            "sample_domain": self.sample_domain(),
            "window_rows_seen": self.window_rows_seen(),
            "window_rows_kept": self.window_rows_kept(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        for key in ("version", "n_samples", "n_domains", "window", "ema", "n_records"):
            if key not in state:
                raise ValueError(f"state dict is missing {key!r}")
        version = int(state["version"])
        if version not in (1, STATE_VERSION):
            raise ValueError(f"state version {state['version']} is not supported")
        for key in ("n_samples", "n_domains", "window"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"state[{key!r}] = {state[key]} does not match this tracker's {key}")
        if float(state["ema"]) != self.ema:
            raise ValueError(f"state['ema'] = {state['ema']} does not match this tracker's ema")
        n, nd = self.n_samples, self.n_domains

        def arr(key: str, dtype: type, shape: tuple) -> np.ndarray:
            if key not in state:
                raise ValueError(f"state dict is missing {key!r}")
            a = state[key]
            if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype):
                raise TypeError(f"state[{key!r}] must be a numpy.ndarray of dtype {np.dtype(dtype)}")
            if a.shape != shape:
                raise ValueError(f"state[{key!r}] must have shape {shape}, got {a.shape}")
            return a.copy()

        seen_w = state.get("window_rows_seen")
        n_windows = seen_w.shape[0] if isinstance(seen_w, np.ndarray) and seen_w.ndim == 2 else 0
        new = {
            "times_seen": arr("times_seen", np.int64, (n,)),
            "times_selected": arr("times_selected", np.int64, (n,)),
            "times_scored": arr("times_scored", np.int64, (n,)) if version == STATE_VERSION else None,
            "last_loss": arr("last_loss", np.float32, (n,)),
            "ema_loss": arr("ema_loss", np.float64, (n,)),
            "sample_domain": arr("sample_domain", np.int64, (n,)),
            "window_rows_seen": arr("window_rows_seen", np.int64, (n_windows, nd)),
            "window_rows_kept": arr("window_rows_kept", np.int64, (n_windows, nd)),
        }
        if new["times_scored"] is None:  # version 1 scored every row it saw
            new["times_scored"] = new["times_seen"].copy()
        dom, seen, sel, sc = new["sample_domain"], new["times_seen"], new["times_selected"], new["times_scored"]
        ok = (dom >= -1) & (dom < nd) & (seen >= 0) & (sel >= 0) & (sel <= seen) & ((seen > 0) == (dom >= 0))
        ok &= (sc >= 0) & (sc <= seen)
        if not ok.all():
            raise ValueError(f"state is inconsistent at sample {int(np.flatnonzero(~ok)[0])}")
        self.n_records = int(state["n_records"])
        self._times_seen = new["times_seen"]
        self._times_selected = new["times_selected"]
        self._times_scored = new["times_scored"]
        self._last_loss = new["last_loss"]
        self._ema_loss = new["ema_loss"]
        self._sample_domain = new["sample_domain"]
        self._seen = new["window_rows_seen"]
        self._kept = new["window_rows_kept"]

    def __repr__(self) -> str:
        return (
            f"Tracker(n_samples={self.n_samples}, n_domains={self.n_domains}, window={self.window}, "
            f"ema={self.ema!r}) with {self.n_records} records"
        )
