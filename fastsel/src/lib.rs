//! fastsel: CPU-side helpers for SCMD runs, exposed to Python through PyO3.
//!
//! This file is the thin binding layer: argument checking and conversion, GIL release, and the
//! mapping of [`error::Error`] to Python exceptions. The logic lives in the other modules.

pub mod error;
pub mod indexing;
pub mod prompts;
pub mod selection;
pub mod tracker;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use numpy::ndarray::Array2;
use numpy::{
    Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods,
    PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{
    PyFileNotFoundError, PyNotADirectoryError, PyOSError, PyPermissionError, PyTypeError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::error::Error;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Type(m) => PyTypeError::new_err(m),
            Error::Value(m) => PyValueError::new_err(m),
            Error::FileNotFound(m) => PyFileNotFoundError::new_err(m),
            Error::NotADirectory(m) => PyNotADirectoryError::new_err(m),
            Error::Permission(m) => PyPermissionError::new_err(m),
            Error::Os(m) => PyOSError::new_err(m),
        }
    }
}

/// Above this many elements the work runs with the GIL released.
const DETACH_THRESHOLD: usize = 4096;

// ------------------------------------------------------------------------------------------------
// Array arguments
// ------------------------------------------------------------------------------------------------

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A zero-copy, read-only view of a 1-D C-contiguous array of `T`, or a TypeError/ValueError
/// that names the argument.
fn array1<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    if let Ok(arr) = obj.cast::<PyArray1<T>>() {
        if !arr.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{name} must be C-contiguous (use numpy.ascontiguousarray)"
            )));
        }
        return arr
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{name} cannot be borrowed: {e}")));
    }
    let Ok(any) = obj.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray of dtype {dtype}, got {}",
            type_name(obj)
        )));
    };
    let actual = any.dtype();
    let expected = numpy::dtype::<T>(obj.py());
    if !actual.is_equiv_to(&expected) {
        let shown = actual
            .str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(PyTypeError::new_err(format!(
            "{name} must have dtype {dtype}, got {shown} (convert with .astype(numpy.{dtype}))"
        )));
    }
    Err(PyValueError::new_err(format!(
        "{name} must be 1-D, got shape {}",
        py_shape(any.shape())
    )))
}

/// A shape as Python prints it: `(2, 3)`, `(4,)`, `()`.
fn py_shape(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn as_slice<'a, T: Element>(arr: &'a PyReadonlyArray1<'_, T>) -> &'a [T] {
    arr.as_slice().expect("checked C-contiguous")
}

fn nonneg(value: i64, name: &str) -> PyResult<usize> {
    usize::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {value}")))
}

/// Bytes of a path-like as Python's `os.fsencode` would give them.
fn os_bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

/// A `str` from raw file-name bytes (surrogateescape for non-UTF-8, like `os.fsdecode`).
fn py_str<'py>(py: Python<'py>, b: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    match std::str::from_utf8(b) {
        Ok(s) => Ok(PyString::new(py, s).into_any()),
        Err(_) => Ok(OsStr::from_bytes(b).into_pyobject(py)?.into_any()),
    }
}

// ------------------------------------------------------------------------------------------------
// Selection
// ------------------------------------------------------------------------------------------------

/// Empty call taking the same argument as `topk_desc`: the benchmark's floor.
#[pyfunction]
fn _noop(losses: PyReadonlyArray1<'_, f32>) {
    let _ = losses;
}

/// Positions of the k largest losses, torch `sort(descending=True, stable=True)` order.
/// With `out` (int64, 1-D, C-contiguous, length k) the result is written there and returned.
#[pyfunction]
#[pyo3(signature = (losses, k, out = None))]
fn topk_desc<'py>(
    py: Python<'py>,
    losses: &Bound<'py, PyAny>,
    k: i64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let arr = array1::<f32>(losses, "losses", "float32")?;
    let x = as_slice(&arr);
    let n = x.len();
    if k < 0 || k as u64 > n as u64 {
        return Err(PyValueError::new_err(format!(
            "k must be in [0, {n}] (len(losses)), got {k}"
        )));
    }
    let k = k as usize;
    match out {
        Some(o) => {
            let o = o.cast::<PyArray1<i64>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "out must be a 1-D numpy.ndarray of dtype int64, got {}",
                    type_name(o)
                ))
            })?;
            if o.len() != k || !o.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "out must be C-contiguous with length k = {k}, got length {}",
                    o.len()
                )));
            }
            let mut rw = o
                .try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("out cannot be written: {e}")))?;
            fill_topk(py, x, rw.as_slice_mut().expect("checked C-contiguous"))?;
            drop(rw);
            Ok(o.clone())
        }
        None => {
            // SAFETY: a fresh array that nothing else references yet; fully written before return.
            let fresh = unsafe { PyArray1::<i64>::new(py, [k], false) };
            let dst = unsafe { fresh.as_slice_mut() }.expect("fresh arrays are contiguous");
            fill_topk(py, x, dst)?;
            Ok(fresh)
        }
    }
}

