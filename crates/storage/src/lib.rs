//! Where checkpoint bytes come from: a small trait for positioned reads, and the backends
//! that implement it for local files (mmap, `pread`, `pread` with `O_DIRECT`), with an
//! automatic choice per file, and (feature `remote`) for HTTP(S) URLs and S3 objects.
//!
//! This crate knows nothing of tensors or devices: it reads byte ranges, exactly, or fails
//! with an error that says which range and why. A read that meets the end of the file
//! before the range is complete is an [`std::io::ErrorKind::UnexpectedEof`] error, never a
//! short buffer of stale bytes, so a file that shrinks during a load is detected.

mod aligned;
mod auto;
mod baseline;
mod direct;
mod mmap;
mod pread;
#[cfg(feature = "remote")]
pub mod remote;

pub use aligned::{AlignedBuf, PAGE};
pub use auto::{AutoPolicy, FsKind, Residency, fs_kind, residency};
pub use baseline::{Eviction, evict, raw_read};
pub use direct::{BOUNCE_LEN, DirectSource};
pub use mmap::MmapSource;
pub use pread::PreadSource;

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
    Mmap,
    Pread,
    Direct,
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
        Backend(Choice::Pread)
    }

    /// `O_DIRECT` positioned reads (falls back to buffered reads, with a warning in the log,
    /// where the filesystem refuses them).
    pub fn direct() -> Backend {
        Backend(Choice::Direct)
    }

    /// Memory-mapped reads.
    ///
    /// # Safety
    ///
    /// The caller promises that no file opened with this backend is truncated or modified
    /// while it is open: a truncated mapping raises `SIGBUS` on access, and a modified one
    /// breaks the immutability of the bytes handed out.
    pub unsafe fn mmap() -> Backend {
        Backend(Choice::Mmap)
    }

    /// Whether this backend is a fixed choice of `kind`, or `None` for automatic.
    pub fn fixed(&self) -> Option<BackendKind> {
        match self.0 {
            Choice::Auto(_) => None,
            Choice::Mmap => Some(BackendKind::Mmap),
            Choice::Pread => Some(BackendKind::Pread),
            Choice::Direct => Some(BackendKind::Direct),
        }
    }
}

impl Default for Backend {
    fn default() -> Backend {
        Backend::auto()
    }
}

/// A file opened for reading, with the backend chosen and why.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The source.
    pub source: Arc<dyn ByteSource>,
    /// Why this backend: the user's choice, or the automatic rule that applied.
    pub reason: String,
}

/// Opens `path` with `backend`.
pub fn open(path: &Path, backend: Backend) -> io::Result<Opened> {
    let (kind, reason) = match backend.0 {
        Choice::Auto(policy) => auto::choose(path, &policy)?,
        other => {
            let kind = Backend(other).fixed().expect("not auto");
            (kind, "chosen by the caller".to_string())
        }
    };
    let source: Arc<dyn ByteSource> = match kind {
        // SAFETY: reaching here means the caller built the backend with the unsafe
        // `Backend::mmap` and took on its promise (files are not modified while open);
        // `auto::choose` never returns Mmap.
        BackendKind::Mmap => Arc::new(unsafe { MmapSource::open(path)? }),
        BackendKind::Pread => Arc::new(PreadSource::open(path)?),
        BackendKind::Direct => Arc::new(DirectSource::open(path)?),
        BackendKind::Http | BackendKind::S3 => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: remote objects are opened with `remote::Remote`",
                    path.display()
                ),
            ));
        }
    };
    let reason = if source.kind() != kind {
        format!(
            "{reason}; fell back to {} (O_DIRECT refused)",
            source.kind()
        )
    } else {
        reason
    };
    Ok(Opened { source, reason })
}

/// An `UnexpectedEof` error for a range that runs past the end of the data.
pub(crate) fn eof_error(path: &Path, offset: u64, len: usize, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "{}: file ended at byte {} while reading bytes {}..{} (was it truncated?)",
            path.display(),
            offset.saturating_add(got),
            offset,
            offset.saturating_add(len as u64)
        ),
    )
}
