//! `index_domainbed`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::indexing;

/// A `str` from raw file-name bytes (surrogateescape for non-UTF-8, like `os.fsdecode`).
fn py_str<'py>(py: Python<'py>, b: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    match std::str::from_utf8(b) {
        Ok(s) => Ok(PyString::new(py, s).into_any()),
        Err(_) => Ok(OsStr::from_bytes(b).into_pyobject(py)?.into_any()),
    }
}

fn py_str_list<'a, 'py>(
    py: Python<'py>,
    names: impl IntoIterator<Item = &'a [u8]>,
) -> PyResult<Bound<'py, PyList>> {
    let items = names
        .into_iter()
        .map(|n| py_str(py, n))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// Env folders, class folders and ImageFolder-ordered samples of a DomainBed root.
#[pyfunction]
pub fn index_domainbed<'py>(py: Python<'py>, root: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let expanded: PathBuf = py
        .import("os.path")?
        .call_method1("expanduser", (root,))?
        .extract()?;
    let root = expanded.as_os_str().as_bytes();
    let idx = py.detach(|| indexing::index_domainbed(root))?;
    let paths = PyList::empty(py);
    let labels = PyList::empty(py);
    for env in &idx.env_index {
        paths.append(py_str_list(py, env.paths())?)?;
        labels.append(env.labels().into_pyarray(py))?;
    }
    let out = PyDict::new(py);
    out.set_item("envs", py_str_list(py, idx.envs.iter().map(Vec::as_slice))?)?;
    out.set_item(
        "classes",
        py_str_list(py, idx.classes.iter().map(Vec::as_slice))?,
    )?;
    out.set_item("paths", paths)?;
    out.set_item("labels", labels)?;
    Ok(out)
}
