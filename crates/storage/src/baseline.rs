//! The yardsticks a loader is measured against: a raw sequential read of the same bytes,
//! and evicting files from the page cache (verified) for cold-cache measurements.

use crate::auto::{Residency, residency};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Reads every file front to back into one reused buffer of `buf_len` bytes, the way `cat`
/// does, with `threads` threads each taking whole files. Returns the bytes read. This is
/// the best a loader could hope for: no allocation, no placement, no page faults.
pub fn raw_read(paths: &[PathBuf], threads: usize, buf_len: usize) -> io::Result<u64> {
    let next = AtomicUsize::new(0);
    let worker = || -> io::Result<u64> {
        let mut buf = vec![0u8; buf_len];
        let mut total = 0u64;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(path) = paths.get(i) else {
                return Ok(total);
            };
            let mut f = File::open(path)?;
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .sum()
    })
}

/// How a file was evicted from the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// `posix_fadvise(POSIX_FADV_DONTNEED)` on the file.
    Fadvise,
}

/// Drops `path`'s pages from the page cache with `posix_fadvise(DONTNEED)` (after `fsync`,
/// so dirty pages can go) and checks with `mincore` that they went. Returns what is still
/// resident.
pub fn evict(path: &Path) -> io::Result<(Eviction, Residency)> {
    let f = File::open(path)?;
    f.sync_all()?;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok((Eviction::Fadvise, residency(path)?))
}
