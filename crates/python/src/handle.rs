//! The open checkpoint behind `safe_open` and `load_checkpoint`: the user's arguments turned
//! into open options (the mapping is decided by the facade's one policy, not here), lazy
//! reads served by a prefetch where there is one, and loads, all without the GIL.

use crate::errors::{open_err, py_err};
use crate::layout::{Layout, grouped, report};
use crate::tensor::PyTensor;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use weightlift::{
    Announcement, Backend, Checkpoint, Device, Dtype, Error, Fill, LoadOptions, Location, Mapping,
    MemoryBudget, OpenOptions, Prefetch, Tensor,
};

/// An open checkpoint: one file, a directory of shards, an index file, a URL or a model id.
#[pyclass(name = "Checkpoint", module = "weightlift._native", frozen)]
pub(crate) struct PyCheckpoint {
    ckpt: Arc<Checkpoint>,
    /// A whole load started ahead of the reads that will want it (see `prefetch`).
    prefetch: OnceLock<Prefetch>,
    /// The files read into the page cache ahead of any reader (see `warm`).
    warm: OnceLock<Prefetch>,
    /// The checkpoint announced to the prefetch window (see `announce`).
    announced: Mutex<Option<Announcement>>,
}

/// Open options for the Python API's `backend` and `copy`: "auto" and "mmap" (safetensors'
/// default, which most callers pass without choosing) leave tensors in mappings of files
/// where the facade's policy maps them (local disks, tmpfs) and read the others into memory
/// of their own; "pread" and "direct" always read; `copy=True` never maps.
fn open_options(path: &str, backend: &str, copy: bool) -> PyResult<OpenOptions> {
    let url = Location::parse(path).is_url();
    let (backend, mapping) = match backend {
        "auto" | "mmap" if copy || url => (Backend::auto(), Mapping::never()),
        // Files that map never go through the read backend, and those that do not (network
        // filesystems) get pread from the automatic rule anyway: skip the rule's page-cache
        // census (~2 ms per file), which only chooses between pread and O_DIRECT.
        // SAFETY: the Python API documents the contract safetensors' own loads have: files
        // must not be modified or truncated while tensors loaded from them live. Users who
        // cannot promise that pass copy=True (or backend="pread").
        "auto" | "mmap" => (Backend::pread(), unsafe { Mapping::auto() }),
        "pread" => (Backend::pread(), Mapping::never()),
        "direct" => (Backend::direct(), Mapping::never()),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown backend {other:?}: use auto, pread, direct or mmap"
            )));
        }
    };
    Ok(OpenOptions::default().backend(backend).mapping(mapping))
}

fn device(name: &str) -> PyResult<Device> {
    name.parse::<Device>()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Where a load puts tensors ("cpu", "cuda:N", "meta"), parsed once when the Python side
/// makes it (`_args.native_device`), then passed to every load as it is.
#[pyclass(
    name = "Device",
    module = "weightlift._native",
    frozen,
    eq,
    hash,
    from_py_object
)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PyDevice {
    device: Device,
}

#[pymethods]
impl PyDevice {
    #[new]
    fn new(name: &str) -> PyResult<PyDevice> {
        Ok(PyDevice {
            device: device(name)?,
        })
    }

    fn __str__(&self) -> String {
        self.device.to_string()
    }

    fn __repr__(&self) -> String {
        format!("Device({:?})", self.device.to_string())
    }
}

impl PyDevice {
    /// Owned host memory: the loads' default.
    const CPU: PyDevice = PyDevice {
        device: Device::Cpu,
    };
}

fn ranges_of(ranges: Option<Vec<(usize, usize)>>) -> Vec<Range<usize>> {
    ranges
        .unwrap_or_default()
        .into_iter()
        .map(|(a, b)| a..b)
        .collect()
}

