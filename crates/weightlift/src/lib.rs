//! weightlift: load safetensors checkpoints as fast as the storage delivers.
//!
//! Open a checkpoint (one file, a directory of shards, or an index file); every header is
//! read and validated up front. Then load it whole (or filtered) into owned memory with
//! planned, coalesced, parallel reads, read single tensors or slices on demand, or map it
//! for zero-copy views.
//!
//! ```no_run
//! use weightlift::{Checkpoint, LoadOptions};
//!
//! let ckpt = Checkpoint::open("model/")?;
//! let state = ckpt.load(&LoadOptions::default().prefix("model.layers.0."))?;
//! for t in &state {
//!     println!("{} {} {:?}", t.name(), t.dtype(), t.shape());
//! }
//! let rows = ckpt.get_slice("lm_head.weight", &[0..1024])?;
//! # Ok::<(), weightlift::Error>(())
//! ```
//!
//! Cargo features: `remote` opens `http(s)://` and `s3://` URLs like paths (see
//! `remote::RemoteOptions`); `cuda` loads to NVIDIA GPUs with `Device::Cuda(n)` (the driver
//! is loaded at run time, so the feature builds anywhere). [`Checkpoint::load_staged`] runs
//! the GPU pipeline over any [`CopyEngine`].

mod assemble;
mod budget;
mod checkpoint;
mod convert;
pub mod env;
mod error;
mod exec;
mod lazy;
mod load;
mod mapping;
mod memory;
mod options;
mod place;
mod plan;
mod pool;
mod prefetch;
mod progress;
mod shard;
mod share;
mod slice;
mod tensor;
mod trail;
mod window;

pub use assemble::{AssembleReport, Piece};
pub use budget::MemoryBudget;
pub use checkpoint::{Checkpoint, OpenOptions};
pub use error::{Error, Result};
pub use lazy::MappedCheckpoint;
pub use mapping::Mapping;
pub use memory::HostMemory;
pub use options::{DEFAULT_MAX_GAP, DEFAULT_REQUEST_SIZE, Filter, LoadOptions, SliceFn};
pub use place::{Fill, FillReport};
pub use pool::default_threads;
pub use prefetch::{Announcement, Prefetch};
pub use progress::{Progress, ProgressFn};
pub use shard::Shard;
pub use share::{ExchangeError, ExchangeSpan, Share, SharedLoad};
pub use tensor::{Element, FileReport, Placement, StateDict, Tensor, TensorView};

// The items of the lower crates that this crate's API uses (in signatures, errors and
// options), so that users need no other dependency; the crates themselves are not
// re-exported whole.
#[cfg(feature = "cuda")]
pub use weightlift_device::CudaEngine;
pub use weightlift_device::{
    CopyEngine, Device, DeviceError, DeviceMemory, StagedTarget, StagingOptions, StagingStats,
};
pub use weightlift_format::{Dtype, FormatError, Header, ShardIndex, TensorInfo};
/// The storage layer's error (the source of [`Error::Io`]).
pub use weightlift_storage::Error as StorageError;
/// A Hugging Face model id (`org/name[@revision]`), as [`Checkpoint::open`] takes them.
pub use weightlift_storage::hub::ModelId;
pub use weightlift_storage::{
    AccessPattern, AutoPolicy, Backend, BackendKind, ByteSource, Entry, LocalStore, Location,
    Opened, RemoteStats, Store, StoreOptions, open_store,
};
pub use weightlift_storage::{
    Assembly, MIN_MAPPED, MemoryInfo, human, map_room, memory_info, parse_size,
};

/// Remote storage options (feature `remote`).
#[cfg(feature = "remote")]
pub mod remote {
    pub use weightlift_storage::remote::{RemoteOptions, S3Config};
}

/// Loads every tensor of a safetensors file held in memory (`bytes` is the whole file),
/// validated like a file on disk, into owned CPU memory (one copy of the data section).
pub fn load_bytes(bytes: &[u8]) -> Result<StateDict> {
    let format_error = |source| Error::Format {
        location: Location::Local("<bytes>".into()),
        source,
    };
    let header = Header::from_file_bytes(bytes).map_err(format_error)?;
    let data = &bytes[header.data_start() as usize..];
    let mut buf = weightlift_device::HostBuffer::new(data.len() as u64)?;
    buf.as_mut_slice().copy_from_slice(data);
    let base = tensor::Storage::Host {
        memory: std::sync::Arc::new(HostMemory::owned(buf)),
        offset: 0,
    };
    let tensors = header
        .tensors()
        .iter()
        .map(|info| Tensor::from_info(info, info.dtype, None, base.at(info.data_offsets.0)))
        .collect();
    Ok(StateDict::new(tensors))
}

/// Opens `location` and loads every tensor into CPU memory with default options.
pub fn load(location: impl Into<Location>) -> Result<StateDict> {
    Checkpoint::open(location)?.load(&LoadOptions::default())
}
