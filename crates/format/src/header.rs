//! Parsing and validating a safetensors header.
//!
//! A file is `[u64 LE header length n][n bytes of JSON][data region]`. The rules are the
//! reference implementation's (the `safetensors` crate), checked in its order, with one
//! deliberate difference: a tensor name that appears twice is an error here (the reference
//! keeps the last entry). Nothing here trusts a length before comparing it with the real
//! input size, and nothing panics on any input.

use crate::Dtype;
use crate::error::{FormatError, MAX_HEADER_SIZE, Result};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::ops::Range;

/// Length of the little-endian header-length prefix.
pub const PREFIX_LEN: u64 = 8;

/// Free-form `__metadata__` of a file: string keys to string values.
pub type Metadata = BTreeMap<String, String>;

/// One tensor's entry in a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first (C order). Empty for a scalar.
    pub shape: Vec<usize>,
    /// Byte range `[start, end)` relative to the start of the data region.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of bytes of data.
    pub fn byte_len(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }

    /// Number of elements (1 for a scalar, 0 if any dimension is 0). Validation guarantees
    /// that it does not overflow for tensors of a parsed [`Header`].
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Byte range relative to the start of the data region.
    pub fn data_range(&self) -> Range<u64> {
        self.data_offsets.0..self.data_offsets.1
    }
}

/// A parsed, validated header.
///
/// Tensors are kept in data-offset order (the order their bytes appear in the file), which is
/// the order a reader wants; lookups by name go through a name-sorted index, which costs
/// no copy of the names.
#[derive(Debug, Clone)]
pub struct Header {
    header_len: u64,
    metadata: Option<Metadata>,
    tensors: Vec<TensorInfo>,
    by_name: Vec<u32>,
    data_len: u64,
}

/// Checks the 8-byte prefix of a file `file_len` bytes long and returns the JSON header's
/// length.
pub fn header_len_from_prefix(prefix: [u8; 8], file_len: u64) -> Result<u64> {
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_SIZE {
        return Err(FormatError::HeaderTooLarge { header_len });
    }
    // header_len <= 1e8, so this cannot overflow.
    if PREFIX_LEN + header_len > file_len {
        return Err(FormatError::HeaderOutOfBounds {
            header_len,
            file_len,
        });
    }
    Ok(header_len)
}

impl Header {
    /// Parses the header of a whole file held in memory.
    pub fn from_file_bytes(file: &[u8]) -> Result<Header> {
        let file_len = file.len() as u64;
        let Some(prefix) = file.first_chunk::<8>() else {
            return Err(FormatError::HeaderTooSmall { len: file_len });
        };
        let header_len = header_len_from_prefix(*prefix, file_len)?;
        // Both bounds were checked against file_len above.
        let json = &file[PREFIX_LEN as usize..(PREFIX_LEN + header_len) as usize];
        Header::parse(json, file_len)
    }

    /// Reads and parses a header from the start of a file of `file_len` bytes. Allocates the
    /// header buffer only after checking the declared length against `file_len` and the limit.
    pub fn read_from<R: Read>(reader: &mut R, file_len: u64) -> Result<Header> {
        if file_len < PREFIX_LEN {
            return Err(FormatError::HeaderTooSmall { len: file_len });
        }
        let mut prefix = [0u8; 8];
        reader
            .read_exact(&mut prefix)
            .map_err(FormatError::io("reading the header length"))?;
        let header_len = header_len_from_prefix(prefix, file_len)?;
        let mut json = vec![0u8; header_len as usize];
        reader
            .read_exact(&mut json)
            .map_err(FormatError::io("reading the header"))?;
        Header::parse(&json, file_len)
    }

    /// Parses and validates the JSON header `json` of a file `file_len` bytes long (the
    /// prefix included). `json` must be exactly the bytes the prefix announced.
    pub fn parse(json: &[u8], file_len: u64) -> Result<Header> {
        let header_len = json.len() as u64;
        let text = std::str::from_utf8(json).map_err(|e| FormatError::HeaderNotUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        let mut current_tensor = None;
        let raw = {
            let mut de = serde_json::Deserializer::from_str(text);
            let raw = HeaderSeed {
                current_tensor: &mut current_tensor,
            }
            .deserialize(&mut de)
            .and_then(|raw| de.end().map(|()| raw));
            raw.map_err(|e| FormatError::HeaderJson {
                message: match &current_tensor {
                    Some(entry) => format!("in entry {entry:?}: {e}"),
                    None => e.to_string(),
                },
            })?
        };
        let RawHeader {
            metadata,
            mut tensors,
        } = raw;

        // Stable, like the reference: zero-sized tensors sharing an offset keep file order.
        tensors.sort_by_key(|t| t.data_offsets);
        let by_name = name_index(&tensors)?;

        let data_len = validate_layout(&tensors)?;
        let actual = file_len.saturating_sub(PREFIX_LEN + header_len);
        if file_len < PREFIX_LEN + header_len || actual != data_len {
            return Err(FormatError::DataLengthMismatch {
                expected: data_len,
                actual,
            });
        }
        Ok(Header {
            header_len,
            metadata,
            tensors,
            by_name,
            data_len,
        })
    }

    /// Length of the JSON header in bytes (the value of the prefix).
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Offset of the data region from the start of the file.
    pub fn data_start(&self) -> u64 {
        PREFIX_LEN + self.header_len
    }

    /// Length of the data region in bytes.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Total file length.
    pub fn file_len(&self) -> u64 {
        self.data_start() + self.data_len
    }

    /// The `__metadata__` map, if the file has one.
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }

