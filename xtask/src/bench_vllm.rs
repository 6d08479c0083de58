//! `cargo xtask bench-vllm`: vLLM's real engine on the CPU (`target/vllm-venv`, see `.ci/run`)
//! starting on a transformers model with each loader (`auto`, `weightlift`, and the peers that
//! run on a CPU: `runai_streamer`; `fastsafetensors` is tried and reported where it refuses),
//! each start in a fresh process in vLLM's one-process mode: the loader's `load_weights` time
//! (what vLLM logs as "Loading weights took"), the engine's start, and the greedy tokens
//! (which must equal `auto`'s).

use crate::bench::{ProfileArg, ensure_transformers};
use crate::record::Cache;
use crate::workspace_root;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use weightlift_workload::util::median;
use weightlift_workload::yardstick::evict;

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
    /// Engine starts per loader (median, min and max reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where generated models are kept (default: target/bench-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the records as a JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One loader's result in one (model, cache) cell.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    profile: String,
    cache: Cache,
    loader: String,
    /// Median `load_weights` seconds, min, max.
    load_s: f64,
    load_min_s: f64,
    load_max_s: f64,
    /// Median engine start seconds (`LLM(...)`).
    start_s: f64,
    /// `load_s` over `auto`'s.
    ratio_to_auto: f64,
    /// Whether the greedy tokens equal `auto`'s.
    same_tokens: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Run {
    start_s: Option<f64>,
    load_s: Option<f64>,
    tokens: Option<Vec<u64>>,
    error: Option<String>,
}

fn vllm_python() -> PathBuf {
    workspace_root().join("target/vllm-venv/bin/python")
}

fn run(model: &Path, loader: &str) -> Result<Run, String> {
    let worker = workspace_root().join("crates/python/tools/vllm_worker.py");
    let out = Command::new(vllm_python())
        .arg(worker)
        .arg(format!("{}={loader}", model.display()))
        .env("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        .env("VLLM_CPU_KVCACHE_SPACE", "1")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| {
            format!(
                "{loader}: no result: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        })?;
    serde_json::from_str(line).map_err(|e| format!("{loader}: {e}"))
}

pub(crate) fn run_bench(args: &BenchVllmArgs) -> Result<(), String> {
    if !vllm_python().is_file() {
        return Err(
            "bench-vllm needs target/vllm-venv with vLLM's CPU build (bash .ci/run makes it)"
                .into(),
        );
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench-data"));
    let fuse = crate::record::fuse_mount(&args.cache, &data_dir)?;
    let mut records = Vec::new();
    for &profile in &args.profiles {
        let disk = data_dir.join(profile.name());
        let disk_files = ensure_transformers(&disk, profile)?;
        for &cache in &args.cache {
            let (dir, files) = crate::record::cache_paths(cache, fuse.as_ref(), &disk, &disk_files);
            eprintln!(
                "== {} {}, {} starts each",
                profile.name(),
                cache.name(),
                args.reps
            );
            let mut runs: Vec<Vec<Run>> = args.loaders.iter().map(|_| Vec::new()).collect();
            for _ in 0..args.reps.max(1) {
                for (i, loader) in args.loaders.iter().enumerate() {
                    if cache != Cache::Warm {
                        for p in files.iter().chain(if cache == Cache::ColdFuse {
                            &disk_files[..]
                        } else {
                            &[]
                        }) {
                            evict(p).map_err(|e| e.to_string())?;
                        }
                    }
                    runs[i].push(run(&dir, loader)?);
                }
            }
            let reference = args
                .loaders
                .iter()
                .position(|l| l == "auto")
                .map(|i| &runs[i]);
            let auto_load = reference.map(|r| median(&loads(r))).unwrap_or(f64::NAN);
            let auto_tokens = reference.and_then(|r| r.iter().find_map(|x| x.tokens.clone()));
            for (loader, rs) in args.loaders.iter().zip(&runs) {
                let l = loads(rs);
                let error = rs.iter().find_map(|r| r.error.clone());
                let record = Record {
                    profile: profile.name().to_string(),
                    cache,
                    loader: loader.clone(),
                    load_s: median(&l),
                    load_min_s: l.iter().copied().fold(f64::INFINITY, f64::min),
                    load_max_s: l.iter().copied().fold(0.0, f64::max),
                    start_s: median(&rs.iter().filter_map(|r| r.start_s).collect::<Vec<_>>()),
                    ratio_to_auto: median(&l) / auto_load,
                    same_tokens: rs
                        .iter()
                        .all(|r| r.tokens.is_some() && r.tokens == auto_tokens),
                    error,
                };
                println!(
                    "{:<16} load {:>7.3} s (min {:.3}, max {:.3})  x auto {:>5.2}  start {:>7.3} s  tokens {}{}",
                    record.loader,
                    record.load_s,
                    record.load_min_s,
                    record.load_max_s,
                    record.ratio_to_auto,
                    record.start_s,
                    if record.same_tokens { "same" } else { "DIFFER" },
                    record
                        .error
                        .as_deref()
                        .map(|e| format!("  error: {}", e.chars().take(100).collect::<String>()))
                        .unwrap_or_default()
                );
                records.push(record);
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&records).expect("json"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn loads(runs: &[Run]) -> Vec<f64> {
    runs.iter().filter_map(|r| r.load_s).collect()
}
