//! `weightlift demo`: the main job on a built-in checkpoint. Generates a MoE-shaped
//! checkpoint once (cached), then loads it with weightlift and reads the same bytes raw,
//! side by side in one run, warm and cold.

use crate::common::{ProfileArg, human_bytes, print, table, thousands};
use std::path::{Path, PathBuf};
use std::time::Instant;
use weightlift::{Checkpoint, LoadOptions};
use weightlift_workload::synthetic::{self, Profile};
use weightlift_workload::util::{available_memory, free_space, median, parse_size};
use weightlift_workload::yardstick::{evict_all, raw_read};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  weightlift demo\n  weightlift demo --size 2GiB --profile dense --runs 5"
)]
pub(crate) struct Args {
    /// Checkpoint size (default: 1 GiB, less where memory or disk is short).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Checkpoint layout.
    #[arg(long, value_enum, default_value_t = ProfileArg::Moe)]
    profile: ProfileArg,
    /// Where to keep the generated checkpoint (default: the user cache directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measurements per contender (the median is shown).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let profile = args.profile.profile();
    let base = args.dir.clone().unwrap_or_else(cache_dir);
    let size = args.size.unwrap_or_else(|| suitable_size(&base));
    let dir = base.join(format!("demo-{}-{}MiB", profile.name(), size >> 20));
    let paths = ensure_checkpoint(&dir, profile, size)?;
    let runs = args.runs.max(1);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());

    let ckpt = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
    let bytes = ckpt.data_bytes();
    let mut out = format!(
        "weightlift demo: {} profile, {} tensors in {} files, {}\ncheckpoint: {} (generated once, then reused)\n\n",
        profile.name(),
        thousands(ckpt.len() as u64),
        ckpt.shards().len(),
        human_bytes(bytes),
        dir.display()
    );
    drop(ckpt);

    let raw = |paths: &[PathBuf]| -> Result<f64, String> {
        let t = Instant::now();
        raw_read(paths, threads, 16 << 20).map_err(|e| format!("raw read: {e}"))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let load = || -> Result<(f64, String), String> {
        let t = Instant::now();
        let ckpt = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
        let state = ckpt
            .load(&LoadOptions::default())
            .map_err(|e| e.to_string())?;
        let secs = t.elapsed().as_secs_f64();
        drop(state);
        let backends: Vec<&str> = ckpt.shards().iter().map(|s| s.backend().name()).collect();
        Ok((secs, backends.join("+")))
    };
    let evict = || evict_all(&paths).map_err(|e| e.to_string());

    let mut rows = vec![vec![
        "cache".to_string(),
        format!("raw read ({threads} threads)"),
        "weightlift".into(),
        "weightlift / raw".into(),
        "backend".into(),
    ]];
    // Warm: read once so the page cache holds the files, then alternate.
    raw(&paths)?;
    let (mut r, mut w, mut backend) = (Vec::new(), Vec::new(), String::new());
    for _ in 0..runs {
        r.push(raw(&paths)?);
        let (secs, b) = load()?;
        w.push(secs);
        backend = b;
    }
    rows.push(row("warm", bytes, &r, &w, &backend));
    let (mut r, mut w) = (Vec::new(), Vec::new());
    let mut still_cached: f64 = 0.0;
    for _ in 0..runs {
        still_cached = still_cached.max(evict()?);
        r.push(raw(&paths)?);
        still_cached = still_cached.max(evict()?);
        let (secs, b) = load()?;
        w.push(secs);
        backend = b;
    }
    rows.push(row("cold", bytes, &r, &w, &backend));
    out.push_str(&table(&rows));
    out.push_str(&format!(
        "\nmedian of {runs}; cold = evicted with posix_fadvise(DONTNEED) before each run ({:.1}% still cached after eviction)\n",
        still_cached * 100.0
    ));
    print(&out)
}

fn row(cache: &str, bytes: u64, raw: &[f64], wl: &[f64], backend: &str) -> Vec<String> {
    let (r, w) = (median(raw), median(wl));
    vec![
        cache.into(),
        format!("{r:.3} s {:>6.2} GB/s", bytes as f64 / r / 1e9),
        format!("{w:.3} s {:>6.2} GB/s", bytes as f64 / w / 1e9),
        format!("{:.2}", r / w),
        backend.into(),
    ]
}

/// `$XDG_CACHE_HOME/weightlift`, else `~/.cache/weightlift`, else a temp directory.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("weightlift")
}

/// 1 GiB, or less where available memory or free disk is short (a quarter of either).
fn suitable_size(dir: &Path) -> u64 {
    let mut size: u64 = (1 << 30).min(available_memory() / 4);
    if let Some(free) = free_space(dir) {
        size = size.min(free / 4);
    }
    size.max(64 << 20)
}

/// Generates the checkpoint into `dir` unless a complete one is there already.
fn ensure_checkpoint(dir: &Path, profile: Profile, size: u64) -> Result<Vec<PathBuf>, String> {
    if let Ok(ckpt) = Checkpoint::open(dir) {
        return Ok(shard_paths(&ckpt));
    }
    eprintln!(
        "generating a {} {} checkpoint in {} (once)...",
        human_bytes(size),
        profile.name(),
        dir.display()
    );
    // Generate beside the final place and rename, so an interrupted run leaves no half
    // checkpoint where the next run would look.
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    synthetic::generate(&partial, profile, size)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&partial, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    Ok(shard_paths(&ckpt))
}

/// The shard files of a local checkpoint.
fn shard_paths(ckpt: &Checkpoint) -> Vec<PathBuf> {
    ckpt.shards()
        .iter()
        .filter_map(|s| s.path().map(Path::to_path_buf))
        .collect()
}
