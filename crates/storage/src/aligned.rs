//! Page-aligned, lazily zeroed host memory from anonymous maps.
//!
//! Anonymous maps give 4096-byte alignment (what `O_DIRECT` needs) and cost nothing until
//! touched. Bounce buffers are reused, so their first-touch cost is paid once.

use memmap2::{MmapMut, MmapOptions};
use std::io;

/// An owned, page-aligned byte buffer.
#[derive(Debug)]
pub struct AlignedBuf {
    map: Option<MmapMut>,
    len: usize,
}

/// Alignment of every [`AlignedBuf`].
pub const PAGE: usize = 4096;

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (zeroed lazily by the kernel on first touch).
    pub fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        if len == 0 {
            return Ok(AlignedBuf { map: None, len: 0 });
        }
        let map = MmapOptions::new().len(len).map_anon()?;
        Ok(AlignedBuf {
            map: Some(map),
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 4095, 4097, 8 << 20] {
            let mut b = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_slice().as_ptr() as usize % PAGE, 0);
                b.as_mut_slice()[len - 1] = 7;
                assert_eq!(b.as_slice()[len - 1], 7);
            }
        }
    }
}
