//! The storage layer's error type.
//!
//! Reads through a [`crate::ByteSource`] fail with [`std::io::Error`] (their kind tells
//! what happened: `UnexpectedEof` for a file cut short, `NotFound`, `TimedOut`, ...).
//! Everything else that can fail here (naming a location, opening a store, configuring
//! S3 or TLS) fails with [`Error`]. No message repeats the location: the caller names it
//! once, next to what it was doing.

use std::io;
use std::path::PathBuf;

/// Why a location could not be opened, listed or fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system or the network failed (its kind says how).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The location is not something this crate can read (a malformed URL, say).
    #[error("not a readable location: {reason}")]
    InvalidLocation {
        /// Why.
        reason: String,
    },
    /// This build, or this kind of store, cannot do what was asked.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A small file (an index) is larger than allowed.
    #[error("{len} bytes is more than the {max} accepted here")]
    TooLarge {
        /// Its length, as far as known.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// S3 could not be configured.
    #[error("S3 configuration: {0}")]
    S3Config(#[from] S3ConfigError),
    /// A CA certificate file could not be used.
    #[error("{}: {reason}", path.display())]
    CaCerts {
        /// The PEM file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The closest [`io::ErrorKind`]: `NotFound` for a missing file or object, and so on.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Io(e) => e.kind(),
            Error::InvalidLocation { .. } => io::ErrorKind::InvalidInput,
            Error::Unsupported(_) => io::ErrorKind::Unsupported,
            Error::TooLarge { .. } | Error::CaCerts { .. } => io::ErrorKind::InvalidData,
            Error::S3Config(_) => io::ErrorKind::InvalidInput,
        }
    }
}

/// Why an S3 configuration is unusable.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum S3ConfigError {
    /// The endpoint is not an http(s) URL with a host.
    #[error("endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A credentials or config file could not be read.
    #[error("{}: {reason}", path.display())]
    ProfileFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The bucket name does not fit the endpoint's URL style.
    #[error("bucket {bucket:?}: {reason}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// Why.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
