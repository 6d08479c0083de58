//! The loader's threads: how many, and the pools they run in.

use crate::error::{Error, Result};

/// A rayon pool of `threads` threads named `name-N`.
pub(crate) fn thread_pool(threads: usize, name: &'static str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool {
            threads,
            reason: e.to_string(),
        })
}

/// Loader threads when nothing else decides: the number of CPUs, at least 4. Reads block
/// in the kernel, so more threads than cores keep the device queue full; page faults on
/// fresh memory scale with cores too.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .max(4)
}
