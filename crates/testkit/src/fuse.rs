//! A `bindfs` passthrough mount: a FUSE filesystem over a local directory, which behaves
//! like a network filesystem for page faults and is classified as one (`statfs` magic), so
//! tests and the bench can see what weightlift does on one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A `bindfs --no-allow-other` mount of a directory, unmounted when dropped.
#[derive(Debug)]
pub struct Mount {
    mount: PathBuf,
    /// The mount point's own temporary folder, when the mount made it.
    _dir: Option<tempfile::TempDir>,
}

impl Mount {
    /// Mounts `source` on a fresh temporary folder; `None` (with the reason on stderr) where
    /// `bindfs` is missing or cannot mount here.
    pub fn new(source: &Path) -> Option<Mount> {
        let dir = tempfile::tempdir().ok()?;
        let at = dir.path().to_path_buf();
        match Mount::at(source, &at) {
            Ok(mut m) => {
                m._dir = Some(dir);
                Some(m)
            }
            Err(e) => {
                eprintln!("no FUSE mount: {e}");
                None
            }
        }
    }

    /// Mounts `source` on `mount` (made if missing; anything mounted there first is
    /// unmounted).
    pub fn at(source: &Path, mount: &Path) -> Result<Mount, String> {
        let _ = Command::new("umount").arg(mount).output();
        std::fs::create_dir_all(mount).map_err(|e| format!("{}: {e}", mount.display()))?;
        let out = Command::new("bindfs")
            .arg("--no-allow-other")
            .arg(source)
            .arg(mount)
            .output()
            .map_err(|e| format!("bindfs (apt-get install bindfs): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "bindfs {} {}: {}",
                source.display(),
                mount.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Mount {
            mount: mount.to_path_buf(),
            _dir: None,
        })
    }

    /// Where the mounted directory is seen.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).output();
    }
}
