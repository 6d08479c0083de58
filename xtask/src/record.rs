//! What a bench run measures and records: the page-cache state of a measurement and one
//! contender's result, shared by the bench that makes them and the plot that draws them.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

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
}
