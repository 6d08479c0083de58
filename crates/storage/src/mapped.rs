//! Private, copy-on-write mappings of whole files, populated in parallel: memory that holds
//! a file's bytes without a copy (the page cache's pages are mapped in), that callers may
//! write to without the file ever changing.
//!
//! This is what `safetensors.torch` gives its users (`UntypedStorage.from_file(shared=
//! False)`), with one difference: instead of faulting the pages in 4 KiB at a time on first
//! touch, [`MappedFile::populate`] asks the kernel for whole ranges at once
//! (`MADV_POPULATE_READ`, Linux 5.14), from as many threads as the caller likes.

use crate::AccessPattern;
use memmap2::{Advice, MmapMut, MmapOptions};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// A private (copy-on-write) mapping of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    map: MmapMut,
    file: File,
    /// Whether the mapping is advised for a sparse selection (see [`MappedFile::hint`]).
    sparse: AtomicBool,
}

impl MappedFile {
    /// Maps `path` privately: reads see the file, writes go to private copies of the pages.
    ///
    /// # Safety
    ///
    /// The file must not be truncated or modified while the mapping (or anything borrowed
    /// from it) lives: a page past a truncation raises `SIGBUS` when touched, and pages not
    /// yet written through the mapping show another process's writes.
    /// [`MappedFile::populate`] reports a truncation as an error rather than crashing, but
    /// bytes touched later, after a truncation, would crash.
    pub unsafe fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file is empty: nothing to map",
            ));
        }
        // SAFETY: the caller promises the file is neither truncated nor modified while
        // mapped (this function's contract). The mapping is private: nothing written
        // through it reaches the file.
        let map = unsafe { MmapOptions::new().map_copy(&file)? };
        // Faults in a mapping read around them by the file's readahead size: doubled for a
        // file read front to back, as safetensors' own mapping does (cold touches of a
        // mapped 1.2 GB checkpoint measured ~1.3x slower without).
        crate::pread::advise(&file, crate::AccessPattern::Sequential);
        let mapped = MappedFile {
            map,
            file,
            sparse: AtomicBool::new(false),
        };
        mapped.hint(AccessPattern::Sequential);
        Ok(mapped)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// Length of the mapping (the file's length when it was mapped).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never: empty files are refused).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The file mapped.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The file's length now.
    pub fn current_len(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.len())
    }

    /// Tells the kernel how the mapping will be read (readahead on page faults).
    ///
    /// Read front to back (the default), the mapping is also advised `MADV_HUGEPAGE` where
    /// the file's readahead is under 4 MiB (see `readahead::sequential_advice`): a fault
    /// that misses the page cache then reads the 2 MiB-aligned block around it as one 2 MiB
    /// folio (4 MiB ahead), whatever the file's readahead size. A script populating a fresh
    /// mapping of hf-moe cold in 16 MiB ranges (128 KiB `read_ahead_kb`, this VM's virtio
    /// disk) reached the disk in 337 requests of 4 MiB that way, against 4,198 of 325 KiB
    /// reading ahead with `POSIX_FADV_WILLNEED` and 5,329 of 256 KiB faulting. It does not
    /// apply to faults that follow an asynchronous readahead chain (one a buffered read of
    /// the file started, such as the header's): those read the readahead size, which is why
    /// loads read cold ranges with one large read before populating them. A sparse
    /// selection is advised `MADV_RANDOM` and not `MADV_HUGEPAGE`, so that faults read no
    /// bytes around the selection, and [`MappedFile::populate`] reads its ranges ahead
    /// exactly.
    pub fn hint(&self, pattern: AccessPattern) {
        let advice = crate::readahead::mapping_advice(&self.file, pattern);
        self.sparse
            .store(pattern == AccessPattern::Sparse, Ordering::Relaxed);
        // Hints: losing them only costs speed (kernels without transparent huge pages
        // refuse `MADV_HUGEPAGE`; the readahead advice stands).
        for &advice in advice {
            let _ = self.map.advise(advice);
        }
    }

    /// Marks the pages of `offset..offset + len` (the whole pages inside it) as the first to
    /// reclaim under memory pressure (`MADV_COLD`): bytes already read, so that a host short
    /// of memory evicts them before bytes not read yet. Nothing is lost or unmapped; a hint.
    pub fn cool(&self, offset: u64, len: u64) {
        self.advise_whole_pages(offset, len, rustix::mm::Advice::LinuxCold);
    }

    /// The whole pages inside `offset..offset + len`, advised with `advice` (a hint).
    fn advise_whole_pages(&self, offset: u64, len: u64, advice: rustix::mm::Advice) -> bool {
        let page = 4096u64;
        let start = offset.div_ceil(page) * page;
        let end = (offset.saturating_add(len).min(self.map.len() as u64) / page) * page;
        if start >= end {
            return false;
        }
        // SAFETY: `start..end` lies inside the live mapping (clamped to its length above) and
        // is page-aligned. The advice given here (MADV_COLD, MADV_PAGEOUT) only moves or
        // reclaims pages: their contents are read from the file again on the next touch, and
        // no Rust reference sees them change.
        let _ = unsafe {
            rustix::mm::madvise(
                self.map.as_ptr().add(start as usize) as *mut std::ffi::c_void,
                (end - start) as usize,
                advice,
            )
        };
        true
    }

    /// Gives the pages of `offset..offset + len` (the whole pages inside it) back to the
    /// kernel: reclaimed from this mapping (`MADV_PAGEOUT`) and dropped from the page cache
    /// (`POSIX_FADV_DONTNEED`), so that bytes already read do not hold memory a host short
    /// of it needs. Nothing is lost: a later touch reads them from the file again (and
    /// private copies of written pages are anonymous memory, which this leaves alone). A
    /// hint: failures only cost memory.
    pub fn release(&self, offset: u64, len: u64) {
        if self.advise_whole_pages(offset, len, rustix::mm::Advice::LinuxPageOut) {
            crate::readahead::drop_cache(&self.file, offset, len);
        }
    }

    /// Whether every page of `offset..offset + len` is in the page cache (`mincore`: the
    /// pages need not be mapped here yet). Out of bounds or on failure: false.
    pub fn resident(&self, offset: u64, len: u64) -> bool {
        let page = 4096u64;
        let end = offset.saturating_add(len).min(self.map.len() as u64);
        if offset >= end {
            return offset == end;
        }
        let (first, last) = (offset / page, end.div_ceil(page));
        crate::auto::resident_pages_of(&self.map, first, last - first)
            .is_ok_and(|n| n == last - first)
    }

    /// Brings the pages of `offset..offset + len` in (reading them from the file where they
    /// are not in the page cache), maps them and touches each once (see [`first_touch`]),
    /// so that touching them later costs nothing.
    /// Safe to call from many threads on disjoint or overlapping ranges.
    ///
    /// A range that the file no longer covers (it was truncated) is an `UnexpectedEof`
    /// error: the kernel answers `EFAULT` where a touch would raise `SIGBUS`. On kernels
    /// without `MADV_POPULATE_READ` the pages are touched one by one instead, after checking
    /// the file's current length.
    pub fn populate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.map.len() as u64)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "bytes {offset}+{len} are outside the {} byte mapping",
                        self.map.len()
                    ),
                )
            })?;
        if len == 0 {
            return Ok(());
        }
        // A sparse selection's ranges are read ahead exactly first: populating alone faults
        // them in page by page where readahead is off (MADV_RANDOM): 2.7x slower measured
        // cold (180 MB of attention weights between experts, 2.56 s against 0.93 s). Not a
        // mapping read front to back: its faults read 2 MiB folios (see `hint`), where
        // `POSIX_FADV_WILLNEED` reads single pages, in requests of at most 1 MiB, that
        // cannot be mapped as 2 MiB pages (two processes populating the same small files
        // that way reached the disk in 159 KiB requests).
        if self.sparse.load(Ordering::Relaxed) {
            crate::readahead::will_need(&self.file, offset, len);
        }
        match self
            .map
            .advise_range(Advice::PopulateRead, offset as usize, len as usize)
        {
            Ok(()) => {
                first_touch(&self.map[offset as usize..end as usize]);
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Err(self.cut(offset, end)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.touch(offset, end),
            Err(e) => Err(e),
        }
    }

    /// Populates by reading one byte per page (kernels before 5.14), once the file is known
    /// to still cover the range.
    fn touch(&self, offset: u64, end: u64) -> io::Result<()> {
        if self.current_len().is_some_and(|now| now < end) {
            return Err(self.cut(offset, end));
        }
        first_touch(&self.map[offset as usize..end as usize]);
        Ok(())
    }

    fn cut(&self, offset: u64, end: u64) -> io::Error {
        let now = self.current_len().unwrap_or(0);
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "file ended at byte {now} while mapping bytes {offset}..{end} (was it truncated?)"
            ),
        )
    }
}

