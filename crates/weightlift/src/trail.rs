//! "The reader is past it": the ranges of a file a reader has read, let go of once the reader
//! is well past them. One rule for the prefetch window (which releases or marks the pages of
//! what its readers read) and for lazy reads of a mapping (which mark them).

use std::collections::VecDeque;
use std::ops::Range;

/// Bytes a reader may be past a range before its pages are let go: a view handed out is
/// touched after the read that returned it, so the pages just read must stay.
pub(crate) const LAG: u64 = 32 << 20;

/// Ranges past the lag are handed out once they add up to this many bytes, adjacent ones
/// merged: each `madvise`/`fadvise` call costs a page-table walk and a TLB flush on every
/// core whatever its length, and a reader of small tensors (an MoE's experts, ~270 KiB each)
/// would otherwise pay one per tensor (4,827 calls on hf-moe: 0.4 s of system time in a
/// memory cgroup, a third of the load).
pub(crate) const BATCH: u64 = 8 << 20;

/// Ranges read, oldest first, not yet let go of.
#[derive(Debug, Default)]
pub(crate) struct Trail {
    ranges: VecDeque<Range<u64>>,
    bytes: u64,
    /// Ranges past the lag not handed out yet (adjacent ones merged), and their bytes.
    past: Vec<Range<u64>>,
    past_bytes: u64,
}

impl Trail {
    /// A reader read `range`: returns the ranges it is now more than [`LAG`] bytes past
    /// (oldest first, adjacent ones merged) once they add up to [`BATCH`] bytes; they leave
    /// the trail. The newest range always stays.
    pub(crate) fn read(&mut self, range: Range<u64>) -> Vec<Range<u64>> {
        self.bytes += range.end - range.start;
        self.ranges.push_back(range);
        while self.bytes > LAG && self.ranges.len() > 1 {
            let old = self.ranges.pop_front().expect("more than one range");
            self.bytes -= old.end - old.start;
            self.pass(old);
        }
        if self.past_bytes >= BATCH {
            self.past_bytes = 0;
            std::mem::take(&mut self.past)
        } else {
            Vec::new()
        }
    }

    /// Every range still on the trail, merged where adjacent (the reader is done: all of them
    /// can go).
    pub(crate) fn drain(&mut self) -> Vec<Range<u64>> {
        while let Some(old) = self.ranges.pop_front() {
            self.pass(old);
        }
        self.bytes = 0;
        self.past_bytes = 0;
        std::mem::take(&mut self.past)
    }

    fn pass(&mut self, range: Range<u64>) {
        self.past_bytes += range.end - range.start;
        match self.past.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => self.past.push(range),
        }
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
            vec![16 * mb..33 * mb],
            "adjacent ranges merged"
        );
        assert_eq!(trail.drain(), vec![33 * mb..133 * mb]);
        assert!(trail.drain().is_empty());
    }

    #[test]
    fn small_ranges_leave_in_batches_merged_where_adjacent() {
        let kb = 1u64 << 10;
        let mut trail = Trail::default();
        let mut out = Vec::new();
        // 256 KiB tensors in file order, one gap (a tensor not read) after the 100th.
        let mut at = 0;
        for i in 0..400u64 {
            if i == 100 {
                at += 256 * kb;
            }
            let got = trail.read(at..at + 256 * kb);
            assert!(got.is_empty() || got.iter().map(|r| r.end - r.start).sum::<u64>() >= BATCH);
            out.extend(got);
            at += 256 * kb;
        }
        // 400 x 256 KiB = 100 MiB read, 32 MiB kept on the trail: 68 MiB past, handed out
        // in batches of 8 MiB (the rest not yet), in a handful of calls rather than 272.
        let handed: u64 = out.iter().map(|r| r.end - r.start).sum();
        assert_eq!(handed, 64 << 20);
        assert!(out.len() <= 9, "{out:?}");
        assert!(out.contains(&(0..100 * 256 * kb)) || out[0].start == 0);
        assert!(
            out.iter()
                .all(|r| !(r.start < 101 * 256 * kb && r.end > 100 * 256 * kb))
        );
        let rest = trail.drain();
        let all: u64 = rest.iter().chain(&out).map(|r| r.end - r.start).sum();
        assert_eq!(all, 100 << 20);
    }
}
