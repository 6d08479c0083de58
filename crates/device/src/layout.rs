//! Placement of tensors inside one allocation.

/// Every tensor starts at a multiple of this many bytes (a cache line, and at least the
/// alignment of every dtype), so typed views and SIMD code never see a misaligned tensor.
pub const TENSOR_ALIGN: u64 = 64;

/// Offsets of tensors packed into one allocation, each aligned to [`TENSOR_ALIGN`], in the
/// order given.
#[derive(Debug, Clone, Default)]
pub struct SlotLayout {
    offsets: Vec<u64>,
    total: u64,
}

impl SlotLayout {
    /// Lays out tensors of the given byte lengths back to back, each aligned.
    pub fn new(lens: impl IntoIterator<Item = u64>) -> SlotLayout {
        let lens = lens.into_iter();
        let mut offsets = Vec::with_capacity(lens.size_hint().0);
        let mut at = 0u64;
        for len in lens {
            at = at.next_multiple_of(TENSOR_ALIGN);
            offsets.push(at);
            at += len;
        }
        SlotLayout { offsets, total: at }
    }

    /// Offset of slot `i`.
    pub fn offset(&self, i: usize) -> u64 {
        self.offsets[i]
    }

    /// Bytes the allocation needs.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_disjoint() {
        let l = SlotLayout::new([3, 0, 64, 65, 1]);
        assert_eq!(l.len(), 5);
        let offs: Vec<u64> = (0..5).map(|i| l.offset(i)).collect();
        assert_eq!(offs, [0, 64, 64, 128, 256]);
        assert_eq!(l.total(), 257);
        assert!(SlotLayout::new([]).is_empty());
    }
}
