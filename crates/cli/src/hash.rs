//! `weightlift hash`: SHA-256 of every tensor's raw bytes, read through the loader.
//!
//! Tensors are loaded a group at a time, each group within the prefetch window of the memory
//! budget (a shard, or a part of one: see `weightlift::MemoryBudget`), so memory stays
//! bounded however large the checkpoint, container limits included; hashing runs in parallel
//! over a group's tensors. With `--device cuda:N` the
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
    let window = ckpt.budget().window().max(1 << 20);
    let mut hashes: BTreeMap<String, (String, Vec<usize>, String)> = BTreeMap::new();
    let groups = ckpt.shards().iter().flat_map(|shard| {
        // Consecutive tensors of the shard, as many as the window holds (at least one).
        let mut groups: Vec<HashSet<String>> = Vec::new();
        let mut bytes = 0u64;
        for t in shard.header().tensors() {
            if pattern.as_ref().is_some_and(|p| !p.matches(&t.name)) {
                continue;
            }
            // Converted tensors grow at most twice (16-bit floats to F32).
            let len = t.byte_len() * if args.convert.is_some() { 2 } else { 1 };
            if groups.is_empty() || bytes + len > window {
                groups.push(HashSet::new());
                bytes = 0;
            }
            bytes += len;
            groups.last_mut().expect("a group").insert(t.name.clone());
        }
        groups
    });
    for names in groups {
        let names = Arc::new(names);
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
