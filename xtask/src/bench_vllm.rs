//! `cargo xtask bench-vllm`: vLLM's real engine on the CPU (`target/vllm-venv`, see `.ci/run`)
//! starting on a transformers model with each loader (`auto`, `weightlift`, and the peers that
//! run on a CPU: `runai_streamer`; `fastsafetensors` is tried and reported where it refuses),
//! each start in a fresh process in vLLM's one-process mode, interleaved, beside a raw read of
//! the same files: the loader's `load_weights` time (what vLLM logs as "Loading weights
//! took"), the loader's whole `load_model` (the model built, loaded and processed: a loader
//! that reads while the model is built moves time out of `load_weights`), the engine's
//! start, its peak RSS, and the greedy tokens (which must equal
//! `auto`'s). Cold starts can run on throttled storage (`--storage`).

use crate::bench::{ProfileArg, bindings_ready_in, ensure_transformers, raw_child};
use crate::harness::{Child, Eviction, Groups, Storage, interleave, write_json};
use crate::record::{Cache, Record, print_table};
use crate::workspace_root;
use clap::Args;
use std::path::{Path, PathBuf};
use weightlift::Checkpoint;

#[derive(Args)]
pub(crate) struct BenchVllmArgs {
    /// Models (transformers profiles: hf-moe, hf-moe-large, hf-dense).
    #[arg(long, value_delimiter = ',', default_value = "hf-moe,hf-moe-large")]
    profiles: Vec<ProfileArg>,
    /// Cache states.
    #[arg(long, value_delimiter = ',', default_value = "warm,cold,cold-fuse")]
    cache: Vec<Cache>,
    /// Loaders (vLLM load formats).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "auto,weightlift,runai_streamer,fastsafetensors"
    )]
    loaders: Vec<String>,
    /// Engine starts per loader, interleaved (min, median and max reported; at least 3).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Cold starts on throttled storage, as `bench --storage` (volume, netfs, slow, or limits
    /// such as `800req/s,1GB/s`).
    #[arg(long, value_parser = crate::harness::parse_storage)]
    storage: Option<Storage>,
    /// Seconds to wait after each eviction before a cold measurement starts, so that storage
    /// is cold below the page cache too (see `harness::Eviction`); 0 measures at once.
    #[arg(long, default_value = "12", value_parser = crate::harness::parse_settle)]
    settle: std::time::Duration,
    /// Where generated models are kept (default: target/bench-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the records as a JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn vllm_python() -> PathBuf {
    workspace_root().join("target/vllm-venv/bin/python")
}

/// One engine start on `model` with `loader`.
fn start(model: &Path, loader: &str) -> Child {
    Child::new(vllm_python())
        .arg(workspace_root().join("crates/python/tools/vllm_worker.py"))
        .arg(format!("{}={loader}", model.display()))
        .env("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        .env("VLLM_CPU_KVCACHE_SPACE", "1")
}

pub(crate) fn run_bench(args: &BenchVllmArgs) -> Result<(), String> {
    if !vllm_python().is_file() {
        return Err(
            "bench-vllm needs target/vllm-venv with vLLM's CPU build (bash .ci/run makes it)"
                .into(),
        );
    }
    if args.loaders.iter().any(|l| l == "weightlift")
        && !bindings_ready_in(&workspace_root().join("target/vllm-venv"))
    {
        return Err("could not build the bindings in release mode into target/vllm-venv".into());
    }
    if args.cache.contains(&Cache::ColdLimited) {
        return Err("bench-vllm runs warm, cold and cold-fuse".into());
    }
    let reps = args.reps.max(3);
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench-data"));
    let fuse = crate::record::fuse_mount(&args.cache, &data_dir)?;
    let io = args
        .storage
        .as_ref()
        .map(|st| st.cgroup(&data_dir))
        .transpose()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The raw read first: every ratio is relative to it.
    let names: Vec<String> = std::iter::once("raw".to_string())
        .chain(args.loaders.iter().cloned())
        .collect();
    let mut records = Vec::new();
    for &profile in &args.profiles {
        let disk = data_dir.join(profile.name());
        let disk_files = ensure_transformers(&disk, profile)?;
        let ckpt = Checkpoint::open(&disk).map_err(|e| e.to_string())?;
        let size = (ckpt.len(), ckpt.data_bytes());
        drop(ckpt);
        for &cache in &args.cache {
            let (dir, files) = crate::record::cache_paths(cache, fuse.as_ref(), &disk, &disk_files);
            eprintln!("== {} {}, {reps} starts each", profile.name(), cache.name());
            let groups = Groups {
                memory: None,
                io: if cache == Cache::Warm {
                    None
                } else {
                    io.as_ref()
                },
            };
            let mut eviction = Eviction::new(cache, &files, &disk_files, args.settle);
            let samples = interleave(reps, names.len(), &mut eviction, groups.io.is_some(), |i| {
                let child = match i {
                    0 => raw_child(&dir, cpus.max(2))?,
                    _ => start(&dir, &names[i]),
                };
                groups.measure(&names[i], &[child]).map(Some)
            })?;
            let auto = names.iter().position(|l| l == "auto");
            let auto_tokens = auto.and_then(|i| samples[i].iter().find_map(|s| s.tokens.clone()));
            let mut cell: Vec<Record> = names
                .iter()
                .zip(&samples)
                .map(|(name, s)| {
                    let mut r = Record::of(profile.name(), cache, name.clone(), s, size);
                    r.reference = Some("auto".to_string());
                    r.settle_s = eviction.settle_s();
                    r.storage = groups.io.and(args.storage.as_ref()).map(|s| s.name.clone());
                    if name != "raw" {
                        r.same_tokens = Some(
                            s.iter()
                                .all(|x| x.tokens.is_some() && x.tokens == auto_tokens),
                        );
                    }
                    r
                })
                .collect();
            let raw = cell[0].median_s;
            let auto = auto.map_or(f64::NAN, |i| cell[i].median_s);
            for r in &mut cell {
                r.compare(raw, auto);
            }
            print_table(&cell);
            records.extend(cell);
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &records)?;
    }
    Ok(())
}
