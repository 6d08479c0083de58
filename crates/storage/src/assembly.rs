//! Memory assembled from pieces of files without copying them: each piece's whole pages are
//! the page cache's own, mapped privately (copy-on-write) at the piece's place, and only the
//! bytes that cannot be mapped (the pages a piece shares with its neighbours, pieces whose
//! file offset is out of step with their place) are copied in.
//!
//! A fused parameter (a layer's experts stacked into one tensor, gate and up side by side)
//! gathers tensors that lie apart in the file, so it cannot be one view of the file's
//! mapping, and filling fresh memory with them costs a page fault and a zeroing per 4 KiB
//! page on top of the copy: on a two-core machine, 0.37 s for the 1.2 GB of experts of a
//! 24-layer x 64-expert checkpoint already in the page cache, where assembling the same
//! tensors took 0.09 s and touching every page of them afterwards 0.07 s.
//!
//! A page can be mapped at an address only with the same offset within its page as in the
//! file, so an assembly has a *phase*: its first byte sits that far into a page. Pieces
//! whose file offset and place differ in phase are copied whole.

use crate::MappedFile;
use rustix::mm::{MapFlags, ProtFlags};
use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;

/// The page size mappings are made in.
const PAGE: usize = 4096;

/// Pieces with fewer whole pages than this are copied: a mapping costs a system call and an
/// entry in the process's map table (see [`map_room`]), worth it only for large pieces.
pub const MIN_MAPPED: usize = 16 * PAGE;

/// Memory of a given length whose pieces are placed from files ([`Assembly::place`]);
/// bytes no piece covers read as zero. Unmapped when dropped.
#[derive(Debug)]
pub struct Assembly {
    /// The reservation: `reserved` bytes of private anonymous memory, page-aligned.
    base: NonNull<u8>,
    reserved: usize,
    /// Where the assembly's first byte is in the reservation (its phase).
    phase: usize,
    len: usize,
}

// SAFETY: the assembly owns its reservation (nothing else maps or unmaps it); the bytes are
// plain memory, written only through `place`, whose contract makes callers keep placements
// and reads from racing.
unsafe impl Send for Assembly {}
// SAFETY: as above: shared references only read, or place under `place`'s contract.
unsafe impl Sync for Assembly {}

