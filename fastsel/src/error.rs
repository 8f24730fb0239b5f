//! One small error type for the pure-Rust modules. `py/errors.rs` maps each variant to the Python
//! exception class named in the variant, so Rust code never needs a Python token to fail.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Wrong kind of argument (dtype, object type) -> `TypeError`.
    Type(String),
    /// Right kind, bad value (range, length, shape, unsupported text) -> `ValueError`.
    Value(String),
    /// A path that should exist does not, or holds nothing usable -> `FileNotFoundError`.
    FileNotFound(String),
    /// A path that should be a directory is not -> `NotADirectoryError`.
    NotADirectory(String),
    /// A folder or file that cannot be read -> `PermissionError`.
    Permission(String),
    /// Any other operating-system failure (symlink loop, I/O error) -> `OSError`.
    Os(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::Type(m)
            | Error::Value(m)
            | Error::FileNotFound(m)
            | Error::NotADirectory(m)
            | Error::Permission(m)
            | Error::Os(m) => m,
        }
    }

    /// Classifies an I/O error on `what` (a description that names the path).
    pub fn from_io(err: &std::io::Error, what: &str) -> Error {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::NotFound => {
                Error::FileNotFound(format!("{what}: no such file or directory"))
            }
            ErrorKind::NotADirectory => Error::NotADirectory(format!("{what}: not a directory")),
            ErrorKind::PermissionDenied => Error::Permission(format!("{what}: permission denied")),
            _ => Error::Os(format!("{what}: {err}")),
        }
    }
}

/// A shape as Python prints it: `(2, 3)`, `(4,)`, `()`.
pub fn py_shape(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
            format!("({})", dims.join(", "))
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_print_like_python_tuples() {
        assert_eq!(py_shape(&[]), "()");
        assert_eq!(py_shape(&[4]), "(4,)");
        assert_eq!(py_shape(&[2, 3]), "(2, 3)");
    }
}
