//! Small helpers the CLI and the bench share: sizes as people write them,
//! medians, peak memory, free disk space.

use std::path::Path;

/// Parses sizes as people write them: `4096`, `16MiB`, `512 MiB`, `0.5g`, `1GiB`, `100MB`
/// (binary units: `k`/`KiB`, `m`/`MiB`, `g`/`GiB`; decimal: `KB`, `MB`, `GB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    Ok((value * mult as f64) as u64)
}

/// The median of `v` (the upper one for an even count); NaN for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
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

/// Memory available for new allocations (`MemAvailable`), in bytes.
pub fn available_memory() -> u64 {
    weightlift_storage::available_memory()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_medians() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("0.5g").unwrap(), 512 << 20);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("GiB").is_err());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
        assert!(peak_rss().unwrap() > 0);
        assert!(free_space(Path::new("/nonexistent/dir")).is_some());
        assert!(available_memory() > 0);
    }
}
