//! `weightlift generate`: the demo's synthetic checkpoints, written where the user says, to
//! benchmark a machine or another loader with (the GPU bundle makes its checkpoints so).

use crate::common::{ProfileArg, human_bytes, print, thousands};
use std::path::PathBuf;
use weightlift::Checkpoint;
use weightlift_workload::synthetic;
use weightlift_workload::util::parse_size;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  weightlift generate /dev/shm/moe --size 4GiB\n  \
    weightlift generate ckpt/dense --profile dense --size 8GiB"
)]
pub(crate) struct Args {
    /// Directory to write the shards and model.safetensors.index.json into (created; must
    /// not hold a checkpoint already).
    dir: PathBuf,
    /// Checkpoint size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Checkpoint layout.
    #[arg(long, value_enum, default_value_t = ProfileArg::Moe)]
    profile: ProfileArg,
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let dir = &args.dir;
    let occupied = std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".safetensors") || name.ends_with(".index.json")
        })
    });
    if occupied {
        return Err(format!(
            "{}: already holds safetensors files; choose an empty directory",
            dir.display()
        ));
    }
    let paths = synthetic::generate(dir, args.profile.profile(), args.size)?;
    let ckpt = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    print(&format!(
        "{}: {} tensors in {} shards, {}\n",
        dir.display(),
        thousands(ckpt.len() as u64),
        paths.len(),
        human_bytes(ckpt.data_bytes())
    ))
}
