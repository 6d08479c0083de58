//! Positioned reads through the page cache: `pread` for one buffer, `preadv` for a scatter
//! read that lands one large request in many tensors' buffers with one system call per
//! 1024 buffers.

use crate::{AccessPattern, BackendKind, ByteSource, eof_error};
use rustix::fs::{Advice, fadvise};
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Most buffers one `preadv` call takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A file read with `pread`/`preadv`.
#[derive(Debug)]
pub struct PreadSource {
    file: File,
    path: PathBuf,
    len: u64,
}

impl PreadSource {
    /// Opens `path` for positioned reads.
    pub fn open(path: &Path) -> io::Result<PreadSource> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        advise(&file, AccessPattern::Sequential);
        Ok(PreadSource {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// The path this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ByteSource for PreadSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_exact_at(&self.file, offset, buf)
    }

    fn read_scatter_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut slices: Vec<IoSliceMut<'_>> = bufs
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|b| IoSliceMut::new(b))
            .collect();
        let mut rest = &mut slices[..];
        let mut done = 0u64;
        while !rest.is_empty() {
            let count = rest.len().min(IOV_MAX);
            let n = match rustix::io::preadv(&self.file, &mut rest[..count], offset + done) {
                Ok(n) => n,
                Err(e) if e == rustix::io::Errno::INTR => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(eof_error(offset, total, done));
            }
            IoSliceMut::advance_slices(&mut rest, n);
            done += n as u64;
        }
        Ok(())
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Pread
    }

    fn hint(&self, pattern: AccessPattern) {
        advise(&self.file, pattern);
    }

    fn current_len(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.len())
    }

    fn drop_cache(&self, offset: u64, len: u64) {
        crate::readahead::drop_cache(&self.file, offset, len);
    }

    fn will_need(&self, offset: u64, len: u64) {
        crate::readahead::will_need(&self.file, offset, len);
    }
}

/// Sets the kernel's readahead for `file`: deep for sequential loads, none for sparse
/// ones (large requests still go to the device as large reads).
pub(crate) fn advise(file: &File, pattern: AccessPattern) {
    let advice = match pattern {
        AccessPattern::Sequential => Advice::Sequential,
        AccessPattern::Sparse => Advice::Random,
    };
    // A hint: a filesystem that ignores it loses nothing.
    let _ = fadvise(file, 0, None, advice);
}

/// `pread` until `buf` is full, retrying interrupted and short reads.
pub(crate) fn read_exact_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(eof_error(offset, buf.len(), done as u64)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        f.write_all(&data).unwrap();
        f
    }

    #[test]
    fn scatter_read_matches_file() {
        let f = file_of(100_000);
        let expected = std::fs::read(f.path()).unwrap();
        let src = PreadSource::open(f.path()).unwrap();
        // More than IOV_MAX buffers, some empty, odd sizes.
        let sizes: Vec<usize> = (0..3000).map(|i| i % 37).collect();
        let total: usize = sizes.iter().sum();
        let mut storage: Vec<Vec<u8>> = sizes.iter().map(|&s| vec![0; s]).collect();
        let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|v| v.as_mut_slice()).collect();
        src.read_scatter_at(123, &mut bufs).unwrap();
        let got: Vec<u8> = storage.concat();
        assert_eq!(got, &expected[123..123 + total]);
    }

    #[test]
    fn reading_past_the_end_is_eof() {
        let f = file_of(1000);
        let src = PreadSource::open(f.path()).unwrap();
        let mut buf = vec![0; 100];
        let err = src.read_exact_at(950, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("file ended at byte 1000"), "{err}");
        let mut a = [0u8; 30];
        let mut b = [0u8; 30];
        let err = src.read_scatter_at(960, &mut [&mut a, &mut b]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn shrinking_file_is_detected() {
        let f = file_of(10_000);
        let src = PreadSource::open(f.path()).unwrap();
        f.as_file().set_len(5_000).unwrap();
        let mut buf = vec![0; 4_000];
        let err = src.read_exact_at(4_000, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(src.len(), 10_000);
        assert_eq!(src.current_len(), Some(5_000));
    }
}
