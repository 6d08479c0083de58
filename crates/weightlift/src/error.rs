//! The facade's error type: every variant names the file (once) and, where there is one,
//! the tensor.

use std::io;
use weightlift_device::DeviceError;
use weightlift_format::FormatError;
use weightlift_storage::Location;

/// Why opening or loading a checkpoint failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file broke a rule of the format (the message names the tensor and the rule).
    #[error("{location}: {source}")]
    Format {
        /// The file (or index file).
        location: Location,
        /// The rule broken.
        #[source]
        source: FormatError,
    },
    /// Opening, listing or reading a file failed outside any tensor (header, index,
    /// listing, mapping).
    #[error("{location}: {context}: {source}")]
    Io {
        /// The file, directory or URL.
        location: Location,
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: weightlift_storage::Error,
    },
    /// Reading a tensor's bytes failed (including a file that shrank during the load).
    #[error("{location}: tensor {tensor:?}: {source}")]
    Read {
        /// The file.
        location: Location,
        /// The tensor whose bytes could not be read.
        tensor: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A directory holds no safetensors file.
    #[error(
        "{location}: no .safetensors files and no {} here",
        weightlift_format::INDEX_FILE_NAME
    )]
    NoShards {
        /// The directory or URL prefix.
        location: Location,
    },
    /// Two shards of a checkpoint without an index hold the same tensor name.
    #[error("tensor {tensor:?} is in both {first} and {second}")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// One shard.
        first: Location,
        /// Another.
        second: Location,
    },
    /// No tensor of that name.
    #[error("no tensor named {0:?} in the checkpoint")]
    NotFound(String),
    /// A slice request does not fit the tensor.
    #[error("tensor {tensor:?}: invalid slice: {reason}")]
    InvalidSlice {
        /// The tensor.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// A placement (see [`crate::Fill`]) that cannot be honoured: its block is not what the
    /// destination expects, falls outside it, overlaps another, or needs a conversion
    /// weightlift does not make. Refused before any byte is read.
    #[error("tensor {tensor:?}: invalid placement: {reason}")]
    InvalidPlacement {
        /// The tensor.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// A typed view was asked for with the wrong element type or alignment.
    #[error("tensor {tensor:?}: {reason}")]
    TypedView {
        /// The tensor.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// An option that cannot be honoured.
    #[error("invalid load option: {0}")]
    InvalidOption(String),
    /// The target device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A CPU load whose tensors need more memory of its own than the memory budget allows
    /// (see [`crate::MemoryBudget`]): refused at planning, before any byte is read, rather
    /// than killed midway for want of memory.
    #[error(
        "the load needs {} of memory for its tensors, more than its budget of {budget}: load a part \
         of it (prefix, filter, slices), map the files, load to a GPU, or set {}",
        weightlift_storage::human(*needed),
        crate::env::MEMORY_BUDGET
    )]
    DoesNotFit {
        /// Bytes the load's tensors need.
        needed: u64,
        /// The budget, and where it comes from.
        budget: String,
    },
    /// The load was called off through [`crate::LoadOptions::cancel`].
    #[error("the load was cancelled")]
    Cancelled,
    /// The thread pool could not be built.
    #[error("cannot start {threads} loader threads: {reason}")]
    ThreadPool {
        /// Threads asked for.
        threads: usize,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The [`io::ErrorKind`] behind an I/O or read error (`NotFound` for a missing file or
    /// object), if there is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            Error::Read { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