impl PyCheckpoint {
    /// The checkpoint.
    pub(crate) fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.ckpt
    }

    /// One tensor (or the block `ranges` of it), through the prefetch where there is one.
    fn read(&self, py: Python<'_>, name: &str, ranges: Vec<Range<usize>>) -> PyResult<Tensor> {
        // Without the GIL: a read may wait for the prefetch, and the prefetch's own lock is
        // never held outside the facade (see `weightlift::Prefetch`).
        py.detach(|| match self.prefetch.get() {
            Some(prefetch) => prefetch.get_slice(name, &ranges),
            None => self.ckpt.get_slice(name, &ranges),
        })
        .map_err(py_err)
    }
}

#[pymethods]
impl PyCheckpoint {
    /// Opens `path` (headers read and validated in parallel, without the GIL); `backend`
    /// and `copy` as the Python API takes them (see `open_options`); `token` is a bearer
    /// token for http(s) URLs; `memory_budget` and `prefetch_window` (bytes) the budget every
    /// use of the checkpoint runs under (default: detected, see
    /// `weightlift::MemoryBudget::detect`).
    #[new]
    #[pyo3(signature = (path, backend="auto", copy=false, token=None, memory_budget=None, prefetch_window=None))]
    fn new(
        py: Python<'_>,
        path: String,
        backend: &str,
        copy: bool,
        token: Option<String>,
        memory_budget: Option<u64>,
        prefetch_window: Option<u64>,
    ) -> PyResult<PyCheckpoint> {
        let mut options = open_options(&path, backend, copy)?
            .remote(weightlift::remote::RemoteOptions::default().bearer_token(token));
        if memory_budget.is_some() || prefetch_window.is_some() {
            options = options.memory_budget(MemoryBudget::set(memory_budget, prefetch_window));
        }
        let ckpt = py
            .detach(|| Checkpoint::open_with(path.as_str(), &options))
            .map_err(|e| open_err(&path, e))?;
        Ok(PyCheckpoint {
            ckpt: Arc::new(ckpt),
            prefetch: OnceLock::new(),
            warm: OnceLock::new(),
            announced: Mutex::new(None),
        })
    }

    /// Starts bringing every tensor into memory in the background (see
    /// `weightlift::Prefetch`: through the process's prefetch window, in the order readers
    /// read, never more than the window ahead of them; files that fit loaded whole), so that
    /// the reads that follow find their bytes in memory rather than faulting them in one page
    /// at a time, or waiting for one small request each. `drop_cache`: release the pages of
    /// what readers have read (default: `WEIGHTLIFT_DROP_CACHE`). `threads`: default
    /// `WEIGHTLIFT_PREFETCH_THREADS`, else 2 (callers that prefetch open every shard of a
    /// checkpoint one after the other, so shards prefetched whole load side by side: two
    /// threads each keep a disk queue full without crowding the caller's own threads). Does
    /// nothing when a prefetch was started already. The window is the checkpoint's (see
    /// `new`).
    #[pyo3(signature = (threads=None, drop_cache=None))]
    fn prefetch(&self, py: Python<'_>, threads: Option<usize>, drop_cache: Option<bool>) {
        let threads = threads
            .or_else(weightlift::env::prefetch_threads)
            .unwrap_or(2);
        let options = LoadOptions::default()
            .drop_cache(drop_cache.unwrap_or_else(weightlift::env::drop_cache))
            .threads(threads.max(1));
        py.detach(|| self.prefetch.get_or_init(|| self.ckpt.prefetch(options)));
    }

    /// Tells the process's prefetch window that a prefetch started later will read all of
    /// this checkpoint (see `weightlift::Checkpoint::announce`): for a handle opened among
    /// others before any is read. Taken back by `close`.
    fn announce(&self) {
        let mut announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        if announced.is_none() {
            *announced = Some(self.ckpt.announce());
        }
    }

    /// Starts reading the files into the page cache in the background, where the checkpoint
    /// fits the prefetch window and they are not there already (see
    /// `weightlift::Checkpoint::warm`), for a caller with other work to do first; whether
    /// any file is being read. Called off by `close`.
    fn warm(&self, py: Python<'_>) -> bool {
        py.detach(|| self.warm.get_or_init(|| self.ckpt.warm()).is_active())
    }

