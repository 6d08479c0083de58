//! Element types a safetensors file can hold, spelled exactly as in the header.
//!
//! The set follows the reference implementation (the `safetensors` crate, 0.8): a file
//! using any other name is rejected, so that a tensor is never read with a guessed size.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a tensor.
///
/// Variants are declared in increasing alignment order, as in the reference
/// implementation; [`crate::Layout`] relies on that order to lay out tensors from the most
/// to the least aligned so that every tensor starts at a multiple of its element size.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Dtype {
    /// Boolean, one byte per element.
    BOOL,
    /// 4-bit float (OCP MXFP4, E2M1); two elements per byte.
    F4,
    /// 6-bit float (OCP MXFP6, E2M3).
    F6_E2M3,
    /// 6-bit float (OCP MXFP6, E3M2).
    F6_E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent and 2 mantissa bits.
    F8_E5M2,
    /// 8-bit float, 4 exponent and 3 mantissa bits.
    F8_E4M3,
    /// 8-bit exponent-only scale (OCP MX E8M0).
    F8_E8M0,
    /// 8-bit float E4M3, finite with unsigned zero (FNUZ).
    F8_E4M3FNUZ,
    /// 8-bit float E5M2, finite with unsigned zero (FNUZ).
    F8_E5M2FNUZ,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE 754 single precision.
    F32,
    /// Complex number of two `F32` parts.
    C64,
    /// IEEE 754 double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Every dtype, in declaration (alignment) order.
    pub const ALL: [Dtype; 22] = [
        Dtype::BOOL,
        Dtype::F4,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Size of one element in bits. Sub-byte types (F4, F6_*) pack elements across bytes,
    /// so a tensor of them is valid only when its total bit count is a multiple of 8.
    pub const fn bits(self) -> usize {
        match self {
            Dtype::F4 => 4,
            Dtype::F6_E2M3 | Dtype::F6_E3M2 => 6,
            Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8_E5M2
            | Dtype::F8_E4M3
            | Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::C64 | Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }

    /// The alignment in bytes a typed view of this dtype needs (1 for sub-byte and byte types).
    ///
    /// C64 is two `f32`s, so it needs 4, not 8.
    pub const fn alignment(self) -> usize {
        match self {
            Dtype::C64 => 4,
            other => {
                let bytes = other.bits() / 8;
                if bytes == 0 { 1 } else { bytes }
            }
        }
    }

    /// The name as written in a header (`"BF16"`, `"F8_E4M3"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::F4 => "F4",
            Dtype::F6_E2M3 => "F6_E2M3",
            Dtype::F6_E3M2 => "F6_E3M2",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::C64 => "C64",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Parses a header name; `None` for a name the format does not define.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Number of bytes `elements` elements occupy, or `None` when the count overflows or
    /// does not fill whole bytes (sub-byte dtypes).
    pub fn byte_len(self, elements: usize) -> Option<usize> {
        let bits = elements.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.name()));
            let back: Dtype = serde_json::from_str(&json).unwrap();
            assert_eq!(back, d);
        }
        assert_eq!(Dtype::from_name("F8"), None);
        assert_eq!(Dtype::from_name("bf16"), None);
    }

    #[test]
    fn bit_sizes() {
        let expect = [
            (Dtype::BOOL, 8),
            (Dtype::F4, 4),
            (Dtype::F6_E2M3, 6),
            (Dtype::F6_E3M2, 6),
            (Dtype::U8, 8),
            (Dtype::I8, 8),
            (Dtype::F8_E5M2, 8),
            (Dtype::F8_E4M3, 8),
            (Dtype::F8_E8M0, 8),
            (Dtype::F8_E4M3FNUZ, 8),
            (Dtype::F8_E5M2FNUZ, 8),
            (Dtype::I16, 16),
            (Dtype::U16, 16),
            (Dtype::F16, 16),
            (Dtype::BF16, 16),
            (Dtype::I32, 32),
            (Dtype::U32, 32),
            (Dtype::F32, 32),
            (Dtype::C64, 64),
            (Dtype::F64, 64),
            (Dtype::I64, 64),
            (Dtype::U64, 64),
        ];
        assert_eq!(expect.len(), Dtype::ALL.len());
        for (d, bits) in expect {
            assert_eq!(d.bits(), bits, "{d}");
        }
    }

    #[test]
    fn declaration_order_is_alignment_order() {
        for pair in Dtype::ALL.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(
                pair[0].alignment() <= pair[1].alignment(),
                "{} before {}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn byte_len_of_sub_byte_types() {
        assert_eq!(Dtype::F4.byte_len(2), Some(1));
        assert_eq!(Dtype::F4.byte_len(3), None);
        assert_eq!(Dtype::F6_E2M3.byte_len(4), Some(3));
        assert_eq!(Dtype::F6_E3M2.byte_len(5), None);
        assert_eq!(Dtype::F64.byte_len(usize::MAX), None);
        assert_eq!(Dtype::U8.byte_len(0), Some(0));
    }
}
