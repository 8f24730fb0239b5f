//! Bookkeeping of one run: per-sample counters and losses, per-window per-domain row counts, a
//! JSON report, and an exact state for resuming. With fresh selection losses it is purely
//! observational; with stale ones (`record_kept`) its `last_loss` is what the next steps rank by.
//!
//! The numpy oracle is `tests/tracker_oracle.py`; both must produce bit-identical arrays and
//! equal JSON (after parsing).

use std::fmt;

use crate::error::{py_shape, Error, Result};
use crate::selection::desc_key_f64;

/// Bound on the dense per-window table (`n_windows * n_domains` cells).
pub const MAX_WINDOW_CELLS: usize = 1 << 26;

/// Version tag stored in `state_dict()`.
pub const STATE_VERSION: i64 = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct Tracker {
    pub n_samples: usize,
    pub n_domains: usize,
    pub window: u64,
    pub ema: f64,
    pub n_records: i64,
    pub times_seen: Vec<i64>,
    pub times_selected: Vec<i64>,
    /// Losses recorded per sample (= times_seen when every row carries its loss).
    pub times_scored: Vec<i64>,
    pub last_loss: Vec<f32>,
    pub ema_loss: Vec<f64>,
    /// Domain of each sample, -1 until first seen.
    pub sample_domain: Vec<i64>,
    /// Row-major `[n_windows, n_domains]`.
    pub window_rows_seen: Vec<i64>,
    pub window_rows_kept: Vec<i64>,
}

impl Tracker {
    pub fn new(n_samples: i64, n_domains: i64, window: i64, ema: f64) -> Result<Self> {
        if n_samples < 1 {
            return Err(Error::Value(format!(
                "n_samples must be >= 1, got {n_samples}"
            )));
        }
        if n_domains < 1 {
            return Err(Error::Value(format!(
                "n_domains must be >= 1, got {n_domains}"
            )));
        }
        if window < 1 {
            return Err(Error::Value(format!("window must be >= 1, got {window}")));
        }
        if !(0.0..=1.0).contains(&ema) {
            return Err(Error::Value(format!("ema must be in [0, 1], got {ema}")));
        }
        let n = usize::try_from(n_samples)
            .map_err(|_| Error::Value(format!("n_samples is too large: {n_samples}")))?;
        let d = usize::try_from(n_domains)
            .map_err(|_| Error::Value(format!("n_domains is too large: {n_domains}")))?;
        if d > MAX_WINDOW_CELLS {
            return Err(Error::Value(format!(
                "n_domains must be <= {MAX_WINDOW_CELLS}, got {d}"
            )));
        }
        Ok(Tracker {
            n_samples: n,
            n_domains: d,
            window: window as u64,
            ema,
            n_records: 0,
            times_seen: vec![0; n],
            times_selected: vec![0; n],
            times_scored: vec![0; n],
            last_loss: vec![f32::NAN; n],
            ema_loss: vec![f64::NAN; n],
            sample_domain: vec![-1; n],
            window_rows_seen: Vec::new(),
            window_rows_kept: Vec::new(),
        })
    }

    pub fn n_windows(&self) -> usize {
        self.window_rows_seen.len() / self.n_domains
    }

    /// Records one step of N rows, each with its loss. Validates everything first, then applies
    /// the batch (a failed call changes nothing).
    pub fn record(
        &mut self,
        step: i64,
        sample_ids: &[i64],
        domain_ids: &[i64],
        losses: &[f32],
        kept: &[i64],
    ) -> Result<()> {
        let n = sample_ids.len();
        if domain_ids.len() != n || losses.len() != n {
            return Err(Error::Value(format!(
                "sample_ids, domain_ids and losses must have the same length, got {}, {} and {}",
                n,
                domain_ids.len(),
                losses.len()
            )));
        }
        let is_kept = self.validate(step, sample_ids, domain_ids, kept)?;
        let scored: Vec<Option<f32>> = losses.iter().map(|&l| Some(l)).collect();
        self.apply(step, sample_ids, domain_ids, &is_kept, &scored);
        Ok(())
    }

    /// Records one step of N rows of which only the kept ones carry a loss: `kept_losses[j]` is
    /// the loss of row `kept[j]`. Every row counts as seen, the kept rows as selected, and only
    /// the kept rows' `last_loss`/`ema_loss` change. A failed call changes nothing.
    pub fn record_kept(
        &mut self,
        step: i64,
        sample_ids: &[i64],
        domain_ids: &[i64],
        kept: &[i64],
        kept_losses: &[f32],
    ) -> Result<()> {
        let n = sample_ids.len();
        if domain_ids.len() != n {
            return Err(Error::Value(format!(
                "sample_ids and domain_ids must have the same length, got {} and {}",
                n,
                domain_ids.len()
            )));
        }
        if kept_losses.len() != kept.len() {
            return Err(Error::Value(format!(
                "kept and kept_losses must have the same length, got {} and {}",
                kept.len(),
                kept_losses.len()
            )));
        }
        let is_kept = self.validate(step, sample_ids, domain_ids, kept)?;
        let mut scored: Vec<Option<f32>> = vec![None; n];
        for (&p, &l) in kept.iter().zip(kept_losses) {
            scored[p as usize] = Some(l);
        }
        self.apply(step, sample_ids, domain_ids, &is_kept, &scored);
        Ok(())
    }

