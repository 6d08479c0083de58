//! Every environment variable weightlift reads, read here and nowhere else in the library,
//! the CLI or the Python package (README: "Environment variables"). The storage layer reads
//! the conventions of the services it reaches (`HF_HOME`, `HF_TOKEN`, `HF_ENDPOINT`, the
//! `AWS_*` variables) where their stores are, since it sits below this crate.
//!
//! An empty value counts as unset; a malformed one is ignored with a warning in the log.

use weightlift_storage::parse_size;

/// The memory budget: a size (`8GiB`) or a share of the memory available (`75%`). See
/// [`crate::MemoryBudget::detect`].
pub const MEMORY_BUDGET: &str = "WEIGHTLIFT_MEMORY_BUDGET";
/// The prefetch window: a size or a share of the budget. See [`crate::MemoryBudget`].
pub const PREFETCH_WINDOW: &str = "WEIGHTLIFT_PREFETCH_WINDOW";
/// `1`: the Python package's prefetches (`safe_open(prefetch=True)`, what `patch()` turns
/// on) release the page-cache pages of what was read once the reader is past them.
pub const DROP_CACHE: &str = "WEIGHTLIFT_DROP_CACHE";
/// Threads each of the Python package's prefetches populates with (default 2).
pub const PREFETCH_THREADS: &str = "WEIGHTLIFT_PREFETCH_THREADS";
/// A bearer token for `http(s)://` URLs, for the CLI (Python takes `token=`).
pub const HTTP_TOKEN: &str = "WEIGHTLIFT_HTTP_TOKEN";

/// The value of `name`, trimmed, where set and not empty.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// [`DROP_CACHE`]: whether it is set to anything but `0`.
pub fn drop_cache() -> bool {
    var(DROP_CACHE).is_some_and(|v| v != "0")
}

/// [`PREFETCH_THREADS`], where set to a positive number.
pub fn prefetch_threads() -> Option<usize> {
    let text = var(PREFETCH_THREADS)?;
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            log::warn!("{PREFETCH_THREADS}={text:?}: not a positive number; ignored");
            None
        }
    }
}

/// [`HTTP_TOKEN`], where set.
pub fn http_token() -> Option<String> {
    var(HTTP_TOKEN)
}

/// `text` as a size, or as a percentage of `of` (what [`MEMORY_BUDGET`] and
/// [`PREFETCH_WINDOW`] take).
pub(crate) fn amount(text: &str, of: u64) -> Result<u64, String> {
    match text.trim().strip_suffix('%') {
        Some(pct) => {
            let pct: f64 = pct
                .trim()
                .parse()
                .map_err(|_| format!("invalid percentage {text:?}"))?;
            Ok((of as f64 * pct.clamp(0.0, 100.0) / 100.0) as u64)
        }
        None => parse_size(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_sizes_or_shares() {
        assert_eq!(amount("1GiB", 0).unwrap(), 1 << 30);
        assert_eq!(amount("50%", 1000).unwrap(), 500);
        assert_eq!(amount(" 25 % ", 1000).unwrap(), 250);
        assert!(amount("lots", 1000).is_err());
        assert!(amount("x%", 1000).is_err());
    }
}
