//! `cargo xtask`: project tasks that need more than `cargo test`.

mod bench;
mod bench_dist;
mod bench_vllm;
mod fuzz;
mod gpu_bundle;
mod harness;
mod plot;
mod record;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weightlift project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Fuzz the header parser (and the index parser) with cargo-fuzz / libFuzzer.
    Fuzz(fuzz::FuzzArgs),
    /// Time weightlift against a raw read and the reference crate on the same bytes.
    Bench(bench::BenchArgs),
    /// Time loads by several ranks (torch.distributed, gloo): each rank loading
    /// everything, one shared load, tensor-parallel slice plans; bytes read per rank.
    BenchDist(bench_dist::BenchDistArgs),
    /// vLLM's engine on the CPU (target/vllm-venv) starting with each loader: weight-loading
    /// and start times, tokens compared with the default loader's.
    BenchVllm(bench_vllm::BenchVllmArgs),
    /// Build, here, the folder a GPU machine (no Rust, no network) needs to test and
    /// measure the CUDA path in one call: CLI, GPU test binaries, wheels, run.sh.
    GpuBundle(gpu_bundle::GpuBundleArgs),
    /// Redraw the bench's SVG from a saved `--json` file.
    Plot {
        /// Records written by `bench --json`.
        #[arg(long)]
        json: PathBuf,
        /// Where to write the SVG.
        #[arg(long)]
        out: PathBuf,
    },
    /// One measurement of the bench, in its own process (used by `bench`).
    #[command(hide = true)]
    BenchOne(bench::OneArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::BenchOne(args) => bench::run_one(&args),
        Task::BenchDist(args) => bench_dist::run(&args),
        Task::BenchVllm(args) => bench_vllm::run_bench(&args),
        Task::GpuBundle(args) => gpu_bundle::run(&args),
        Task::Plot { json, out } => std::fs::read_to_string(&json)
            .map_err(|e| format!("{}: {e}", json.display()))
            .and_then(|text| {
                serde_json::from_str::<Vec<record::Record>>(&text)
                    .map_err(|e| format!("{}: {e}", json.display()))
            })
            .and_then(|records| {
                std::fs::write(&out, plot::svg(&records))
                    .map_err(|e| format!("{}: {e}", out.display()))
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}
