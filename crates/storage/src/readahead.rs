//! Reading ahead through the page cache on request (`POSIX_FADV_WILLNEED`), over the whole
//! range asked for.
//!
//! The kernel reads at most `max(device request size, readahead size)` per `WILLNEED` call
//! and silently ignores the rest of the range (`force_page_cache_ra`): measured here, one
//! call on 64 MiB of a cold file brought in 8 MiB (this VM's `read_ahead_kb`); on a host
//! with the usual 128 KiB readahead and 1,280 KiB requests it would bring in 1.25 MiB. So a
//! range is advised in steps of that size, read from sysfs for the file's device, and the
//! whole range is read. What it reads goes in single 4 KiB pages (requests of at most 1
//! MiB, 600-800 KiB on average measured here, never mapped as 2 MiB pages): large reads and
//! faults in a mapping advised `MADV_HUGEPAGE` do better where the whole file is wanted.

use rustix::fs::{Advice, fadvise, fstat, major, minor};
use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// The kernel's default readahead (`VM_READAHEAD_PAGES`): the step where sysfs says nothing.
const DEFAULT_STEP: u64 = 128 << 10;
/// Bounds on a step read from sysfs (a misread value never means one huge or tiny call).
const MIN_STEP: u64 = 64 << 10;
const MAX_STEP: u64 = 64 << 20;

/// `POSIX_FADV_WILLNEED` over `offset..offset + len` of `file`: the kernel starts reading
/// the whole range into the page cache and returns without waiting for it. A hint: errors
/// are ignored.
pub(crate) fn will_need(file: &File, offset: u64, len: u64) {
    let end = offset.saturating_add(len);
    let step = step(file);
    let mut at = offset;
    while at < end {
        let n = step.min(end - at);
        if let Some(n) = NonZeroU64::new(n)
            && fadvise(file, at, Some(n), Advice::WillNeed).is_err()
        {
            return;
        }
        at += n;
    }
}

/// The bytes one `WILLNEED` call reads on `file`'s device (cached per device).
fn step(file: &File) -> u64 {
    let Ok(stat) = fstat(file) else {
        return DEFAULT_STEP;
    };
    let dev = stat.st_dev;
    static STEPS: OnceLock<Mutex<HashMap<u64, u64>>> = OnceLock::new();
    let mut steps = STEPS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *steps
        .entry(dev)
        .or_insert_with(|| step_of(Path::new("/sys"), major(dev), minor(dev)))
}

/// The per-call readahead of device `maj:min` as sysfs under `sys` describes it: the larger
/// of its largest request (`max_sectors_kb`) and its readahead (`read_ahead_kb`), the
/// kernel's cap on one `WILLNEED`. A partition's limits are its disk's; a filesystem without
/// a block device (NFS, FUSE) has only a readahead (`/sys/class/bdi`).
fn step_of(sys: &Path, maj: u32, min: u32) -> u64 {
    let found = match queue_of(sys, maj, min) {
        Some(queue) => kib(&queue.join("max_sectors_kb")).max(kib(&queue.join("read_ahead_kb"))),
        None => kib(&sys.join(format!("class/bdi/{maj}:{min}/read_ahead_kb"))),
    };
    found.map_or(DEFAULT_STEP, |s| s.clamp(MIN_STEP, MAX_STEP))
}

/// The readahead of `file`'s device now (`read_ahead_kb`, in bytes), where sysfs says.
/// Read afresh on every call: it can be changed at any time (`blockdev --setra`).
pub(crate) fn readahead(file: &File) -> Option<u64> {
    let stat = fstat(file).ok()?;
    readahead_of(Path::new("/sys"), major(stat.st_dev), minor(stat.st_dev))
}

/// What a fault that misses the page cache reads in a mapping advised `MADV_HUGEPAGE`: two
/// 2 MiB folios (the kernel's `do_sync_mmap_readahead`), whatever the readahead size.
const HUGE_FAULT_READ: u64 = 4 << 20;

/// The advice for a mapping of `file` read front to back: `MADV_HUGEPAGE` where its faults
/// would otherwise read less than the 4 MiB that advice makes them read (the kernel's
/// default 128 KiB readahead: 5,329 requests of 256 KiB for a mapped hf-moe faulted in cold,
/// 337 of 4 MiB advised), and not where the readahead is larger: there the advice replaces
/// a readahead that grows and runs ahead of the faults with two folios read per fault
/// (this VM's 8 MiB readahead: touching a mapped 1.18 GiB checkpoint cold took 1.4-1.9 s
/// advised, 0.34-0.44 s not).
pub(crate) fn sequential_advice(file: &File) -> &'static [memmap2::Advice] {
    advice_for(readahead(file))
}

/// The advice for a mapping of `file` read the way `pattern` says (both kinds of mapping
/// take it): read front to back, [`sequential_advice`]; a sparse selection, no readahead
/// and no huge pages, so that faults read nothing around it.
pub(crate) fn mapping_advice(
    file: &File,
    pattern: crate::AccessPattern,
) -> &'static [memmap2::Advice] {
    use memmap2::Advice;
    match pattern {
        crate::AccessPattern::Sequential => sequential_advice(file),
        crate::AccessPattern::Sparse => &[Advice::Random, Advice::NoHugePage],
    }
}

