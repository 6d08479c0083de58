//! `weightlift inspect`: what a checkpoint holds, from its headers alone.

use crate::common::{CheckpointArgs, filter_pattern, human_bytes, print, table, thousands};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use weightlift::Dtype;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  weightlift inspect model/\n  weightlift inspect model/ --filter 'model.layers.0.*'\n  \
    weightlift inspect model.safetensors --json | jq '.tensors | length'"
)]
pub(crate) struct Args {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// List (and count) only tensors whose names match this glob pattern (`*`, `?`, `[..]`).
    #[arg(long)]
    filter: Option<String>,
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let pattern = filter_pattern(args.filter.as_deref())?;
    let ckpt = args.checkpoint.open()?;
    let keep = |name: &str| pattern.as_ref().is_none_or(|p| p.matches(name));

    let mut metadata = Map::new();
    for shard in ckpt.shards() {
        for (k, v) in shard.header().metadata().into_iter().flatten() {
            metadata.insert(k.clone(), Value::from(v.as_str()));
        }
    }
    let mut total_bytes = 0u64;
    let mut parameters = 0u64;
    let mut per_dtype: BTreeMap<Dtype, (u64, u64)> = BTreeMap::new();
    let mut listed = Vec::new();
    for (shard, t) in ckpt.tensors().filter(|(_, t)| keep(&t.name)) {
        total_bytes += t.byte_len();
        parameters += t.num_elements() as u64;
        let e = per_dtype.entry(t.dtype).or_default();
        e.0 += 1;
        e.1 += t.byte_len();
        listed.push((shard, t));
    }

    if args.json {
        let files: Vec<Value> = ckpt
            .shards()
            .iter()
            .map(|s| json!({"path": s.location().to_string(), "header_bytes": s.header().data_start(), "data_bytes": s.header().data_len()}))
            .collect();
        let tensors: Vec<Value> = listed
            .iter()
            .map(|(s, t)| {
                json!({"name": t.name, "dtype": t.dtype.name(), "shape": t.shape, "file": s.name(), "data_offsets": [t.data_offsets.0, t.data_offsets.1]})
            })
            .collect();
        let out = json!({
            "files": files,
            "metadata": if metadata.is_empty() { Value::Null } else { Value::Object(metadata) },
            "tensors": tensors,
            "total_bytes": total_bytes,
            "parameters": parameters,
        });
        return print(&format!("{out}\n"));
    }

    let mut out = format!(
        "{}: {} file{}, {}, {} parameters, {}\n",
        args.checkpoint.path,
        ckpt.shards().len(),
        if ckpt.shards().len() == 1 { "" } else { "s" },
        tensors(listed.len() as u64),
        thousands(parameters),
        human_bytes(total_bytes)
    );
    if let Some(p) = &args.filter {
        out.push_str(&format!("(tensors matching {p:?})\n"));
    }
    out.push_str("\nfiles:\n");
    let rows: Vec<Vec<String>> = ckpt
        .shards()
        .iter()
        .map(|s| {
            vec![
                format!("  {}", s.name()),
                tensors(s.header().len() as u64),
                format!("header {}", human_bytes(s.header().data_start())),
                format!("data {}", human_bytes(s.header().data_len())),
            ]
        })
        .collect();
    out.push_str(&table(&rows));
    out.push_str("\ndtypes:\n");
    let rows: Vec<Vec<String>> = per_dtype
        .iter()
        .map(|(d, (n, b))| vec![format!("  {d}"), tensors(*n), human_bytes(*b)])
        .collect();
    out.push_str(&table(&rows));
    if !metadata.is_empty() {
        out.push_str("\nmetadata:\n");
        for (k, v) in &metadata {
            out.push_str(&format!("  {k} = {}\n", v.as_str().unwrap_or_default()));
        }
    }
    out.push_str("\ntensors:\n");
    let mut rows = vec![vec![
        "  NAME".to_string(),
        "DTYPE".into(),
        "SHAPE".into(),
        "SIZE".into(),
    ]];
    rows.extend(listed.iter().map(|(_, t)| {
        vec![
            format!("  {}", t.name),
            t.dtype.to_string(),
            format!("{:?}", t.shape),
            human_bytes(t.byte_len()),
        ]
    }));
    out.push_str(&table(&rows));
    print(&out)
}

/// `1 tensor`, `12,345 tensors`.
fn tensors(n: u64) -> String {
    format!("{} tensor{}", thousands(n), if n == 1 { "" } else { "s" })
}
