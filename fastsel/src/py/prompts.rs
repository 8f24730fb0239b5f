//! `ClipBpe`: CLIP's byte-pair encoding (the text cleaning stays in Python, `fastsel._prompts`).

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::exceptions::{PyFileNotFoundError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::prompts;
use crate::py::convert::type_name;

/// CLIP's BPE (open_clip's `SimpleTokenizer` without the text cleaning);
/// `fastsel.PromptTokenizer` subclasses it and cleans the text first.
#[pyclass(module = "fastsel._fastsel", frozen, subclass)]
pub struct ClipBpe {
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
        if context_length < 1 {
            return Err(PyValueError::new_err(format!(
                "context_length must be >= 1, got {context_length}"
            )));
        }
        let ctx = context_length as usize;
        let ids = py.detach(|| self.inner.tokenize(&texts, ctx))?;
        let ids = Array2::from_shape_vec((texts.len(), ctx), ids).expect("one row per text");
        Ok(ids.into_pyarray(py))
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