fn fill_topk(py: Python<'_>, x: &[f32], dst: &mut [i64]) -> PyResult<()> {
    if x.len() >= DETACH_THRESHOLD {
        py.detach(|| selection::topk_desc_into(x, dst))?;
    } else {
        selection::topk_desc_into(x, dst)?;
    }
    Ok(())
}

/// Per domain (ascending id): the top `int(n_d * p)` positions, concatenated.
#[pyfunction]
fn topk_per_domain<'py>(
    py: Python<'py>,
    losses: &Bound<'py, PyAny>,
    domain_ids: &Bound<'py, PyAny>,
    p: f64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let l = array1::<f32>(losses, "losses", "float32")?;
    let d = array1::<i64>(domain_ids, "domain_ids", "int64")?;
    let (l, d) = (as_slice(&l), as_slice(&d));
    let out = if l.len() >= DETACH_THRESHOLD {
        py.detach(|| selection::topk_per_domain(l, d, p))?
    } else {
        selection::topk_per_domain(l, d, p)?
    };
    Ok(out.into_pyarray(py))
}

// ------------------------------------------------------------------------------------------------
// Tracker
// ------------------------------------------------------------------------------------------------

/// Bookkeeping of one run (the numpy oracle is `tests/tracker_oracle.py`).
#[pyclass(module = "fastsel._fastsel")]
struct Tracker {
    inner: tracker::Tracker,
}

fn state_array<'py, T: Element + Copy>(
    d: &Bound<'py, PyDict>,
    key: &str,
    dtype: &str,
    shape: &[usize],
) -> PyResult<Vec<T>> {
    let obj = d
        .get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("state dict is missing {key:?}")))?;
    let name = format!("state[{key:?}]");
    let Ok(arr) = obj.cast::<numpy::PyArrayDyn<T>>() else {
        if obj.cast::<PyUntypedArray>().is_ok() {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype {dtype}"
            )));
        }
        return Err(PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray of dtype {dtype}, got {}",
            type_name(&obj)
        )));
    };
    if arr.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape {}, got {}",
            py_shape(shape),
            py_shape(arr.shape())
        )));
    }
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
    Ok(ro.as_array().iter().copied().collect())
}

