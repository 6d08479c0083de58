//! The automatic backend choice, per file.
//!
//! The rule, in order:
//! 1. On a network or FUSE filesystem (NFS, SMB/CIFS, Lustre, Ceph, 9P, AFS, GPFS, BeeGFS,
//!    GlusterFS and anything over FUSE, by `statfs` magic): buffered `pread` with large
//!    requests. Never mmap there (each 4 KiB fault is a round trip), and not `O_DIRECT`
//!    (support and semantics vary by server).
//! 2. In memory (tmpfs, ramfs): buffered `pread`; there is no device to bypass.
//! 3. When at least [`AutoPolicy::cached_fraction`] of the file's pages are in the page
//!    cache (`mincore` over a mapping that is never read): buffered `pread`, which copies
//!    from the cache at memory speed where `O_DIRECT` would read the disk again.
//! 4. Otherwise (cold): buffered `pread` with deep readahead, unless the file is larger
//!    than [`AutoPolicy::direct_min_bytes`] (default: half of the memory available when
//!    the file is opened), where the page cache could not hold it anyway and `O_DIRECT`
//!    keeps the load from evicting everything else.
//!
//! Why not `O_DIRECT` for every large cold file: measured with `cargo xtask bench`
//! (2 GiB, cold, 5 repetitions, 4 threads), buffered reads ran at 0.83-0.95x the raw read
//! and `O_DIRECT` at 0.58-0.69x: readahead keeps the device busy asynchronously, where
//! each `O_DIRECT` read waits for its own I/O and then goes through a bounce copy.
//!
//! mmap is never chosen automatically: it is no faster than `pread` for whole-checkpoint
//! loads and it crashes the process if the file is truncated. Pick a backend explicitly to
//! override the rule.

use crate::LocalKind;
use memmap2::Mmap;
use std::fs::File;
use std::io;
use std::path::Path;

/// Thresholds of the automatic choice: [`AutoPolicy::default`] and the setters.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct AutoPolicy {
    /// Cold files at least this large are read with `O_DIRECT`; `None`: half of the
    /// memory available (`MemAvailable`) when the file is opened.
    pub direct_min_bytes: Option<u64>,
    /// Files with at least this fraction of pages cached are read buffered.
    pub cached_fraction: f64,
}

impl AutoPolicy {
    /// Cold files at least this large are read with `O_DIRECT` (`None`: half of the memory
    /// available when the file is opened).
    pub fn direct_min_bytes(mut self, bytes: Option<u64>) -> AutoPolicy {
        self.direct_min_bytes = bytes;
        self
    }

    /// Files with at least this fraction of pages cached are read buffered.
    pub fn cached_fraction(mut self, fraction: f64) -> AutoPolicy {
        self.cached_fraction = fraction;
        self
    }
}

impl Default for AutoPolicy {
    fn default() -> AutoPolicy {
        AutoPolicy {
            direct_min_bytes: None,
            cached_fraction: 0.5,
        }
    }
}

/// What kind of filesystem a file lives on, as far as the backend choice cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// A local block-device filesystem (ext4, xfs, btrfs, ...).
    Local,
    /// Memory-backed (tmpfs, ramfs).
    Memory,
    /// Network or FUSE; the name says which.
    Network(&'static str),
}

/// Classifies the filesystem holding `path` by its `statfs` magic number.
pub fn fs_kind(path: &Path) -> io::Result<FsKind> {
    let st = rustix::fs::statfs(path)?;
    // `f_type`'s integer type differs between platforms; the magic numbers are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64 & 0xffff_ffff;
    Ok(classify_magic(magic))
}

fn classify_magic(magic: u64) -> FsKind {
    match magic {
        0x6969 => FsKind::Network("nfs"),
        0x517b => FsKind::Network("smb"),
        0xff53_4d42 => FsKind::Network("cifs"),
        0xfe53_4d42 => FsKind::Network("smb2"),
        0x6573_5546 => FsKind::Network("fuse"),
        0x0bd0_0bd0 => FsKind::Network("lustre"),
        0x00c3_6400 => FsKind::Network("ceph"),
        0x0102_1997 => FsKind::Network("9p"),
        0x5346_414f | 0x6b41_4653 => FsKind::Network("afs"),
        0x4750_4653 => FsKind::Network("gpfs"),
        0x1983_0326 => FsKind::Network("beegfs"),
        0x7375_7245 => FsKind::Network("coda"),
        0x564c => FsKind::Network("ncp"),
        0x0116_1970 => FsKind::Network("gfs2"),
        0x0102_1994 | 0x8584_58f6 => FsKind::Memory,
        _ => FsKind::Local,
    }
}

