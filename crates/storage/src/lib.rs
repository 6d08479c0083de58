//! Where checkpoint bytes come from: a small trait for positioned reads, and the backends
//! that implement it for local files (mmap, `pread`, `pread` with `O_DIRECT`), with an
//! automatic choice per file, and (feature `remote`) for HTTP(S) URLs and S3 objects.
//!
//! Every place bytes can be is named by a [`Location`] (a local path or a URL), and every
//! checkpoint's home is a [`Store`] (a local directory, an HTTP(S) or an S3 prefix) that
//! lists files, fetches small ones and opens others as a [`ByteSource`]. [`open_store`]
//! picks the store for a location.
//!
//! This crate knows nothing of tensors or devices: it reads byte ranges, exactly, or fails
//! with an error that says which range and why. A read that meets the end of the file
//! before the range is complete is an [`std::io::ErrorKind::UnexpectedEof`] error, never a
//! short buffer of stale bytes, so a file that shrinks during a load is detected.

mod aligned;
mod assembly;
mod auto;
mod direct;
mod error;
pub mod hub;
mod location;
mod mapped;
mod memory;
mod mmap;
mod pread;
mod readahead;
#[cfg(feature = "remote")]
pub mod remote;
mod store;

pub use aligned::{AlignedBuf, PAGE};
pub use assembly::{Assembly, MIN_MAPPED, map_room};
pub use auto::{
    AutoPolicy, FsKind, Residency, available_memory, fs_kind, map_advice, residency, residency_in,
};
pub use direct::{BOUNCE_LEN, DirectSource};
pub use error::{Error, Result, S3ConfigError};
pub use location::Location;
pub use mapped::MappedFile;
pub use memory::{MemoryInfo, human, memory_info, parse_size};
pub use mmap::MmapSource;
pub use pread::PreadSource;
pub use store::{Entry, LocalStore, Opened, RemoteStats, Store, StoreOptions, open_store};

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// A readable, fixed-length byte source, shared by many threads at once.
///
/// Every method reads exactly the requested bytes or returns an error; implementations
/// retry interrupted and short reads themselves.
pub trait ByteSource: Send + Sync + fmt::Debug {
    /// Length in bytes, as seen when the source was opened.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Fills `bufs`, in order, with the contiguous bytes starting at `offset`: one large
    /// read landing in many buffers (a scatter read).
    fn read_scatter_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> io::Result<()> {
        let mut at = offset;
        for buf in bufs.iter_mut() {
            self.read_exact_at(at, buf)?;
            at += buf.len() as u64;
        }
        Ok(())
    }

    /// Which backend serves the reads.
    fn kind(&self) -> BackendKind;

    /// Tells the source how the coming reads will go, so it can tune the kernel's readahead.
    /// A hint only; the default does nothing.
    fn hint(&self, _pattern: AccessPattern) {}

    /// The whole source as memory, when it is memory-mapped (for zero-copy views).
    fn mapped(&self) -> Option<&[u8]> {
        None
    }

    /// The length now, where it can be learnt without a request (a local file's size), or
    /// as the server last reported it: tells which tensor a file cut short lost. `None`
    /// where unknown.
    fn current_len(&self) -> Option<u64> {
        None
    }

    /// Tells the kernel that the bytes `offset..offset + len` will not be read again, so
    /// their page-cache pages can go (after a load copied them into memory of its own). A
    /// hint; the default does nothing.
    fn drop_cache(&self, _offset: u64, _len: u64) {}

    /// Tells the kernel that the bytes `offset..offset + len` will be read soon, so it can
    /// start reading them into the page cache now, asynchronously (`POSIX_FADV_WILLNEED`):
    /// what a caller that has other work to do first asks for. A hint; the default does
    /// nothing (sources without a page cache).
    fn will_need(&self, _offset: u64, _len: u64) {}
}

/// How a load will read a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessPattern {
    /// Most of the file, front to back: deep readahead pays.
    Sequential,
    /// Selected ranges with gaps: readahead would read bytes nobody asked for (kernel
    /// readahead ran 20+ MiB past 16 MiB requests here), so it is turned off.
    Sparse,
}

/// The backend a [`ByteSource`] actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// Memory map, copied out with `memcpy` (page faults bring the data in).
    Mmap,
    /// Positioned reads through the page cache.
    Pread,
    /// Positioned reads with `O_DIRECT`, bypassing the page cache.
    Direct,
    /// HTTP(S) range requests.
    Http,
    /// S3 ranged GETs (SigV4-presigned).
    S3,
}

