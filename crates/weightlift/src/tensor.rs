//! Loaded tensors, the state dict that owns them, and borrowed views.

use crate::error::{Error, Result};
use crate::exec::fill_target;
use crate::memory::HostMemory;
use std::ops::Range;
use std::sync::Arc;
use weightlift_device::{CopyEngine, Device, DeviceMemory, HostBuffer, StagedTarget, StagingStats};
use weightlift_format::{Dtype, TensorInfo};
use weightlift_storage::Location;

/// An element type with a safetensors dtype, for typed views.
pub trait Element: bytemuck::Pod {
    /// The dtype whose elements are `Self`.
    const DTYPE: Dtype;
}

macro_rules! elements {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DTYPE: Dtype = Dtype::$d; })*
    };
}

elements!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32,
    u64 => U64, i64 => I64, f32 => F32, f64 => F64,
    half::f16 => F16, half::bf16 => BF16,
);

/// Where a tensor's bytes are.
#[derive(Debug, Clone)]
pub(crate) enum Storage {
    /// In host memory shared with the other tensors of the same allocation.
    Host {
        memory: Arc<HostMemory>,
        offset: usize,
    },
    /// In device memory (a GPU) shared with the other tensors of the same allocation.
    Device {
        memory: Arc<dyn DeviceMemory>,
        offset: u64,
    },
    /// Nowhere: a meta tensor has a dtype and a shape only.
    Meta,
}

impl Storage {
    /// The same memory, at `offset`.
    pub(crate) fn at(&self, offset: u64) -> Storage {
        match self {
            Storage::Host { memory, .. } => Storage::Host {
                memory: Arc::clone(memory),
                offset: offset as usize,
            },
            Storage::Device { memory, .. } => Storage::Device {
                memory: Arc::clone(memory),
                offset,
            },
            Storage::Meta => Storage::Meta,
        }
    }
}

/// A loaded tensor: name, dtype, shape and (unless meta) its bytes, which it keeps alive.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) byte_len: usize,
    pub(crate) storage: Storage,
}

impl Tensor {
    /// The tensor a header entry becomes when loaded as `dtype` into `storage`: all of it,
    /// or the block of shape `block` (elements in C order).
    pub(crate) fn from_info(
        info: &TensorInfo,
        dtype: Dtype,
        block: Option<Vec<usize>>,
        storage: Storage,
    ) -> Tensor {
        let shape = block.unwrap_or_else(|| info.shape.clone());
        let elements: u64 = shape.iter().map(|&d| d as u64).product();
        Tensor {
            name: info.name.clone(),
            dtype,
            byte_len: (elements * dtype.bits() as u64).div_ceil(8) as usize,
            shape,
            storage,
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes (also for a meta tensor, which holds none).
    pub fn byte_len(&self) -> usize {
        self.byte_len
    }

    /// Whether this is a meta tensor (no bytes).
    pub fn is_meta(&self) -> bool {
        matches!(self.storage, Storage::Meta)
    }

    /// The device the bytes are on.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host { .. } => Device::Cpu,
            Storage::Device { memory, .. } => memory.device(),
            Storage::Meta => Device::Meta,
        }
    }

