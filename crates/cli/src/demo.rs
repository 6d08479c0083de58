//! `weightlift demo`: the main job on a built-in checkpoint. Generates a MoE-shaped
//! checkpoint once (cached, with a progress bar), then loads it the two ways users get, mapped
//! (what Python's `load_file` and `safe_open` hand out by default) and into memory of its own,
//! beside the bounds that limit them (the raw read of the same bytes, and filling as much
//! fresh memory), interleaved, warm and cold, every time divided by the raw read's.

use crate::common::{ProfileArg, human_bytes, print, table, thousands};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;
use weightlift::{Checkpoint, LoadOptions, Mapping, OpenOptions};
use weightlift_workload::synthetic::{self, Profile};
use weightlift_workload::util::{available_memory, free_space, median, parse_size};
use weightlift_workload::yardstick::{evict_all, fresh_memory, raw_read};

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
    /// Measurements per contender (min, median and max are shown; at least 3).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// What the demo times.
#[derive(Clone, Copy, PartialEq)]
enum Contender {
    /// The sequential read of the files' bytes: what the storage delivers.
    Raw,
    /// Faulting in and filling as much new memory: the floor under a load into memory of its
    /// own (no I/O; warm only).
    Fresh,
    /// `Checkpoint::load` of the files mapped: tensors are views of the page cache.
    Mapped,
    /// `Checkpoint::load` into memory of its own.
    Owned,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Raw => "raw read (bound)",
            Contender::Fresh => "fresh memory fill (bound for owned)",
            Contender::Mapped => "weightlift, mapped (Python's default)",
            Contender::Owned => "weightlift, owned memory",
        }
    }
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let profile = args.profile.profile();
    let base = args.dir.clone().unwrap_or_else(cache_dir);
    let size = args.size.unwrap_or_else(|| suitable_size(&base));
    let dir = base.join(format!("demo-{}-{}MiB", profile.name(), size >> 20));
    let paths = ensure_checkpoint(&dir, profile, size)?;
    let runs = args.runs.max(3);
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

    let time = |c: Contender| -> Result<f64, String> {
        let t = Instant::now();
        match c {
            Contender::Raw => {
                raw_read(&paths, threads, 16 << 20).map_err(|e| format!("raw read: {e}"))?;
            }
            Contender::Fresh => {
                fresh_memory(bytes, threads).map_err(|e| format!("fresh memory: {e}"))?;
            }
            Contender::Mapped | Contender::Owned => {
                let mapping = if c == Contender::Mapped {
                    // SAFETY: the demo's own generated files, which nothing modifies or
                    // truncates while the load's tensors live (they are dropped below).
                    unsafe { Mapping::auto() }
                } else {
                    Mapping::never()
                };
                let options = OpenOptions::default().mapping(mapping);
                let ckpt = Checkpoint::open_with(&dir, &options).map_err(|e| e.to_string())?;
                let state = ckpt
                    .load(&LoadOptions::default())
                    .map_err(|e| e.to_string())?;
                std::hint::black_box(&state);
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let evict = || evict_all(&paths).map_err(|e| e.to_string());

    let mut rows = vec![vec![
        "cache".to_string(),
        "what".into(),
        "min / median / max".into(),
        "GB/s".into(),
        "x raw read".into(),
    ]];
    let mut still_cached: f64 = 0.0;
    for cache in ["warm", "cold"] {
        let contenders: &[Contender] = if cache == "warm" {
            &[
                Contender::Raw,
                Contender::Fresh,
                Contender::Mapped,
                Contender::Owned,
            ]
        } else {
            &[Contender::Raw, Contender::Mapped, Contender::Owned]
        };
        if cache == "warm" {
            // Read once so that the page cache holds the files.
            time(Contender::Raw)?;
        }
        let mut times = vec![Vec::new(); contenders.len()];
        // Interleaved: each run times every contender once.
        for _ in 0..runs {
            for (i, &c) in contenders.iter().enumerate() {
                if cache == "cold" {
                    still_cached = still_cached.max(evict()?);
                }
                times[i].push(time(c)?);
            }
        }
        let raw = median(&times[0]);
        for (&c, t) in contenders.iter().zip(&times) {
            let (lo, mid, hi) = (
                t.iter().copied().fold(f64::INFINITY, f64::min),
                median(t),
                t.iter().copied().fold(0.0, f64::max),
            );
            rows.push(vec![
                cache.into(),
                c.name().into(),
                format!("{lo:.3} / {mid:.3} / {hi:.3} s"),
                format!("{:.2}", bytes as f64 / mid / 1e9),
                format!("{:.2}x", mid / raw),
            ]);
        }
    }
    out.push_str(&table(&rows));
    out.push_str(&format!(
        "\n{runs} runs each, interleaved. x raw read = median time / the raw read's median time\n\
         (1.00x: as fast as reading the bytes; lower is faster). Mapped loads hand out views of\n\
         the page cache; owned loads fill new memory, which the fresh-memory row bounds.\n\
         Cold: evicted with posix_fadvise(DONTNEED) before each run ({:.1}% still cached after).\n",
        still_cached * 100.0
    ));
    print(&out)
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
    // Drawn on stderr only when it is a terminal.
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {binary_bytes}/{binary_total_bytes} eta {eta}")
            .expect("valid template"),
    );
    synthetic::generate_with_progress(&partial, profile, size, &|n| bar.inc(n))?;
    bar.finish_and_clear();
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
