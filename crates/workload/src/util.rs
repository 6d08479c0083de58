//! Small helpers the CLI and the bench share: sizes as people write them,
//! medians, peak memory, free disk space.

use std::path::Path;

/// Parses sizes as people write them (`16MiB`, `0.5g`, `100MB`): the storage crate's rule,
/// so that the CLI, the bench and the environment variables read sizes alike.
pub use weightlift_storage::parse_size;

/// The median of `v` (the mean of the middle two for an even count); NaN for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        // Of an even count, the mean of the middle two (not the slower of them).
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak-RSS watermark (Linux: writing 5 to `clear_refs`).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Bytes available to unprivileged users on the filesystem holding `path` (or its nearest
/// existing ancestor).
pub fn free_space(path: &Path) -> Option<u64> {
    let probe = path.ancestors().find(|p| p.exists())?;
    let st = rustix::fs::statvfs(probe).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Memory available for new allocations, in bytes: the machine's (`MemAvailable`), or less
/// inside a memory cgroup.
pub fn available_memory() -> u64 {
    weightlift_storage::memory_info().available
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_medians() {
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5, "not the slower of two");
        assert!(median(&[]).is_nan());
        assert!(peak_rss().unwrap() > 0);
        assert!(free_space(Path::new("/nonexistent/dir")).is_some());
        assert!(available_memory() > 0);
    }
}