    /// All tensors in data-offset order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Looks a tensor up by name (binary search, no allocation).
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.position(name).map(|i| &self.tensors[i])
    }

    /// Position of a tensor in [`Header::tensors`].
    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name
            .binary_search_by(|&i| self.tensors[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|slot| self.by_name[slot] as usize)
    }

    /// Tensors in name order.
    pub fn tensors_by_name(&self) -> impl ExactSizeIterator<Item = &TensorInfo> + '_ {
        self.by_name.iter().map(|&i| &self.tensors[i as usize])
    }
}

/// Builds the name-sorted index of `tensors`, rejecting a repeated name.
fn name_index(tensors: &[TensorInfo]) -> Result<Vec<u32>> {
    // A header is at most 1e8 bytes and each entry takes well over 4 bytes, so u32 suffices.
    let mut by_name: Vec<u32> = (0..tensors.len() as u32).collect();
    by_name.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
    if let Some(pair) = by_name
        .windows(2)
        .find(|w| tensors[w[0] as usize].name == tensors[w[1] as usize].name)
    {
        return Err(FormatError::DuplicateTensor {
            name: tensors[pair[0] as usize].name.clone(),
        });
    }
    Ok(by_name)
}

/// Checks the data layout of offset-sorted tensors and returns the data region's length.
///
/// Rules, in the reference's order, for each tensor: it starts where the previous one ended
/// (the first at 0) and its offsets are ordered; its element count and bit count do not
/// overflow; the bit count fills whole bytes; the byte span equals the byte size.
fn validate_layout(tensors: &[TensorInfo]) -> Result<u64> {
    let mut expected_start = 0u64;
    for t in tensors {
        let (start, end) = t.data_offsets;
        if start != expected_start || end < start {
            return Err(FormatError::InvalidOffsets {
                name: t.name.clone(),
                start,
                end,
                expected_start,
            });
        }
        expected_start = end;
        let overflow = || FormatError::SizeOverflow {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        };
        let elements = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)?;
        let bits = elements.checked_mul(t.dtype.bits()).ok_or_else(overflow)?;
        if bits % 8 != 0 {
            return Err(FormatError::PartialByte {
                name: t.name.clone(),
                dtype: t.dtype,
                elements,
            });
        }
        let expected = (bits / 8) as u64;
        if end - start != expected {
            return Err(FormatError::SizeMismatch {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                expected,
                actual: end - start,
            });
        }
    }
    Ok(expected_start)
}

struct RawHeader {
    metadata: Option<Metadata>,
    tensors: Vec<TensorInfo>,
}

/// A tensor entry as the JSON spells it. The derived impl gives the reference's leniencies
/// and strictness: unknown fields are ignored, repeated fields and unknown dtypes rejected.
#[derive(Deserialize)]
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Deserializes the top-level object, recording which tensor was being read so that an
/// error can name it.
struct HeaderSeed<'a> {
    current_tensor: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = RawHeader;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<RawHeader, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to {dtype, shape, data_offsets}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
        let mut metadata: Option<Option<Metadata>> = None;
        let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "__metadata__" {
                if metadata.is_some() {
                    return Err(de::Error::duplicate_field("__metadata__"));
                }
                *self.current_tensor = Some(key.into_owned());
                metadata = Some(map.next_value()?);
                *self.current_tensor = None;
                continue;
            }
            *self.current_tensor = Some(key.into_owned());
            let raw: RawTensor = map.next_value()?;
            let name = self.current_tensor.take().unwrap_or_default();
            tensors.push(TensorInfo {
                name,
                dtype: raw.dtype,
                shape: raw.shape,
                data_offsets: raw.data_offsets,
            });
        }
        Ok(RawHeader {
            metadata: metadata.flatten(),
            tensors,
        })
    }
}