    /// Checks a step's rows (lengths already equal); returns which rows are kept.
    fn validate(
        &self,
        step: i64,
        sample_ids: &[i64],
        domain_ids: &[i64],
        kept: &[i64],
    ) -> Result<Vec<bool>> {
        if step < 0 {
            return Err(Error::Value(format!("step must be >= 0, got {step}")));
        }
        let n = sample_ids.len();
        let w = (step as u64 / self.window) as usize;
        let needed = (w + 1).saturating_mul(self.n_domains);
        if needed > MAX_WINDOW_CELLS {
            return Err(Error::Value(format!(
                "step {step} is too large for window {} and {} domains (more than {} window cells)",
                self.window, self.n_domains, MAX_WINDOW_CELLS
            )));
        }
        for (r, &s) in sample_ids.iter().enumerate() {
            if s < 0 || s as u64 >= self.n_samples as u64 {
                return Err(Error::Value(format!(
                    "sample_ids[{r}] = {s} is out of range [0, {})",
                    self.n_samples
                )));
            }
        }
        for (r, &d) in domain_ids.iter().enumerate() {
            if d < 0 || d as u64 >= self.n_domains as u64 {
                return Err(Error::Value(format!(
                    "domain_ids[{r}] = {d} is out of range [0, {})",
                    self.n_domains
                )));
            }
        }
        // A sample keeps one domain for the whole run (also within this batch).
        let mut fresh: Vec<(i64, i64, usize)> = Vec::new();
        for (r, (&s, &d)) in sample_ids.iter().zip(domain_ids).enumerate() {
            let known = self.sample_domain[s as usize];
            if known < 0 {
                fresh.push((s, d, r));
            } else if known != d {
                return Err(Error::Value(format!(
                    "domain_ids[{r}] = {d} but sample {s} was recorded earlier with domain {known}"
                )));
            }
        }
        if fresh.len() > 1 {
            fresh.sort_unstable_by_key(|&(s, _, r)| (s, r));
            for pair in fresh.windows(2) {
                let ((s0, d0, r0), (s1, d1, r1)) = (pair[0], pair[1]);
                if s0 == s1 && d0 != d1 {
                    return Err(Error::Value(format!(
                        "sample {s0} appears with domain_ids {d0} (row {r0}) and {d1} (row {r1}) in one batch"
                    )));
                }
            }
        }
        let mut is_kept = vec![false; n];
        for (j, &p) in kept.iter().enumerate() {
            if p < 0 || p as u64 >= n as u64 {
                return Err(Error::Value(format!(
                    "kept[{j}] = {p} is not a row position in [0, {n})"
                )));
            }
            if is_kept[p as usize] {
                return Err(Error::Value(format!("kept[{j}] = {p} repeats a position")));
            }
            is_kept[p as usize] = true;
        }
        Ok(is_kept)
    }

    /// Applies a validated step; `scored[r]` is row r's loss, if it has one.
    fn apply(
        &mut self,
        step: i64,
        sample_ids: &[i64],
        domain_ids: &[i64],
        is_kept: &[bool],
        scored: &[Option<f32>],
    ) {
        let w = (step as u64 / self.window) as usize;
        let needed = (w + 1) * self.n_domains;
        if needed > self.window_rows_seen.len() {
            self.window_rows_seen.resize(needed, 0);
            self.window_rows_kept.resize(needed, 0);
        }
        let base = w * self.n_domains;
        let keep_w = 1.0 - self.ema;
        for r in 0..sample_ids.len() {
            let s = sample_ids[r] as usize;
            let d = domain_ids[r];
            self.sample_domain[s] = d;
            if let Some(loss) = scored[r] {
                let e = if self.times_scored[s] == 0 {
                    f64::from(loss)
                } else {
                    self.ema * self.ema_loss[s] + keep_w * f64::from(loss)
                };
                // NaN sign/payload after arithmetic is not portable: store the canonical NaN.
                self.ema_loss[s] = if e.is_nan() { f64::NAN } else { e };
                self.times_scored[s] += 1;
                self.last_loss[s] = loss;
            }
            self.times_seen[s] += 1;
            self.window_rows_seen[base + d as usize] += 1;
            if is_kept[r] {
                self.times_selected[s] += 1;
                self.window_rows_kept[base + d as usize] += 1;
            }
        }
        self.n_records += 1;
    }