    /// Waits (without the GIL) until the warm read started by `warm` has brought in all it
    /// will of the file at `path` (see `weightlift::Prefetch::wait_for_shard`); at once where
    /// no warm read runs or `path` is none of this checkpoint's files.
    fn wait_warm(&self, py: Python<'_>, path: std::path::PathBuf) {
        let Some(warm) = self.warm.get() else {
            return;
        };
        // The path as given first (the folder the checkpoint was opened from, as a rule);
        // resolved only where that finds none, a file system call per shard.
        let shards = self.ckpt.shards();
        let shard = shards
            .iter()
            .position(|shard| shard.path() == Some(path.as_path()))
            .or_else(|| {
                let wanted = std::fs::canonicalize(&path).ok()?;
                shards.iter().position(|shard| {
                    shard
                        .path()
                        .is_some_and(|p| std::fs::canonicalize(p).is_ok_and(|p| p == wanted))
                })
            });
        if let Some(shard) = shard {
            py.detach(|| warm.wait_for_shard(shard));
        }
    }

    /// Starts reading the files into the page cache in the background where they fit the
    /// prefetch window (see `weightlift::Checkpoint::read_ahead`); whether it did.
    fn read_ahead(&self) -> bool {
        self.ckpt.read_ahead()
    }

    /// Calls off a running prefetch (a handle being closed).
    fn close(&self) {
        for prefetch in [self.prefetch.get(), self.warm.get()].into_iter().flatten() {
            prefetch.cancel();
        }
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
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
    /// the block is contiguous) or read into memory of its own, as the checkpoint's mapping
    /// policy says.
    #[pyo3(signature = (name, ranges=None, layout=Layout::Numpy))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        ranges: Option<Vec<(usize, usize)>>,
        layout: Layout,
    ) -> PyResult<Bound<'py, PyTuple>> {
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
    /// `names`: load only these tensors.
    #[pyo3(signature = (device=PyDevice::CPU, threads=None, prefix=None, drop_cache=false, layout=Layout::Numpy, slices=None, names=None))]
    #[allow(clippy::too_many_arguments)]
    fn load<'py>(
        &self,
        py: Python<'py>,
        device: PyDevice,
        threads: Option<usize>,
        prefix: Option<String>,
        drop_cache: bool,
        layout: Layout,
        slices: Option<HashMap<String, Vec<(usize, usize)>>>,
        names: Option<HashSet<String>>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let mut options =
            load_options(device.device, threads, prefix, slices).drop_cache(drop_cache);
        if let Some(names) = names {
            options = options.filter(move |n| names.contains(n));
        }
        let state = py.detach(|| self.ckpt.load(&options)).map_err(py_err)?;
        let files = report(py, state.files())?;
        let tensors = state.into_tensors();
        Ok((grouped(py, &tensors, layout)?, files))
    }

    /// `rank`'s share of a load read by `world` processes (see `weightlift::Share`): every
    /// allocation of the full size, this rank's share read into it. Returns `(groups,
    /// report, spans, digest, read)`: the groups (see `load`) whose memory the caller fills
    /// with the other ranks' spans, `(owner, allocation, start, end)` for every span
    /// (allocation = position in `groups`), the load's digest
    /// (`weightlift::SharedLoad::digest`: equal on every rank that asked for the same load),
    /// and the `(shard, start, end)` file ranges the load read, all ranks together (for
    /// `drop_cache` once every rank is done).
    #[pyo3(signature = (rank, world, device=PyDevice::CPU, threads=None, prefix=None, layout=Layout::Numpy, slices=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn load_share<'py>(
        &self,
        py: Python<'py>,
        rank: usize,
        world: usize,
        device: PyDevice,
        threads: Option<usize>,
        prefix: Option<String>,
        layout: Layout,
        slices: Option<HashMap<String, Vec<(usize, usize)>>>,
    ) -> PyResult<(
        Bound<'py, PyList>,
        Bound<'py, PyList>,
        Vec<(usize, usize, u64, u64)>,
        u64,
        Vec<(usize, u64, u64)>,
    )> {
        let options = load_options(device.device, threads, prefix, slices);
        let (state, spans, digest, read) = py
            .detach(|| {
                let load = self
                    .ckpt
                    .load_share(&options, weightlift::Share { rank, world })?;
                let (spans, read) = share_layout(&load);
                let digest = load.digest();
                Ok::<_, Error>((load.finish(), spans, digest, read))
            })
            .map_err(py_err)?;
        let files = report(py, state.files())?;
        let tensors = state.into_tensors();
        Ok((grouped(py, &tensors, layout)?, files, spans, digest, read))
    }

    /// A host load shared by `world` ranks whose exchange runs while this rank's share is
    /// read (see `weightlift::SharedLoad::exchange`), driven by three callables of the
    /// caller's transport: `begin(groups, report, spans, digest, read)` once planned (as
    /// `load_share` returns them; the groups' memory is filled by the exchange and must not
    /// be read before this call returns), then, once per round, `agree(error)` (this
    /// rank's read failure as a string, or None: the transport tells every rank and raises
    /// where any failed) and `send(owner, allocation, start, end)` per piece (the owner
    /// broadcasts those bytes of `groups[allocation]`'s memory, the others receive them).
    /// An exception from a callable ends the load with it.
    #[pyo3(signature = (rank, world, chunk, begin, agree, send, threads=None, prefix=None, layout=Layout::Numpy, slices=None))]
    #[allow(clippy::too_many_arguments)]
    fn load_share_exchanged(
        &self,
        py: Python<'_>,
        rank: usize,
        world: usize,
        chunk: u64,
        begin: Py<PyAny>,
        agree: Py<PyAny>,
        send: Py<PyAny>,
        threads: Option<usize>,
        prefix: Option<String>,
        layout: Layout,
        slices: Option<HashMap<String, Vec<(usize, usize)>>>,
    ) -> PyResult<()> {
        let options = load_options(Device::Cpu, threads, prefix, slices);
        let ckpt = &self.ckpt;
        let mut load = py
            .detach(|| ckpt.plan_share(&options, weightlift::Share { rank, world }))
            .map_err(py_err)?;
        let (spans, read) = share_layout(&load);
        // SAFETY: the Python side (`weightlift._distributed`) reads no byte of these tensors
        // before this call returns, and writes only the pieces `send` names for other ranks
        // (broadcasts into them); a failed load's tensors are dropped unread.
        let state = unsafe { load.state_before_exchange() };
        let files = report(py, state.files())?;
        let groups = grouped(py, &state.into_tensors(), layout)?;
        begin.call1(py, (groups, files, spans, load.digest(), read))?;
        py.detach(|| {
            load.exchange_spans(
                chunk,
                |mine| {
                    let mine = mine.map(|e| e.to_string());
                    Python::attach(|py| agree.call1(py, (mine,)).map(drop))
                },
                |span| {
                    let at = (
                        span.owner,
                        span.allocation,
                        span.range.start,
                        span.range.end,
                    );
                    Python::attach(|py| send.call1(py, at).map(drop))
                },
            )
        })
        .map_err(|e| match e {
            weightlift::ExchangeError::Load(e) => py_err(e),
            weightlift::ExchangeError::Transport(e) => e,
        })
    }

    /// Drops `ranges` (`(shard, start, end)`, as `load_share` returns them) from the page
    /// cache.
    fn drop_cache(&self, py: Python<'_>, ranges: Vec<(usize, u64, u64)>) {
        let ranges: Vec<(usize, Range<u64>)> =
            ranges.into_iter().map(|(s, a, b)| (s, a..b)).collect();
        py.detach(|| self.ckpt.drop_cache(&ranges));
    }

    /// Reads blocks of tensors straight into memory the caller owns (see `weightlift::Fill`),
    /// without the GIL. `fills`: `Fill`s, each naming a destination by its position in
    /// `dests`; `dests`: torch tensors whose storages are filled (at each fill's byte offset
    /// from the storage's start), on `device`: "cpu", or "cuda:N" (filled through a pinned
    /// staging pool kept for the process; the caller synchronizes the device first, so that
    /// no queued work touches them). `max_gap`: see `LoadOptions::max_gap`. Returns `(bytes
    /// read, reads made)`.
    ///
    /// The storages' addresses and lengths are taken here, from the tensors, which this call
    /// holds until it returns; what stays the caller's part is that nothing else reads or
    /// writes them meanwhile (the GIL is released).
    #[pyo3(signature = (fills, dests, threads=None, max_gap=None, device=PyDevice::CPU))]
    fn load_into(
        &self,
        py: Python<'_>,
        fills: Vec<PyRef<'_, PyFill>>,
        dests: Vec<Bound<'_, PyAny>>,
        threads: Option<usize>,
        max_gap: Option<u64>,
        device: PyDevice,
    ) -> PyResult<(u64, usize)> {
        let device = device.device;
        let fills: Vec<Fill> = fills.iter().map(|f| f.fill.clone()).collect();
        // Each destination's storage: (address, length), checked to be on `device`.
        let dests = dests
            .iter()
            .map(|tensor| {
                let on = tensor.getattr("device")?.str()?.to_string();
                let on = match on.as_str() {
                    "cuda" => "cuda:0".to_string(),
                    _ => on,
                };
                if self::device(&on)? != device {
                    return Err(PyValueError::new_err(format!(
                        "a destination is on {on}, the load fills {device:?}"
                    )));
                }
                let storage = tensor.call_method0("untyped_storage")?;
                let address: usize = storage.call_method0("data_ptr")?.extract()?;
                let len: usize = storage.call_method0("nbytes")?.extract()?;
                Ok((address, len))
            })
            .collect::<PyResult<Vec<(usize, usize)>>>()?;
        // Distinct destinations must not share bytes: each becomes its own `&mut [u8]`.
        let mut spans: Vec<(usize, usize)> = dests.iter().map(|&(a, n)| (a, a + n)).collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(PyValueError::new_err(
                "two destinations share memory: pass each storage once",
            ));
        }
        if dests.iter().any(|&(address, len)| address == 0 && len > 0) {
            return Err(PyValueError::new_err("a destination has no memory"));
        }
        let mut options = LoadOptions::default();
        if let Some(t) = threads {
            options = options.threads(t.max(1));
        }
        if let Some(gap) = max_gap {
            options = options.max_gap(gap);
        }
        let ckpt = &self.ckpt;
        let report = match device {
            Device::Cpu => py.detach(move || {
                let dests: Vec<&mut [u8]> = dests
                    .iter()
                    .map(|&(address, len)| {
                        if len == 0 {
                            return &mut [][..];
                        }
                        // SAFETY: `(address, len)` is the storage of a CPU tensor this call
                        // holds (`dests`, alive until it returns), read from torch above;
                        // nothing else touches it meanwhile (this method's contract, kept by
                        // the Python glue, which passes tensors it just allocated); no two
                        // destinations overlap (checked above), so the slices are disjoint.
                        unsafe { std::slice::from_raw_parts_mut(address as *mut u8, len) }
                    })
                    .collect();
                ckpt.load_into(&fills, dests, &options)
            }),
            Device::Cuda(ordinal) => py.detach(move || {
                let target = crate::staging::cuda(ordinal)?;
                let mut memories: Vec<_> = dests
                    .iter()
                    // SAFETY: `(address, len)` is the storage of a tensor on GPU `ordinal`
                    // (torch's, in the primary context) this call holds until it returns,
                    // checked above to be on that device; no work is queued on it and nothing
                    // else touches it meanwhile (this method's contract, kept by the Python
                    // glue, which synchronizes the device first); no two overlap (checked
                    // above).
                    .map(|&(address, len)| unsafe {
                        target.engine().borrow(address as u64, len as u64)
                    })
                    .collect();
                ckpt.load_into_staged(&fills, memories.iter_mut().collect(), &target, &options)
            }),
            other => {
                return Err(PyValueError::new_err(format!(
                    "load_into fills CPU or CUDA memory, not {other}"
                )));
            }
        }
        .map_err(py_err)?;
        Ok((report.bytes_read, report.requests))
    }

    /// `(name, shape)` of every tensor, in file order.
    fn shapes(&self) -> Vec<(&str, Vec<usize>)> {
        self.ckpt
            .tensors()
            .map(|(_, t)| (t.name.as_str(), t.shape.clone()))
            .collect()
    }

    /// `(name, dtype code, shape, shard, start)` of every tensor, in file order: `shard` the
    /// position of its file among the checkpoint's, `start` the byte offset of its data in
    /// that file (for callers that map the files themselves and must tell which tensor a
    /// pointer into the mapping belongs to).
    #[allow(clippy::type_complexity)]
    fn spans(&self) -> Vec<(&str, &'static str, Vec<usize>, usize, u64)> {
        let at: HashMap<*const weightlift::Shard, usize> = self
            .ckpt
            .shards()
            .iter()
            .enumerate()
            .map(|(i, s)| (s as *const _, i))
            .collect();
        self.ckpt
            .tensors()
            .map(|(shard, t)| {
                let at = at.get(&(shard as *const _)).copied().unwrap_or(0);
                (
                    t.name.as_str(),
                    t.dtype.name(),
                    t.shape.clone(),
                    at,
                    shard.header().data_start() + t.data_offsets.0,
                )
            })
            .collect()
    }

    /// Number of tensors.
    fn __len__(&self) -> usize {
        self.ckpt.len()
    }
}

