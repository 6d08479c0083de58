//! `weightlift._native`: the Rust half of the Python package.
//!
//! It exposes open checkpoints and loaded tensors; the Python half (`python/weightlift`)
//! turns tensors into numpy arrays (through `__array_interface__`, sharing memory) or torch
//! tensors (through DLPack, sharing memory), and mirrors the `safetensors` API on top.
//! Loads run with the GIL released.
//!
//! - `errors`: safetensors' exception types with weightlift's messages.
//! - `dlpack`: the one DLPack exporter.
//! - `tensor`, `memory`: one tensor, and one allocation, as Python objects.
//! - `layout`: how loaded tensors are described to Python (numpy's and torch's layouts).
//! - `handle`: the open checkpoint (`safe_open`'s and `load_checkpoint`'s), its prefetch
//!   and loads.
//! - `staging`: the pinned pools placement loads into GPUs share.
//! - `assemble`: fused parameters made in place of pieces of the files.

mod assemble;
mod dlpack;
mod errors;
mod handle;
mod layout;
mod memory;
mod staging;
mod tensor;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use weightlift::Dtype;

/// Every tensor of a safetensors file held in `data` (the whole file), in file order,
/// grouped by allocation in `layout` (see `layout::grouped`).
#[pyfunction]
#[pyo3(signature = (data, layout=layout::Layout::Numpy))]
fn load_bytes<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
    layout: layout::Layout,
) -> PyResult<Bound<'py, PyList>> {
    let state = weightlift::load_bytes(data.as_bytes()).map_err(errors::py_err)?;
    layout::grouped(py, &state.into_tensors(), layout)
}

/// Bytes of `count` elements of the dtype `code` (e.g. "BF16"), as the format counts them
/// (sub-byte dtypes packed); `None` for an unknown code or a count that does not fill
/// whole bytes.
#[pyfunction]
fn byte_len(code: &str, count: usize) -> Option<usize> {
    Dtype::from_name(code)?.byte_len(count)
}

/// `(budget, window, source)`: the memory budget loads run under now, the prefetch window
/// within it, and where the budget comes from (see `weightlift::MemoryBudget::detect`).
#[pyfunction]
fn memory_budget() -> (u64, u64, String) {
    let b = weightlift::MemoryBudget::detect();
    (b.bytes(), b.window(), b.source().to_string())
}

/// Bytes of a size as people write it (`16MiB`, `0.5g`, `100MB`).
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    weightlift::parse_size(text).map_err(pyo3::exceptions::PyValueError::new_err)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add(
        "SafetensorError",
        m.py().get_type::<errors::SafetensorError>(),
    )?;
    m.add("DoesNotFit", m.py().get_type::<errors::DoesNotFit>())?;
    m.add("Cancelled", m.py().get_type::<errors::Cancelled>())?;
    m.add(
        "InvalidPlacement",
        m.py().get_type::<errors::InvalidPlacement>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The bench refuses to time a debug build.
    m.add(
        "__build__",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    m.add_class::<tensor::PyTensor>()?;
    m.add_class::<handle::PyCheckpoint>()?;
    m.add_class::<handle::PyFill>()?;
    m.add_class::<handle::PyDevice>()?;
    m.add_class::<layout::Layout>()?;
    m.add_class::<memory::PyMemory>()?;
    m.add_class::<memory::PyDeviceMemory>()?;
    m.add_class::<staging::PyStaging>()?;
    m.add_function(wrap_pyfunction!(load_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(byte_len, m)?)?;
    m.add_function(wrap_pyfunction!(memory_budget, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(assemble::assemble, m)?)?;
    Ok(())
}