    /// Sample ids of domain `d` that were seen, hardest first: NaN EMA first, then EMA
    /// descending; ties (including -0.0/+0.0) by lower id.
    pub fn hardest(&self, d: i64, top: usize) -> Vec<usize> {
        let mut ids: Vec<(u64, usize)> = (0..self.n_samples)
            .filter(|&s| self.times_scored[s] > 0 && self.sample_domain[s] == d)
            .map(|s| (!desc_key_f64(self.ema_loss[s]), s))
            .collect();
        ids.sort_unstable();
        ids.truncate(top);
        ids.into_iter().map(|(_, s)| s).collect()
    }

    pub fn report_json(&self, top: usize) -> String {
        let d_n = self.n_domains;
        let mut dom_seen = vec![0i64; d_n];
        let mut dom_kept = vec![0i64; d_n];
        for w in 0..self.n_windows() {
            for d in 0..d_n {
                dom_seen[d] += self.window_rows_seen[w * d_n + d];
                dom_kept[d] += self.window_rows_kept[w * d_n + d];
            }
        }
        let mut samples_seen = vec![0i64; d_n];
        for s in 0..self.n_samples {
            if self.times_seen[s] > 0 {
                samples_seen[self.sample_domain[s] as usize] += 1;
            }
        }
        let mut j = String::with_capacity(1024);
        j.push('{');
        j.push_str("\"format\": \"fastsel.tracker.report/1\", ");
        j.push_str(&format!(
            "\"settings\": {{\"n_samples\": {}, \"n_domains\": {}, \"window\": {}, \"ema\": {}, \"top\": {}}}, ",
            self.n_samples,
            d_n,
            self.window,
            json_f64(self.ema),
            top
        ));
        j.push_str(&format!(
            "\"records\": {}, \"rows_seen\": {}, \"rows_kept\": {}, ",
            self.n_records,
            dom_seen.iter().sum::<i64>(),
            dom_kept.iter().sum::<i64>()
        ));
        j.push_str("\"domains\": [");
        for d in 0..d_n {
            if d > 0 {
                j.push_str(", ");
            }
            j.push_str(&format!(
                "{{\"domain\": {d}, \"rows_seen\": {}, \"rows_kept\": {}, \"kept_share\": {}, \"samples_seen\": {}, \"hardest\": [",
                dom_seen[d],
                dom_kept[d],
                share(dom_kept[d], dom_seen[d]),
                samples_seen[d]
            ));
            for (i, s) in self.hardest(d as i64, top).into_iter().enumerate() {
                if i > 0 {
                    j.push_str(", ");
                }
                j.push_str(&format!(
                    "{{\"sample_id\": {s}, \"ema_loss\": {}, \"last_loss\": {}, \"times_seen\": {}, \"times_selected\": {}}}",
                    json_f64(self.ema_loss[s]),
                    json_f64(f64::from(self.last_loss[s])),
                    self.times_seen[s],
                    self.times_selected[s]
                ));
            }
            j.push_str("]}");
        }
        j.push_str("], \"windows\": [");
        let mut first = true;
        for w in 0..self.n_windows() {
            let seen = &self.window_rows_seen[w * d_n..(w + 1) * d_n];
            let kept = &self.window_rows_kept[w * d_n..(w + 1) * d_n];
            if seen.iter().all(|&x| x == 0) {
                continue;
            }
            if !first {
                j.push_str(", ");
            }
            first = false;
            let first_step = w as u64 * self.window;
            j.push_str(&format!(
                "{{\"window\": {w}, \"first_step\": {first_step}, \"last_step\": {}, \"rows_seen\": {}, \"rows_kept\": {}, \"kept_share\": [{}]}}",
                first_step + self.window - 1,
                json_ints(seen),
                json_ints(kept),
                seen.iter()
                    .zip(kept)
                    .map(|(&s, &k)| share(k, s))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        j.push_str("]}");
        j
    }
}

// ------------------------------------------------------------------------------------------------
// Saved state
// ------------------------------------------------------------------------------------------------

/// One array of a saved state: its elements in C order and its shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateArray<'a, T> {
    pub data: &'a [T],
    pub shape: &'a [usize],
}

impl<'a, T> StateArray<'a, T> {
    pub fn new(data: &'a [T], shape: &'a [usize]) -> Self {
        StateArray { data, shape }
    }
}

/// A tracker's saved state (what `state_dict()` holds in Python) as plain values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SavedState<'a> {
    pub version: i64,
    pub n_samples: i64,
    pub n_domains: i64,
    pub window: i64,
    pub ema: f64,
    pub n_records: i64,
    pub times_seen: StateArray<'a, i64>,
    pub times_selected: StateArray<'a, i64>,
    /// Required from version 2 on; version 1 scored every row it saw (`times_seen`).
    pub times_scored: Option<StateArray<'a, i64>>,
    pub last_loss: StateArray<'a, f32>,
    pub ema_loss: StateArray<'a, f64>,
    pub sample_domain: StateArray<'a, i64>,
    pub window_rows_seen: StateArray<'a, i64>,
    pub window_rows_kept: StateArray<'a, i64>,
}

/// Why a saved state cannot be loaded into a tracker (a `ValueError` in Python).
#[derive(Debug, Clone, PartialEq)]
pub enum StateError {
    UnsupportedVersion(i64),
    /// `n_samples`, `n_domains` or `window` differs from the tracker's.
    SettingMismatch {
        key: &'static str,
        got: i64,
        want: i64,
    },
    /// `ema` differs from the tracker's (bit for bit).
    EmaMismatch {
        got: f64,
        want: f64,
    },
    NegativeRecords(i64),
    Missing(&'static str),
    Shape {
        key: &'static str,
        want: Vec<usize>,
        got: Vec<usize>,
    },
    /// The per-window table would exceed [`MAX_WINDOW_CELLS`].
    TooManyWindows(usize),
    /// A sample's domain is out of range or its counters are negative or exceed `times_seen`.
    Inconsistent {
        sample: usize,
        domain: i64,
        seen: i64,
        selected: i64,
        scored: i64,
    },
    /// A sample was seen but has no domain, or has a domain but was never seen.
    SeenWithoutDomain {
        sample: usize,
        seen: i64,
        domain: i64,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::UnsupportedVersion(v) => write!(
                f,
                "state version {v} is not supported (expected 1 or {STATE_VERSION})"
            ),
            StateError::SettingMismatch { key, got, want } => write!(
                f,
                "state[{key:?}] = {got} does not match this tracker's {key} = {want}"
            ),
            StateError::EmaMismatch { got, want } => write!(
                f,
                "state[\"ema\"] = {got} does not match this tracker's ema = {want}"
            ),
            StateError::NegativeRecords(_) => f.write_str("state[\"n_records\"] must be >= 0"),
            StateError::Missing(key) => write!(f, "state dict is missing {key:?}"),
            StateError::Shape { key, want, got } => write!(
                f,
                "state[{key:?}] must have shape {}, got {}",
                py_shape(want),
                py_shape(got)
            ),
            StateError::TooManyWindows(_) => {
                f.write_str("state[\"window_rows_seen\"] has too many windows")
            }
            StateError::Inconsistent {
                sample,
                domain,
                seen,
                selected,
                scored,
            } => write!(
                f,
                "state is inconsistent at sample {sample} (domain {domain}, seen {seen}, \
                 selected {selected}, scored {scored})"
            ),
            StateError::SeenWithoutDomain {
                sample,
                seen,
                domain,
            } => write!(
                f,
                "state is inconsistent at sample {sample}: seen {seen} times but domain {domain}"
            ),
        }
    }
}

impl std::error::Error for StateError {}

impl From<StateError> for Error {
    fn from(e: StateError) -> Error {
        Error::Value(e.to_string())
    }
}

/// The elements of `a` if its shape is `want`.
fn shaped<'a, T>(
    key: &'static str,
    a: StateArray<'a, T>,
    want: &[usize],
) -> std::result::Result<&'a [T], StateError> {
    if a.shape != want || a.data.len() != want.iter().product::<usize>() {
        return Err(StateError::Shape {
            key,
            want: want.to_vec(),
            got: a.shape.to_vec(),
        });
    }
    Ok(a.data)
}

