//! The yardsticks a loader is measured against: a raw sequential read of the same bytes,
//! filling fresh memory of the same size, and evicting files from the page cache
//! (verified) for cold-cache measurements.

use rayon::prelude::*;
use rustix::fs::{Advice, fadvise};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use weightlift_storage::{Residency, residency};

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

/// Faults in and fills `bytes` of new memory from `threads` threads: the floor under any
/// load that produces owned memory (one page fault and zeroing per 4 KiB page).
pub fn fresh_memory(bytes: u64, threads: usize) -> io::Result<()> {
    let mut mem = weightlift_device::HostBuffer::new(bytes).map_err(io::Error::other)?;
    let chunk = (bytes as usize).div_ceil(threads.max(1)).max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(io::Error::other)?;
    pool.install(|| {
        mem.as_mut_slice()
            .par_chunks_mut(chunk)
            .for_each(|c| c.fill(0x5a))
    });
    std::hint::black_box(&mem);
    Ok(())
}

/// Drops `path`'s pages from the page cache with `posix_fadvise(DONTNEED)` (after `fsync`,
/// so dirty pages can go) and checks with `mincore` that they went. Returns what is still
/// resident.
pub fn evict(path: &Path) -> io::Result<Residency> {
    let f = File::open(path)?;
    f.sync_all()?;
    fadvise(&f, 0, None, Advice::DontNeed)?;
    residency(path)
}

/// [`evict`] for every file; returns the largest fraction still resident.
pub fn evict_all(paths: &[PathBuf]) -> io::Result<f64> {
    let mut worst: f64 = 0.0;
    for p in paths {
        let r = evict(p)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: evicting: {e}", p.display())))?;
        worst = worst.max(r.fraction());
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_reads_every_byte_and_eviction_empties_the_cache() {
        // On the disk (tmpfs has no page cache to evict from).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let paths: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, vec![i as u8; 100_000 + i]).unwrap();
                p
            })
            .collect();
        assert_eq!(raw_read(&paths, 2, 4096).unwrap(), 300_003);
        assert!(evict_all(&paths).unwrap() < 0.1);
        fresh_memory(1 << 20, 2).unwrap();
    }
}
