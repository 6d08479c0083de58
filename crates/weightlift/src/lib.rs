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
//! the GPU pipeline over any [`device::CopyEngine`].

mod checkpoint;
mod convert;
mod error;
mod exec;
mod lazy;
mod load;
mod options;
mod plan;
mod progress;
mod share;
mod slice;
mod tensor;

pub use checkpoint::{Checkpoint, OpenOptions, Shard};
pub use error::{Error, Result};
pub use exec::default_threads;
pub use lazy::MappedCheckpoint;
pub use options::{DEFAULT_MAX_GAP, DEFAULT_REQUEST_SIZE, Filter, LoadOptions, Mapping, SliceFn};
pub use progress::{Progress, ProgressFn};
pub use share::{ExchangeSpan, Share, SharedLoad};
pub use tensor::{Element, FileReport, HostMemory, Placement, StateDict, Tensor, TensorView};

pub use weightlift_device as device;
pub use weightlift_device::{Device, StagedTarget, StagingOptions, StagingStats};
pub use weightlift_format as format;
pub use weightlift_format::Dtype;
pub use weightlift_storage as storage;
pub use weightlift_storage::{AutoPolicy, Backend, BackendKind, Location, RemoteStats};
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
    let header = format::Header::from_file_bytes(bytes).map_err(format_error)?;
    let data = &bytes[header.data_start() as usize..];
    let mut buf = device::HostBuffer::new(data.len() as u64)?;
    buf.as_mut_slice().copy_from_slice(data);
    let base = tensor::Storage::Host {
        memory: std::sync::Arc::new(buf.into()),
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
