//! A memory cgroup with a limit, made for a test or a bench run: a stand-in for a host or
//! container with less memory than the model (page cache is charged to the group, so the
//! kernel evicts as such a host would).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A memory cgroup (v1, else v2), removed on drop once its processes have exited.
#[derive(Debug)]
pub struct MemoryCgroup {
    path: PathBuf,
    version: u8,
}

/// The mount point of the first mount of `fstype` whose super options include `option`.
fn mountpoint(fstype: &str, option: Option<&str>) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let at = before.split(' ').nth(4)?;
        let tail: Vec<&str> = after.split(' ').collect();
        let ok = tail.first() == Some(&fstype)
            && option.is_none_or(|o| tail.get(2).is_some_and(|s| s.split(',').any(|x| x == o)));
        ok.then(|| PathBuf::from(at))
    })
}

impl MemoryCgroup {
    /// Makes a group named `name` limited to `limit` bytes; the reason where none can be
    /// made (not root, no memory controller).
    pub fn new(name: &str, limit: u64) -> Result<MemoryCgroup, String> {
        let mut why = Vec::new();
        if let Some(v1) = mountpoint("cgroup", Some("memory")) {
            match MemoryCgroup::make(&v1, name, 1, "memory.limit_in_bytes", limit) {
                Ok(g) => return Ok(g),
                Err(e) => why.push(format!("v1 at {}: {e}", v1.display())),
            }
        }
        if let Some(v2) = mountpoint("cgroup2", None) {
            let controllers =
                std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                match MemoryCgroup::make(&v2, name, 2, "memory.max", limit) {
                    Ok(g) => return Ok(g),
                    Err(e) => why.push(format!("v2 at {}: {e}", v2.display())),
                }
            } else {
                why.push(format!("v2 at {}: no memory controller", v2.display()));
            }
        }
        Err(format!(
            "no memory cgroup can be made here: {}",
            if why.is_empty() {
                "no cgroup filesystem".to_string()
            } else {
                why.join("; ")
            }
        ))
    }

    fn make(
        root: &Path,
        name: &str,
        version: u8,
        file: &str,
        limit: u64,
    ) -> Result<MemoryCgroup, String> {
        let path = root.join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).map_err(|e| e.to_string())?;
        let group = MemoryCgroup { path, version };
        std::fs::write(group.path.join(file), limit.to_string()).map_err(|e| e.to_string())?;
        Ok(group)
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// OOM kills in the group so far.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.version == 1 {
            "memory.oom_control"
        } else {
            "memory.events"
        };
        std::fs::read_to_string(self.path.join(file))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// `program args...` as a command whose process joins the group before it starts.
    pub fn command(&self, program: &Path) -> Command {
        command_in(&[&self.path], program)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A block-I/O cgroup throttling reads from one disk: a stand-in for storage that limits
/// bandwidth and requests (a cloud volume, a network filesystem). Buffered reads, page faults
/// of mappings and `O_DIRECT` reads of its processes are all throttled; its counters say how
/// many requests and bytes reached the disk. v1 (`blkio`), else v2 (`io.max`); removed on
/// drop once its processes have exited.
#[derive(Debug)]
pub struct IoCgroup {
    path: PathBuf,
    version: u8,
    /// The disk, as `MAJ:MIN`.
    device: String,
    /// The disk's readahead (`read_ahead_kb`) before [`IoCgroup::with_readahead`] set it,
    /// restored on drop.
    readahead_was: Option<String>,
}

/// Requests and bytes a group sent to a disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCount {
    /// Read requests the disk served.
    pub requests: u64,
    /// Bytes they read.
    pub bytes: u64,
}

impl IoCount {
    /// What was counted since `before`.
    pub fn since(self, before: IoCount) -> IoCount {
        IoCount {
            requests: self.requests.saturating_sub(before.requests),
            bytes: self.bytes.saturating_sub(before.bytes),
        }
    }
}

/// The disk (`MAJ:MIN`) holding `path`.
pub fn device_of(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .dev();
    // glibc's major()/minor() of a dev_t.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Ok(format!("{major}:{minor}"))
}

