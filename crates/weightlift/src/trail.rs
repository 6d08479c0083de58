//! "The reader is past it": the ranges of a file a reader has read, let go of once the reader
//! is well past them. One rule for the prefetch window (which releases or marks the pages of
//! what its readers read) and for lazy reads of a mapping (which mark them).

use std::collections::VecDeque;
use std::ops::Range;

/// Bytes a reader may be past a range before its pages are let go: a view handed out is
/// touched after the read that returned it, so the pages just read must stay.
pub(crate) const LAG: u64 = 32 << 20;

/// Ranges read, oldest first, not yet let go of.
#[derive(Debug, Default)]
pub(crate) struct Trail {
    ranges: VecDeque<Range<u64>>,
    bytes: u64,
}

impl Trail {
    /// A reader read `range`: returns the ranges it is now more than [`LAG`] bytes past
    /// (oldest first), which leave the trail. The newest range always stays.
    pub(crate) fn read(&mut self, range: Range<u64>) -> Vec<Range<u64>> {
        self.bytes += range.end - range.start;
        self.ranges.push_back(range);
        let mut past = Vec::new();
        while self.bytes > LAG && self.ranges.len() > 1 {
            let old = self.ranges.pop_front().expect("more than one range");
            self.bytes -= old.end - old.start;
            past.push(old);
        }
        past
    }

    /// Every range still on the trail (the reader is done: all of them can go).
    pub(crate) fn drain(&mut self) -> Vec<Range<u64>> {
        self.bytes = 0;
        self.ranges.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_leave_once_the_reader_is_lag_bytes_past_them() {
        let mb = 1u64 << 20;
        let mut trail = Trail::default();
        assert!(trail.read(0..16 * mb).is_empty());
        assert!(trail.read(16 * mb..32 * mb).is_empty(), "exactly LAG: kept");
        assert_eq!(trail.read(32 * mb..33 * mb), vec![0..16 * mb]);
        // One range larger than the lag stays: its view may be touched yet.
        assert_eq!(
            trail.read(33 * mb..133 * mb),
            vec![16 * mb..32 * mb, 32 * mb..33 * mb]
        );
        assert_eq!(trail.drain(), vec![33 * mb..133 * mb]);
        assert!(trail.drain().is_empty());
    }
}
