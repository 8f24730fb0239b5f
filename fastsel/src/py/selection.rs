//! `topk_desc` and `topk_per_domain`.

use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;

use crate::py::convert::{array1, as_slice, detach_if};
use crate::selection;

/// Positions of the k largest losses, torch `sort(descending=True, stable=True)` order.
#[pyfunction]
pub fn topk_desc<'py>(
    py: Python<'py>,
    losses: &Bound<'py, PyAny>,
    k: i64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let losses = array1::<f32>(losses, "losses", "float32")?;
    let x = as_slice(&losses);
    let top = detach_if(py, x.len(), || selection::topk_desc(x, k))?;
    Ok(top.into_pyarray(py))
}

/// Per domain (ascending id): the top `int(n_d * p)` positions, concatenated.
#[pyfunction]
pub fn topk_per_domain<'py>(
    py: Python<'py>,
    losses: &Bound<'py, PyAny>,
    domain_ids: &Bound<'py, PyAny>,
    p: f64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let losses = array1::<f32>(losses, "losses", "float32")?;
    let domains = array1::<i64>(domain_ids, "domain_ids", "int64")?;
    let (l, d) = (as_slice(&losses), as_slice(&domains));
    let top = detach_if(py, l.len(), || selection::topk_per_domain(l, d, p))?;
    Ok(top.into_pyarray(py))
}
