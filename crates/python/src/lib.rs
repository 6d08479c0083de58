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
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use weightlift::device::DeviceMemory;
use weightlift::{
    Backend, Checkpoint, Device, Dtype, Error, FileReport, HostMemory, LoadOptions, Mapping,
    OpenOptions, Placement, Tensor,
};

create_exception!(
    weightlift,
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
        dl_device(self.tensor.device())
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

/// One host allocation (a shard's tensors: owned memory or a file's private mapping), as a
/// flat uint8 array interface.
#[pyclass(name = "Memory", module = "weightlift._native", frozen)]
struct PyMemory {
    memory: Arc<HostMemory>,
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
struct PyDeviceMemory {
    memory: Arc<dyn DeviceMemory>,
}

impl PyDeviceMemory {
    fn managed<M: dlpark::ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let prepared = Dynamic::compact(vec![self.memory.len() as i64])
            .prepare_as::<M>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let mut init = prepared.initialize(Box::new(Arc::clone(&self.memory)));
        init.set_data(self.memory.device_ptr() as *mut c_void);
        init.set_dtype(DLDataType::U8);
        init.set_device(dl_device(self.memory.device()));
        // SAFETY: the pointer is the start of the device allocation, which the `Arc` in the
        // context keeps alive until the consumer calls the deleter; the shape describes its
        // exact length in bytes; every copy into it completed before the load returned.
        Ok(unsafe { init.finish() })
    }
}

impl DlpackExporter for PyDeviceMemory {
    fn device(&self) -> DLDevice {
        dl_device(self.memory.device())
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
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

fn dl_device(device: Device) -> DLDevice {
    match device {
        Device::Cuda(n) => DLDevice::cuda(n as i32),
        _ => DLDevice::CPU,
    }
}

/// How tensors are described to the Python side, which makes the arrays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// numpy: `(name, dtype code, shape, byte offset)`.
    Numpy,
    /// torch: `(name, dtype code, shape, strides, element offset, byte offset)`, shapes
    /// and strides as torch counts them (F4 packs two elements per byte: the last dimension
    /// is halved), the element offset -1 where the byte offset is not a multiple of the
    /// element size (such a tensor is copied).
    Torch,
}

fn layout(name: &str) -> PyResult<Layout> {
    match name {
        "np" => Ok(Layout::Numpy),
        "pt" => Ok(Layout::Torch),
        other => Err(PyValueError::new_err(format!("unknown layout {other:?}"))),
    }
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
fn grouped<'py>(
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
fn report<'py>(py: Python<'py>, files: &[FileReport]) -> PyResult<Bound<'py, PyList>> {
    let items = files
        .iter()
        .map(|f| {
            let d = PyDict::new(py);
            d.set_item("file", f.location.to_string())?;
            d.set_item(
                "placement",
                match f.placement {
                    Placement::Owned => "owned",
                    Placement::Mapped => "mapped",
                    Placement::Device => "device",
                    Placement::Meta => "meta",
                },
            )?;
            d.set_item("reason", &f.reason)?;
            d.set_item("bytes_read", f.bytes_read)?;
            Ok(d)
        })
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// Whether loads may map files: the Python API's `copy=`/`backend=` turned into a mode.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MapMode {
    Never,
    Always,
    Auto,
}

impl MapMode {
    fn parse(name: &str) -> PyResult<MapMode> {
        match name {
            "never" => Ok(MapMode::Never),
            "always" => Ok(MapMode::Always),
            "auto" => Ok(MapMode::Auto),
            other => Err(PyValueError::new_err(format!(
                "unknown mapping {other:?}: use never, always or auto"
            ))),
        }
    }

    fn mapping(self) -> Mapping {
        match self {
            MapMode::Never => Mapping::never(),
            // SAFETY: the Python API documents the contract safetensors' own loads have: files
            // must not be modified or truncated while tensors loaded from them live. Users who
            // cannot promise that pass copy=True (or backend="pread").
            MapMode::Always => unsafe { Mapping::always() },
            // SAFETY: as above.
            MapMode::Auto => unsafe { Mapping::auto() },
        }
    }
}

/// An open checkpoint: one file, a directory of shards, an index file, or a URL.
#[pyclass(name = "Checkpoint", module = "weightlift._native", frozen)]
struct PyCheckpoint {
    ckpt: Arc<Checkpoint>,
    mode: MapMode,
    /// Per shard: whether lazy reads map it (decided on first use).
    maps: Mutex<HashMap<usize, bool>>,
    /// A whole load started ahead of the reads that will want it (see `prefetch`). Locked
    /// only with the GIL released: a thread waiting for the prefetch holds this lock, then
    /// needs the GIL back, so a thread holding the GIL must never wait for this lock.
    prefetch: Mutex<Prefetch>,
    /// Calls off the prefetch (set by `close` and drop; read by the load between requests).
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// A load running in the background for a handle, then its result.
enum Prefetch {
    None,
    Running {
        thread: std::thread::JoinHandle<weightlift::Result<weightlift::StateDict>>,
    },
    /// The finished load (`None`: it failed; reads then go to the files themselves and
    /// report their own errors).
    Done(Option<Arc<weightlift::StateDict>>),
}

impl Drop for PyCheckpoint {
    fn drop(&mut self) {
        self.cancel();
    }
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

impl PyCheckpoint {
    /// Whether lazy reads of shard `s` map the file.
    fn maps_shard(&self, s: usize) -> bool {
        match self.mode {
            MapMode::Never => false,
            MapMode::Always => true,
            MapMode::Auto => {
                let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                *maps.entry(s).or_insert_with(|| {
                    self.ckpt.shards()[s]
                        .path()
                        .is_some_and(|p| weightlift::storage::map_advice(p).0)
                })
            }
        }
    }

    /// Calls off a prefetch that is still running (it stops before its next request).
    fn cancel(&self) {
        self.cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The prefetched state dict, once it is complete; `None` without a prefetch or when it
    /// failed. Waits without the GIL, and takes the lock only without it (see `prefetch`):
    /// taking it with the GIL held deadlocks against a thread that waited for the prefetch
    /// under the lock and now wants the GIL back (transformers' converter threads did).
    fn prefetched(&self, py: Python<'_>) -> Option<Arc<weightlift::StateDict>> {
        py.detach(|| {
            let mut state = self.prefetch.lock().unwrap_or_else(|e| e.into_inner());
            if let Prefetch::Running { .. } = &*state {
                let Prefetch::Running { thread } = std::mem::replace(&mut *state, Prefetch::None)
                else {
                    unreachable!("matched above")
                };
                *state = Prefetch::Done(match thread.join() {
                    Ok(Ok(dict)) => Some(Arc::new(dict)),
                    _ => None,
                });
            }
            match &*state {
                Prefetch::Done(dict) => dict.clone(),
                _ => None,
            }
        })
    }

    /// One tensor (or the block `ranges` of it), mapped or read as the handle's mode says;
    /// from a prefetched load where there is one for a file that is not mapped.
    fn read(&self, py: Python<'_>, name: &str, ranges: Vec<Range<usize>>) -> PyResult<Tensor> {
        let shard = self
            .ckpt
            .shards()
            .iter()
            .position(|s| s.header().get(name).is_some())
            .ok_or_else(|| py_err(Error::NotFound(name.to_string())))?;
        let mapped = self.maps_shard(shard);
        if !mapped
            && let Some(dict) = self.prefetched(py)
            && let Some(t) = dict.get(name)
        {
            return t.slice(&ranges).map_err(py_err);
        }
        let ckpt = Arc::clone(&self.ckpt);
        let name = name.to_string();
        py.detach(move || {
            if mapped {
                // SAFETY: see `MapMode::mapping`: the Python API's documented contract.
                unsafe { ckpt.get_mapped(&name, &ranges) }
            } else {
                ckpt.get_slice(&name, &ranges)
            }
        })
        .map_err(py_err)
    }
}

fn ranges_of(ranges: Option<Vec<(usize, usize)>>) -> Vec<Range<usize>> {
    ranges
        .unwrap_or_default()
        .into_iter()
        .map(|(a, b)| a..b)
        .collect()
}

#[pymethods]
impl PyCheckpoint {
    /// Opens `path` (headers read and validated in parallel, without the GIL); `token` is a
    /// bearer token for http(s) URLs; `mapping` ("never", "always", "auto") says whether CPU
    /// loads and lazy reads may leave tensors in private mappings of local files.
    #[new]
    #[pyo3(signature = (path, backend="auto", token=None, mapping="never"))]
    fn new(
        py: Python<'_>,
        path: String,
        backend: &str,
        token: Option<String>,
        mapping: &str,
    ) -> PyResult<PyCheckpoint> {
        let mode = MapMode::parse(mapping)?;
        let mut options = OpenOptions::backend(self::backend(backend)?);
        options.remote.bearer_token = token;
        let ckpt = py
            .detach(|| Checkpoint::open_with(path.as_str(), &options))
            .map_err(py_err)?;
        Ok(PyCheckpoint {
            ckpt: Arc::new(ckpt),
            mode,
            maps: Mutex::new(HashMap::new()),
            prefetch: Mutex::new(Prefetch::None),
            cancel: Arc::default(),
        })
    }

    /// Starts loading every tensor in the background (mapped and populated for files that
    /// map, read into memory of its own for the others), so that the reads that follow find
    /// their bytes in memory rather than faulting them in one page at a time, or waiting
    /// for one small request each. Does nothing when a prefetch was started already.
    #[pyo3(signature = (threads=None))]
    fn prefetch(&self, py: Python<'_>, threads: Option<usize>) {
        let mut options = LoadOptions::default()
            .mapping(self.mode.mapping())
            .cancel(Arc::clone(&self.cancel));
        if let Some(t) = threads {
            options = options.threads(t.max(1));
        }
        py.detach(|| {
            let mut state = self.prefetch.lock().unwrap_or_else(|e| e.into_inner());
            if !matches!(&*state, Prefetch::None) {
                return;
            }
            let ckpt = Arc::clone(&self.ckpt);
            let thread = std::thread::Builder::new()
                .name("weightlift-prefetch".into())
                .spawn(move || ckpt.load(&options));
            if let Ok(thread) = thread {
                *state = Prefetch::Running { thread };
            }
        });
    }

    /// Calls off a running prefetch (a handle being closed).
    fn close(&self) {
        self.cancel();
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

    /// One tensor, or the block `ranges` (one (start, stop) per leading dimension), as
    /// `(memory, entry)` in `layout` ("np" or "pt"; see `Layout`). Mapped (a view where
    /// the block is contiguous) or read into owned memory, as the handle's mapping says.
    #[pyo3(signature = (name, ranges=None, layout="np"))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        ranges: Option<Vec<(usize, usize)>>,
        layout: &str,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let layout = self::layout(layout)?;
        let tensor = self.read(py, name, ranges_of(ranges))?;
        let groups = grouped(py, std::slice::from_ref(&tensor), layout)?;
        let group = groups.get_item(0)?;
        let (memory, entries): (Bound<'py, PyAny>, Bound<'py, PyList>) = group.extract()?;
        (memory, entries.get_item(0)?).into_pyobject(py)
    }

    /// One tensor as a native object (DLPack and `__array_interface__` exporter).
    #[pyo3(signature = (name, ranges=None))]
    fn tensor(
        &self,
        py: Python<'_>,
        name: &str,
        ranges: Option<Vec<(usize, usize)>>,
    ) -> PyResult<PyTensor> {
        Ok(PyTensor {
            tensor: self.read(py, name, ranges_of(ranges))?,
        })
    }

    /// Loads every tensor (or those starting with `prefix`) with the parallel loader, onto
    /// `device` ("cpu" or "cuda:N"), without the GIL. Returns `(groups, report)`: tensors
    /// grouped by allocation in `layout` (see `grouped`), and one dict per file saying where
    /// its tensors went and why.
    /// `slices` maps tensor names to the block to load (one (start, stop) per leading
    /// dimension); the others load whole.
    #[pyo3(signature = (device="cpu", threads=None, prefix=None, drop_cache=false, layout="np", slices=None))]
    #[allow(clippy::too_many_arguments)]
    fn load<'py>(
        &self,
        py: Python<'py>,
        device: &str,
        threads: Option<usize>,
        prefix: Option<String>,
        drop_cache: bool,
        layout: &str,
        slices: Option<HashMap<String, Vec<(usize, usize)>>>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let layout = self::layout(layout)?;
        let options = load_options(self::device(device)?, threads, prefix, slices)
            .mapping(self.mode.mapping())
            .drop_cache(drop_cache);
        let ckpt = Arc::clone(&self.ckpt);
        let state = py.detach(move || ckpt.load(&options)).map_err(py_err)?;
        let files = report(py, state.files())?;
        let tensors = state.into_tensors();
        Ok((grouped(py, &tensors, layout)?, files))
    }

    /// `rank`'s share of a load read by `world` processes (see `weightlift::Share`): every
    /// allocation of the full size, this rank's share read into it. Returns `(groups,
    /// report, spans, digest)`: the groups (see `load`) whose memory the caller fills with
    /// the other ranks' spans, `(owner, allocation, start, end)` for every span (allocation =
    /// position in `groups`), and a digest of what the load covers (equal on every rank that
    /// asked for the same load).
    #[pyo3(signature = (rank, world, device="cpu", threads=None, prefix=None, layout="np", slices=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn load_share<'py>(
        &self,
        py: Python<'py>,
        rank: usize,
        world: usize,
        device: &str,
        threads: Option<usize>,
        prefix: Option<String>,
        layout: &str,
        slices: Option<HashMap<String, Vec<(usize, usize)>>>,
    ) -> PyResult<(
        Bound<'py, PyList>,
        Bound<'py, PyList>,
        Vec<(usize, usize, u64, u64)>,
        u64,
    )> {
        let layout = self::layout(layout)?;
        let options = load_options(self::device(device)?, threads, prefix, slices);
        let ckpt = Arc::clone(&self.ckpt);
        let (state, spans) = py
            .detach(move || {
                let load = ckpt.load_share(&options, weightlift::Share { rank, world })?;
                let spans: Vec<_> = load
                    .spans()
                    .iter()
                    .map(|s| (s.owner, s.allocation, s.range.start, s.range.end))
                    .collect();
                Ok::<_, Error>((load.finish(), spans))
            })
            .map_err(py_err)?;
        let files = report(py, state.files())?;
        let tensors = state.into_tensors();
        let digest = plan_digest(&self.ckpt.location().to_string(), &tensors);
        Ok((grouped(py, &tensors, layout)?, files, spans, digest))
    }

    /// `(name, shape)` of every tensor, in file order.
    fn shapes(&self) -> Vec<(&str, Vec<usize>)> {
        self.ckpt
            .tensors()
            .map(|(_, t)| (t.name.as_str(), t.shape.clone()))
            .collect()
    }

    /// Number of tensors.
    fn __len__(&self) -> usize {
        self.ckpt.len()
    }
}

/// Load options from the Python arguments shared by `load` and `load_share`.
fn load_options(
    device: Device,
    threads: Option<usize>,
    prefix: Option<String>,
    slices: Option<HashMap<String, Vec<(usize, usize)>>>,
) -> LoadOptions {
    let mut options = LoadOptions::default().device(device);
    if let Some(t) = threads {
        options = options.threads(t.max(1));
    }
    if let Some(p) = prefix {
        options = options.prefix(p);
    }
    if let Some(map) = slices {
        let map: HashMap<String, Vec<Range<usize>>> = map
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(|(a, b)| a..b).collect()))
            .collect();
        options = options.slices(move |name, _| map.get(name).cloned());
    }
    options
}

/// What a load covers, as a number every rank of a shared load computes alike: the
/// checkpoint, and every tensor's name, dtype and shape as loaded.
fn plan_digest(location: &str, tensors: &[Tensor]) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same input gives the same number in every process.
    let mut h = std::hash::DefaultHasher::new();
    location.hash(&mut h);
    for t in tensors {
        (t.name(), t.dtype().name(), t.shape()).hash(&mut h);
    }
    h.finish()
}

/// Every tensor of a safetensors file held in `data` (the whole file), in file order,
/// grouped by allocation in `layout` (see `grouped`).
#[pyfunction]
#[pyo3(signature = (data, layout="np"))]
fn load_bytes<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
    layout: &str,
) -> PyResult<Bound<'py, PyList>> {
    let layout = self::layout(layout)?;
    let bytes = data.as_bytes();
    let state = weightlift::load_bytes(bytes).map_err(py_err)?;
    grouped(py, &state.into_tensors(), layout)
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
    m.add_class::<PyDeviceMemory>()?;
    m.add_function(wrap_pyfunction!(load_bytes, m)?)?;
    Ok(())
}