/// [`sequential_advice`] for a device whose readahead is `readahead` (None: unknown).
fn advice_for(readahead: Option<u64>) -> &'static [memmap2::Advice] {
    use memmap2::Advice;
    match readahead {
        Some(bytes) if bytes >= HUGE_FAULT_READ => &[Advice::Sequential],
        _ => &[Advice::Sequential, Advice::HugePage],
    }
}

fn readahead_of(sys: &Path, maj: u32, min: u32) -> Option<u64> {
    match queue_of(sys, maj, min) {
        Some(queue) => kib(&queue.join("read_ahead_kb")),
        None => kib(&sys.join(format!("class/bdi/{maj}:{min}/read_ahead_kb"))),
    }
}

/// The request queue of block device `maj:min` under `sys` (a partition's is its disk's).
fn queue_of(sys: &Path, maj: u32, min: u32) -> Option<std::path::PathBuf> {
    let block = sys.join(format!("dev/block/{maj}:{min}"));
    [block.join("queue"), block.join("../queue")]
        .into_iter()
        .find(|q| q.is_dir())
}

/// A sysfs size in KiB, as bytes.
fn kib(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse::<u64>().ok().map(|k| k << 10)
}

/// `POSIX_FADV_DONTNEED` on a range: its clean page-cache pages are dropped.
pub(crate) fn drop_cache(file: &File, offset: u64, len: u64) {
    if let Some(len) = NonZeroU64::new(len) {
        let _ = fadvise(file, offset, Some(len), Advice::DontNeed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_step_is_the_larger_of_the_request_and_readahead_sizes_and_readahead_is_read_alone() {
        let sys = tempfile::tempdir().unwrap();
        let write = |rel: &str, text: &str| {
            let path = sys.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        // A disk.
        write("dev/block/8:0/queue/max_sectors_kb", "1280\n");
        write("dev/block/8:0/queue/read_ahead_kb", "128\n");
        assert_eq!(step_of(sys.path(), 8, 0), 1280 << 10);
        // A partition: its disk's queue, reached through the partition's link and `..`.
        write("devices/sdb/queue/max_sectors_kb", "256");
        write("devices/sdb/queue/read_ahead_kb", "128");
        write("devices/sdb/sdb1/partition", "1");
        std::os::unix::fs::symlink(
            sys.path().join("devices/sdb/sdb1"),
            sys.path().join("dev/block/8:17"),
        )
        .unwrap();
        assert_eq!(step_of(sys.path(), 8, 17), 256 << 10);
        // The readahead alone (what decides a mapping's advice): the disk's for a partition.
        assert_eq!(readahead_of(sys.path(), 8, 17), Some(128 << 10));
        write("dev/block/9:0/queue/max_sectors_kb", "512");
        write("dev/block/9:0/queue/read_ahead_kb", "8192");
        assert_eq!(step_of(sys.path(), 9, 0), 8192 << 10);
        // A network filesystem: readahead only.
        write("class/bdi/0:53/read_ahead_kb", "1024");
        assert_eq!(step_of(sys.path(), 0, 53), 1 << 20);
        assert_eq!(readahead_of(sys.path(), 0, 53), Some(1 << 20));
        assert_eq!(readahead_of(sys.path(), 0, 99), None);
        // Nothing known, or nonsense: the kernel's default, or the bounds.
        assert_eq!(step_of(sys.path(), 0, 99), DEFAULT_STEP);
        write("class/bdi/0:54/read_ahead_kb", "0");
        assert_eq!(step_of(sys.path(), 0, 54), MIN_STEP);
        write("class/bdi/0:55/read_ahead_kb", "cheese");
        assert_eq!(step_of(sys.path(), 0, 55), DEFAULT_STEP);
    }

    #[test]
    fn huge_pages_are_advised_only_where_faults_would_read_less_than_they_make_them() {
        use memmap2::Advice;
        let huge = |ra| advice_for(ra).contains(&Advice::HugePage);
        assert!(huge(Some(128 << 10)), "the kernel's default readahead");
        assert!(huge(Some(2 << 20)));
        assert!(huge(None), "unknown: as measured for the default");
        assert!(!huge(Some(4 << 20)));
        assert!(!huge(Some(8 << 20)), "this VM's readahead");
        assert!(advice_for(Some(8 << 20)).contains(&Advice::Sequential));
    }

    /// The bytes of the first `len` of `file` in the page cache.
    fn resident(file: &File, len: u64) -> u64 {
        // SAFETY: a private read-only mapping of a file this test owns and never truncates;
        // the mapping is never dereferenced, only asked about with `mincore`.
        let map = unsafe { memmap2::Mmap::map(file) }.unwrap();
        crate::auto::resident_pages_of(&map, 0, len.div_ceil(4096)).unwrap() * 4096
    }

    #[test]
    fn will_need_reads_the_whole_range_not_one_readahead() {
        let len: u64 = 48 << 20;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let block = vec![3u8; 1 << 20];
        for _ in 0..len >> 20 {
            f.write_all(&block).unwrap();
        }
        f.as_file().sync_all().unwrap();
        drop_cache(f.as_file(), 0, len);
        if resident(f.as_file(), len) == len {
            // A filesystem that keeps every page (tmpfs): nothing to show here.
            return;
        }
        will_need(f.as_file(), 0, len);
        // Pages under read count as in the page cache; give slow storage a moment anyway.
        let mut got = resident(f.as_file(), len);
        for _ in 0..100 {
            if got == len {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            got = resident(f.as_file(), len);
        }
        assert_eq!(got, len, "{got} of {len} bytes read ahead");
    }
}
