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

create_exception!(
    weightlift,
    DoesNotFit,
    SafetensorError,
    "A load whose tensors need more memory than its budget: refused before anything is read."
);

create_exception!(
    weightlift,
    Cancelled,
    SafetensorError,
    "A load called off before it finished."
);

create_exception!(
    weightlift,
    InvalidPlacement,
    SafetensorError,
    "A load_into placement that cannot be honoured (wrong shape, outside its destination, \
     overlapping another, on a device load_into does not fill): raised before any byte is \
     written."
);

/// A weightlift error as a Python exception: `FileNotFoundError` for a missing file (as
/// safetensors raises); `DoesNotFit`, `Cancelled` and `InvalidPlacement` (subclasses of
/// `SafetensorError`, so `except SafetensorError` catches them as before) for what a caller
/// may handle; `SafetensorError` for everything else; the same message as the CLI.
pub(crate) fn py_err(e: Error) -> PyErr {
    let text = e.to_string();
    match e {
        Error::DoesNotFit { .. } => DoesNotFit::new_err(text),
        Error::Cancelled => Cancelled::new_err(text),
        Error::InvalidPlacement { .. } => InvalidPlacement::new_err(text),
        _ if e.io_kind() == Some(std::io::ErrorKind::NotFound) => {
            PyFileNotFoundError::new_err(text)
        }
        _ => SafetensorError::new_err(text),
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
