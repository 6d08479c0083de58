//! `weightlift hash`: SHA-256 of every tensor's raw bytes, read through the loader.
//!
//! Shards are loaded one at a time, so memory stays at one shard's tensors however large
//! the checkpoint; hashing runs in parallel over the tensors. With `--device cuda:N` the
//! tensors go to the GPU and are copied back before hashing: the same hashes as a CPU load
//! prove the device path moved every byte right.

use crate::common::{CheckpointArgs, filter_pattern, print};
use rayon::prelude::*;
use serde_json::{Map, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use weightlift::{Device, Dtype, LoadOptions};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  weightlift hash model/\n  weightlift hash model.safetensors --json > hashes.json\n  \
    diff <(weightlift hash a/) <(weightlift hash b/)\n  \
    diff <(weightlift hash model/) <(weightlift hash model/ --device cuda:0)"
)]
pub(crate) struct Args {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Load to this device first (cpu or cuda:N; GPU tensors are copied back to be hashed).
    #[arg(long, default_value = "cpu", value_parser = clap::value_parser!(Device))]
    device: Device,
    /// Hash only tensors whose names match this glob pattern (`*`, `?`, `[..]`).
    #[arg(long)]
    filter: Option<String>,
    /// Convert floating-point tensors to this dtype while loading (F32, F16, BF16, ...) and
    /// hash the converted bytes.
    #[arg(long, value_parser = parse_dtype)]
    convert: Option<Dtype>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_dtype(name: &str) -> Result<Dtype, String> {
    Dtype::from_name(&name.to_ascii_uppercase()).ok_or_else(|| format!("unknown dtype {name:?}"))
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    if args.device == Device::Meta {
        return Err("meta tensors have no bytes to hash: use --device cpu or cuda:N".into());
    }
    let pattern = filter_pattern(args.filter.as_deref())?;
    let ckpt = args.checkpoint.open()?;
    let mut hashes: BTreeMap<String, (String, Vec<usize>, String)> = BTreeMap::new();
    for shard in ckpt.shards() {
        let names: Arc<HashSet<String>> = Arc::new(
            shard
                .header()
                .tensors()
                .iter()
                .map(|t| t.name.clone())
                .filter(|n| pattern.as_ref().is_none_or(|p| p.matches(n)))
                .collect(),
        );
        if names.is_empty() {
            continue;
        }
        let mut options = LoadOptions::default()
            .device(args.device)
            .filter(move |n| names.contains(n));
        if let Some(dtype) = args.convert {
            options = options.convert_to(dtype);
        }
        let state = ckpt.load(&options).map_err(|e| e.to_string())?;
        let digests: Vec<(String, String, Vec<usize>, String)> = state
            .into_tensors()
            .into_par_iter()
            .map(|t| {
                let host = t.to_host().map_err(|e| format!("{}: {e}", t.name()))?;
                let hex = format!("{:x}", Sha256::digest(host.bytes().unwrap_or_default()));
                Ok((
                    t.name().to_string(),
                    t.dtype().to_string(),
                    t.shape().to_vec(),
                    hex,
                ))
            })
            .collect::<Result<_, String>>()?;
        for (name, dtype, shape, hex) in digests {
            hashes.insert(name, (dtype, shape, hex));
        }
    }
    if args.json {
        let tensors: Map<String, serde_json::Value> = hashes
            .into_iter()
            .map(|(name, (dtype, shape, sha))| {
                (name, json!({"dtype": dtype, "shape": shape, "sha256": sha}))
            })
            .collect();
        return print(&format!("{}\n", json!({ "tensors": tensors })));
    }
    let mut out = String::new();
    for (name, (dtype, shape, sha)) in &hashes {
        out.push_str(&format!("{sha}  {dtype} {shape:?}  {name}\n"));
    }
    print(&out)
}