/// How much of a file is in the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// Pages in the page cache.
    pub resident_pages: u64,
    /// Pages in the file.
    pub total_pages: u64,
}

impl Residency {
    /// Resident fraction (1.0 for an empty file).
    pub fn fraction(&self) -> f64 {
        if self.total_pages == 0 {
            1.0
        } else {
            self.resident_pages as f64 / self.total_pages as f64
        }
    }
}

/// Counts the file's pages in the page cache with `mincore`, like `fincore`. The mapping
/// is never read, so this costs no I/O and cannot fault.
pub fn residency(path: &Path) -> io::Result<Residency> {
    residency_sampled(path, u64::MAX)
}

/// Counts the pages of the bytes `range` of the file (clipped to its length) that are in
/// the page cache, like [`residency`].
pub fn residency_in(path: &Path, range: std::ops::Range<u64>) -> io::Result<Residency> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let page = 4096u64;
    let (start, end) = (
        range.start.min(len) / page,
        range.end.min(len).div_ceil(page),
    );
    if start >= end {
        return Ok(Residency {
            resident_pages: 0,
            total_pages: 0,
        });
    }
    // SAFETY: as in `residency_sampled`: the mapping only goes to mincore.
    let map = unsafe { Mmap::map(&file)? };
    let resident = resident_pages(&map, start, end - start)?;
    Ok(Residency {
        resident_pages: resident,
        total_pages: end - start,
    })
}

/// Resident pages among `pages` pages of `map` from page `first` (in bounds).
fn resident_pages(map: &Mmap, first: u64, pages: u64) -> io::Result<u64> {
    resident_pages_of(map, first, pages)
}

/// [`resident_pages`] of any mapping's bytes.
pub(crate) fn resident_pages_of(map: &[u8], first: u64, pages: u64) -> io::Result<u64> {
    let page = 4096u64;
    let mut vec = vec![0u8; pages.min(1 << 18) as usize];
    let mut resident = 0;
    let mut at = first;
    while at < first + pages {
        let n = (first + pages - at).min(1 << 18);
        let start = (at * page) as usize;
        let bytes = ((n * page) as usize).min(map.len() - start);
        // SAFETY: `start..start + bytes` lies inside the live mapping (page-aligned start),
        // and `vec` has room for one byte per page of that range. The mapping is never
        // dereferenced, so a concurrent truncation cannot fault here.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(start) as *mut libc::c_void,
                bytes,
                vec.as_mut_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        resident += vec[..n as usize].iter().filter(|&&b| b & 1 == 1).count() as u64;
        at += n;
    }
    Ok(resident)
}

/// Files up to this many pages (256 MiB) are checked page by page by the automatic choice;
/// larger ones are sampled.
const EXACT_PAGES: u64 = 1 << 16;
/// Sampled windows and their length in pages.
const SAMPLE_WINDOWS: u64 = 1024;
const WINDOW_PAGES: u64 = 32;

/// Like [`residency`], but for files over `exact_pages` pages only counts
/// [`SAMPLE_WINDOWS`] evenly spaced windows of [`WINDOW_PAGES`] pages, scaled up: a
/// threshold decision needs an estimate, and walking every page of a 2 GiB file cost 14% of
/// opening a checkpoint.
fn residency_sampled(path: &Path, exact_pages: u64) -> io::Result<Residency> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let page = 4096u64;
    let total_pages = len.div_ceil(page);
    if len == 0 {
        return Ok(Residency {
            resident_pages: 0,
            total_pages: 0,
        });
    }
    // SAFETY: the mapping is only passed to mincore, never dereferenced, so a concurrent
    // truncation or modification of the file cannot affect memory we read.
    let map = unsafe { Mmap::map(&file)? };
    let windows: Vec<(u64, u64)> = if total_pages <= exact_pages {
        vec![(0, total_pages)]
    } else {
        let count = SAMPLE_WINDOWS.min(total_pages.div_ceil(WINDOW_PAGES));
        let stride = total_pages / count;
        (0..count)
            .map(|w| (w * stride, WINDOW_PAGES.min(total_pages - w * stride)))
            .collect()
    };
    let (mut resident, mut checked) = (0u64, 0u64);
    for (first, pages) in windows {
        resident += resident_pages(&map, first, pages)?;
        checked += pages;
    }
    Ok(Residency {
        resident_pages: (resident as f64 * total_pages as f64 / checked as f64).round() as u64,
        total_pages,
    })
}

