//! One loaded tensor as a Python object: numpy's array interface and DLPack.

use crate::dlpack::{Export, dl_device, dl_dtype, flags};
use crate::memory::array_interface;
use dlpark::ffi::{DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::python::producer::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use weightlift::Tensor;

/// A loaded tensor, in host or device memory it keeps alive.
#[pyclass(name = "Tensor", module = "weightlift._native", frozen)]
pub(crate) struct PyTensor {
    pub(crate) tensor: Tensor,
}

impl PyTensor {
    fn host_bytes(&self) -> PyResult<&[u8]> {
        self.tensor.bytes().ok_or_else(|| {
            PyValueError::new_err(format!(
                "tensor {:?} is on {}, not in host memory",
                self.tensor.name(),
                self.tensor.device()
            ))
        })
    }

    fn export(&self) -> PyResult<Export<Tensor>> {
        let t = &self.tensor;
        let data = match t.device_ptr() {
            Some(ptr) => ptr,
            None => self.host_bytes()?.as_ptr() as u64,
        };
        let dtype = dl_dtype(t.dtype()).ok_or_else(|| {
            PyValueError::new_err(format!(
                "tensor {:?}: {} has no DLPack type",
                t.name(),
                t.dtype()
            ))
        })?;
        Ok(Export {
            owner: t.clone(),
            data,
            shape: t.shape().iter().map(|&d| d as i64).collect(),
            dtype,
            device: dl_device(t.device()),
        })
    }
}

impl DlpackExporter for PyTensor {
    fn device(&self) -> DLDevice {
        dl_device(self.tensor.device())
    }

    fn flags(&self) -> DlpackFlags {
        flags()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        // Device loads are complete (every copy waited for) before tensors exist.
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        // SAFETY: `export` points at the tensor's own bytes (host or device), which the
        // owned clone keeps alive; its shape and dtype are the tensor's; device tensors exist
        // only once every copy into them completed; Rust hands out no mutable reference.
        unsafe { self.export()?.managed() }
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        // SAFETY: as in `export_legacy`.
        unsafe { self.export()?.managed() }
    }
}

#[pymethods]
impl PyTensor {
    /// The tensor's name.
    #[getter]
    fn name(&self) -> &str {
        self.tensor.name()
    }

    /// The safetensors dtype code (e.g. "BF16").
    #[getter]
    fn dtype(&self) -> &'static str {
        self.tensor.dtype().name()
    }

    /// The shape.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.tensor.shape().to_vec()
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.tensor.byte_len()
    }

    /// "cpu" or "cuda:N".
    #[getter]
    fn device(&self) -> String {
        self.tensor.device().to_string()
    }

    /// The bytes as a flat uint8 array interface: numpy arrays made from it share the
    /// memory and keep this object (and so the memory) alive.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        array_interface(py, self.host_bytes()?)
    }

    /// DLPack export (the Python array API protocol): zero-copy, host or CUDA memory.
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
        let d = dl_device(self.tensor.device());
        (d.device_type.0, d.device_id)
    }

    fn __repr__(&self) -> String {
        format!(
            "Tensor({:?}, {}, {:?}, {})",
            self.tensor.name(),
            self.tensor.dtype(),
            self.tensor.shape(),
            self.tensor.device()
        )
    }
}