fn state_int(d: &Bound<'_, PyDict>, key: &str) -> PyResult<i64> {
    let obj = d
        .get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("state dict is missing {key:?}")))?;
    obj.extract::<i64>().map_err(|_| {
        PyTypeError::new_err(format!(
            "state[{key:?}] must be an int, got {}",
            type_name(&obj)
        ))
    })
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

    fn window_rows_seen<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let t = &self.inner;
        let a = Array2::from_shape_vec((t.n_windows(), t.n_domains), t.window_rows_seen.clone())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(a.into_pyarray(py))
    }

    fn window_rows_kept<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let t = &self.inner;
        let a = Array2::from_shape_vec((t.n_windows(), t.n_domains), t.window_rows_kept.clone())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(a.into_pyarray(py))
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
        let top = nonneg(top, "top")?;
        Ok(self.inner.report_json(top))
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
        d.set_item("window_rows_seen", self.window_rows_seen(py)?)?;
        d.set_item("window_rows_kept", self.window_rows_kept(py)?)?;
        Ok(d)
    }

    /// Restores a `state_dict()` taken from a tracker with the same settings (either
    /// implementation). Everything is checked before anything changes.
    fn load_state_dict(&mut self, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let d = state.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err(format!("state must be a dict, got {}", type_name(state)))
        })?;
        let t = &self.inner;
        let version = state_int(d, "version")?;
        if version != tracker::STATE_VERSION && version != 1 {
            return Err(PyValueError::new_err(format!(
                "state version {version} is not supported (expected 1 or {})",
                tracker::STATE_VERSION
            )));
        }
        for (key, want) in [
            ("n_samples", t.n_samples as i64),
            ("n_domains", t.n_domains as i64),
            ("window", t.window as i64),
        ] {
            let got = state_int(d, key)?;
            if got != want {
                return Err(PyValueError::new_err(format!(
                    "state[{key:?}] = {got} does not match this tracker's {key} = {want}"
                )));
            }
        }
        let ema_obj = d
            .get_item("ema")?
            .ok_or_else(|| PyValueError::new_err("state dict is missing \"ema\""))?;
        let ema: f64 = ema_obj
            .extract()
            .map_err(|_| PyTypeError::new_err("state[\"ema\"] must be a float"))?;
        if ema.to_bits() != t.ema.to_bits() {
            return Err(PyValueError::new_err(format!(
                "state[\"ema\"] = {ema} does not match this tracker's ema = {}",
                t.ema
            )));
        }
        let n_records = state_int(d, "n_records")?;
        if n_records < 0 {
            return Err(PyValueError::new_err("state[\"n_records\"] must be >= 0"));
        }
        let n = t.n_samples;
        let nd = t.n_domains;
        let times_seen = state_array::<i64>(d, "times_seen", "int64", &[n])?;
        let times_selected = state_array::<i64>(d, "times_selected", "int64", &[n])?;
        let times_scored = if version == 1 {
            times_seen.clone() // version 1 scored every row it saw
        } else {
            state_array::<i64>(d, "times_scored", "int64", &[n])?
        };
        let last_loss = state_array::<f32>(d, "last_loss", "float32", &[n])?;
        let ema_loss = state_array::<f64>(d, "ema_loss", "float64", &[n])?;
        let sample_domain = state_array::<i64>(d, "sample_domain", "int64", &[n])?;
        let seen_obj = d
            .get_item("window_rows_seen")?
            .ok_or_else(|| PyValueError::new_err("state dict is missing \"window_rows_seen\""))?;
        let n_windows = seen_obj
            .cast::<PyUntypedArray>()
            .map(|a| a.shape().first().copied().unwrap_or(0))
            .unwrap_or(0);
        if n_windows.saturating_mul(nd) > tracker::MAX_WINDOW_CELLS {
            return Err(PyValueError::new_err(
                "state[\"window_rows_seen\"] has too many windows",
            ));
        }
        let window_rows_seen =
            state_array::<i64>(d, "window_rows_seen", "int64", &[n_windows, nd])?;
        let window_rows_kept =
            state_array::<i64>(d, "window_rows_kept", "int64", &[n_windows, nd])?;
        for s in 0..n {
            let dom = sample_domain[s];
            let seen = times_seen[s];
            if !(-1..nd as i64).contains(&dom)
                || seen < 0
                || times_selected[s] < 0
                || times_selected[s] > seen
                || times_scored[s] < 0
                || times_scored[s] > seen
            {
                return Err(PyValueError::new_err(format!(
                    "state is inconsistent at sample {s} (domain {dom}, seen {seen}, selected {}, scored {})",
                    times_selected[s], times_scored[s]
                )));
            }
            if (seen > 0) != (dom >= 0) {
                return Err(PyValueError::new_err(format!(
                    "state is inconsistent at sample {s}: seen {seen} times but domain {dom}"
                )));
            }
        }
        let t = &mut self.inner;
        t.n_records = n_records;
        t.times_seen = times_seen;
        t.times_selected = times_selected;
        t.times_scored = times_scored;
        t.last_loss = last_loss;
        t.ema_loss = ema_loss;
        t.sample_domain = sample_domain;
        t.window_rows_seen = window_rows_seen;
        t.window_rows_kept = window_rows_kept;
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

// ------------------------------------------------------------------------------------------------
// Indexing
// ------------------------------------------------------------------------------------------------

/// Env folders, class folders and ImageFolder-ordered samples of a DomainBed root.
#[pyfunction]
fn index_domainbed<'py>(py: Python<'py>, root: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let expanded: PathBuf = py
        .import("os.path")?
        .call_method1("expanduser", (root,))?
        .extract()?;
    let bytes = os_bytes(&expanded);
    let idx = py.detach(|| indexing::index_domainbed(&bytes))?;
    let out = PyDict::new(py);
    let envs = PyList::empty(py);
    for e in &idx.envs {
        envs.append(py_str(py, e)?)?;
    }
    let classes = PyList::empty(py);
    for c in &idx.classes {
        classes.append(py_str(py, c)?)?;
    }
    let paths = PyList::empty(py);
    let labels = PyList::empty(py);
    for env in &idx.env_index {
        let items = env
            .paths()
            .map(|p| py_str(py, p))
            .collect::<PyResult<Vec<_>>>()?;
        paths.append(PyList::new(py, items)?)?;
        labels.append(env.labels().into_pyarray(py))?;
    }
    out.set_item("envs", envs)?;
    out.set_item("classes", classes)?;
    out.set_item("paths", paths)?;
    out.set_item("labels", labels)?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------------
