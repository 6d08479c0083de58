//! Errors as Python sees them: safetensors' exception types, weightlift's messages.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError};
use pyo3::prelude::*;
use weightlift::{Error, Location, ModelId};

create_exception!(
    weightlift,
    SafetensorError,
    PyException,
    "A malformed file, a missing tensor or a failed read (same name as safetensors' error)."
);

/// A weightlift error as a Python exception: `FileNotFoundError` for a missing file (as
/// safetensors raises), `SafetensorError` for everything else, with the same message as the
/// CLI.
pub(crate) fn py_err(e: Error) -> PyErr {
    match e.io_kind() {
        Some(std::io::ErrorKind::NotFound) => PyFileNotFoundError::new_err(e.to_string()),
        _ => SafetensorError::new_err(e.to_string()),
    }
}

/// An error opening `path`: where the path itself does not exist (and is no model id in the
/// Hugging Face cache either), `FileNotFoundError` in safetensors' words, which callers
/// match on; any other error as [`py_err`] makes it.
pub(crate) fn open_err(path: &str, e: Error) -> PyErr {
    match &e {
        Error::Io {
            location, source, ..
        } if source.kind() == std::io::ErrorKind::NotFound
            && *location == Location::parse(path)
            && !location.is_url()
            && ModelId::parse(path).is_none() =>
        {
            PyFileNotFoundError::new_err(format!("No such file or directory: {path}"))
        }
        _ => py_err(e),
    }
}
