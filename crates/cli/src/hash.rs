//! `weightlift hash`: SHA-256 of every tensor's raw bytes, read through the loader.
//!
//! Shards are loaded one at a time, so memory stays at one shard's tensors however large
//! the checkpoint; hashing runs in parallel over the tensors.

use crate::common::{CheckpointArgs, print};
use rayon::prelude::*;
use serde_json::{Map, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use weightlift::LoadOptions;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  weightlift hash model/\n  weightlift hash model.safetensors --json > hashes.json\n  \
    diff <(weightlift hash a/) <(weightlift hash b/)"
)]
pub(crate) struct Args {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let ckpt = args.checkpoint.open()?;
    let mut hashes: BTreeMap<String, (String, Vec<usize>, String)> = BTreeMap::new();
    for shard in ckpt.shards() {
        let names: Arc<HashSet<String>> = Arc::new(
            shard
                .header()
                .tensors()
                .iter()
                .map(|t| t.name.clone())
                .collect(),
        );
        let state = ckpt
            .load(&LoadOptions::default().filter(move |n| names.contains(n)))
            .map_err(|e| e.to_string())?;
        let digests: Vec<(String, String, Vec<usize>, String)> = state
            .into_tensors()
            .into_par_iter()
            .map(|t| {
                let hex = format!("{:x}", Sha256::digest(t.bytes().unwrap_or_default()));
                (
                    t.name().to_string(),
                    t.dtype().to_string(),
                    t.shape().to_vec(),
                    hex,
                )
            })
            .collect();
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
