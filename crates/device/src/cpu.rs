//! The CPU target: owned, page-aligned host memory that reads land in directly.

use crate::{Device, DeviceError, Region, Target, check_ranges};
use memmap2::{MmapMut, MmapOptions};
use std::ops::Range;

/// With huge pages asked for, allocations at least this large get the advice.
const HUGE_PAGE_MIN: u64 = 4 << 20;

/// Owned, page-aligned host memory (an anonymous map: zeroed lazily by the kernel, no
/// up-front touch of every page).
#[derive(Debug)]
pub struct HostBuffer {
    map: Option<MmapMut>,
}

impl HostBuffer {
    /// Allocates `len` bytes.
    pub fn new(len: u64) -> Result<HostBuffer, DeviceError> {
        HostBuffer::with_huge_pages(len, false)
    }

    /// Allocates `len` bytes, asking for transparent huge pages when `huge_pages` is set.
    ///
    /// Filling fresh memory costs a page fault and a zeroing per 4 KiB page, the largest
    /// single cost of an owned load; 2 MiB pages make faults 512 times rarer. But where the
    /// kernel's THP `defrag` setting is `madvise` (a common default), the advice makes
    /// allocations stall in direct compaction when free memory is fragmented: measured
    /// here, loads of 1 GiB took either 0.27 s or about 2 s with the advice, and a steady
    /// 0.42 s without. Hence off by default.
    pub fn with_huge_pages(len: u64, huge_pages: bool) -> Result<HostBuffer, DeviceError> {
        if len == 0 {
            return Ok(HostBuffer { map: None });
        }
        let err = |reason: String| DeviceError::Alloc {
            bytes: len,
            device: "cpu".into(),
            reason,
        };
        let len_usize =
            usize::try_from(len).map_err(|_| err("larger than the address space".into()))?;
        let map = MmapOptions::new()
            .len(len_usize)
            .map_anon()
            .map_err(|e| err(e.to_string()))?;
        #[cfg(target_os = "linux")]
        if huge_pages && len >= HUGE_PAGE_MIN {
            // A hint: where transparent huge pages are disabled the kernel ignores it.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(HostBuffer { map: Some(map) })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Loads into host memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTarget {
    /// Ask for transparent huge pages (see [`HostBuffer::with_huge_pages`]).
    pub huge_pages: bool,
}

/// A region of a [`HostBuffer`]: the final memory itself.
#[derive(Debug)]
pub struct CpuRegion<'a> {
    bytes: &'a mut [u8],
}

impl<'a> CpuRegion<'a> {
    /// `bytes` of host memory as a region, for a caller that carves its regions itself
    /// (regions of one buffer filled while other parts of it are in use).
    pub fn new(bytes: &'a mut [u8]) -> CpuRegion<'a> {
        CpuRegion { bytes }
    }
}

impl Target for CpuTarget {
    type Alloc = HostBuffer;
    type Memory = HostBuffer;
    type Region<'a> = CpuRegion<'a>;

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn allocate(&self, bytes: u64) -> Result<HostBuffer, DeviceError> {
        HostBuffer::with_huge_pages(bytes, self.huge_pages)
    }

    fn regions<'a>(
        &'a self,
        alloc: &'a mut HostBuffer,
        ranges: &[Range<u64>],
    ) -> Result<Vec<CpuRegion<'a>>, DeviceError> {
        let mut rest = alloc.as_mut_slice();
        check_ranges(ranges, rest.len() as u64)?;
        let mut consumed = 0u64;
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            // Safe splitting: each region is carved off the front of what is left.
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((r.start - consumed) as usize);
            let (bytes, tail) = tail.split_at_mut((r.end - r.start) as usize);
            out.push(CpuRegion { bytes });
            rest = tail;
            consumed = r.end;
        }
        Ok(out)
    }

    fn finish(&self, alloc: HostBuffer) -> Result<HostBuffer, DeviceError> {
        Ok(alloc)
    }
}

impl Region for CpuRegion<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn fill<E: From<DeviceError>>(
        self,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        populate(self.bytes);
        fill(self.bytes)
    }
}

/// `MADV_POPULATE_WRITE` (Linux 5.14); not in every libc crate version.
#[cfg(target_os = "linux")]
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults in the pages under `bytes` in one batch before a read fills them.
///
/// Fresh memory costs a page fault per 4 KiB page, taken one at a time inside the kernel's
/// copy to user space; populating first does the same work in a loop without the per-fault
/// entry and exit. Measured with `weightlift load` on 2 GiB warm: 0.61-0.73 s against
/// 0.76-0.98 s without. Kernels without the advice answer EINVAL and the reads fault as
/// before.
fn populate(bytes: &mut [u8]) {
    #[cfg(target_os = "linux")]
    if !bytes.is_empty() {
        let start = bytes.as_ptr() as usize & !(4096 - 1);
        let end = (bytes.as_ptr() as usize + bytes.len()).next_multiple_of(4096);
        // SAFETY: `start..end` covers the pages that hold at least one byte of `bytes`, all
        // of them mapped and writable (`bytes` is a live mutable slice). POPULATE_WRITE only
        // makes those pages present and writable; it never changes their contents, so
        // neighbouring regions being written by other threads are unaffected.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_fill_their_own_bytes() {
        let t = CpuTarget::default();
        let mut alloc = t.allocate(10_000).unwrap();
        assert_eq!(alloc.as_slice().as_ptr() as usize % 4096, 0);
        let regions = t
            .regions(&mut alloc, &[0..10, 64..100, 5000..10_000])
            .unwrap();
        for (i, r) in regions.into_iter().enumerate() {
            r.fill(|buf| {
                buf.fill(i as u8 + 1);
                Ok::<(), DeviceError>(())
            })
            .unwrap();
        }
        let mem = t.finish(alloc).unwrap();
        let s = mem.as_slice();
        assert!(s[..10].iter().all(|&b| b == 1));
        assert!(s[10..64].iter().all(|&b| b == 0));
        assert!(s[64..100].iter().all(|&b| b == 2));
        assert!(s[5000..].iter().all(|&b| b == 3));
        assert!(t.regions(&mut t.allocate(10).unwrap(), &[0..11]).is_err());
        assert!(t.allocate(0).unwrap().is_empty());
    }
}
