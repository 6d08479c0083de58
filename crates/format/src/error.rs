//! The one error type of the format crate: each variant names the rule that broke and, where
//! there is one, the tensor (or shard) it broke for.

use crate::Dtype;

/// The largest header the reference implementation accepts, in bytes.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Why a safetensors file, an index file or a write request was rejected.
///
/// Messages name the rule broken and the tensor; callers that know the file add its path
/// (the facade crate does).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer than the 8 bytes of the header-length prefix.
    #[error("file is {len} bytes, shorter than the 8-byte header length prefix")]
    HeaderTooSmall {
        /// Bytes available.
        len: u64,
    },
    /// The header-length prefix is over [`MAX_HEADER_SIZE`].
    #[error("header length {header_len} exceeds the limit of {MAX_HEADER_SIZE} bytes")]
    HeaderTooLarge {
        /// The declared header length.
        header_len: u64,
    },
    /// The header-length prefix points past the end of the file.
    #[error(
        "header length {header_len} runs past the end of the file ({file_len} bytes in all, {} after the prefix)",
        file_len.saturating_sub(8)
    )]
    HeaderOutOfBounds {
        /// The declared header length.
        header_len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header bytes are not UTF-8.
    #[error("header is not valid UTF-8 (invalid byte at header offset {valid_up_to})")]
    HeaderNotUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The header is not a JSON object of the expected shape (unknown dtype, negative or
    /// fractional number, `__metadata__` value that is not a string, ...).
    #[error("invalid header JSON: {message}")]
    HeaderJson {
        /// serde_json's description, prefixed with the tensor where there is one.
        message: String,
    },
    /// The same tensor name appears twice. The reference keeps the last one silently;
    /// weightlift rejects the file because the two entries disagree about which bytes
    /// the name refers to.
    #[error("tensor {name:?} appears more than once in the header")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
    },
    /// Tensor data must be contiguous from offset 0 in offset order, without gaps or
    /// overlaps, and every `data_offsets` pair must be ordered.
    #[error(
        "tensor {name:?}: data_offsets [{start}, {end}] break the layout rule: tensors must tile the data region from 0 in offset order without gaps or overlaps (expected start {expected_start}{})",
        if end < start { ", and start <= end" } else { "" }
    )]
    InvalidOffsets {
        /// The tensor.
        name: String,
        /// Its start offset.
        start: u64,
        /// Its end offset.
        end: u64,
        /// Where the previous tensor ended.
        expected_start: u64,
    },
    /// The element count or bit count overflows.
    #[error("tensor {name:?}: shape {shape:?} of {dtype} overflows when computing its byte size")]
    SizeOverflow {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A sub-byte dtype whose element count does not fill whole bytes.
    #[error(
        "tensor {name:?}: {elements} elements of {dtype} ({} bits each) do not fill a whole number of bytes",
        dtype.bits()
    )]
    PartialByte {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its element count.
        elements: usize,
    },
    /// The byte span of `data_offsets` differs from element count x dtype size.
    #[error(
        "tensor {name:?}: data_offsets span {actual} bytes but shape {shape:?} of {dtype} needs {expected}"
    )]
    SizeMismatch {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes the offsets span.
        actual: u64,
    },
    /// The data region after the header is not exactly as long as the tensors need.
    #[error(
        "data region is {actual} bytes but the tensors cover exactly {expected} (the file is {} or has trailing bytes)",
        if actual < expected { "truncated" } else { "longer than its header says" }
    )]
    DataLengthMismatch {
        /// Bytes the tensors cover.
        expected: u64,
        /// Bytes present after the header.
        actual: u64,
    },
    /// `model.safetensors.index.json` is not valid.
    #[error("invalid index file: {message}")]
    IndexJson {
        /// What is wrong.
        message: String,
    },
    /// A shard path in the index is absolute or leaves the checkpoint's directory.
    #[error(
        "index names shard {shard:?}, which is not a plain relative path inside the checkpoint directory"
    )]
    IndexShardPath {
        /// The offending path.
        shard: String,
    },
    /// The index maps a tensor to a shard the checker was not given.
    #[error("index maps tensor {tensor:?} to shard {shard:?}, which is missing")]
    IndexMissingShard {
        /// A tensor mapped to it.
        tensor: String,
        /// The shard.
        shard: String,
    },
    /// The index maps a tensor to a shard whose header does not hold it.
    #[error(
        "index maps tensor {tensor:?} to shard {shard:?}, but that shard's header has no such tensor"
    )]
    IndexTensorNotInShard {
        /// The tensor.
        tensor: String,
        /// The shard.
        shard: String,
    },
    /// A shard holds a tensor the index does not map to it.
    #[error("shard {shard:?} holds tensor {tensor:?}, which the index {}", match indexed_shard {
        Some(other) => format!("maps to shard {other:?}"),
        None => "does not list".to_string(),
    })]
    ShardTensorNotInIndex {
        /// The tensor.
        tensor: String,
        /// The shard holding it.
        shard: String,
        /// Where the index says it is, if anywhere.
        indexed_shard: Option<String>,
    },
    /// `metadata.total_size` differs from the bytes of the tensors in the shards.
    #[error("index metadata.total_size is {declared} bytes but the shards' tensors hold {actual}")]
    IndexTotalSize {
        /// The declared size.
        declared: u64,
        /// The sum of the tensors' byte lengths.
        actual: u64,
    },
    /// A tensor handed to the writer has a byte length that does not match its shape.
    #[error("cannot write tensor {name:?}: {actual} data bytes given but shape {shape:?} of {dtype} needs {}", match expected {
        Some(n) => format!("{n}"),
        None => "a size that overflows or is not a whole number of bytes".to_string(),
    })]
    WriteSizeMismatch {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the shape needs (`None` when it overflows or is not whole bytes).
        expected: Option<u64>,
        /// Bytes given.
        actual: u64,
    },
    /// A tensor name handed to the writer is reserved.
    #[error("cannot write a tensor named {name:?}: the name is reserved for file metadata")]
    ReservedName {
        /// The name.
        name: String,
    },
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl FormatError {
    pub(crate) fn io(context: &'static str) -> impl Fn(std::io::Error) -> FormatError + Copy {
        move |source| FormatError::Io { context, source }
    }

    /// The tensor this error is about, where there is one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            FormatError::DuplicateTensor { name }
            | FormatError::InvalidOffsets { name, .. }
            | FormatError::SizeOverflow { name, .. }
            | FormatError::PartialByte { name, .. }
            | FormatError::SizeMismatch { name, .. }
            | FormatError::WriteSizeMismatch { name, .. }
            | FormatError::ReservedName { name } => Some(name),
            FormatError::IndexMissingShard { tensor, .. }
            | FormatError::IndexTensorNotInShard { tensor, .. }
            | FormatError::ShardTensorNotInIndex { tensor, .. } => Some(tensor),
            _ => None,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
