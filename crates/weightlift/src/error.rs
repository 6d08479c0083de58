//! The facade's error type: every variant names the file and, where there is one, the tensor.

use std::io;
use std::path::PathBuf;
use weightlift_device::DeviceError;
use weightlift_format::FormatError;

/// Why opening or loading a checkpoint failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file broke a rule of the format (the message names the tensor and the rule).
    #[error("{}: {source}", path.display())]
    Format {
        /// The file (or index file).
        path: PathBuf,
        /// The rule broken.
        #[source]
        source: FormatError,
    },
    /// Opening or reading a file failed outside any tensor (header, index, listing).
    #[error("{}: {context}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading a tensor's bytes failed (including a file that shrank during the load).
    #[error("{}: tensor {tensor:?}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The tensor whose bytes could not be read.
        tensor: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A directory holds no safetensors file.
    #[error("{}: no .safetensors files and no {} here", path.display(), weightlift_format::INDEX_FILE_NAME)]
    NoShards {
        /// The directory.
        path: PathBuf,
    },
    /// Two shards of a checkpoint without an index hold the same tensor name.
    #[error("tensor {tensor:?} is in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// One shard.
        first: PathBuf,
        /// Another.
        second: PathBuf,
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
    /// The thread pool could not be built.
    #[error("cannot start {threads} loader threads: {reason}")]
    ThreadPool {
        /// Threads asked for.
        threads: usize,
        /// Why.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
