//! What a bench run measures and records: the page-cache state of a measurement and one
//! contender's result, shared by the bench that makes them and the plot that draws them.

pub(crate) use crate::harness::Cache;
use crate::harness::{Sample, Stats, median_u64};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use weightlift_testkit::cgroup::IoCount;
use weightlift_testkit::fuse::Mount;

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

/// One contender's result in one (profile, cache) cell, for `bench`, `bench-vllm` and
/// `bench-dist` alike. Ratios are speed ratios: the yardstick's time over this contender's
/// (above 1: faster than it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) profile: String,
    pub(crate) cache: Cache,
    pub(crate) contender: String,
    pub(crate) median_s: f64,
    pub(crate) min_s: f64,
    pub(crate) max_s: f64,
    pub(crate) gbps: f64,
    /// The raw read of the same files (the better of one thread and many), over this.
    pub(crate) ratio_to_raw: f64,
    /// The reference (see `reference`; `bench`: the crates.io `safetensors` crate's load),
    /// over this.
    pub(crate) ratio_to_reference: f64,
    /// The contender `ratio_to_reference` compares with, where not the crates.io crate
    /// (`bench-vllm`: `auto`, `bench-dist`: `each`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reference: Option<String>,
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
    /// The same during the timed load alone, where the child counted it (medians; see
    /// `Sample::load_disk_requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) load_disk_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) load_disk_bytes: Option<u64>,
    /// The Python libraries the contender ran with (e.g. "transformers 5.25.0, torch
    /// 2.15.0"), for the Python contenders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) software: Option<String>,
    /// Cold cells: seconds waited after each eviction before the measurement started (see
    /// `harness::Eviction`); absent in records written before the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) settle_s: Option<f64>,
    /// `bench-vllm`: the engine's median start time, whether every start's greedy tokens
    /// equalled `auto`'s, and the first error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) start_s: Option<f64>,
    /// `bench-vllm`: the loader's whole `load_model` (model built, weights loaded and
    /// processed), min / median / max seconds: a loader that reads while the model is built
    /// moves time from the weights' part into the building.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) model_s: Option<[f64; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) same_tokens: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// `bench-dist`: where the ranks read (local, http), how many ran, the bytes each read
    /// from storage (last repetition), and the most any rank read over what it had to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) world: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rank_read_bytes: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read_over_due: Option<f64>,
}

impl Record {
    /// The record of `samples` (one contender's measurements in a cell of `bytes` over
    /// `tensors` tensors); ratios NaN until [`Record::compare`].
    pub(crate) fn of(
        profile: &str,
        cache: Cache,
        contender: String,
        samples: &[Sample],
        (tensors, bytes): (usize, u64),
    ) -> Record {
        let st = Stats::of(samples);
        let disk = |f: fn(&IoCount) -> u64| {
            median_u64(samples.iter().filter_map(|s| s.disk.as_ref().map(f)))
        };
        let starts: Vec<f64> = samples.iter().filter_map(|s| s.start_s).collect();
        let models: Vec<f64> = samples.iter().filter_map(|s| s.model_s).collect();
        Record {
            profile: profile.to_string(),
            cache,
            contender,
            median_s: st.median,
            min_s: st.min,
            max_s: st.max,
            gbps: bytes as f64 / st.median / 1e9,
            ratio_to_raw: f64::NAN,
            ratio_to_reference: f64::NAN,
            reference: None,
            peak_rss_bytes: samples.iter().map(|s| s.peak_rss).max().unwrap_or(0),
            tensors,
            bytes,
            ratio_to_local: None,
            read_bytes: median_u64(samples.iter().filter_map(|s| s.read_bytes)),
            memory_limit: None,
            oom_kills: None,
            storage: None,
            disk_requests: disk(|d| d.requests),
            disk_bytes: disk(|d| d.bytes),
            load_disk_requests: median_u64(samples.iter().filter_map(|s| s.load_disk_requests)),
            load_disk_bytes: median_u64(samples.iter().filter_map(|s| s.load_disk_bytes)),
            software: None,
            settle_s: None,
            start_s: (!starts.is_empty()).then(|| Stats::of_secs(&starts).median),
            model_s: (!models.is_empty()).then(|| {
                let st = Stats::of_secs(&models);
                [st.min, st.median, st.max]
            }),
            same_tokens: None,
            error: samples.iter().find_map(|s| s.error.clone()),
            source: None,
            world: None,
            rank_read_bytes: None,
            read_over_due: None,
        }
    }