impl BackendKind {
    /// Lower-case name, as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Mmap => "mmap",
            BackendKind::Pread => "pread",
            BackendKind::Direct => "direct",
            BackendKind::Http => "http",
            BackendKind::S3 => "s3",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to open files: a fixed backend, or [`Backend::auto`] to choose per file.
///
/// Memory maps are only available through the `unsafe` [`Backend::mmap`]: a mapped file that
/// another process truncates makes the reading process crash with `SIGBUS`, and one it
/// modifies changes bytes that Rust code holds as immutable. The other backends read into
/// memory weightlift owns and detect a shrinking file as an error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backend(Choice);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Choice {
    Auto(AutoPolicy),
    Fixed(LocalKind),
}

/// The backends that read local files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalKind {
    Mmap,
    Pread,
    Direct,
}

impl LocalKind {
    fn kind(self) -> BackendKind {
        match self {
            LocalKind::Mmap => BackendKind::Mmap,
            LocalKind::Pread => BackendKind::Pread,
            LocalKind::Direct => BackendKind::Direct,
        }
    }
}

impl Backend {
    /// Choose per file with the default [`AutoPolicy`]: buffered `pread` on network
    /// filesystems and for files mostly in the page cache, `O_DIRECT` for large cold files.
    /// Never mmap.
    pub fn auto() -> Backend {
        Backend(Choice::Auto(AutoPolicy::default()))
    }

    /// Choose per file with a custom policy.
    pub fn auto_with(policy: AutoPolicy) -> Backend {
        Backend(Choice::Auto(policy))
    }

    /// Positioned reads through the page cache.
    pub fn pread() -> Backend {
        Backend(Choice::Fixed(LocalKind::Pread))
    }

    /// `O_DIRECT` positioned reads (falls back to buffered reads, with a warning in the log,
    /// where the filesystem refuses them).
    pub fn direct() -> Backend {
        Backend(Choice::Fixed(LocalKind::Direct))
    }

    /// Memory-mapped reads.
    ///
    /// # Safety
    ///
    /// The caller promises that no file opened with this backend is truncated or modified
    /// while it is open: a truncated mapping raises `SIGBUS` on access, and a modified one
    /// breaks the immutability of the bytes handed out.
    pub unsafe fn mmap() -> Backend {
        Backend(Choice::Fixed(LocalKind::Mmap))
    }

    /// Whether this backend is a fixed choice of `kind`, or `None` for automatic.
    pub fn fixed(&self) -> Option<BackendKind> {
        match self.0 {
            Choice::Auto(_) => None,
            Choice::Fixed(local) => Some(local.kind()),
        }
    }
}

impl Default for Backend {
    fn default() -> Backend {
        Backend::auto()
    }
}

/// Opens the local file `path` with `backend` (the first bytes are not read: `head` is
/// empty).
pub fn open_file(path: &Path, backend: Backend) -> io::Result<Opened> {
    let (local, reason) = match backend.0 {
        Choice::Auto(policy) => auto::choose(path, &policy)?,
        Choice::Fixed(local) => (local, "chosen by the caller".to_string()),
    };
    let source: Arc<dyn ByteSource> = match local {
        // SAFETY: reaching here means the caller built the backend with the unsafe
        // `Backend::mmap` and took on its promise (files are not modified while open);
        // `auto::choose` never returns Mmap.
        LocalKind::Mmap => Arc::new(unsafe { MmapSource::open(path)? }),
        LocalKind::Direct => Arc::new(DirectSource::open(path)?),
        LocalKind::Pread => Arc::new(PreadSource::open(path)?),
    };
    let reason = if source.kind() != local.kind() {
        format!(
            "{reason}; fell back to {} (O_DIRECT refused)",
            source.kind()
        )
    } else {
        reason
    };
    Ok(Opened {
        source,
        reason,
        head: Vec::new(),
    })
}

/// An `UnexpectedEof` error for a range that runs past the end of the data. The caller
/// names the file.
pub(crate) fn eof_error(offset: u64, len: usize, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "file ended at byte {} while reading bytes {}..{} (was it truncated?)",
            offset.saturating_add(got),
            offset,
            offset.saturating_add(len as u64)
        ),
    )
}