/// A shared load's spans, `(owner, allocation, start, end)`, and the file ranges it reads,
/// `(shard, start, end)`, as `load_share` and `load_share_exchanged` hand them to Python.
#[allow(clippy::type_complexity)]
fn share_layout(
    load: &weightlift::SharedLoad<'_>,
) -> (Vec<(usize, usize, u64, u64)>, Vec<(usize, u64, u64)>) {
    let spans = load
        .spans()
        .iter()
        .map(|s| (s.owner, s.allocation, s.range.start, s.range.end))
        .collect();
    let read = load
        .read_ranges()
        .into_iter()
        .map(|(s, r)| (s, r.start, r.end))
        .collect();
    (spans, read)
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

/// One block of a tensor to read into a destination of `Checkpoint.load_into` (see
/// `weightlift::Fill`): made once, with keywords, checked against the file by the load.
#[pyclass(name = "Fill", module = "weightlift._native", frozen)]
pub(crate) struct PyFill {
    fill: Fill,
}

#[pymethods]
impl PyFill {
    /// `name`: the tensor; `dest`: the destination's position in the load's `dests`;
    /// `offset`: bytes from the destination storage's start; `block`: `(start, end)` per
    /// leading dimension (None: the whole tensor); `shape`: the block's shape the destination
    /// expects; `strides`: the destination's, in elements (None: C-contiguous); `dtype`: a
    /// safetensors dtype name to convert to; `view`: the block's elements seen as this shape
    /// before the strides place them (see `weightlift::Fill::view`).
    #[new]
    #[pyo3(signature = (name, dest, offset, block=None, shape=None, strides=None, dtype=None, view=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        dest: usize,
        offset: u64,
        block: Option<Vec<(usize, usize)>>,
        shape: Option<Vec<usize>>,
        strides: Option<Vec<u64>>,
        dtype: Option<&str>,
        view: Option<Vec<usize>>,
    ) -> PyResult<PyFill> {
        let mut fill = Fill::new(name, dest, offset);
        if let Some(block) = block {
            fill = fill.block(block.into_iter().map(|(a, b)| a..b).collect());
        }
        if let Some(shape) = shape {
            fill = fill.shape(shape);
        }
        if let Some(strides) = strides {
            fill = fill.strides(strides);
        }
        if let Some(code) = dtype {
            let dtype = Dtype::from_name(code)
                .ok_or_else(|| PyValueError::new_err(format!("unknown dtype {code:?}")))?;
            fill = fill.dtype(dtype);
        }
        if let Some(view) = view {
            fill = fill.view(view);
        }
        Ok(PyFill { fill })
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.fill)
    }
}