impl Assembly {
    /// Reserves `len` bytes starting `phase` bytes into a page (`phase` is taken modulo the
    /// page size): private anonymous memory, not backed until touched or placed.
    pub fn new(len: usize, phase: usize) -> io::Result<Assembly> {
        let phase = phase % PAGE;
        let reserved = len
            .checked_add(phase + PAGE)
            .map(|n| n.div_ceil(PAGE) * PAGE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "assembly too large"))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks: it overlaps
        // nothing of this process. `NORESERVE`: pages placed from files are never backed by
        // anonymous memory, so none is accounted for them.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                reserved,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        let base =
            NonNull::new(base.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Assembly {
            base,
            reserved,
            phase,
            len,
        })
    }

    /// Where the first byte is within its page.
    pub fn phase(&self) -> usize {
        self.phase
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes (zero where nothing was placed).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `phase..phase + len` lies inside the live reservation (see `new`), which
        // this assembly owns; it is readable memory (anonymous or a private file mapping),
        // and `place`'s contract keeps placements from running while it is borrowed.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(self.phase), self.len) }
    }

    /// Places `len` bytes of `file` from `offset` at byte `at` of the assembly: the whole
    /// pages inside the piece are mapped from the file (where `offset` and `at` are in the
    /// same phase and there are at least [`MIN_MAPPED`] bytes of them), the rest copied from
    /// the file. Returns the bytes mapped (0: all copied).
    ///
    /// Copied bytes are read from the file: a range it no longer covers is an `UnexpectedEof`
    /// error, not a crash.
    ///
    /// # Safety
    ///
    /// - The file must not be truncated or modified while the assembly lives (the contract
    ///   of [`MappedFile::open`]: mapped pages past a truncation raise `SIGBUS` when
    ///   touched).
    /// - Nothing may read or write `at..at + len` of the assembly while this runs (no slice
    ///   from [`Assembly::as_slice`] alive); placements of pieces that do not overlap may run
    ///   at once on several threads.
    pub unsafe fn place(
        &self,
        file: &MappedFile,
        offset: u64,
        len: usize,
        at: usize,
    ) -> io::Result<usize> {
        let end = self.piece_end(at, len)?;
        offset
            .checked_add(len as u64)
            .filter(|&e| e <= file.len() as u64)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "bytes {offset}+{len} are outside the {} byte file",
                        file.len()
                    ),
                )
            })?;
        if len == 0 {
            return Ok(0);
        }
        // Positions in the reservation.
        let (start, stop) = (self.phase + at, self.phase + end);
        let (lo, hi) = self.whole_pages(at, end);
        let in_phase = (offset % PAGE as u64) as usize == start % PAGE;
        let mapped = if in_phase && hi > lo && hi - lo >= MIN_MAPPED {
            hi - lo
        } else {
            0
        };
        let (copy_head, copy_tail) = if mapped > 0 {
            (lo - start, stop - hi)
        } else {
            (len, 0)
        };
        // The copies first: a file cut short fails them (a short read) before anything is
        // mapped past its end.
        if copy_head > 0 {
            // SAFETY: the range is inside the piece (see `copy_in`).
            unsafe { self.copy_in(file, offset, start, copy_head) }?;
        }
        if copy_tail > 0 {
            // SAFETY: as above.
            unsafe { self.copy_in(file, offset + (hi - start) as u64, hi, copy_tail) }?;
        }
        if mapped > 0 {
            // SAFETY: `lo..hi` is page-aligned and inside this assembly's reservation (it
            // lies within `start..stop`, checked above to be inside the assembly), so
            // `FIXED` replaces only pages this assembly owns, which nothing reads meanwhile
            // (this function's contract). The file offset is page-aligned (same phase as
            // `lo`) and, with `len`, inside the file (checked above). Private: writes to the
            // pages never reach the file. The file's contract is the caller's.
            let got = unsafe {
                rustix::mm::mmap(
                    self.base.as_ptr().add(lo).cast::<c_void>(),
                    mapped,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::PRIVATE | MapFlags::FIXED,
                    file.file(),
                    offset + (lo - start) as u64,
                )
            }?;
            debug_assert_eq!(got.cast::<u8>(), self.base.as_ptr().wrapping_add(lo));
        }
        Ok(mapped)
    }

    /// Maps in the pages of `at..at + len` that [`Assembly::place`] mapped from a file (reading
    /// those not in the page cache) and touches each once, so that touching them later costs
    /// no page fault (one system call, where touching takes a fault per few pages) and no
    /// first access (see `MappedFile::populate`). Worth it on the threads that place while
    /// the disk still reads: the faults a reader would take later are taken while the disk
    /// is the bound (hf-moe cold, `from_pretrained` and a touch of every parameter, 4 runs
    /// each: 0.85-0.92 s against 0.94-1.07 s with the mapping alone).
    ///
    /// A range whose file was cut short is an `UnexpectedEof` error (where a touch would
    /// raise `SIGBUS`). On kernels without `MADV_POPULATE_READ` (before 5.14) nothing is
    /// done: the pages fault in when touched.
    ///
    /// # Safety
    ///
    /// As [`Assembly::place`]: nothing places into `at..at + len` meanwhile.
    pub unsafe fn populate(&self, at: usize, len: usize) -> io::Result<()> {
        let end = self.piece_end(at, len)?;
        let (lo, hi) = self.whole_pages(at, end);
        if hi <= lo {
            return Ok(());
        }
        // SAFETY: `lo..hi` is page-aligned and inside the reservation, which this assembly
        // owns; `MADV_POPULATE_READ` only maps pages in (private mappings stay shared with
        // the page cache until written), it changes no byte.
        let advised = unsafe {
            rustix::mm::madvise(
                self.base.as_ptr().add(lo).cast::<c_void>(),
                hi - lo,
                rustix::mm::Advice::LinuxPopulateRead,
            )
        };
        match advised {
            Ok(()) => {
                // SAFETY: `lo..hi` is inside the reservation, mapped and readable, and nothing
                // writes it meanwhile (this function's contract).
                let pages =
                    unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(lo), hi - lo) };
                crate::mapped::first_touch(pages);
                Ok(())
            }
            Err(e) if e == rustix::io::Errno::FAULT => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a file placed in the assembly ended before its piece (was it truncated?)",
            )),
            Err(e) if e == rustix::io::Errno::INVAL => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The end of a piece of `len` bytes at `at`, checked to lie inside the assembly.
    fn piece_end(&self, at: usize, len: usize) -> io::Result<usize> {
        at.checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a piece of {len} bytes at {at} overflows an assembly of {}",
                        self.len
                    ),
                )
            })
    }

    /// The whole pages inside bytes `at..end` of the assembly, as positions in the
    /// reservation (`lo >= hi`: none): what [`Assembly::place`] can map.
    fn whole_pages(&self, at: usize, end: usize) -> (usize, usize) {
        (
            (self.phase + at).div_ceil(PAGE) * PAGE,
            (self.phase + end) / PAGE * PAGE,
        )
    }

    /// Reads `len` bytes of `file` from `offset` into position `to` of the reservation (one
    /// positioned read: the bytes are in the page cache, read there by the caller).
    ///
    /// # Safety
    ///
    /// `to..to + len` is inside the assembly and nothing else reads or writes it meanwhile
    /// (`place`'s contract).
    unsafe fn copy_in(
        &self,
        file: &MappedFile,
        offset: u64,
        to: usize,
        len: usize,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // SAFETY: the range is inside the reservation and not otherwise accessed (this
        // function's contract); it is this assembly's own memory, not the file's mapping.
        let dest = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(to), len) };
        file.file().read_exact_at(dest, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "file ended before byte {} (was it truncated?)",
                        offset + len as u64
                    ),
                )
            } else {
                e
            }
        })
    }
}

impl Drop for Assembly {
    fn drop(&mut self) {
        // SAFETY: the reservation was mapped by `new` (pieces placed inside it replaced
        // parts of it), and nothing borrowed from the assembly outlives it.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast::<c_void>(), self.reserved) };
    }
}