    /// The raw little-endian bytes in host memory; `None` for a meta tensor or one on a
    /// device (see [`Tensor::to_host`]).
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Host { memory, offset } => {
                Some(&memory.as_slice()[*offset..*offset + self.byte_len])
            }
            Storage::Device { .. } | Storage::Meta => None,
        }
    }

    /// The host allocation holding the bytes (shared with the other tensors of its shard)
    /// and the offset of the first byte in it: what bindings need to hand out many arrays
    /// over one buffer. `None` for device and meta tensors.
    pub fn host_allocation(&self) -> Option<(&Arc<HostMemory>, usize)> {
        match &self.storage {
            Storage::Host { memory, offset } => Some((memory, *offset)),
            _ => None,
        }
    }

    /// The device allocation holding the bytes (shared with the other tensors of its
    /// shard) and the offset of the first byte in it: what bindings need to hand out many
    /// device tensors over one allocation. `None` for host and meta tensors.
    pub fn device_allocation(&self) -> Option<(&Arc<dyn DeviceMemory>, u64)> {
        match &self.storage {
            Storage::Device { memory, offset } => Some((memory, *offset)),
            _ => None,
        }
    }

    /// The device address of the first byte, for a tensor on a device (to hand to other
    /// libraries, e.g. through DLPack). The tensor (or a clone) must outlive its use.
    pub fn device_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Device { memory, offset } => Some(memory.device_ptr() + offset),
            _ => None,
        }
    }

    /// A copy of this tensor in the device memory of `target`, through its staging
    /// buffers and pipeline (as a load goes): how a slice read with
    /// [`crate::Checkpoint::get_slice`] goes to a GPU.
    pub fn to_device<E: CopyEngine>(&self, target: &StagedTarget<E>) -> Result<Tensor> {
        let host = self.to_host()?;
        let bytes = host.bytes().unwrap_or_default();
        let len = bytes.len() as u64;
        let step = target.buffer_size() as u64;
        // One job per staging buffer: the destination range and the bytes that fill it.
        let jobs: Vec<(Range<u64>, Range<usize>)> = (0..len)
            .step_by(step as usize)
            .map(|start| {
                let end = (start + step).min(len);
                (start..end, start as usize..end as usize)
            })
            .collect();
        // In order: each copy runs while the next buffer fills.
        let mut memories = fill_target(target, &[len], &[jobs], None, |src, buf| {
            buf.copy_from_slice(&bytes[src.clone()]);
            Ok(())
        })?;
        let memory: Arc<dyn DeviceMemory> = Arc::new(memories.pop().expect("one allocation"));
        Ok(Tensor {
            storage: Storage::Device { memory, offset: 0 },
            ..self.clone()
        })
    }

    /// A copy of this tensor on `device`: [`Tensor::to_host`] for the CPU; for
    /// `Device::Cuda` (feature `cuda`) through a staging pool made for the copy.
    pub fn to(&self, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => self.to_host(),
            Device::Meta => Ok(Tensor {
                storage: Storage::Meta,
                ..self.clone()
            }),
            Device::Cuda(ordinal) => self.to_cuda(ordinal),
        }
    }

    #[cfg(feature = "cuda")]
    fn to_cuda(&self, ordinal: usize) -> Result<Tensor> {
        let default = weightlift_device::StagingOptions::default();
        let staging = weightlift_device::StagingOptions::new(
            2,
            self.byte_len.clamp(4096, default.buffer_size),
        );
        self.to_device(&StagedTarget::cuda(ordinal, 1, staging)?)
    }

    #[cfg(not(feature = "cuda"))]
    fn to_cuda(&self, ordinal: usize) -> Result<Tensor> {
        Err(weightlift_device::cuda_not_built(ordinal).into())
    }

    /// The tensor in host memory: itself for a CPU tensor (shared, no copy); a copy for a
    /// device tensor. Meta tensors have no bytes to copy.
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Host { .. } => Ok(self.clone()),
            Storage::Device { memory, offset } => {
                let mut buf = HostBuffer::new(self.byte_len as u64)?;
                memory.read_back(*offset, buf.as_mut_slice())?;
                Ok(Tensor {
                    storage: Storage::Host {
                        memory: Arc::new(HostMemory::owned(buf)),
                        offset: 0,
                    },
                    ..self.clone()
                })
            }
            Storage::Meta => Err(Error::TypedView {
                tensor: self.name.clone(),
                reason: "a meta tensor has no data to copy".into(),
            }),
        }
    }

    /// The sub-block `ranges` of a tensor in host memory (one range per leading dimension,
    /// as [`crate::Checkpoint::get_slice`] takes them): a view sharing the memory when the
    /// block's bytes are contiguous (the whole tensor, or ranges on the leading dimension),
    /// else a copy.
    pub fn slice(&self, ranges: &[std::ops::Range<usize>]) -> Result<Tensor> {
        let Storage::Host { memory, offset } = &self.storage else {
            return Err(Error::InvalidSlice {
                tensor: self.name.clone(),
                reason: format!("the data is on {}: slice it there", self.device()),
            });
        };
        if ranges.is_empty() {
            return Ok(self.clone());
        }
        let plan = crate::slice::plan(&self.shape, ranges, self.dtype.bits() as u64).map_err(
            |reason| Error::InvalidSlice {
                tensor: self.name.clone(),
                reason,
            },
        )?;
        let total: u64 = plan.runs.iter().map(|r| r.1).sum();
        let storage = match plan.runs.as_slice() {
            [] => Storage::Host {
                memory: Arc::clone(memory),
                offset: *offset,
            },
            [(at, _)] => Storage::Host {
                memory: Arc::clone(memory),
                offset: offset + *at as usize,
            },
            runs => {
                let bytes = &memory.as_slice()[*offset..*offset + self.byte_len];
                let mut buf = HostBuffer::new(total)?;
                let mut to = 0usize;
                for &(at, len) in runs {
                    let (at, len) = (at as usize, len as usize);
                    buf.as_mut_slice()[to..to + len].copy_from_slice(&bytes[at..at + len]);
                    to += len;
                }
                Storage::Host {
                    memory: Arc::new(HostMemory::owned(buf)),
                    offset: 0,
                }
            }
        };
        Ok(Tensor {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: plan.shape,
            byte_len: total as usize,
            storage,
        })
    }

    /// A borrowed view of the tensor; `None` for a meta tensor.
    pub fn view(&self) -> Option<TensorView<'_>> {
        Some(TensorView {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            bytes: self.bytes()?,
        })
    }

    /// The elements as a typed slice (the dtype must be `T`'s).
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        match self.view() {
            Some(v) => v.as_slice(),
            None => Err(Error::TypedView {
                tensor: self.name.clone(),
                reason: match self.device() {
                    Device::Meta => "a meta tensor has no data".into(),
                    d => format!("the data is on {d}: copy it with Tensor::to_host first"),
                },
            }),
        }
    }
}

