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
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.path)
            .arg(program);
        cmd
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}