/// Whether a load should leave `path`'s tensors in a private mapping of the file rather than
/// copy them into memory of its own, and why: yes on local block-device filesystems and in
/// memory (the page cache's pages are used in place, populated in large ranges); no on
/// network and FUSE filesystems, where every page fault of a mapping is a round trip and
/// large reads into owned memory are many times faster.
pub fn map_advice(path: &Path) -> (bool, String) {
    match fs_kind(path) {
        Ok(FsKind::Local) => (
            true,
            "mapped: a local filesystem (page-cache pages used in place, populated in parallel)"
                .into(),
        ),
        Ok(FsKind::Memory) => (true, "mapped: in memory (tmpfs)".into()),
        Ok(FsKind::Network(name)) => (
            false,
            format!(
                "owned: on {name}, a network filesystem (each page fault would be a round trip)"
            ),
        ),
        Err(e) => (
            false,
            format!("owned: the filesystem could not be told ({e})"),
        ),
    }
}

/// Applies the rule (module docs) to `path`; returns the backend and the reason.
pub(crate) fn choose(path: &Path, policy: &AutoPolicy) -> io::Result<(LocalKind, String)> {
    let len = std::fs::metadata(path)?.len();
    match fs_kind(path).unwrap_or(FsKind::Local) {
        FsKind::Network(name) => {
            return Ok((
                LocalKind::Pread,
                format!("auto: on {name}, a network filesystem"),
            ));
        }
        FsKind::Memory => return Ok((LocalKind::Pread, "auto: in memory (tmpfs)".into())),
        FsKind::Local => {}
    }
    let cached = residency_sampled(path, EXACT_PAGES)
        .map(|r| r.fraction())
        .unwrap_or(0.0);
    let pct = (cached * 100.0).round();
    if cached >= policy.cached_fraction {
        Ok((LocalKind::Pread, format!("auto: {pct}% in the page cache")))
    } else {
        let threshold = policy
            .direct_min_bytes
            .unwrap_or_else(|| available_memory() / 2);
        if len >= threshold {
            Ok((
                LocalKind::Direct,
                format!(
                    "auto: cold ({pct}% cached) and {} MiB, over {} MiB",
                    len >> 20,
                    threshold >> 20
                ),
            ))
        } else {
            Ok((
                LocalKind::Pread,
                format!("auto: cold ({pct}% cached), readahead"),
            ))
        }
    }
}

/// `MemAvailable` from `/proc/meminfo` in bytes (`u64::MAX` where unknown, so that the
/// automatic choice never picks `O_DIRECT` by accident).
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(u64::MAX, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Advice, fadvise};
    use std::io::Write;

    #[test]
    fn classifies_network_filesystems() {
        assert_eq!(classify_magic(0x6969), FsKind::Network("nfs"));
        assert_eq!(classify_magic(0x6573_5546), FsKind::Network("fuse"));
        assert_eq!(classify_magic(0x0102_1994), FsKind::Memory);
        assert_eq!(classify_magic(0xef53), FsKind::Local); // ext4
        assert_eq!(fs_kind(Path::new("/dev/shm")).unwrap(), FsKind::Memory);
        let (map, why) = map_advice(Path::new("/dev/shm"));
        assert!(map && why.contains("tmpfs"), "{why}");
        let (map, why) = map_advice(Path::new(env!("CARGO_MANIFEST_DIR")));
        assert!(map && why.contains("local"), "{why}");
        assert!(!map_advice(Path::new("/nonexistent/x")).0);
    }

    #[test]
    fn residency_sees_cache_state() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let _ = std::fs::read(&path).unwrap();
        let warm = residency(&path).unwrap();
        assert_eq!(warm.total_pages, 256);
        assert!(warm.fraction() > 0.9, "{warm:?}");
        fadvise(&f, 0, None, Advice::DontNeed).unwrap();
        let cold = residency(&path).unwrap();
        assert!(cold.fraction() < 0.1, "{cold:?}");
        let (kind, why) = choose(
            &path,
            &AutoPolicy {
                direct_min_bytes: Some(1),
                cached_fraction: 0.5,
            },
        )
        .unwrap();
        assert_eq!(kind, LocalKind::Direct, "{why}");
        // By default, a cold file that fits in memory is read buffered, with readahead.
        let (kind, why) = choose(&path, &AutoPolicy::default()).unwrap();
        assert_eq!(kind, LocalKind::Pread, "{why}");
        assert!(why.contains("cold") && why.contains("readahead"), "{why}");
        let _ = std::fs::read(&path).unwrap();
        let (kind, why) = choose(&path, &AutoPolicy::default()).unwrap();
        assert_eq!(kind, LocalKind::Pread);
        assert!(why.contains("page cache"), "{why}");
        // Sampling agrees with the exact count on a fully cached and a cold file.
        assert!(residency_sampled(&path, 16).unwrap().fraction() > 0.9);
        fadvise(&f, 0, None, Advice::DontNeed).unwrap();
        assert!(residency_sampled(&path, 16).unwrap().fraction() < 0.1);
    }
}
