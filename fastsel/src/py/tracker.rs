//! `Tracker`: per-sample bookkeeping of one run.

use std::borrow::Cow;

use numpy::ndarray::Array2;
use numpy::{
    Element, IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;
use crate::py::convert::{array1, as_slice, nonneg, type_name};
use crate::tracker::{self, SavedState, StateArray};

/// Bookkeeping of one run (the numpy oracle is `tests/tracker_oracle.py`).
#[pyclass(module = "fastsel._fastsel")]
pub struct Tracker {
    inner: tracker::Tracker,
}

/// `state[key]`, or the ValueError of a missing key.
fn state_item<'py>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Bound<'py, PyAny>> {
    d.get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("state dict is missing {key:?}")))
}

fn state_int(d: &Bound<'_, PyDict>, key: &str) -> PyResult<i64> {
    let obj = state_item(d, key)?;
    obj.extract::<i64>().map_err(|_| {
        PyTypeError::new_err(format!(
            "state[{key:?}] must be an int, got {}",
            type_name(&obj)
        ))
    })
}

/// A read-only view of the numpy array `obj` of dtype `T` (any shape, any layout).
fn state_array<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    key: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let name = format!("state[{key:?}]");
    let Ok(arr) = obj.cast::<PyArrayDyn<T>>() else {
        if obj.cast::<PyUntypedArray>().is_ok() {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype {dtype}"
            )));
        }
        return Err(PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray of dtype {dtype}, got {}",
            type_name(obj)
        )));
    };
    arr.try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// The elements of `a` in C order: borrowed when C-contiguous, else copied.
fn elements<'a, T: Element + Copy>(a: &'a PyReadonlyArrayDyn<'_, T>) -> Cow<'a, [T]> {
    match a.as_slice() {
        Ok(s) if a.is_c_contiguous() => Cow::Borrowed(s),
        _ => Cow::Owned(a.as_array().iter().copied().collect()),
    }
}

fn view<'a, T: Element>(data: &'a [T], a: &'a PyReadonlyArrayDyn<'_, T>) -> StateArray<'a, T> {
    StateArray::new(data, a.shape())
}

#[pymethods]
impl Tracker {
    #[new]
    #[pyo3(signature = (n_samples, n_domains, window = 100, ema = 0.9))]
    fn new(n_samples: i64, n_domains: i64, window: i64, ema: f64) -> PyResult<Self> {
        Ok(Tracker {
            inner: tracker::Tracker::new(n_samples, n_domains, window, ema)?,
        })
    }

    /// Records one step: N rows (sample id, domain id, loss) and the kept row positions.
    fn record(
        &mut self,
        step: i64,
        sample_ids: &Bound<'_, PyAny>,
        domain_ids: &Bound<'_, PyAny>,
        losses: &Bound<'_, PyAny>,
        kept: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let s = array1::<i64>(sample_ids, "sample_ids", "int64")?;
        let d = array1::<i64>(domain_ids, "domain_ids", "int64")?;
        let l = array1::<f32>(losses, "losses", "float32")?;
        let k = array1::<i64>(kept, "kept", "int64")?;
        self.inner
            .record(step, as_slice(&s), as_slice(&d), as_slice(&l), as_slice(&k))?;
        Ok(())
    }

    /// Records one step of N rows of which only the kept rows carry a loss (`kept_losses[j]`
    /// belongs to row `kept[j]`).
    fn record_kept(
        &mut self,
        step: i64,
        sample_ids: &Bound<'_, PyAny>,
        domain_ids: &Bound<'_, PyAny>,
        kept: &Bound<'_, PyAny>,
        kept_losses: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let s = array1::<i64>(sample_ids, "sample_ids", "int64")?;
        let d = array1::<i64>(domain_ids, "domain_ids", "int64")?;
        let k = array1::<i64>(kept, "kept", "int64")?;
        let l = array1::<f32>(kept_losses, "kept_losses", "float32")?;
        self.inner
            .record_kept(step, as_slice(&s), as_slice(&d), as_slice(&k), as_slice(&l))?;
        Ok(())
    }

