//! What a bench run measures and records: the page-cache state of a measurement and one
//! contender's result, shared by the bench that makes them and the plot that draws them.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use weightlift_testkit::fuse::Mount;

/// Page-cache state before each measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Cache {
    /// The files are in the page cache.
    Warm,
    /// Every file evicted (and checked) before each measurement.
    Cold,
    /// Cold, read through a FUSE passthrough mount (`bindfs`) standing in for a network
    /// filesystem: both the mount's and the disk's caches are evicted.
    ColdFuse,
    /// Cold, each measurement in a memory cgroup of `--memory-limit` bytes (a host or
    /// container with less memory than the model): bytes read from storage are reported
    /// beside the time.
    ColdLimited,
}

impl Cache {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cache::Warm => "warm",
            Cache::Cold => "cold",
            Cache::ColdFuse => "cold-fuse",
            Cache::ColdLimited => "cold-limited",
        }
    }
}

/// The FUSE passthrough of `data_dir` that `cold-fuse` reads through (beside it, as
/// `bench-data-fuse`), mounted when `caches` asks for that state.
pub(crate) fn fuse_mount(caches: &[Cache], data_dir: &Path) -> Result<Option<Mount>, String> {
    if !caches.contains(&Cache::ColdFuse) {
        return Ok(None);
    }
    Mount::at(data_dir, &data_dir.with_file_name("bench-data-fuse")).map(Some)
}

/// Where a measurement in `cache` reads the directory `dir` (one of the data directory's)
/// and its `files`: the same names under the FUSE mount for `cold-fuse`, else as they are.
pub(crate) fn cache_paths(
    cache: Cache,
    fuse: Option<&Mount>,
    dir: &Path,
    files: &[PathBuf],
) -> (PathBuf, Vec<PathBuf>) {
    match (cache, fuse) {
        (Cache::ColdFuse, Some(fuse)) => {
            let through = fuse.path().join(dir.file_name().unwrap_or_default());
            let files = files
                .iter()
                .map(|p| through.join(p.file_name().unwrap_or_default()))
                .collect();
            (through, files)
        }
        _ => (dir.to_path_buf(), files.to_vec()),
    }
}

/// One contender's result in one (profile, cache) cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) profile: String,
    pub(crate) cache: Cache,
    pub(crate) contender: String,
    pub(crate) median_s: f64,
    pub(crate) min_s: f64,
    pub(crate) max_s: f64,
    pub(crate) gbps: f64,
    pub(crate) ratio_to_raw: f64,
    pub(crate) ratio_to_reference: f64,
    pub(crate) peak_rss_bytes: u64,
    pub(crate) tensors: usize,
    pub(crate) bytes: u64,
    /// For the http contender: its speed relative to the same load from local files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ratio_to_local: Option<f64>,
    /// Bytes read from storage (`/proc/self/io`), median over the repetitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read_bytes: Option<u64>,
    /// For `cold-limited`: the cgroup's limit, and OOM kills seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) memory_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) oom_kills: Option<u64>,
    /// Under `--storage` (cold runs): the profile, and the read requests and bytes the disk
    /// served (medians over the repetitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) storage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) disk_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) disk_bytes: Option<u64>,
    /// The Python libraries the contender ran with (e.g. "transformers 5.25.0, torch
    /// 2.15.0"), for the Python contenders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) software: Option<String>,
}
