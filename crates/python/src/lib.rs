//! `weightlift._native`: the Rust half of the Python package.
//!
//! It exposes open checkpoints and loaded tensors; the Python half (`python/weightlift`)
//! turns tensors into numpy arrays (through `__array_interface__`, sharing memory) or torch
//! tensors (through DLPack, sharing memory), and mirrors the `safetensors` API on top.
//! Loads run with the GIL released.

use dlpark::ffi::{DLDataType, DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::metadata::Dynamic;
use dlpark::python::producer::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;
use weightlift::{Backend, Checkpoint, Device, Dtype, Error, LoadOptions, OpenOptions, Tensor};

create_exception!(
    _native,
    SafetensorError,
    PyException,
    "A malformed file, a missing tensor or a failed read (same name as safetensors' error)."
);

/// A weightlift error as a Python exception: `FileNotFoundError` for a missing file (as
/// safetensors raises), `SafetensorError` for everything else, with the same message as the
/// CLI.
fn py_err(e: Error) -> PyErr {
    match e.io_kind() {
        Some(std::io::ErrorKind::NotFound) => PyFileNotFoundError::new_err(e.to_string()),
        _ => SafetensorError::new_err(e.to_string()),
    }
}

/// numpy's `__array_interface__` (version 3) of `bytes` as a flat, writable uint8 array.
/// The caller is the object numpy keeps as the array's base, and it owns the bytes.
fn array_interface<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", 3)?;
    d.set_item("shape", (bytes.len(),))?;
    d.set_item("typestr", "|u1")?;
    d.set_item("data", (bytes.as_ptr() as usize, false))?;
    Ok(d)
}

/// A loaded tensor, in host or device memory it keeps alive.
#[pyclass(name = "Tensor", module = "weightlift._native", frozen)]
struct PyTensor {
    tensor: Tensor,
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

    fn dl_device(&self) -> DLDevice {
        match self.tensor.device() {
            Device::Cuda(n) => DLDevice::cuda(n as i32),
            _ => DLDevice::CPU,
        }
    }

    fn dl_dtype(&self) -> PyResult<DLDataType> {
        Ok(match self.tensor.dtype() {
            Dtype::BOOL => DLDataType::BOOL,
            Dtype::U8 => DLDataType::U8,
            Dtype::I8 => DLDataType::I8,
            Dtype::U16 => DLDataType::U16,
            Dtype::I16 => DLDataType::I16,
            Dtype::U32 => DLDataType::U32,
            Dtype::I32 => DLDataType::I32,
            Dtype::U64 => DLDataType::U64,
            Dtype::I64 => DLDataType::I64,
            Dtype::F16 => DLDataType::F16,
            Dtype::BF16 => DLDataType::BF16,
            Dtype::F32 => DLDataType::F32,
            Dtype::F64 => DLDataType::F64,
            Dtype::C64 => DLDataType::C64,
            Dtype::F8_E4M3 => DLDataType::F8E4M3FN,
            Dtype::F8_E5M2 => DLDataType::F8E5M2,
            Dtype::F8_E4M3FNUZ => DLDataType::F8E4M3FNUZ,
            Dtype::F8_E5M2FNUZ => DLDataType::F8E5M2FNUZ,
            Dtype::F8_E8M0 => DLDataType::F8E8M0FNU,
            other => {
                return Err(PyValueError::new_err(format!(
                    "tensor {:?}: {other} has no DLPack type",
                    self.tensor.name()
                )));
            }
        })
    }

    /// A fresh DLPack descriptor of the tensor, owning a clone (which keeps the memory alive).
    fn managed<M: dlpark::ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let t = &self.tensor;
        let data = match t.device_ptr() {
            Some(ptr) => ptr as *mut c_void,
            None => self.host_bytes()?.as_ptr() as *mut c_void,
        };
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        let prepared = Dynamic::compact(shape)
            .prepare_as::<M>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let mut init = prepared.initialize(Box::new(t.clone()));
        init.set_data(data);
        init.set_dtype(self.dl_dtype()?);
        init.set_device(self.dl_device());
        // SAFETY: `data` points to the tensor's bytes (host or device), which the owned
        // clone in the context keeps alive until the consumer calls the deleter; shape and
        // compact strides describe exactly `byte_len` bytes of the tensor's dtype; the
        // descriptor is not marked read-only, and no other Rust reference writes the bytes.
        Ok(unsafe { init.finish() })
    }
}

