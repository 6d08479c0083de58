//! How much host memory loads may hold, and how far prefetches may run ahead of their
//! readers: decided from the memory actually available to the process (a container's
//! cgroup limit included), or set by the caller or the environment.
//!
//! - The **budget** bounds what a CPU load holds in memory of its own: an owned load whose
//!   tensors need more fails at planning, naming the bytes needed and available, instead of
//!   being killed midway. Default: the memory available now
//!   ([`weightlift_storage::memory_info`]); [`crate::env::MEMORY_BUDGET`] (a size, `8GiB`, or a
//!   share of the available memory, `75%`) or [`crate::LoadOptions::memory_budget`] set it.
//! - The **window** bounds what prefetches read ahead of their readers (page-cache pages
//!   populated and not yet read) and how much of a mapped load is populated up front.
//!   Default: half of the budget, so that what readers make of the bytes fits beside them;
//!   [`crate::env::PREFETCH_WINDOW`] (a size or a share of the budget) sets it.

use crate::env::{self, MEMORY_BUDGET, PREFETCH_WINDOW, amount};
use weightlift_storage::{human, memory_info};

/// A memory budget and the prefetch window within it, with where they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    bytes: u64,
    window: u64,
    source: String,
}

impl MemoryBudget {
    /// The budget now: `WEIGHTLIFT_MEMORY_BUDGET` where set (a size, or a percentage of the
    /// available memory), else the memory available to this process; the window:
    /// `WEIGHTLIFT_PREFETCH_WINDOW` (a size, or a percentage of the budget), else half the
    /// budget. A malformed variable is ignored with a warning in the log.
    pub fn detect() -> MemoryBudget {
        let info = memory_info();
        let (bytes, source) = match env::var(MEMORY_BUDGET).map(|v| (amount(&v, info.available), v))
        {
            Some((Ok(bytes), text)) => (bytes, format!("{MEMORY_BUDGET}={text}")),
            Some((Err(e), _)) => {
                log::warn!("{MEMORY_BUDGET}: {e}; using the memory available");
                (info.available, info.source)
            }
            None => (info.available, info.source),
        };
        let window = match env::var(PREFETCH_WINDOW).map(|v| amount(&v, bytes)) {
            Some(Ok(window)) => window,
            Some(Err(e)) => {
                log::warn!("{PREFETCH_WINDOW}: {e}; using half the memory budget");
                bytes / 2
            }
            None => bytes / 2,
        };
        MemoryBudget {
            bytes,
            window,
            source,
        }
    }

    /// A budget of `bytes` (the window: half of it), as the caller set it.
    pub fn of(bytes: u64) -> MemoryBudget {
        MemoryBudget {
            bytes,
            window: bytes / 2,
            source: "set by the caller".into(),
        }
    }

    /// A budget of `bytes` where given (else detected), with a window of `window` bytes where
    /// given (else half the budget, or the environment's): what a caller setting either or
    /// both gets.
    pub fn set(bytes: Option<u64>, window: Option<u64>) -> MemoryBudget {
        let budget = bytes.map_or_else(MemoryBudget::detect, MemoryBudget::of);
        match window {
            Some(w) => budget.with_window(w),
            None => budget,
        }
    }

    /// This budget with a window of `bytes`.
    pub fn with_window(mut self, bytes: u64) -> MemoryBudget {
        self.window = bytes;
        self
    }

    /// Bytes a load may hold in memory of its own.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes prefetches may have read ahead of their readers.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Where the budget comes from, in words.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// "1.50 GiB (source)", for messages.
    pub(crate) fn describe(&self) -> String {
        format!("{} ({})", human(self.bytes), self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_set_has_half_of_it_as_window() {
        let b = MemoryBudget::of(1 << 30);
        assert_eq!((b.bytes(), b.window()), (1 << 30, 1 << 29));
        assert_eq!(b.with_window(5).window(), 5);
        assert!(MemoryBudget::detect().bytes() > 0);
    }
}