// Prompts
// ------------------------------------------------------------------------------------------------

/// CLIP's BPE (open_clip's `SimpleTokenizer` without the text cleaning);
/// `fastsel.PromptTokenizer` subclasses it and cleans the text first.
#[pyclass(module = "fastsel._fastsel", frozen, subclass)]
struct ClipBpe {
    inner: prompts::ClipBpe,
    path: PathBuf,
}

fn default_bpe_path(py: Python<'_>) -> PyResult<PathBuf> {
    let spec = py
        .import("importlib.util")?
        .call_method1("find_spec", ("open_clip",))?;
    if spec.is_none() {
        return Err(PyFileNotFoundError::new_err(
            "open_clip is not installed; pass bpe_path= (open_clip's bpe_simple_vocab_16e6.txt.gz)",
        ));
    }
    let locations = spec.getattr("submodule_search_locations")?;
    let first = locations.try_iter()?.next().ok_or_else(|| {
        PyFileNotFoundError::new_err("cannot locate the open_clip package folder; pass bpe_path=")
    })??;
    let dir: PathBuf = first.extract()?;
    Ok(dir.join("bpe_simple_vocab_16e6.txt.gz"))
}

/// A list of str from a str (one item) or an iterable of str.
fn str_list(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<String>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(vec![s.to_cow()?.into_owned()]);
    }
    let iter = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a list of str, got {}",
            type_name(obj)
        ))
    })?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let item = item?;
        let s = item.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!(
                "{name}[{i}] must be a str, got {}",
                type_name(&item)
            ))
        })?;
        let text = s.to_cow().map_err(|_| {
            PyValueError::new_err(format!(
                "{name}[{i}] = {} is not valid text (lone surrogate); fastsel cannot tokenise it",
                item.repr().map(|r| r.to_string()).unwrap_or_default()
            ))
        })?;
        out.push(text.into_owned());
    }
    Ok(out)
}

fn ctx_len(context_length: i64) -> PyResult<usize> {
    if context_length < 1 {
        return Err(PyValueError::new_err(format!(
            "context_length must be >= 1, got {context_length}"
        )));
    }
    Ok(context_length as usize)
}

#[pymethods]
impl ClipBpe {
    #[new]
    #[pyo3(signature = (bpe_path = None))]
    fn new(py: Python<'_>, bpe_path: Option<PathBuf>) -> PyResult<Self> {
        let path = match bpe_path {
            Some(p) => p,
            None => default_bpe_path(py)?,
        };
        let inner = py.detach(|| prompts::ClipBpe::from_gz_file(&path))?;
        Ok(ClipBpe { inner, path })
    }

    /// Ids of already cleaned texts, int64 `[len(texts), context_length]`.
    #[pyo3(signature = (texts, context_length = 77))]
    fn tokenize_clean<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        context_length: i64,
    ) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let texts = str_list(texts, "texts")?;
        let ctx = ctx_len(context_length)?;
        let ids = py.detach(|| self.inner.tokenize(&texts, ctx))?;
        let a = Array2::from_shape_vec((texts.len(), ctx), ids).expect("shape matches");
        Ok(a.into_pyarray(py))
    }

    #[getter]
    fn bpe_path(&self) -> PathBuf {
        self.path.clone()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    #[getter]
    fn sot_token_id(&self) -> u32 {
        self.inner.sot
    }

    #[getter]
    fn eot_token_id(&self) -> u32 {
        self.inner.eot
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let name = slf.get_type().name()?;
        Ok(format!("{name}(bpe_path={:?})", slf.get().path))
    }
}

#[pymodule]
fn _fastsel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(_noop, m)?)?;
    m.add_function(wrap_pyfunction!(topk_desc, m)?)?;
    m.add_function(wrap_pyfunction!(topk_per_domain, m)?)?;
    m.add_function(wrap_pyfunction!(index_domainbed, m)?)?;
    m.add_class::<Tracker>()?;
    m.add_class::<ClipBpe>()?;
    Ok(())
}
