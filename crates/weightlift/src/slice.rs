//! Slicing: which byte runs of a C-order tensor make up a sub-block.

use std::ops::Range;

/// The result of planning a slice: the new shape and the byte runs (offset within the
/// tensor, length) to read, in output order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlicePlan {
    pub shape: Vec<usize>,
    pub runs: Vec<(u64, u64)>,
}

/// Plans `ranges` (one per leading dimension; missing trailing dimensions are taken whole)
/// over a tensor of `shape` with `elem_bits`-bit elements. Trailing dimensions taken
/// whole merge into longer runs, so a slice along dimension 0 is a single read. For
/// sub-byte elements (F4, F6), every run must start and end on a byte boundary.
pub(crate) fn plan(
    shape: &[usize],
    ranges: &[Range<usize>],
    elem_bits: u64,
) -> Result<SlicePlan, String> {
    if ranges.len() > shape.len() {
        return Err(format!(
            "{} ranges given for a tensor of rank {}",
            ranges.len(),
            shape.len()
        ));
    }
    let full: Vec<Range<usize>> = shape
        .iter()
        .enumerate()
        .map(|(d, &n)| ranges.get(d).cloned().unwrap_or(0..n))
        .collect();
    for (d, (r, &n)) in full.iter().zip(shape).enumerate() {
        if r.start > r.end || r.end > n {
            return Err(format!(
                "range {r:?} is out of bounds for dimension {d} of size {n}"
            ));
        }
    }
    let new_shape: Vec<usize> = full.iter().map(|r| r.end - r.start).collect();
    if new_shape.contains(&0) {
        return Ok(SlicePlan {
            shape: new_shape,
            runs: Vec::new(),
        });
    }
    // Bit strides of each dimension.
    let mut strides = vec![elem_bits; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1] as u64;
    }
    if shape.is_empty() {
        return Ok(SlicePlan {
            shape: new_shape,
            runs: vec![(0, elem_bits.div_ceil(8))],
        });
    }
    // `k`: the innermost dimension not taken whole; runs span it and everything after.
    let k = (0..shape.len())
        .rev()
        .find(|&d| full[d] != (0..shape[d]))
        .unwrap_or(0);
    let run_bits = (full[k].end - full[k].start) as u64 * strides[k];
    let mut runs: Vec<(u64, u64)> = Vec::new();
    // Odometer over the dimensions before k.
    let mut idx: Vec<usize> = full[..k].iter().map(|r| r.start).collect();
    loop {
        let base_bits: u64 = idx
            .iter()
            .zip(&strides)
            .map(|(&i, &s)| i as u64 * s)
            .sum::<u64>()
            + full[k].start as u64 * strides[k];
        if !base_bits.is_multiple_of(8) || !run_bits.is_multiple_of(8) {
            return Err(
                "the slice does not start and end on byte boundaries, as sub-byte \
                        elements must"
                    .into(),
            );
        }
        let (base, run_len) = (base_bits / 8, run_bits / 8);
        match runs.last_mut() {
            Some((off, len)) if *off + *len == base => *len += run_len,
            _ => runs.push((base, run_len)),
        }
        let mut d = k;
        loop {
            if d == 0 {
                return Ok(SlicePlan {
                    shape: new_shape,
                    runs,
                });
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < full[d].end {
                break;
            }
            idx[d] = full[d].start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_one_run() {
        let p = plan(&[4, 3], &[1..3], 16).unwrap();
        assert_eq!(p.shape, vec![2, 3]);
        assert_eq!(p.runs, vec![(6, 12)]);
    }

    #[test]
    fn columns_are_one_run_per_row() {
        let p = plan(&[4, 3], &[0..4, 1..2], 32).unwrap();
        assert_eq!(p.shape, vec![4, 1]);
        assert_eq!(p.runs, vec![(4, 4), (16, 4), (28, 4), (40, 4)]);
    }

    #[test]
    fn middle_dimension() {
        let p = plan(&[2, 3, 4], &[0..2, 1..3], 8).unwrap();
        assert_eq!(p.shape, vec![2, 2, 4]);
        assert_eq!(p.runs, vec![(4, 8), (16, 8)]);
    }

    #[test]
    fn whole_tensor_and_scalars_and_empty() {
        assert_eq!(plan(&[2, 2], &[], 8).unwrap().runs, vec![(0, 4)]);
        assert_eq!(plan(&[], &[], 64).unwrap().runs, vec![(0, 8)]);
        let p = plan(&[5, 2], &[2..2], 8).unwrap();
        assert_eq!(p.shape, vec![0, 2]);
        assert!(p.runs.is_empty());
    }

    #[test]
    fn bad_ranges() {
        assert!(plan(&[2], &[0..3], 8).is_err());
        assert!(plan(&[2], &[0..1, 0..1], 8).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = [2..1];
        assert!(plan(&[3], &reversed, 8).is_err());
    }

    #[test]
    fn sub_byte_elements_slice_on_byte_boundaries() {
        // F4: two elements per byte. Rows of 4 elements are 2 bytes.
        let p = plan(&[3, 4], &[1..3], 4).unwrap();
        assert_eq!(p.runs, vec![(2, 4)]);
        let p = plan(&[3, 4], &[0..3, 2..4], 4).unwrap();
        assert_eq!(p.runs, vec![(1, 1), (3, 1), (5, 1)]);
        assert!(plan(&[3, 4], &[0..3, 1..2], 4).is_err(), "half a byte");
        assert!(plan(&[3], &[1..2], 4).is_err());
    }
}
