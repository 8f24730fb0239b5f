//! fastsel: CPU-side helpers for SCMD runs, exposed to Python through PyO3.

use pyo3::prelude::*;

#[pymodule]
fn _fastsel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
