//! fastsel: CPU-side helpers for SCMD runs, exposed to Python through PyO3.
//!
//! The logic lives in the plain Rust modules (`indexing`, `prompts`, `selection`, `tracker`, with
//! `error`); `py/` holds the thin bindings, one file per exported function group or class. This
//! file only declares the modules and registers the bindings.

pub mod error;
pub mod indexing;
pub mod prompts;
mod py;
pub mod selection;
pub mod tracker;

use pyo3::prelude::*;

#[pymodule]
fn _fastsel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(py::selection::topk_desc, m)?)?;
    m.add_function(wrap_pyfunction!(py::selection::topk_per_domain, m)?)?;
    m.add_function(wrap_pyfunction!(py::indexing::index_domainbed, m)?)?;
    m.add_class::<py::tracker::Tracker>()?;
    m.add_class::<py::prompts::ClipBpe>()?;
    Ok(())
}
