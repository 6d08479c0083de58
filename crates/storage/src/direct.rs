//! Positioned reads with `O_DIRECT`: the data goes from the device into our memory without
//! passing through (or evicting anything from) the page cache.
//!
//! `O_DIRECT` needs the buffer address, the file offset and the length aligned to the
//! block size (4096 here). Requests rarely are, so reads go through a small pool of
//! page-aligned bounce buffers (one per concurrent reader, [`BOUNCE_LEN`] each) and are
//! copied out; that copy runs at memory speed, far above what a cold disk delivers. Where
//! the filesystem refuses `O_DIRECT` (at open or at the first read), the source logs a
//! warning and continues with buffered reads.

use crate::aligned::{AlignedBuf, PAGE};
use crate::pread::{advise, read_exact_at};
use crate::readahead::{drop_cache, will_need};
use crate::{AccessPattern, BackendKind, ByteSource, eof_error};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Size of each bounce buffer: the largest single `O_DIRECT` read.
pub const BOUNCE_LEN: usize = 8 << 20;

/// A file read with `O_DIRECT`, or with buffered reads where that is refused.
#[derive(Debug)]
pub struct DirectSource {
    direct: Option<File>,
    buffered: File,
    path: PathBuf,
    len: u64,
    refused: AtomicBool,
    bounces: Mutex<Vec<AlignedBuf>>,
}

impl DirectSource {
    /// Opens `path` with `O_DIRECT`, falling back to buffered reads where refused.
    pub fn open(path: &Path) -> io::Result<DirectSource> {
        Self::open_with(path, |p| {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(p)
        })
    }

    /// Opens with a custom way of opening the `O_DIRECT` descriptor (tests use it to
    /// simulate a filesystem that refuses `O_DIRECT`).
    fn open_with(
        path: &Path,
        open_direct: impl FnOnce(&Path) -> io::Result<File>,
    ) -> io::Result<DirectSource> {
        let buffered = File::open(path)?;
        let len = buffered.metadata()?.len();
        let direct = match open_direct(path) {
            Ok(f) => Some(f),
            Err(e) if is_refusal(&e) => {
                log::warn!(
                    "{}: the filesystem refuses O_DIRECT ({e}); using buffered reads",
                    path.display()
                );
                None
            }
            Err(e) => return Err(e),
        };
        Ok(DirectSource {
            direct,
            buffered,
            path: path.to_path_buf(),
            len,
            refused: AtomicBool::new(false),
            bounces: Mutex::new(Vec::new()),
        })
    }

    /// Whether reads bypass the page cache (false after a fallback).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && !self.refused.load(Ordering::Relaxed)
    }

    /// Reads `offset..offset + total` in order, handing each contiguous piece to `sink`.
    /// Returns `Ok(false)` when `O_DIRECT` was refused before any byte was delivered.
    fn read_direct(
        &self,
        direct: &File,
        offset: u64,
        total: usize,
        sink: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        let end = offset.checked_add(total as u64).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bytes {offset}+{total} run past the largest file offset"),
            )
        })?;
        let mut bounce = self.take_bounce()?;
        let result = (|| {
            let mut window = offset & !(PAGE as u64 - 1);
            while window < end {
                let want = (end - window)
                    .next_multiple_of(PAGE as u64)
                    .min(BOUNCE_LEN as u64) as usize;
                let buf = &mut bounce.as_mut_slice()[..want];
                let mut got = 0usize;
                while got < want {
                    match direct.read_at(&mut buf[got..], window + got as u64) {
                        Ok(0) => break,
                        Ok(n) => {
                            got += n;
                            // Only the last block of a file comes back short.
                            if n % PAGE != 0 {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e)
                            if is_refusal(&e)
                                && window == offset & !(PAGE as u64 - 1)
                                && got == 0 =>
                        {
                            return Ok(false);
                        }
                        Err(e) => return Err(e),
                    }
                }
                let from = offset.max(window);
                let to = end.min(window + want as u64);
                if window + (got as u64) < to {
                    return Err(eof_error(
                        offset,
                        total,
                        (window + got as u64).saturating_sub(offset),
                    ));
                }
                sink(&buf[(from - window) as usize..(to - window) as usize]);
                window += want as u64;
            }
            Ok(true)
        })();
        self.bounces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(bounce);
        result
    }

    fn take_bounce(&self) -> io::Result<AlignedBuf> {
        let pooled = self.bounces.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(b) => Ok(b),
            None => AlignedBuf::zeroed(BOUNCE_LEN),
        }
    }

    /// Runs a read directly, or buffered where `O_DIRECT` is unavailable or refused now.
    fn read(
        &self,
        offset: u64,
        total: usize,
        sink: &mut dyn FnMut(&[u8]),
        buffered: &mut dyn FnMut(&File) -> io::Result<()>,
    ) -> io::Result<()> {
        if total == 0 {
            return Ok(());
        }
        if let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| !self.refused.load(Ordering::Relaxed))
        {
            if self.read_direct(direct, offset, total, sink)? {
                return Ok(());
            }
            if !self.refused.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "{}: the filesystem refused an O_DIRECT read; using buffered reads",
                    self.path.display()
                );
            }
        }
        buffered(&self.buffered)
    }
}

fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

impl ByteSource for DirectSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let total = buf.len();
        let mut at = 0usize;
        let mut copy = |piece: &[u8]| {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        };
        // The closure borrows `buf`; the buffered path reads into a fresh borrow below.
        let mut done = false;
        self.read(offset, total, &mut copy, &mut |_| {
            done = true;
            Ok(())
        })?;
        if done {
            read_exact_at(&self.buffered, offset, buf)?;
        }
        Ok(())
    }

    fn read_scatter_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut fallback = false;
        {
            let mut idx = 0usize;
            let mut pos = 0usize;
            let mut copy = |mut piece: &[u8]| {
                while !piece.is_empty() {
                    let dst = &mut bufs[idx][pos..];
                    let n = dst.len().min(piece.len());
                    dst[..n].copy_from_slice(&piece[..n]);
                    piece = &piece[n..];
                    pos += n;
                    if pos == bufs[idx].len() {
                        idx += 1;
                        pos = 0;
                    }
                }
            };
            self.read(offset, total, &mut |p| copy(p), &mut |_| {
                fallback = true;
                Ok(())
            })?;
        }
        if fallback {
            let mut at = offset;
            for buf in bufs.iter_mut() {
                read_exact_at(&self.buffered, at, buf)?;
                at += buf.len() as u64;
            }
        }
        Ok(())
    }

    fn hint(&self, pattern: AccessPattern) {
        // Only the buffered fallback goes through the page cache.
        advise(&self.buffered, pattern);
    }

    fn current_len(&self) -> Option<u64> {
        self.buffered.metadata().ok().map(|m| m.len())
    }

    fn drop_cache(&self, offset: u64, len: u64) {
        // Only a buffered fallback filled the page cache.
        if !self.is_direct() {
            drop_cache(&self.buffered, offset, len);
        }
    }

    fn will_need(&self, offset: u64, len: u64) {
        // Direct reads bypass the page cache: reading ahead into it would only read twice.
        if !self.is_direct() {
            will_need(&self.buffered, offset, len);
        }
    }

    fn kind(&self) -> BackendKind {
        if self.direct.is_some() {
            BackendKind::Direct
        } else {
            BackendKind::Pread
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        // A disk-backed directory: tmpfs accepts misaligned O_DIRECT and would hide bugs.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + i / 4093) as u8).collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        (dir, path, data)
    }

    #[test]
    fn unaligned_ranges_read_correctly() {
        let len = BOUNCE_LEN * 2 + 12345;
        let (_d, path, data) = file_of(len);
        let src = DirectSource::open(&path).unwrap();
        assert!(src.is_direct());
        for (off, n) in [
            (0, 1),
            (1, 4095),
            (4095, 2),
            (4096, 4096),
            (777, BOUNCE_LEN + 9999),
            (len - 3, 3),
            (len - 5000, 5000),
        ] {
            let mut buf = vec![0; n];
            src.read_exact_at(off as u64, &mut buf).unwrap();
            assert!(buf == data[off..off + n], "range {off}+{n}");
        }
        let mut a = vec![0u8; 5000];
        let mut b = vec![0u8; 0];
        let mut c = vec![0u8; BOUNCE_LEN];
        src.read_scatter_at(333, &mut [&mut b, &mut a, &mut c])
            .unwrap();
        assert!(a == data[333..5333]);
        assert!(c == data[5333..5333 + BOUNCE_LEN]);
    }

    #[test]
    fn past_end_and_truncation_are_eof() {
        let (_d, path, _) = file_of(10_000);
        let src = DirectSource::open(&path).unwrap();
        let mut buf = vec![0; 200];
        let err = src.read_exact_at(9_900, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = src.read_exact_at(4000, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn refused_o_direct_falls_back_to_buffered_reads() {
        let (_d, path, data) = file_of(50_000);
        let src =
            DirectSource::open_with(&path, |_| Err(io::Error::from_raw_os_error(libc::EINVAL)))
                .unwrap();
        assert!(!src.is_direct());
        assert_eq!(src.kind(), BackendKind::Pread);
        let mut buf = vec![0; 1000];
        src.read_exact_at(10, &mut buf).unwrap();
        assert!(buf == data[10..1010]);
        let mut a = vec![0u8; 7];
        let mut b = vec![0u8; 9];
        src.read_scatter_at(3, &mut [&mut a, &mut b]).unwrap();
        assert!(a == data[3..10] && b == data[10..19]);
        // Other open errors are not refusals: they propagate.
        let err =
            DirectSource::open_with(&path, |_| Err(io::Error::from_raw_os_error(libc::EACCES)))
                .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }
}