impl DlpackExporter for PyTensor {
    fn device(&self) -> DLDevice {
        self.dl_device()
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        // Device loads are complete (every copy waited for) before tensors exist.
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.managed()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.managed()
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
        let d = self.dl_device();
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

/// One host allocation (a shard's tensors), as a flat uint8 array interface.
#[pyclass(name = "Memory", module = "weightlift._native", frozen)]
struct PyMemory {
    memory: Arc<weightlift::HostMemory>,
}

#[pymethods]
impl PyMemory {
    /// numpy arrays made from this share the memory and keep it alive.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        array_interface(py, self.memory.as_slice())
    }
}

/// Groups host tensors by allocation: `[(memory, [(name, dtype, shape, offset), ...])]`, so
/// that Python makes one array per allocation and cheap views into it per tensor (43,000
/// tensors cost ~0.07 s that way, against several times that through one object each).
fn grouped<'py>(py: Python<'py>, tensors: Vec<Tensor>) -> PyResult<Bound<'py, PyList>> {
    type Entry = (String, &'static str, Vec<usize>, usize);
    let mut groups: Vec<(Arc<weightlift::HostMemory>, Vec<Entry>)> = Vec::new();
    for t in &tensors {
        let (memory, offset) = t.host_allocation().ok_or_else(|| {
            PyValueError::new_err(format!("tensor {:?} is not in host memory", t.name()))
        })?;
        let entry = (
            t.name().to_string(),
            t.dtype().name(),
            t.shape().to_vec(),
            offset,
        );
        match groups.last_mut() {
            Some((m, entries)) if Arc::ptr_eq(m, memory) => entries.push(entry),
            _ => groups.push((Arc::clone(memory), vec![entry])),
        }
    }
    let items = groups
        .into_iter()
        .map(|(memory, entries)| Ok((Py::new(py, PyMemory { memory })?, entries)))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// An open checkpoint: one file, a directory of shards, an index file, or a URL.
#[pyclass(name = "Checkpoint", module = "weightlift._native", frozen)]
struct PyCheckpoint {
    ckpt: Arc<Checkpoint>,
}

fn backend(name: &str) -> PyResult<Backend> {
    Ok(match name {
        "auto" => Backend::auto(),
        "pread" => Backend::pread(),
        "direct" => Backend::direct(),
        // SAFETY: documented in the Python API: with backend="mmap" files must not be
        // modified or truncated while open (as for safetensors' default mmap backend).
        "mmap" => unsafe { Backend::mmap() },
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown backend {other:?}: use auto, pread, direct or mmap"
            )));
        }
    })
}

fn device(name: &str) -> PyResult<Device> {
    name.parse::<Device>()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

fn tensor_dict<'py>(py: Python<'py>, tensors: Vec<Tensor>) -> PyResult<Bound<'py, PyList>> {
    let items = tensors
        .into_iter()
        .map(|tensor| Py::new(py, PyTensor { tensor }))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

impl PyCheckpoint {
    /// A parallel load without the GIL.
    fn run_load(
        &self,
        py: Python<'_>,
        device: Device,
        threads: Option<usize>,
        prefix: Option<String>,
    ) -> PyResult<Vec<Tensor>> {
        let mut options = LoadOptions::default().device(device);
        if let Some(t) = threads {
            options = options.threads(t.max(1));
        }
        if let Some(p) = prefix {
            options = options.prefix(p);
        }
        let ckpt = Arc::clone(&self.ckpt);
        let state = py.detach(move || ckpt.load(&options)).map_err(py_err)?;
        Ok(state.into_tensors())
    }
}

#[pymethods]
impl PyCheckpoint {
    /// Opens `path` (headers read and validated in parallel, without the GIL); `token` is a
    /// bearer token for http(s) URLs.
    #[new]
    #[pyo3(signature = (path, backend="auto", token=None))]
    fn new(
        py: Python<'_>,
        path: String,
        backend: &str,
        token: Option<String>,
    ) -> PyResult<PyCheckpoint> {
        let mut options = OpenOptions::backend(self::backend(backend)?);
        options.remote.bearer_token = token;
        let ckpt = py
            .detach(|| Checkpoint::open_with(path.as_str(), &options))
            .map_err(py_err)?;
        Ok(PyCheckpoint {
            ckpt: Arc::new(ckpt),
        })
    }