    fn times_seen<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.inner.times_seen)
    }

    fn times_selected<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.inner.times_selected)
    }

    fn times_scored<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.inner.times_scored)
    }

    fn last_loss<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, &self.inner.last_loss)
    }

    fn ema_loss<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, &self.inner.ema_loss)
    }

    fn sample_domain<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, &self.inner.sample_domain)
    }

    fn window_rows_seen<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<i64>> {
        grid(py, &self.inner, &self.inner.window_rows_seen)
    }

    fn window_rows_kept<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<i64>> {
        grid(py, &self.inner, &self.inner.window_rows_kept)
    }

    #[getter]
    fn n_samples(&self) -> usize {
        self.inner.n_samples
    }

    #[getter]
    fn n_domains(&self) -> usize {
        self.inner.n_domains
    }

    #[getter]
    fn window(&self) -> u64 {
        self.inner.window
    }

    #[getter]
    fn ema(&self) -> f64 {
        self.inner.ema
    }

    #[getter]
    fn n_records(&self) -> i64 {
        self.inner.n_records
    }

    #[pyo3(signature = (top = 10))]
    fn report_json(&self, top: i64) -> PyResult<String> {
        Ok(self.inner.report_json(nonneg(top, "top")?))
    }

    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = &self.inner;
        let d = PyDict::new(py);
        d.set_item("version", tracker::STATE_VERSION)?;
        d.set_item("n_samples", t.n_samples)?;
        d.set_item("n_domains", t.n_domains)?;
        d.set_item("window", t.window)?;
        d.set_item("ema", t.ema)?;
        d.set_item("n_records", t.n_records)?;
        d.set_item("times_seen", self.times_seen(py))?;
        d.set_item("times_selected", self.times_selected(py))?;
        d.set_item("times_scored", self.times_scored(py))?;
        d.set_item("last_loss", self.last_loss(py))?;
        d.set_item("ema_loss", self.ema_loss(py))?;
        d.set_item("sample_domain", self.sample_domain(py))?;
        d.set_item("window_rows_seen", self.window_rows_seen(py))?;
        d.set_item("window_rows_kept", self.window_rows_kept(py))?;
        Ok(d)
    }

    /// Restores a `state_dict()` taken from a tracker with the same settings (either
    /// implementation). Everything is checked (`tracker::Tracker::load_state`) before anything
    /// changes; here the dict's items only become Rust values.
    fn load_state_dict(&mut self, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let d = state.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err(format!("state must be a dict, got {}", type_name(state)))
        })?;
        let version = state_int(d, "version")?;
        let n_samples = state_int(d, "n_samples")?;
        let n_domains = state_int(d, "n_domains")?;
        let window = state_int(d, "window")?;
        let ema: f64 = state_item(d, "ema")?
            .extract()
            .map_err(|_| PyTypeError::new_err("state[\"ema\"] must be a float"))?;
        let n_records = state_int(d, "n_records")?;
        let arr_i64 = |key| state_array::<i64>(&state_item(d, key)?, key, "int64");
        let times_seen = arr_i64("times_seen")?;
        let times_selected = arr_i64("times_selected")?;
        // Version 1 states have no times_scored (and load_state ignores one there).
        let times_scored = match d.get_item("times_scored")? {
            Some(obj) if version != 1 => Some(state_array::<i64>(&obj, "times_scored", "int64")?),
            _ => None,
        };
        let last_loss = state_array::<f32>(&state_item(d, "last_loss")?, "last_loss", "float32")?;
        let ema_loss = state_array::<f64>(&state_item(d, "ema_loss")?, "ema_loss", "float64")?;
        let sample_domain = arr_i64("sample_domain")?;
        let rows_seen = arr_i64("window_rows_seen")?;
        let rows_kept = arr_i64("window_rows_kept")?;

        let seen_e = elements(&times_seen);
        let selected_e = elements(&times_selected);
        let scored_e = times_scored.as_ref().map(elements);
        let last_e = elements(&last_loss);
        let ema_e = elements(&ema_loss);
        let domain_e = elements(&sample_domain);
        let rows_seen_e = elements(&rows_seen);
        let rows_kept_e = elements(&rows_kept);
        let saved = SavedState {
            version,
            n_samples,
            n_domains,
            window,
            ema,
            n_records,
            times_seen: view(&seen_e, &times_seen),
            times_selected: view(&selected_e, &times_selected),
            times_scored: scored_e
                .as_ref()
                .zip(times_scored.as_ref())
                .map(|(e, a)| view(e.as_ref(), a)),
            last_loss: view(&last_e, &last_loss),
            ema_loss: view(&ema_e, &ema_loss),
            sample_domain: view(&domain_e, &sample_domain),
            window_rows_seen: view(&rows_seen_e, &rows_seen),
            window_rows_kept: view(&rows_kept_e, &rows_kept),
        };
        self.inner.load_state(&saved).map_err(Error::from)?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        let t = &self.inner;
        format!(
            "Tracker(n_samples={}, n_domains={}, window={}, ema={:?}) with {} records",
            t.n_samples, t.n_domains, t.window, t.ema, t.n_records
        )
    }
}

/// A row-major `[n_windows, n_domains]` table as a 2-D array.
fn grid<'py>(py: Python<'py>, t: &tracker::Tracker, cells: &[i64]) -> Bound<'py, PyArray2<i64>> {
    Array2::from_shape_vec((t.n_windows(), t.n_domains), cells.to_vec())
        .expect("the table holds n_windows * n_domains cells")
        .into_pyarray(py)
}
