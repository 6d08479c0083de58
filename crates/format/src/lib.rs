//! The safetensors file format and nothing else: parsing and strict validation of headers,
//! dtypes, sharded-checkpoint index files, and writing files.
//!
//! This crate does no I/O beyond [`std::io::Read`] / [`std::io::Write`] (and the atomic
//! file write, which needs a temporary file and a rename). It never panics on untrusted
//! input and never allocates in proportion to a length it has not checked against the real
//! input size. It has no `unsafe` code.
//!
//! ```
//! use weightlift_format::{serialize, Dtype, Header, TensorRef};
//!
//! let data = [0u8; 8];
//! let file = serialize(
//!     &[TensorRef { name: "w", dtype: Dtype::F32, shape: &[2], data: &data }],
//!     None,
//! )?;
//! let header = Header::from_file_bytes(&file)?;
//! assert_eq!(header.get("w").unwrap().shape, vec![2]);
//! # Ok::<(), weightlift_format::FormatError>(())
//! ```

#![forbid(unsafe_code)]

mod dtype;
mod error;
mod header;
mod index;
mod write;

pub use dtype::Dtype;
pub use error::{FormatError, MAX_HEADER_SIZE, Result};
pub use header::{Header, Metadata, PREFIX_LEN, TensorInfo, header_len_from_prefix};
pub use index::{INDEX_FILE_NAME, ShardIndex, WeightMap};
pub use write::{Layout, TensorRef, serialize, write_file, write_file_with, write_to};
