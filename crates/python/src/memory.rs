//! Allocations as Python objects: one per shard (owned memory, a file's private mapping, or
//! device memory), each made into one array by Python, then cheap views per tensor.

use crate::dlpack::{Export, dl_device, flags};
use dlpark::ffi::{DLDataType, DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::python::producer::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;
use weightlift::{DeviceMemory, HostMemory};

/// numpy's `__array_interface__` (version 3) of `bytes` as a flat, writable uint8 array.
/// The caller is the object numpy keeps as the array's base, and it owns the bytes.
pub(crate) fn array_interface<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", 3)?;
    d.set_item("shape", (bytes.len(),))?;
    d.set_item("typestr", "|u1")?;
    d.set_item("data", (bytes.as_ptr() as usize, false))?;
    Ok(d)
}

/// One host allocation (a shard's tensors: owned memory or a file's private mapping), as a
/// flat uint8 array interface.
#[pyclass(name = "Memory", module = "weightlift._native", frozen)]
pub(crate) struct PyMemory {
    pub(crate) memory: Arc<HostMemory>,
}

#[pymethods]
impl PyMemory {
    /// numpy arrays made from this share the memory and keep it alive.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        array_interface(py, self.memory.as_slice())
    }

    /// Whether the memory is a private mapping of a file.
    #[getter]
    fn mapped(&self) -> bool {
        self.memory.is_mapped()
    }

    /// Whether anything else holds the allocation (a shard's mapping or a shard loaded whole,
    /// which many tensors share), rather than only this object (one tensor's bytes read into
    /// memory of their own, freed with the last array made from it).
    #[getter]
    fn shared(&self) -> bool {
        self.memory.is_mapped() || Arc::strong_count(&self.memory) > 1
    }

    /// The allocation's identity (its address): equal for every `Memory` object over the
    /// same allocation, so Python can reuse what it built over one.
    #[getter]
    fn key(&self) -> usize {
        Arc::as_ptr(&self.memory) as usize
    }

    fn __len__(&self) -> usize {
        self.memory.len()
    }
}

/// One device allocation (a shard's tensors on a GPU), exported through DLPack as a flat
/// uint8 tensor: torch makes one tensor of it, then cheap views per tensor.
#[pyclass(name = "DeviceMemory", module = "weightlift._native", frozen)]
pub(crate) struct PyDeviceMemory {
    pub(crate) memory: Arc<dyn DeviceMemory>,
}

impl PyDeviceMemory {
    fn export(&self) -> Export<Arc<dyn DeviceMemory>> {
        Export {
            owner: Arc::clone(&self.memory),
            data: self.memory.device_ptr(),
            shape: vec![self.memory.len() as i64],
            dtype: DLDataType::U8,
            device: dl_device(self.memory.device()),
        }
    }
}

impl DlpackExporter for PyDeviceMemory {
    fn device(&self) -> DLDevice {
        dl_device(self.memory.device())
    }

    fn flags(&self) -> DlpackFlags {
        flags()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        // SAFETY: the pointer is the start of the device allocation, which the `Arc` owner
        // keeps alive; the shape is its exact length in bytes; every copy into it completed
        // before the load returned.
        unsafe { self.export().managed() }
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        // SAFETY: as in `export_legacy`.
        unsafe { self.export().managed() }
    }
}

#[pymethods]
impl PyDeviceMemory {
    /// DLPack export of the whole allocation as uint8 (zero-copy).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    /// (device type, device id) in DLPack codes.
    fn __dlpack_device__(&self) -> (u32, i32) {
        let d = dl_device(self.memory.device());
        (d.device_type.0, d.device_id)
    }

    fn __len__(&self) -> usize {
        self.memory.len() as usize
    }
}