/// How many more mappings this process may make, with half of the kernel's limit
/// (`vm.max_map_count`) left to everything else it does: a placed piece adds up to two
/// (the file's pages and the split of the reservation around them). `None` where the
/// limit is unknown (not Linux): then nothing is placed by mapping.
pub fn map_room() -> Option<usize> {
    let limit: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let maps = std::fs::read("/proc/self/maps").ok()?;
    let used = maps.iter().filter(|&&b| b == b'\n').count();
    Some((limit / 2).saturating_sub(used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len as u64).map(|i| (i * 7 + i / 4093) as u8).collect();
        f.write_all(&data).unwrap();
        (f, data)
    }

    #[test]
    fn pieces_in_any_phase_assemble_to_the_files_bytes() {
        let (f, data) = file_of(1 << 20);
        // SAFETY: the temporary file is private to this test and never changed.
        let map = unsafe { MappedFile::open(f.path()).unwrap() };
        // (file offset, length), placed one after the other in this order, from phase 100.
        let pieces = [
            (100 + 5 * 4096, 20 * 4096), // in phase: mapped, partial pages copied
            (300_000, 17 * 4096 + 5),    // out of phase: copied
            (8, 10),                     // tiny
            (4096 * 100 + 100 + 20 * 4096 + 17 * 4096 + 15, 40 * 4096),
            (0, 0),
        ];
        let total: usize = pieces.iter().map(|p| p.1).sum();
        let assembly = Assembly::new(total + 3, 100).unwrap();
        let (mut at, mut expect, mut mapped) = (0, Vec::new(), 0);
        for (offset, len) in pieces {
            // SAFETY: the file is not changed; nothing reads the assembly meanwhile.
            mapped += unsafe { assembly.place(&map, offset as u64, len, at) }.unwrap();
            expect.extend_from_slice(&data[offset..offset + len]);
            at += len;
        }
        expect.extend_from_slice(&[0, 0, 0]);
        assert_eq!(assembly.as_slice(), &expect[..]);
        assert!(
            mapped >= 19 * 4096,
            "the in-phase pieces are mapped: {mapped}"
        );
        // Writes are private.
        let (ptr, len) = (assembly.as_slice().as_ptr() as *mut u8, assembly.len());
        // SAFETY: the assembly's bytes, not borrowed elsewhere now.
        unsafe { std::slice::from_raw_parts_mut(ptr, len)[4096 * 3] ^= 0xff };
        assert_eq!(std::fs::read(f.path()).unwrap(), data);
    }

    #[test]
    fn populating_maps_the_placed_pages_in_and_changes_no_byte() {
        let (f, data) = file_of(64 * 4096);
        // SAFETY: the temporary file is private to this test and never changed.
        let map = unsafe { MappedFile::open(f.path()).unwrap() };
        let assembly = Assembly::new(40 * 4096, 100).unwrap();
        // SAFETY: the file is not changed; nothing reads the assembly meanwhile.
        unsafe {
            assert!(assembly.place(&map, 100 + 4096, 40 * 4096, 0).unwrap() > 0);
            assembly.populate(0, 40 * 4096).unwrap();
            assert!(
                assembly.populate(1, 40 * 4096).is_err(),
                "past the assembly"
            );
        }
        assert_eq!(assembly.as_slice(), &data[100 + 4096..100 + 41 * 4096]);
    }

    #[test]
    fn populating_a_piece_of_a_truncated_file_is_an_error_not_a_crash() {
        let (f, _) = file_of(64 * 4096);
        // SAFETY: the file is truncated below on purpose, and the assembly's pages past the
        // cut are never touched: only populated, which reports it.
        let map = unsafe { MappedFile::open(f.path()).unwrap() };
        let assembly = Assembly::new(48 * 4096, 0).unwrap();
        // SAFETY: as above.
        unsafe { assembly.place(&map, 8 * 4096, 48 * 4096, 0).unwrap() };
        f.as_file().set_len(16 * 4096).unwrap();
        // SAFETY: as above.
        let err = unsafe { assembly.populate(0, 48 * 4096) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn bad_pieces_are_errors() {
        let (f, _) = file_of(64 * 4096);
        // SAFETY: as above.
        let map = unsafe { MappedFile::open(f.path()).unwrap() };
        let assembly = Assembly::new(8192, 0).unwrap();
        // SAFETY: as above.
        unsafe {
            assert!(
                assembly.place(&map, 0, 8193, 0).is_err(),
                "past the assembly"
            );
            assert!(
                assembly.place(&map, 0, 100, 8100).is_err(),
                "past the assembly"
            );
            assert!(
                assembly.place(&map, 64 * 4096 - 10, 11, 0).is_err(),
                "past the file"
            );
            assert!(assembly.place(&map, u64::MAX, 1, 0).is_err(), "overflow");
        }
        assert!(Assembly::new(usize::MAX, 0).is_err());
        assert!(map_room().is_some_and(|n| n > 0) || !cfg!(target_os = "linux"));
    }
}
