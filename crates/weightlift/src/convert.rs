//! Dtype conversion on load: F16 / BF16 to and from F32 (and F16 <-> BF16 through F32).

use half::{bf16, f16};
use weightlift_format::Dtype;

/// The dtype a tensor of `dtype` is loaded as when converting to `to`; unchanged for
/// dtypes the conversion does not apply to (integers, F64, F8...).
pub(crate) fn converted(dtype: Dtype, to: Dtype) -> Dtype {
    let floats = [Dtype::F16, Dtype::BF16, Dtype::F32];
    if floats.contains(&dtype) && floats.contains(&to) {
        to
    } else {
        dtype
    }
}

/// Byte length of `bytes` bytes of `from` elements once converted to `to`. Exact for whole
/// elements, which is all the loader ever converts.
pub(crate) fn converted_len(bytes: u64, from: Dtype, to: Dtype) -> u64 {
    bytes * to.bits() as u64 / from.bits() as u64
}

/// Whether `to` is a dtype conversions can produce.
pub(crate) fn is_conversion_target(to: Dtype) -> bool {
    matches!(to, Dtype::F16 | Dtype::BF16 | Dtype::F32)
}

/// Converts little-endian elements of `from` in `src` to `to` in `dst`.
pub(crate) fn convert(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) {
    let read = |b: &[u8]| -> f32 {
        match from {
            Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    };
    let src_size = from.bits() / 8;
    let dst_size = to.bits() / 8;
    for (s, d) in src
        .chunks_exact(src_size)
        .zip(dst.chunks_exact_mut(dst_size))
    {
        let x = read(s);
        match to {
            Dtype::F16 => d.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
            Dtype::BF16 => d.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
            _ => d.copy_from_slice(&x.to_le_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let values = [0.0f32, 1.0, -2.5, 65504.0, 0.000061035156];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut f16_bytes = vec![0u8; values.len() * 2];
        convert(Dtype::F32, Dtype::F16, &f32_bytes, &mut f16_bytes);
        let mut back = vec![0u8; values.len() * 4];
        convert(Dtype::F16, Dtype::F32, &f16_bytes, &mut back);
        assert_eq!(back, f32_bytes);
        let mut bf = [0u8; 4];
        convert(Dtype::F32, Dtype::BF16, &1.5f32.to_le_bytes(), &mut bf[..2]);
        assert_eq!(bf16::from_le_bytes([bf[0], bf[1]]).to_f32(), 1.5);
        assert_eq!(converted(Dtype::I32, Dtype::F32), Dtype::I32);
        assert_eq!(converted(Dtype::BF16, Dtype::F32), Dtype::F32);
        assert_eq!(converted(Dtype::F64, Dtype::F32), Dtype::F64);
    }
}