/// Reads one byte of every page of `bytes` (present pages: no fault is taken).
///
/// Mapping a page in is not all its first touch costs: on a virtual machine the first access
/// to a page just read from the disk still took ~0.3 us of user time per 4 KiB page with
/// its entry present (hf-dense cold, 1.18 GiB: 0.05-0.11 s for the first touch of every
/// page after a mapped load, 0.008 s for the second; the same after a warm load). Taken
/// here, by the threads that populate while the disk reads the next ranges, it overlaps
/// the reads: `from_pretrained` of hf-dense cold plus a touch of every parameter took
/// 0.62-0.68 s against 0.76-0.85 s without, 3 runs each interleaved, and warm loads were
/// unchanged.
pub(crate) fn first_touch(bytes: &[u8]) {
    let mut sum = 0u8;
    for page in bytes.chunks(4096) {
        sum = sum.wrapping_add(page[0]);
    }
    std::hint::black_box(sum);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_populates_and_never_writes_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        // SAFETY: the temporary file is private to this test; it is truncated below only
        // after the checks that touch the mapping, and never touched after.
        let map = unsafe { MappedFile::open(f.path()).unwrap() };
        assert_eq!(map.as_slice(), &data[..]);
        map.populate(0, 100_000).unwrap();
        map.populate(4097, 3).unwrap();
        map.populate(0, 0).unwrap();
        assert!(map.populate(99_999, 2).is_err(), "past the mapping");
        assert!(map.populate(u64::MAX, 2).is_err(), "overflow");
        // Writes stay private.
        let mut private = map;
        private.map[0] = 0xff;
        assert_eq!(std::fs::read(f.path()).unwrap()[0], 0);
        // A file cut under the mapping: an error, not a crash.
        f.as_file().set_len(10_000).unwrap();
        let err = private.populate(50_000, 10_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert!(
            err.to_string().contains("file ended at byte 10000"),
            "{err}"
        );
        let empty = tempfile::NamedTempFile::new().unwrap();
        // SAFETY: as above.
        assert!(unsafe { MappedFile::open(empty.path()) }.is_err());
    }
}