impl Tracker {
    /// Restores a saved state taken from a tracker with the same settings. Everything is checked
    /// (version, settings, shapes, per-sample consistency) before anything changes.
    pub fn load_state(&mut self, state: &SavedState<'_>) -> std::result::Result<(), StateError> {
        let version = state.version;
        if version != STATE_VERSION && version != 1 {
            return Err(StateError::UnsupportedVersion(version));
        }
        for (key, got, want) in [
            ("n_samples", state.n_samples, self.n_samples as i64),
            ("n_domains", state.n_domains, self.n_domains as i64),
            ("window", state.window, self.window as i64),
        ] {
            if got != want {
                return Err(StateError::SettingMismatch { key, got, want });
            }
        }
        if state.ema.to_bits() != self.ema.to_bits() {
            return Err(StateError::EmaMismatch {
                got: state.ema,
                want: self.ema,
            });
        }
        if state.n_records < 0 {
            return Err(StateError::NegativeRecords(state.n_records));
        }
        let (n, nd) = (self.n_samples, self.n_domains);
        let times_seen = shaped("times_seen", state.times_seen, &[n])?;
        let times_selected = shaped("times_selected", state.times_selected, &[n])?;
        let times_scored = match (version, state.times_scored) {
            (1, _) => times_seen,
            (_, Some(a)) => shaped("times_scored", a, &[n])?,
            (_, None) => return Err(StateError::Missing("times_scored")),
        };
        let last_loss = shaped("last_loss", state.last_loss, &[n])?;
        let ema_loss = shaped("ema_loss", state.ema_loss, &[n])?;
        let sample_domain = shaped("sample_domain", state.sample_domain, &[n])?;
        let n_windows = state.window_rows_seen.shape.first().copied().unwrap_or(0);
        if n_windows.saturating_mul(nd) > MAX_WINDOW_CELLS {
            return Err(StateError::TooManyWindows(n_windows));
        }
        let grid = [n_windows, nd];
        let rows_seen = shaped("window_rows_seen", state.window_rows_seen, &grid)?;
        let rows_kept = shaped("window_rows_kept", state.window_rows_kept, &grid)?;
        for s in 0..n {
            let (domain, seen) = (sample_domain[s], times_seen[s]);
            let (selected, scored) = (times_selected[s], times_scored[s]);
            if !(-1..nd as i64).contains(&domain)
                || seen < 0
                || !(0..=seen).contains(&selected)
                || !(0..=seen).contains(&scored)
            {
                return Err(StateError::Inconsistent {
                    sample: s,
                    domain,
                    seen,
                    selected,
                    scored,
                });
            }
            if (seen > 0) != (domain >= 0) {
                return Err(StateError::SeenWithoutDomain {
                    sample: s,
                    seen,
                    domain,
                });
            }
        }
        self.n_records = state.n_records;
        self.times_seen = times_seen.to_vec();
        self.times_selected = times_selected.to_vec();
        self.times_scored = times_scored.to_vec();
        self.last_loss = last_loss.to_vec();
        self.ema_loss = ema_loss.to_vec();
        self.sample_domain = sample_domain.to_vec();
        self.window_rows_seen = rows_seen.to_vec();
        self.window_rows_kept = rows_kept.to_vec();
        Ok(())
    }
}