    /// Sets the ratios against the raw read's and the reference's median seconds.
    pub(crate) fn compare(&mut self, raw: f64, reference: f64) {
        self.ratio_to_raw = raw / self.median_s;
        self.ratio_to_reference = reference / self.median_s;
    }
}

/// Prints `records` (one cell's) as the one table every bench prints: the columns every
/// record has, then those some have (requests at the disk, OOM kills, engine start, tokens,
/// ranks' reads).
pub(crate) fn print_table(records: &[Record]) {
    let has = |f: fn(&Record) -> bool| records.iter().any(f);
    let (disk, load_disk, oom, model, start, tokens, dist, error) = (
        has(|r| r.disk_requests.is_some()),
        has(|r| r.load_disk_requests.is_some()),
        has(|r| r.oom_kills.is_some()),
        has(|r| r.model_s.is_some()),
        has(|r| r.start_s.is_some()),
        has(|r| r.same_tokens.is_some()),
        has(|r| r.rank_read_bytes.is_some()),
        has(|r| r.error.is_some()),
    );
    let reference = records
        .iter()
        .find_map(|r| r.reference.clone())
        .unwrap_or_else(|| "ref".to_string());
    print!(
        "{:<32} {:>9} {:>9} {:>9} {:>7} {:>7} {:>8} {:>10} {:>7}",
        "contender",
        "median s",
        "min s",
        "max s",
        "GB/s",
        "x raw",
        format!("x {}", &reference[..reference.len().min(6)]),
        "peak RSS",
        "read x"
    );
    if oom {
        print!(" {:>4}", "oom");
    }
    if disk {
        print!(" {:>9} {:>8}", "requests", "avg KiB");
    }
    if load_disk {
        print!(" {:>9} {:>8}", "load req", "avg KiB");
    }
    if model {
        print!(" {:>20}", "model s min/med/max");
    }
    if start {
        print!(" {:>8}", "start s");
    }
    if tokens {
        print!(" {:>7}", "tokens");
    }
    if dist {
        print!(" {:>15} {:>9}", "MiB read/rank", "read/due");
    }
    println!();
    for r in records {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
        print!(
            "{:<32} {:>9.3} {:>9.3} {:>9.3} {:>7.2} {:>7.2} {:>8.2} {:>9.0}M {:>7}",
            r.contender,
            r.median_s,
            r.min_s,
            r.max_s,
            r.gbps,
            r.ratio_to_raw,
            r.ratio_to_reference,
            r.peak_rss_bytes as f64 / 1048576.0,
            opt(r
                .read_bytes
                .map(|b| format!("{:.2}", b as f64 / r.bytes as f64))),
        );
        if oom {
            print!(" {:>4}", opt(r.oom_kills.map(|n| n.to_string())));
        }
        let requests = |count: Option<u64>, bytes: Option<u64>| match (count, bytes) {
            (Some(n), Some(b)) => {
                print!(" {:>9} {:>8.0}", n, b as f64 / n.max(1) as f64 / 1024.0)
            }
            _ => print!(" {:>9} {:>8}", "-", "-"),
        };
        if disk {
            requests(r.disk_requests, r.disk_bytes);
        }
        if load_disk {
            requests(r.load_disk_requests, r.load_disk_bytes);
        }
        if model {
            let m = r.model_s.map(|[a, b, c]| format!("{a:.2}/{b:.2}/{c:.2}"));
            print!(" {:>20}", opt(m));
        }
        if start {
            print!(" {:>8}", opt(r.start_s.map(|s| format!("{s:.3}"))));
        }
        if tokens {
            let same = r
                .same_tokens
                .map(|s| if s { "same" } else { "DIFFER" }.to_string());
            print!(" {:>7}", opt(same));
        }
        if dist {
            let mib = r.rank_read_bytes.as_ref().map(|v| {
                v.iter()
                    .map(|b| format!("{:.0}", *b as f64 / 1048576.0))
                    .collect::<Vec<_>>()
                    .join("/")
            });
            print!(
                " {:>15} {:>9}",
                opt(mib),
                opt(r.read_over_due.map(|x| format!("{x:.3}")))
            );
        }
        if error && let Some(e) = &r.error {
            print!("  error: {}", e.chars().take(120).collect::<String>());
        }
        println!();
    }
    println!();
}
