//! Each [`Error`] variant becomes the Python exception it names.

use pyo3::exceptions::{
    PyFileNotFoundError, PyNotADirectoryError, PyOSError, PyPermissionError, PyTypeError,
    PyValueError,
};
use pyo3::PyErr;

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
