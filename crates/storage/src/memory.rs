//! How much memory this process can still have: the machine's (`MemAvailable`) and, inside a
//! memory cgroup (a container's limit, v1 or v2), the limit less what the group already uses
//! that cannot be reclaimed (page cache can be). What a load may hold, and how far a
//! prefetch may run ahead, are decided from this.

use std::path::{Path, PathBuf};

/// Memory this process can still have, and where the number comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Bytes available for new memory: the smaller of the machine's and the cgroup's.
    pub available: u64,
    /// The tightest memory cgroup limit over this process, if there is one.
    pub limit: Option<u64>,
    /// Where `available` comes from, in words (for messages).
    pub source: String,
}

/// Reads [`MemoryInfo`] for this process now (a few small reads under `/proc` and the
/// cgroup filesystem).
pub fn memory_info() -> MemoryInfo {
    let machine = crate::available_memory();
    let mut info = MemoryInfo {
        available: machine,
        limit: None,
        source: format!("{} available on the machine", human(machine)),
    };
    if let Some(group) = cgroup_memory() {
        info.limit = Some(group.limit);
        let free = group.limit.saturating_sub(group.unreclaimable);
        if free < info.available {
            info.available = free;
            info.source = format!(
                "memory cgroup {} (v{}): limit {}, {} in use that cannot be reclaimed",
                group.path.display(),
                group.version,
                human(group.limit),
                human(group.unreclaimable)
            );
        }
    }
    info
}

/// Bytes as people read them (`1.50 GiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

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
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    Ok((value * mult as f64) as u64)
}

/// A memory cgroup's limit and what it holds that cannot be reclaimed.
struct Group {
    version: u8,
    path: PathBuf,
    limit: u64,
    unreclaimable: u64,
}

/// Limits at or above this are "no limit" (v1 writes 2^63 rounded down to a page).
const NO_LIMIT: u64 = 1 << 60;

/// This process's memory cgroup with a limit, v2 first, then v1.
fn cgroup_memory() -> Option<Group> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let group = if controllers.is_empty() {
            mount_of(&mounts, |fstype, _| fstype == "cgroup2")
                .and_then(|(root, at)| v2(&within(&at, &root, path), &at))
        } else if controllers.split(',').any(|c| c == "memory") {
            mount_of(&mounts, |fstype, options| {
                fstype == "cgroup" && options.split(',').any(|o| o == "memory")
            })
            .and_then(|(root, at)| v1(&within(&at, &root, path)))
        } else {
            None
        };
        // The tightest of the groups found (a process can sit in both hierarchies).
        if let Some(g) = group
            && found.as_ref().is_none_or(|f: &Group| {
                g.limit.saturating_sub(g.unreclaimable) < f.limit.saturating_sub(f.unreclaimable)
            })
        {
            found = Some(g);
        }
    }
    found
}

/// (root, mount point) of the first mount whose filesystem type and super options `pick`
/// accepts, from `/proc/self/mountinfo`.
fn mount_of(mountinfo: &str, pick: impl Fn(&str, &str) -> bool) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let tail: Vec<&str> = after.split(' ').collect();
        let (root, at) = (fields.get(3)?, fields.get(4)?);
        let (fstype, options) = (tail.first()?, tail.get(2).copied().unwrap_or(""));
        pick(fstype, options).then(|| (root.to_string(), PathBuf::from(at)))
    })
}

/// The directory of cgroup `path` under a hierarchy mounted at `at` whose root is `root`.
fn within(at: &Path, root: &str, path: &str) -> PathBuf {
    let rel = path.strip_prefix(root).unwrap_or(path);
    at.join(rel.trim_start_matches('/'))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a `memory.stat` file.
fn stat(dir: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// A v2 group: the tightest `memory.max` from it up to the hierarchy's root; what it uses
/// (`memory.current`) less its page cache (`file` in `memory.stat`).
fn v2(dir: &Path, root: &Path) -> Option<Group> {
    let mut limit = u64::MAX;
    let mut at = dir.to_path_buf();
    loop {
        if let Ok(text) = std::fs::read_to_string(at.join("memory.max"))
            && let Ok(max) = text.trim().parse::<u64>()
        {
            limit = limit.min(max);
        }
        if at == root || !at.pop() || !at.starts_with(root) {
            break;
        }
    }
    if limit >= NO_LIMIT {
        return None;
    }
    let current = read_u64(&dir.join("memory.current"))?;
    let file = stat(dir, "file").unwrap_or(0);
    Some(Group {
        version: 2,
        path: dir.to_path_buf(),
        limit,
        unreclaimable: current.saturating_sub(file),
    })
}

/// A v1 group: `hierarchical_memory_limit` (the tightest over its ancestors) or
/// `memory.limit_in_bytes`; what it uses less its page cache (`total_cache`).
fn v1(dir: &Path) -> Option<Group> {
    let limit = stat(dir, "hierarchical_memory_limit")
        .into_iter()
        .chain(read_u64(&dir.join("memory.limit_in_bytes")))
        .min()?;
    if limit >= NO_LIMIT {
        return None;
    }
    let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
    let cache = stat(dir, "total_cache")
        .or_else(|| stat(dir, "cache"))
        .unwrap_or(0);
    Some(Group {
        version: 1,
        path: dir.to_path_buf(),
        limit,
        unreclaimable: usage.saturating_sub(cache),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_and_written() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("0.5g").unwrap(), 512 << 20);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("GiB").is_err());
        assert_eq!(human(1536 << 20), "1.50 GiB");
        assert_eq!(human(12), "12 B");
    }

    #[test]
    fn mounts_and_paths() {
        let mountinfo = "\
30 23 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
31 23 0:27 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
32 23 0:28 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct";
        let (root, at) = mount_of(mountinfo, |t, o| {
            t == "cgroup" && o.split(',').any(|x| x == "memory")
        })
        .unwrap();
        assert_eq!(
            (root.as_str(), at.as_path()),
            ("/", Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            within(&at, &root, "/test/x"),
            Path::new("/sys/fs/cgroup/memory/test/x")
        );
        assert_eq!(
            within(
                Path::new("/sys/fs/cgroup"),
                "/docker/abc",
                "/docker/abc/inner"
            ),
            Path::new("/sys/fs/cgroup/inner")
        );
        let (_, at) = mount_of(mountinfo, |t, _| t == "cgroup2").unwrap();
        assert_eq!(at, Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn this_process_has_some_memory() {
        let info = memory_info();
        assert!(info.available > 0, "{info:?}");
        assert!(!info.source.is_empty());
    }
}
