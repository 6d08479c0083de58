//! Writing safetensors files.
//!
//! The layout is deterministic: tensors sorted by decreasing dtype alignment, then by name,
//! laid out back to back after a header padded with spaces to a multiple of 8 bytes. Since
//! the data region then starts 8-byte aligned and every tensor's size is a multiple of its
//! element size, each tensor starts at a multiple of its dtype's alignment.

use crate::Dtype;
use crate::error::{FormatError, Result};
use crate::header::{Metadata, PREFIX_LEN};
use std::io::{BufWriter, Write};
use std::path::Path;

/// A tensor to write: its name, dtype, shape and little-endian C-order bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// The name (must not be `__metadata__`).
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: &'a [usize],
    /// The data, exactly `elements x dtype bits / 8` bytes.
    pub data: &'a [u8],
}

/// The header bytes and data placement of a file about to be written.
///
/// Useful on its own to stream data that is not all in memory at once: write
/// [`Layout::header_bytes`], then each tensor's data in [`Layout::order`].
#[derive(Debug, Clone)]
pub struct Layout {
    header: Vec<u8>,
    order: Vec<usize>,
    offsets: Vec<(u64, u64)>,
    data_len: u64,
}

impl Layout {
    /// Lays out tensors given as `(name, dtype, shape)`. Positions in the result refer to the
    /// order of this iterator.
    pub fn new<'a, I>(tensors: I, metadata: Option<&Metadata>) -> Result<Layout>
    where
        I: IntoIterator<Item = (&'a str, Dtype, &'a [usize])>,
    {
        let specs: Vec<(&str, Dtype, &[usize])> = tensors.into_iter().collect();
        let mut sizes = Vec::with_capacity(specs.len());
        for &(name, dtype, shape) in &specs {
            if name == "__metadata__" {
                return Err(FormatError::ReservedName { name: name.into() });
            }
            let size = byte_size(dtype, shape).ok_or_else(|| FormatError::WriteSizeMismatch {
                name: name.into(),
                dtype,
                shape: shape.to_vec(),
                expected: None,
                actual: 0,
            })?;
            sizes.push(size);
        }
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by(|&a, &b| specs[b].1.cmp(&specs[a].1).then(specs[a].0.cmp(specs[b].0)));
        let mut by_name: Vec<&str> = specs.iter().map(|s| s.0).collect();
        by_name.sort_unstable();
        if let Some(w) = by_name.windows(2).find(|w| w[0] == w[1]) {
            return Err(FormatError::DuplicateTensor { name: w[0].into() });
        }

        let mut offsets = vec![(0, 0); specs.len()];
        let mut json = String::with_capacity(64 + specs.len() * 96);
        json.push('{');
        if let Some(meta) = metadata {
            json.push_str("\"__metadata__\":");
            json.push_str(&serde_json::to_string(meta).expect("string map serializes"));
        }
        let mut offset = 0u64;
        for &i in &order {
            let (name, dtype, shape) = specs[i];
            // Each size fits in u64, but their sum need not: shapes are caller input.
            let end = offset
                .checked_add(sizes[i])
                .ok_or_else(|| FormatError::SizeOverflow {
                    name: name.into(),
                    dtype,
                    shape: shape.to_vec(),
                })?;
            offsets[i] = (offset, end);
            if json.len() > 1 {
                json.push(',');
            }
            json.push_str(&serde_json::to_string(name).expect("str serializes"));
            json.push_str(":{\"dtype\":\"");
            json.push_str(dtype.name());
            json.push_str("\",\"shape\":");
            json.push_str(&serde_json::to_string(shape).expect("usize slice serializes"));
            json.push_str(&format!(",\"data_offsets\":[{offset},{end}]}}"));
            offset = end;
        }
        json.push('}');
        while !json.len().is_multiple_of(8) {
            json.push(' ');
        }
        let mut header = Vec::with_capacity(PREFIX_LEN as usize + json.len());
        header.extend_from_slice(&(json.len() as u64).to_le_bytes());
        header.extend_from_slice(json.as_bytes());
        Ok(Layout {
            header,
            order,
            offsets,
            data_len: offset,
        })
    }

    /// Prefix, JSON and padding: everything before the data region.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header
    }

    /// Input positions in the order their data follows the header.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// `data_offsets` given to the tensor at input position `i`.
    pub fn data_offsets(&self, i: usize) -> (u64, u64) {
        self.offsets[i]
    }

    /// Length of the data region.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Length of the whole file.
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len
    }
}

fn byte_size(dtype: Dtype, shape: &[usize]) -> Option<u64> {
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    dtype.byte_len(elements).map(|b| b as u64)
}

fn layout_checked(tensors: &[TensorRef<'_>], metadata: Option<&Metadata>) -> Result<Layout> {
    let layout = Layout::new(tensors.iter().map(|t| (t.name, t.dtype, t.shape)), metadata)?;
    for (i, t) in tensors.iter().enumerate() {
        let (start, end) = layout.data_offsets(i);
        if t.data.len() as u64 != end - start {
            return Err(FormatError::WriteSizeMismatch {
                name: t.name.into(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                expected: Some(end - start),
                actual: t.data.len() as u64,
            });
        }
    }
    Ok(layout)
}

/// Writes a complete file to `writer` and returns the number of bytes written.
pub fn write_to<W: Write>(
    writer: &mut W,
    tensors: &[TensorRef<'_>],
    metadata: Option<&Metadata>,
) -> Result<u64> {
    let layout = layout_checked(tensors, metadata)?;
    let io = FormatError::io("writing tensors");
    writer.write_all(layout.header_bytes()).map_err(io)?;
    for &i in layout.order() {
        writer.write_all(tensors[i].data).map_err(io)?;
    }
    Ok(layout.file_len())
}

/// Serializes a complete file into memory.
pub fn serialize(tensors: &[TensorRef<'_>], metadata: Option<&Metadata>) -> Result<Vec<u8>> {
    let layout = layout_checked(tensors, metadata)?;
    let mut out = Vec::with_capacity(layout.file_len() as usize);
    out.extend_from_slice(layout.header_bytes());
    for &i in layout.order() {
        out.extend_from_slice(tensors[i].data);
    }
    Ok(out)
}

/// Writes a complete file at `path` atomically: to a temporary file in the same directory,
/// flushed and fsynced, then renamed over `path`. A crash leaves either the old file or the
/// new one, never a torn one.
pub fn write_file(
    path: &Path,
    tensors: &[TensorRef<'_>],
    metadata: Option<&Metadata>,
) -> Result<()> {
    let layout = layout_checked(tensors, metadata)?;
    write_file_with(path, |w| {
        w.write_all(layout.header_bytes())?;
        for &i in layout.order() {
            w.write_all(tensors[i].data)?;
        }
        Ok(())
    })
}

/// Atomically writes `path` with whatever `fill` writes (temporary file, fsync, rename).
/// Generators that stream a [`Layout`]'s data use this.
pub fn write_file_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".weightlift-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(FormatError::io("creating a temporary file"))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp);
    fill(&mut w).map_err(FormatError::io("writing the file"))?;
    let tmp = w.into_inner().map_err(|e| FormatError::Io {
        context: "flushing the file",
        source: e.into_error(),
    })?;
    tmp.as_file()
        .sync_all()
        .map_err(FormatError::io("syncing the file"))?;
    tmp.persist(path).map_err(|e| FormatError::Io {
        context: "renaming the file into place",
        source: e.error,
    })?;
    // Make the rename itself durable; where directories cannot be opened this is best effort.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
