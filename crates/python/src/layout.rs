//! How loaded tensors are described to the Python side, which makes the arrays: grouped
//! by allocation, each with its dtype code, shape and offset (numpy), or shape, strides and
//! element offset as torch counts them; and the per-file report of a load.

use crate::errors::SafetensorError;
use crate::memory::{PyDeviceMemory, PyMemory};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use std::sync::Arc;
use weightlift::{DeviceMemory, Dtype, FileReport, HostMemory, Tensor};

/// How tensors are described to the Python side, which makes the arrays: `Layout.NP` or
/// `Layout.PT`, chosen once per handle or call by the Python side (from the framework it was
/// given), never parsed from a string per call.
#[pyclass(
    name = "Layout",
    module = "weightlift._native",
    eq,
    eq_int,
    frozen,
    from_py_object
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// numpy: `(name, dtype code, shape, byte offset)`.
    #[pyo3(name = "NP")]
    Numpy,
    /// torch: `(name, dtype code, shape, strides, element offset, byte offset)`, shapes
    /// and strides as torch counts them (F4 packs two elements per byte: the last dimension
    /// is halved), the element offset -1 where the byte offset is not a multiple of the
    /// element size (such a tensor is copied).
    #[pyo3(name = "PT")]
    Torch,
}

/// One tensor's entry in `layout`, at `offset` bytes into its allocation.
fn entry<'py>(
    py: Python<'py>,
    t: &Tensor,
    offset: u64,
    layout: Layout,
) -> PyResult<Bound<'py, PyTuple>> {
    // Interned: one string object per dtype, not one per tensor. Shapes and strides are
    // tuples: torch parses them faster than lists (~0.2 us per tensor here).
    let code = PyString::intern(py, t.dtype().name());
    match layout {
        Layout::Numpy => (t.name(), code, PyTuple::new(py, t.shape())?, offset).into_pyobject(py),
        Layout::Torch => {
            let mut shape = t.shape().to_vec();
            let bits = t.dtype().bits();
            let itemsize = if t.dtype() == Dtype::F4 {
                match shape.last_mut() {
                    Some(last) if *last % 2 == 0 => *last /= 2,
                    _ => {
                        return Err(SafetensorError::new_err(format!(
                            "tensor {:?}: F4 (float4_e2m1fn_x2) needs a last dimension divisible by 2 in torch, got shape {:?}",
                            t.name(),
                            t.shape()
                        )));
                    }
                }
                1
            } else {
                (bits / 8).max(1) as u64
            };
            let mut strides = vec![1usize; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                strides[d] = strides[d + 1] * shape[d + 1];
            }
            let elem = if offset.is_multiple_of(itemsize) {
                (offset / itemsize) as i64
            } else {
                -1
            };
            (
                t.name(),
                code,
                PyTuple::new(py, shape)?,
                PyTuple::new(py, strides)?,
                elem,
                offset,
            )
                .into_pyobject(py)
        }
    }
}

/// Groups tensors by allocation: `[(memory, [entry, ...]), ...]` in load order, so that
/// Python makes one array (or torch tensor) per allocation and cheap views into it per
/// tensor (43,000 tensors cost ~0.07 s that way, against several times that through one
/// object each). Host allocations come as `Memory`, device ones as `DeviceMemory`.
pub(crate) fn grouped<'py>(
    py: Python<'py>,
    tensors: &[Tensor],
    layout: Layout,
) -> PyResult<Bound<'py, PyList>> {
    enum Alloc<'a> {
        Host(&'a Arc<HostMemory>),
        Device(&'a Arc<dyn DeviceMemory>),
    }
    let same = |a: &Alloc<'_>, b: &Alloc<'_>| match (a, b) {
        (Alloc::Host(a), Alloc::Host(b)) => Arc::ptr_eq(a, b),
        (Alloc::Device(a), Alloc::Device(b)) => Arc::ptr_eq(a, b),
        _ => false,
    };
    let mut groups: Vec<(Alloc<'_>, Bound<'py, PyList>)> = Vec::new();
    for t in tensors {
        let (alloc, offset) = if let Some((m, o)) = t.host_allocation() {
            (Alloc::Host(m), o as u64)
        } else if let Some((m, o)) = t.device_allocation() {
            (Alloc::Device(m), o)
        } else {
            return Err(PyValueError::new_err(format!(
                "tensor {:?} has no data (meta)",
                t.name()
            )));
        };
        let e = entry(py, t, offset, layout)?;
        match groups.last() {
            Some((last, entries)) if same(last, &alloc) => entries.append(e)?,
            _ => {
                let entries = PyList::empty(py);
                entries.append(e)?;
                groups.push((alloc, entries));
            }
        }
    }
    let items = groups
        .into_iter()
        .map(|(alloc, entries)| {
            let memory: Py<PyAny> = match alloc {
                Alloc::Host(m) => Py::new(
                    py,
                    PyMemory {
                        memory: Arc::clone(m),
                    },
                )?
                .into_any(),
                Alloc::Device(m) => Py::new(
                    py,
                    PyDeviceMemory {
                        memory: Arc::clone(m),
                    },
                )?
                .into_any(),
            };
            Ok((memory, entries))
        })
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// A load's per-file report as dicts: `file`, `placement`, `reason`, `bytes_read`.
pub(crate) fn report<'py>(py: Python<'py>, files: &[FileReport]) -> PyResult<Bound<'py, PyList>> {
    let items = files
        .iter()
        .map(|f| {
            let d = PyDict::new(py);
            d.set_item("file", f.location.to_string())?;
            d.set_item("placement", f.placement.name())?;
            d.set_item("reason", &f.reason)?;
            d.set_item("bytes_read", f.bytes_read)?;
            Ok(d)
        })
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}