/// JSON for a float: shortest round-trip digits; NaN and infinities as the strings
/// "NaN", "Infinity", "-Infinity" (JSON has no literal for them).
pub fn json_f64(x: f64) -> String {
    if x.is_nan() {
        "\"NaN\"".to_string()
    } else if x == f64::INFINITY {
        "\"Infinity\"".to_string()
    } else if x == f64::NEG_INFINITY {
        "\"-Infinity\"".to_string()
    } else {
        format!("{x:?}")
    }
}

fn share(kept: i64, seen: i64) -> String {
    if seen == 0 {
        "null".to_string()
    } else {
        json_f64(kept as f64 / seen as f64)
    }
}

fn json_ints(v: &[i64]) -> String {
    let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_and_ema() {
        let mut t = Tracker::new(4, 2, 10, 0.5).unwrap();
        t.record(3, &[1, 1, 2], &[0, 0, 1], &[2.0, 4.0, 1.0], &[1])
            .unwrap();
        assert_eq!(t.times_seen, vec![0, 2, 1, 0]);
        assert_eq!(t.times_selected, vec![0, 1, 0, 0]);
        assert_eq!(t.last_loss[1], 4.0);
        // first observation 2.0, then 0.5 * 2 + 0.5 * 4 = 3
        assert_eq!(t.ema_loss[1], 3.0);
        assert!(t.ema_loss[0].is_nan());
        assert_eq!(t.window_rows_seen, vec![2, 1]);
        assert_eq!(t.window_rows_kept, vec![1, 0]);
        t.record(25, &[3], &[1], &[f32::NAN], &[0]).unwrap();
        assert_eq!(t.n_windows(), 3);
        assert_eq!(t.window_rows_seen, vec![2, 1, 0, 0, 0, 1]);
        assert_eq!(t.hardest(1, 10), vec![3, 2]);
    }

    #[test]
    fn failed_record_changes_nothing() {
        let mut t = Tracker::new(4, 2, 10, 0.9).unwrap();
        let before = format!("{t:?}");
        assert!(t.record(0, &[0, 5], &[0, 0], &[1.0, 1.0], &[]).is_err());
        assert!(t.record(0, &[0, 1], &[0, 2], &[1.0, 1.0], &[]).is_err());
        assert!(t.record(0, &[0, 1], &[0, 0], &[1.0, 1.0], &[2]).is_err());
        assert!(t.record(0, &[0, 1], &[0, 0], &[1.0, 1.0], &[1, 1]).is_err());
        assert!(t.record(0, &[0, 0], &[0, 1], &[1.0, 1.0], &[]).is_err());
        assert!(t.record(-1, &[0], &[0], &[1.0], &[]).is_err());
        assert!(t.record(0, &[0], &[0, 1], &[1.0], &[]).is_err());
        assert!(t.record_kept(0, &[0, 1], &[0, 0], &[1], &[]).is_err());
        assert!(t.record_kept(0, &[0, 1], &[0], &[1], &[1.0]).is_err());
        assert!(t.record_kept(0, &[0, 1], &[0, 0], &[2], &[1.0]).is_err());
        assert_eq!(format!("{t:?}"), before);
        t.record(0, &[0], &[0], &[1.0], &[]).unwrap();
        assert!(t.record(1, &[0], &[1], &[1.0], &[]).is_err());
    }

    #[test]
    fn record_kept_scores_only_the_kept_rows() {
        let mut t = Tracker::new(4, 2, 10, 0.5).unwrap();
        t.record(0, &[1], &[0], &[2.0], &[0]).unwrap();
        // rows: samples 1, 2, 3; only row 2 (sample 3) and row 0 (sample 1) are kept and scored
        t.record_kept(1, &[1, 2, 3], &[0, 1, 1], &[2, 0], &[5.0, 4.0])
            .unwrap();
        assert_eq!(t.times_seen, vec![0, 2, 1, 1]);
        assert_eq!(t.times_selected, vec![0, 2, 0, 1]);
        assert_eq!(t.times_scored, vec![0, 2, 0, 1]);
        assert_eq!(t.last_loss[1], 4.0);
        assert!(t.last_loss[2].is_nan()); // seen, never scored
        assert_eq!(t.last_loss[3], 5.0);
        assert_eq!(t.ema_loss[1], 3.0); // 0.5 * 2 + 0.5 * 4
        assert_eq!(t.ema_loss[3], 5.0); // its first loss
        assert_eq!(t.window_rows_seen, vec![2, 2]);
        assert_eq!(t.window_rows_kept, vec![2, 1]);
        assert_eq!(t.hardest(1, 10), vec![3]); // only scored samples rank
    }

    #[test]
    fn json_floats() {
        assert_eq!(json_f64(0.5), "0.5");
        assert_eq!(json_f64(1.0), "1.0");
        assert_eq!(json_f64(f64::NAN), "\"NaN\"");
        assert_eq!(json_f64(f64::NEG_INFINITY), "\"-Infinity\"");
        assert_eq!(json_f64(1e-300), "1e-300");
    }

    /// A tracker with history in two windows (sample 0 never seen).
    fn with_history() -> Tracker {
        let mut t = Tracker::new(4, 2, 10, 0.5).unwrap();
        t.record(0, &[1, 2], &[0, 1], &[1.0, 2.0], &[0]).unwrap();
        t.record_kept(15, &[1, 3, 2], &[0, 1, 1], &[1], &[4.0])
            .unwrap();
        t
    }

    /// The shapes a saved state of `t` holds.
    fn shapes(t: &Tracker) -> ([usize; 1], [usize; 2]) {
        ([t.n_samples], [t.n_windows(), t.n_domains])
    }

    fn saved<'a>(t: &'a Tracker, n: &'a [usize], grid: &'a [usize]) -> SavedState<'a> {
        SavedState {
            version: STATE_VERSION,
            n_samples: t.n_samples as i64,
            n_domains: t.n_domains as i64,
            window: t.window as i64,
            ema: t.ema,
            n_records: t.n_records,
            times_seen: StateArray::new(&t.times_seen, n),
            times_selected: StateArray::new(&t.times_selected, n),
            times_scored: Some(StateArray::new(&t.times_scored, n)),
            last_loss: StateArray::new(&t.last_loss, n),
            ema_loss: StateArray::new(&t.ema_loss, n),
            sample_domain: StateArray::new(&t.sample_domain, n),
            window_rows_seen: StateArray::new(&t.window_rows_seen, grid),
            window_rows_kept: StateArray::new(&t.window_rows_kept, grid),
        }
    }

    #[test]
    fn state_round_trip() {
        let t = with_history();
        let (n, grid) = shapes(&t);
        let mut u = Tracker::new(4, 2, 10, 0.5).unwrap();
        u.load_state(&saved(&t, &n, &grid)).unwrap();
        assert_eq!(format!("{u:?}"), format!("{t:?}"));
        assert_eq!(u.report_json(3), t.report_json(3));
    }

    #[test]
    fn version_1_state_scored_every_row_it_saw() {
        let mut t = Tracker::new(4, 2, 10, 0.5).unwrap();
        t.record(0, &[1, 2], &[0, 1], &[1.0, 2.0], &[0]).unwrap();
        let (n, grid) = shapes(&t);
        let mut state = saved(&t, &n, &grid);
        state.version = 1;
        state.times_scored = None;
        let mut u = Tracker::new(4, 2, 10, 0.5).unwrap();
        u.load_state(&state).unwrap();
        assert_eq!(u.times_scored, vec![0, 1, 1, 0]);
        // a stray times_scored in a version 1 state is ignored
        let wrong = [9i64; 4];
        state.times_scored = Some(StateArray::new(&wrong, &n));
        u.load_state(&state).unwrap();
        assert_eq!(u.times_scored, t.times_seen);
    }

    /// The error of loading `state` into a fresh tracker with `with_history`'s settings, which
    /// must not change.
    fn load_err(state: &SavedState<'_>) -> StateError {
        let mut u = Tracker::new(4, 2, 10, 0.5).unwrap();
        let before = format!("{u:?}");
        let e = u.load_state(state).unwrap_err();
        assert_eq!(
            format!("{u:?}"),
            before,
            "a failed load changed the tracker"
        );
        e
    }

    #[test]
    fn state_rejects_other_versions_and_settings() {
        let t = with_history();
        let (n, grid) = shapes(&t);
        let good = saved(&t, &n, &grid);
        for version in [0, 3, -1] {
            let e = load_err(&SavedState { version, ..good });
            assert_eq!(e, StateError::UnsupportedVersion(version));
        }
        for (key, state) in [
            (
                "n_samples",
                SavedState {
                    n_samples: 5,
                    ..good
                },
            ),
            (
                "n_domains",
                SavedState {
                    n_domains: 1,
                    ..good
                },
            ),
            (
                "window",
                SavedState {
                    window: 100,
                    ..good
                },
            ),
        ] {
            let e = load_err(&state);
            assert!(
                matches!(e, StateError::SettingMismatch { key: k, .. } if k == key),
                "{e:?}"
            );
        }
        let e = load_err(&SavedState { ema: 0.9, ..good });
        assert_eq!(
            e,
            StateError::EmaMismatch {
                got: 0.9,
                want: 0.5
            }
        );
        // -0.0 == 0.0, but settings are compared bit for bit
        let mut z = Tracker::new(4, 2, 10, 0.0).unwrap();
        let e = z.load_state(&SavedState { ema: -0.0, ..good });
        assert!(matches!(e, Err(StateError::EmaMismatch { .. })), "{e:?}");
        let e = load_err(&SavedState {
            n_records: -1,
            ..good
        });
        assert_eq!(e, StateError::NegativeRecords(-1));
        let e = load_err(&SavedState {
            times_scored: None,
            ..good
        });
        assert_eq!(e, StateError::Missing("times_scored"));
    }

    #[test]
    fn state_rejects_wrong_shapes() {
        let t = with_history();
        let (n, grid) = shapes(&t);
        let good = saved(&t, &n, &grid);
        let short = [0i64; 3];
        let shape = |e: StateError| match e {
            StateError::Shape { key, want, got } => (key, want, got),
            other => panic!("not a shape error: {other:?}"),
        };
        let e = load_err(&SavedState {
            times_seen: StateArray::new(&short, &[3]),
            ..good
        });
        assert_eq!(shape(e), ("times_seen", vec![4], vec![3]));
        let e = load_err(&SavedState {
            times_selected: StateArray::new(&t.times_selected, &[4, 1]),
            ..good
        });
        assert_eq!(shape(e), ("times_selected", vec![4], vec![4, 1]));
        // data that does not fill the shape it claims
        let e = load_err(&SavedState {
            times_scored: Some(StateArray::new(&short, &n)),
            ..good
        });
        assert_eq!(shape(e).0, "times_scored");
        let e = load_err(&SavedState {
            last_loss: StateArray::new(&[], &[]),
            ..good
        });
        assert_eq!(shape(e), ("last_loss", vec![4], vec![]));
        let e = load_err(&SavedState {
            ema_loss: StateArray::new(&[], &n),
            ..good
        });
        assert_eq!(shape(e).0, "ema_loss");
        let e = load_err(&SavedState {
            sample_domain: StateArray::new(&short, &n),
            ..good
        });
        assert_eq!(shape(e).0, "sample_domain");
        // window tables: [n_windows, n_domains], n_windows from window_rows_seen
        let e = load_err(&SavedState {
            window_rows_seen: StateArray::new(&t.window_rows_seen, &[grid[0] * 2]),
            ..good
        });
        // (its first dimension counts the windows, as for a well-formed table)
        assert_eq!(shape(e), ("window_rows_seen", vec![4, 2], vec![4]));
        let e = load_err(&SavedState {
            window_rows_seen: StateArray::new(&t.window_rows_seen, &[grid[0] * 2, 1]),
            ..good
        });
        assert_eq!(shape(e), ("window_rows_seen", vec![4, 2], vec![4, 1]));
        let e = load_err(&SavedState {
            window_rows_kept: StateArray::new(&t.window_rows_kept[..2], &[1, 2]),
            ..good
        });
        assert_eq!(shape(e), ("window_rows_kept", grid.to_vec(), vec![1, 2]));
        let many = MAX_WINDOW_CELLS / 2 + 1;
        let e = load_err(&SavedState {
            window_rows_seen: StateArray::new(&[], &[many, 2]),
            ..good
        });
        assert_eq!(e, StateError::TooManyWindows(many));
    }

    #[test]
    fn state_rejects_inconsistent_samples() {
        let t = with_history();
        let (n, grid) = shapes(&t);
        let good = saved(&t, &n, &grid);
        assert_eq!(t.times_seen, vec![0, 2, 2, 1]);
        assert_eq!(t.times_selected, vec![0, 1, 0, 1]);
        assert_eq!(t.times_scored, vec![0, 1, 1, 1]);
        assert_eq!(t.sample_domain, vec![-1, 0, 1, 1]);
        let at = |e: StateError| match e {
            StateError::Inconsistent { sample, .. } => sample,
            other => panic!("not an inconsistency: {other:?}"),
        };
        let domain = |d: &[i64; 4]| {
            load_err(&SavedState {
                sample_domain: StateArray::new(d, &n),
                ..good
            })
        };
        assert_eq!(at(domain(&[-1, 0, 2, 1])), 2); // domain >= n_domains
        assert_eq!(at(domain(&[-2, 0, 1, 1])), 0); // domain < -1
        let neg = [0i64, -1, 1, 1];
        let e = load_err(&SavedState {
            times_seen: StateArray::new(&neg, &n),
            ..good
        });
        assert_eq!(at(e), 1);
        let e = load_err(&SavedState {
            times_selected: StateArray::new(&neg, &n),
            ..good
        });
        assert_eq!(at(e), 1);
        let e = load_err(&SavedState {
            times_scored: Some(StateArray::new(&neg, &n)),
            ..good
        });
        assert_eq!(at(e), 1);
        let above = [0i64, 3, 0, 0];
        let e = load_err(&SavedState {
            times_selected: StateArray::new(&above, &n),
            ..good
        });
        assert_eq!(
            e,
            StateError::Inconsistent {
                sample: 1,
                domain: 0,
                seen: 2,
                selected: 3,
                scored: 1
            }
        );
        let e = load_err(&SavedState {
            times_scored: Some(StateArray::new(&above, &n)),
            ..good
        });
        assert_eq!(at(e), 1);
        // seen <=> has a domain
        let e = domain(&[0, 0, 1, 1]);
        let want = StateError::SeenWithoutDomain {
            sample: 0,
            seen: 0,
            domain: 0,
        };
        assert_eq!(e, want);
        let e = domain(&[-1, -1, 1, 1]);
        let want = StateError::SeenWithoutDomain {
            sample: 1,
            seen: 2,
            domain: -1,
        };
        assert_eq!(e, want);
    }

    #[test]
    fn state_error_messages() {
        let cases: [(StateError, &str); 6] = [
            (
                StateError::UnsupportedVersion(9),
                "state version 9 is not supported (expected 1 or 2)",
            ),
            (
                StateError::SettingMismatch {
                    key: "n_samples",
                    got: 5,
                    want: 4,
                },
                "state[\"n_samples\"] = 5 does not match this tracker's n_samples = 4",
            ),
            (
                StateError::EmaMismatch {
                    got: 0.5,
                    want: 1.0,
                },
                "state[\"ema\"] = 0.5 does not match this tracker's ema = 1",
            ),
            (
                StateError::Shape {
                    key: "times_seen",
                    want: vec![4],
                    got: vec![2, 2],
                },
                "state[\"times_seen\"] must have shape (4,), got (2, 2)",
            ),
            (
                StateError::Missing("times_scored"),
                "state dict is missing \"times_scored\"",
            ),
            (
                StateError::Inconsistent {
                    sample: 3,
                    domain: 0,
                    seen: 1,
                    selected: 2,
                    scored: 1,
                },
                "state is inconsistent at sample 3 (domain 0, seen 1, selected 2, scored 1)",
            ),
        ];
        for (e, msg) in cases {
            assert_eq!(e.to_string(), msg);
            assert_eq!(Error::from(e), Error::Value(msg.to_string()));
        }
    }
}
