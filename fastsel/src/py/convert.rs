//! Argument conversion shared by the bindings: zero-copy views of numpy arrays, with errors that
//! name the argument.

use numpy::{
    Element, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::py_shape;

/// Above this many elements the work runs with the GIL released.
pub const DETACH_THRESHOLD: usize = 4096;

/// Runs `f` with the GIL released when `size` is large enough for that to pay.
pub fn detach_if<T: Send>(py: Python<'_>, size: usize, f: impl FnOnce() -> T + Send) -> T {
    if size >= DETACH_THRESHOLD {
        py.detach(f)
    } else {
        f()
    }
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A zero-copy, read-only view of a 1-D C-contiguous array of `T`, or a TypeError/ValueError
/// that names the argument.
pub fn array1<'py, T: Element>(
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
    if !actual.is_equiv_to(&numpy::dtype::<T>(obj.py())) {
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

/// The elements of an array that [`array1`] returned.
pub fn as_slice<'a, T: Element>(arr: &'a PyReadonlyArray1<'_, T>) -> &'a [T] {
    arr.as_slice().expect("array1 checked C-contiguous")
}

pub fn nonneg(value: i64, name: &str) -> PyResult<usize> {
    usize::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {value}")))
}