/// A borrowed tensor: from a loaded [`Tensor`], or zero-copy from a memory-mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The name.
    pub name: &'a str,
    /// The element type.
    pub dtype: Dtype,
    /// The dimensions.
    pub shape: &'a [usize],
    /// The raw little-endian bytes.
    pub bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// The elements as a typed slice. Fails when the dtype is not `T`'s or when the bytes
    /// are not aligned for `T` (possible for views into files whose data is misaligned;
    /// loaded tensors are always 64-byte aligned).
    pub fn as_slice<T: Element>(&self) -> Result<&'a [T]> {
        if self.dtype != T::DTYPE {
            return Err(Error::TypedView {
                tensor: self.name.to_string(),
                reason: format!("is {}, not {}", self.dtype, T::DTYPE),
            });
        }
        bytemuck::try_cast_slice(self.bytes).map_err(|e| Error::TypedView {
            tensor: self.name.to_string(),
            reason: format!("cannot view as {}: {e:?}", T::DTYPE),
        })
    }
}

/// Loaded tensors by name. Owns their memory (shared per shard allocation: memory is freed
/// when the last tensor of an allocation is dropped).
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    tensors: Vec<Tensor>,
    /// Positions sorted by name, built on the first lookup: loads that only iterate (the
    /// Python bindings, meta loads) never pay for sorting tens of thousands of names.
    by_name: std::sync::OnceLock<Vec<u32>>,
    staging: Option<StagingStats>,
    files: Vec<FileReport>,
}

/// Where one file's tensors went in a load, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileReport {
    /// Position of the file (shard) in the checkpoint.
    pub shard: usize,
    /// The file.
    pub location: Location,
    /// Where its tensors are.
    pub placement: Placement,
    /// Why: the backend's reason for an owned load, the mapping rule for a mapped one.
    pub reason: String,
    /// Bytes read (or, mapped, brought into the page cache and mapped) from storage.
    pub bytes_read: u64,
}

/// Where a file's loaded tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Placement {
    /// Copied into memory of the load's own.
    Owned,
    /// In a private mapping of the file (page-cache pages, used in place).
    Mapped,
    /// Copied into device memory.
    Device,
    /// Nowhere (shapes only).
    Meta,
}

impl Placement {
    /// The placement in one word (`owned`, `mapped`, `device`, `meta`), as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Owned => "owned",
            Placement::Mapped => "mapped",
            Placement::Device => "device",
            Placement::Meta => "meta",
        }
    }
}

impl StateDict {
    pub(crate) fn new(tensors: Vec<Tensor>) -> StateDict {
        StateDict {
            tensors,
            by_name: std::sync::OnceLock::new(),
            staging: None,
            files: Vec::new(),
        }
    }

    fn by_name(&self) -> &[u32] {
        self.by_name.get_or_init(|| {
            let mut by_name: Vec<u32> = (0..self.tensors.len() as u32).collect();
            by_name.sort_unstable_by(|&a, &b| {
                self.tensors[a as usize]
                    .name
                    .cmp(&self.tensors[b as usize].name)
            });
            by_name
        })
    }

    pub(crate) fn with_files(mut self, mut files: Vec<FileReport>) -> StateDict {
        files.sort_by_key(|f| f.shard);
        self.files = files;
        self
    }

    /// Per file: where its tensors went and why, and the bytes read from it (files with no
    /// tensor selected are left out).
    pub fn files(&self) -> &[FileReport] {
        &self.files
    }

    /// Bytes read from storage in all, over [`StateDict::files`].
    pub fn bytes_read(&self) -> u64 {
        self.files.iter().map(|f| f.bytes_read).sum()
    }

    pub(crate) fn with_staging(mut self, stats: StagingStats) -> StateDict {
        self.staging = Some(stats);
        self
    }

    /// For a load into device memory: where the time went (storage to pinned host buffers,
    /// host to device copies, waits for a free buffer).
    pub fn staging(&self) -> Option<StagingStats> {
        self.staging
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        let by_name = self.by_name();
        by_name
            .binary_search_by(|&i| self.tensors[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[by_name[i] as usize])
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Tensors in load order (shard by shard, file order).
    pub fn iter(&self) -> std::slice::Iter<'_, Tensor> {
        self.tensors.iter()
    }

    /// Tensors in name order.
    pub fn iter_sorted(&self) -> impl ExactSizeIterator<Item = &Tensor> + '_ {
        self.by_name().iter().map(|&i| &self.tensors[i as usize])
    }

    /// Sum of the tensors' byte lengths.
    pub fn byte_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len as u64).sum()
    }

    /// Takes the tensors out, in load order.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }
}

impl<'a> IntoIterator for &'a StateDict {
    type Item = &'a Tensor;
    type IntoIter = std::slice::Iter<'a, Tensor>;

    fn into_iter(self) -> Self::IntoIter {
        self.tensors.iter()
    }
}