    /// Tensor names, sorted.
    fn keys(&self) -> Vec<&str> {
        self.ckpt.names()
    }

    /// Tensor names in file order (shard by shard, by offset).
    fn offset_keys(&self) -> Vec<&str> {
        self.ckpt.tensors().map(|(_, t)| t.name.as_str()).collect()
    }

    /// The first shard's `__metadata__`, or the index's metadata for a sharded checkpoint
    /// (as strings); None when there is none.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let d = PyDict::new(py);
        if let Some((_, index)) = self.ckpt.index() {
            // Index metadata is JSON (e.g. a numeric total_size): strings, as safetensors gives.
            for (k, v) in &index.metadata {
                match v {
                    serde_json::Value::String(s) => d.set_item(k, s)?,
                    other => d.set_item(k, other.to_string())?,
                }
            }
        } else if let Some(meta) = self
            .ckpt
            .shards()
            .first()
            .and_then(|s| s.header().metadata())
        {
            for (k, v) in meta {
                d.set_item(k, v)?;
            }
        } else {
            return Ok(None);
        }
        Ok(Some(d))
    }

    /// (dtype code, shape) of a tensor.
    fn info(&self, name: &str) -> PyResult<(&'static str, Vec<usize>)> {
        let (_, info) = self
            .ckpt
            .info(name)
            .ok_or_else(|| py_err(Error::NotFound(name.to_string())))?;
        Ok((info.dtype.name(), info.shape.clone()))
    }

    /// Reads one tensor, or the block `ranges` (one (start, stop) per leading dimension).
    #[pyo3(signature = (name, ranges=None))]
    fn get(
        &self,
        py: Python<'_>,
        name: &str,
        ranges: Option<Vec<(usize, usize)>>,
    ) -> PyResult<PyTensor> {
        let ranges: Vec<Range<usize>> = ranges
            .unwrap_or_default()
            .into_iter()
            .map(|(a, b)| a..b)
            .collect();
        let ckpt = Arc::clone(&self.ckpt);
        let name = name.to_string();
        let tensor = py
            .detach(move || ckpt.get_slice(&name, &ranges))
            .map_err(py_err)?;
        Ok(PyTensor { tensor })
    }

    /// Loads every tensor (or those starting with `prefix`) with the parallel loader, onto
    /// `device` ("cpu" or "cuda:N"), without the GIL. Returns tensors in file order.
    #[pyo3(signature = (device="cpu", threads=None, prefix=None))]
    fn load<'py>(
        &self,
        py: Python<'py>,
        device: &str,
        threads: Option<usize>,
        prefix: Option<String>,
    ) -> PyResult<Bound<'py, PyList>> {
        let tensors = self.run_load(py, self::device(device)?, threads, prefix)?;
        tensor_dict(py, tensors)
    }

    /// Like `load` onto the CPU, grouped by allocation (see `grouped`).
    #[pyo3(signature = (threads=None, prefix=None))]
    fn load_host<'py>(
        &self,
        py: Python<'py>,
        threads: Option<usize>,
        prefix: Option<String>,
    ) -> PyResult<Bound<'py, PyList>> {
        let tensors = self.run_load(py, Device::Cpu, threads, prefix)?;
        grouped(py, tensors)
    }

    /// Number of tensors.
    fn __len__(&self) -> usize {
        self.ckpt.len()
    }
}

/// Every tensor of a safetensors file held in `data` (the whole file), in file order:
/// grouped by allocation (see `grouped`) with `group=True`, else one object each.
#[pyfunction]
#[pyo3(signature = (data, group=false))]
fn load_bytes<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
    group: bool,
) -> PyResult<Bound<'py, PyList>> {
    let bytes = data.as_bytes();
    let state = weightlift::load_bytes(bytes).map_err(py_err)?;
    if group {
        grouped(py, state.into_tensors())
    } else {
        tensor_dict(py, state.into_tensors())
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SafetensorError", m.py().get_type::<SafetensorError>())?;
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
    m.add_class::<PyTensor>()?;
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<PyMemory>()?;
    m.add_function(wrap_pyfunction!(load_bytes, m)?)?;
    Ok(())
}