impl IoCgroup {
    /// Makes a group named `name` whose reads from the disk holding `path` are limited to
    /// `bytes_per_s` and `requests_per_s` (`None`: no limit); the reason where none can be
    /// made (not root, no blkio/io controller, a partition rather than a disk).
    pub fn new(
        name: &str,
        path: &Path,
        bytes_per_s: Option<u64>,
        requests_per_s: Option<u64>,
    ) -> Result<IoCgroup, String> {
        let device = device_of(path)?;
        let mut why = Vec::new();
        if let Some(v1) = mountpoint("cgroup", Some("blkio")) {
            let limits = |g: &IoCgroup| {
                if let Some(bps) = bytes_per_s {
                    g.write("blkio.throttle.read_bps_device", bps)?;
                }
                if let Some(iops) = requests_per_s {
                    g.write("blkio.throttle.read_iops_device", iops)?;
                }
                Ok(())
            };
            match IoCgroup::make(&v1, name, 1, &device, limits) {
                Ok(g) => return Ok(g),
                Err(e) => why.push(format!("v1 at {}: {e}", v1.display())),
            }
        }
        if let Some(v2) = mountpoint("cgroup2", None) {
            let controllers =
                std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "io") {
                let limits = |g: &IoCgroup| {
                    let mut line = device.clone();
                    if let Some(bps) = bytes_per_s {
                        line.push_str(&format!(" rbps={bps}"));
                    }
                    if let Some(iops) = requests_per_s {
                        line.push_str(&format!(" riops={iops}"));
                    }
                    std::fs::write(g.path.join("io.max"), line).map_err(|e| e.to_string())
                };
                match IoCgroup::make(&v2, name, 2, &device, limits) {
                    Ok(g) => return Ok(g),
                    Err(e) => why.push(format!("v2 at {}: {e}", v2.display())),
                }
            } else {
                why.push(format!("v2 at {}: no io controller", v2.display()));
            }
        }
        Err(format!(
            "no block-I/O cgroup can be made here for disk {device}: {}",
            if why.is_empty() {
                "no cgroup filesystem".to_string()
            } else {
                why.join("; ")
            }
        ))
    }

    /// Makes the group `name` under the cgroup filesystem `root` (of `version`) and sets its
    /// `limits`; removed again (on drop) where they cannot be set.
    fn make(
        root: &Path,
        name: &str,
        version: u8,
        device: &str,
        limits: impl FnOnce(&IoCgroup) -> Result<(), String>,
    ) -> Result<IoCgroup, String> {
        let path = root.join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).map_err(|e| e.to_string())?;
        let group = IoCgroup {
            path,
            version,
            device: device.to_string(),
            readahead_was: None,
        };
        limits(&group)?;
        Ok(group)
    }

    /// Sets the disk's readahead to `bytes` (rounded down to KiB) until the group is dropped:
    /// the storage a profile models has its own (a cloud volume's kernel keeps the default
    /// 128 KiB; a VM's disk may have been given more), and the requests a load makes depend
    /// on it. The setting is the disk's, not the group's: every reader of the disk sees it
    /// meanwhile.
    pub fn with_readahead(mut self, bytes: u64) -> Result<IoCgroup, String> {
        let file = self.readahead_file();
        let was = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        std::fs::write(&file, format!("{}", bytes >> 10))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        self.readahead_was.get_or_insert(was.trim().to_string());
        Ok(self)
    }

    /// The disk's readahead setting in sysfs.
    fn readahead_file(&self) -> PathBuf {
        PathBuf::from(format!(
            "/sys/dev/block/{}/queue/read_ahead_kb",
            self.device
        ))
    }

    /// Writes `"MAJ:MIN value"` to the group's `file`.
    fn write(&self, file: &str, value: u64) -> Result<(), String> {
        std::fs::write(self.path.join(file), format!("{} {value}", self.device))
            .map_err(|e| format!("{file}: {e}"))
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read requests and bytes the group's processes sent to the disk so far.
    pub fn reads(&self) -> IoCount {
        let read = |file: &str| std::fs::read_to_string(self.path.join(file)).unwrap_or_default();
        if self.version == 1 {
            // Lines `MAJ:MIN Read N`.
            let count = |text: String| {
                text.lines()
                    .filter_map(|l| {
                        let mut f = l.split_whitespace();
                        (f.next() == Some(self.device.as_str()) && f.next() == Some("Read"))
                            .then(|| f.next().and_then(|n| n.parse::<u64>().ok()))
                            .flatten()
                    })
                    .sum()
            };
            IoCount {
                requests: count(read("blkio.throttle.io_serviced")),
                bytes: count(read("blkio.throttle.io_service_bytes")),
            }
        } else {
            // A line `MAJ:MIN rbytes=N wbytes=N rios=N ...`.
            let text = read("io.stat");
            let field = |name: &str| {
                text.lines()
                    .filter(|l| l.split_whitespace().next() == Some(self.device.as_str()))
                    .flat_map(|l| l.split_whitespace())
                    .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.parse().ok()))
                    .unwrap_or(0)
            };
            IoCount {
                requests: field("rios="),
                bytes: field("rbytes="),
            }
        }
    }
}

impl Drop for IoCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
        if let Some(was) = &self.readahead_was {
            let _ = std::fs::write(self.readahead_file(), was);
        }
    }
}

/// `program args...` as a command whose process joins every group of `groups` (directories
/// of cgroups, of any controller) before it starts.
pub fn command_in(groups: &[&Path], program: &Path) -> Command {
    let mut script = String::new();
    for i in 0..groups.len() {
        script.push_str(&format!("echo $$ > \"${}/cgroup.procs\" && ", i + 1));
    }
    script.push_str(&format!("shift {} && exec \"$@\"", groups.len()));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).arg("sh");
    for g in groups {
        cmd.arg(g);
    }
    cmd.arg(program);
    cmd
}
