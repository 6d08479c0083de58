//! The `weightlift` command: look inside, verify and load safetensors checkpoints.

mod common;
mod demo;
mod generate;
mod hash;
mod inspect;
mod load;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "weightlift",
    version,
    about = "Inspect, verify and load safetensors checkpoints, fast.",
    long_about = "Inspect, verify and load safetensors checkpoints, fast.\n\n\
        PATH is a .safetensors file, a directory of shards (with or without \
        model.safetensors.index.json), or an index file; local, or an http(s):// or s3:// URL \
        (S3 settings from the usual AWS variables and profile files; a bearer token for \
        http(s) from WEIGHTLIFT_HTTP_TOKEN).",
    after_help = "Examples:\n  weightlift demo\n  weightlift inspect model/ --filter '*.experts.0.*'\n  \
        weightlift hash model.safetensors --json\n  weightlift load model/ --backend direct --threads 8"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarise a checkpoint and list its tensors.
    Inspect(inspect::Args),
    /// Load every tensor and print its SHA-256 (verify a download, compare checkpoints).
    Hash(hash::Args),
    /// Load a checkpoint and report time, throughput and memory.
    Load(load::Args),
    /// Generate (once) a MoE-shaped checkpoint and load it against a raw read of its bytes.
    Demo(demo::Args),
    /// Write a synthetic checkpoint (real layouts, pseudo-random bytes) to benchmark with.
    Generate(generate::Args),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Hash(args) => hash::run(&args),
        Command::Load(args) => load::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Generate(args) => generate::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weightlift: error: {e}");
            ExitCode::FAILURE
        }
    }
}
