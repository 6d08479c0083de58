//! Memory-mapped reads: the file's pages are mapped and copied out with `memcpy`.
//!
//! Cheap to open and the only backend that can hand out zero-copy views, but on network
//! filesystems every 4 KiB page fault is a round trip, and a file truncated under the
//! mapping crashes the process with `SIGBUS` (hence the `unsafe` constructor).

use crate::{AccessPattern, BackendKind, ByteSource, eof_error};
use memmap2::Mmap;
use std::fs::File;
use std::io;
use std::path::Path;

/// A memory-mapped file.
#[derive(Debug)]
pub struct MmapSource {
    map: Mmap,
    file: File,
}

impl MmapSource {
    /// Maps `path` read-only.
    ///
    /// # Safety
    ///
    /// The file must not be truncated or modified while the source (or any slice borrowed
    /// from [`ByteSource::mapped`]) is alive: truncation raises `SIGBUS` on access, and
    /// modification changes memory that safe code holds as immutable.
    pub unsafe fn open(path: &Path) -> io::Result<MmapSource> {
        let file = File::open(path)?;
        // SAFETY: the caller promises the file is neither truncated nor modified while
        // mapped (this function's contract).
        let map = unsafe { Mmap::map(&file)? };
        let source = MmapSource { map, file };
        // Loads read whole ranges front to back: ask for aggressive readahead.
        source.hint(AccessPattern::Sequential);
        Ok(source)
    }
}

impl MmapSource {
    /// The whole file, as memory.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }
}

impl ByteSource for MmapSource {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| self.map.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(eof_error(
                offset,
                buf.len(),
                self.len().saturating_sub(offset),
            )),
        }
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Mmap
    }

    fn hint(&self, pattern: AccessPattern) {
        // As `MappedFile::hint` does, for the same reasons: read front to back, faults read
        // 2 MiB folios where the readahead is smaller; a sparse selection reads nothing
        // around it.
        let advice = crate::readahead::mapping_advice(&self.file, pattern);
        for &advice in advice {
            let _ = self.map.advise(advice);
        }
    }

    fn mapped(&self) -> Option<&[u8]> {
        Some(&self.map)
    }

    fn current_len(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.len())
    }

    fn drop_cache(&self, offset: u64, len: u64) {
        crate::readahead::drop_cache(&self.file, offset, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_and_bounds() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1, 2, 3, 4, 5]).unwrap();
        // SAFETY: the temporary file is private to this test and not modified while mapped.
        let src = unsafe { MmapSource::open(f.path()).unwrap() };
        let mut buf = [0; 3];
        src.read_exact_at(2, &mut buf).unwrap();
        assert_eq!(buf, [3, 4, 5]);
        let err = src.read_exact_at(3, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = src.read_exact_at(u64::MAX, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(src.mapped(), Some(&[1u8, 2, 3, 4, 5][..]));
    }
}
