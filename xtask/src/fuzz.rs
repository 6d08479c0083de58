//! `cargo xtask fuzz`: runs a cargo-fuzz target for a fixed time on the stable toolchain.
//!
//! On stable, `cargo fuzz run --sanitizer none` works as is and gives about five times the
//! executions per second of AddressSanitizer; the parsers are `#![forbid(unsafe_code)]`,
//! so what the fuzzer hunts here is panics, overflows and bad invariants, which need no
//! sanitizer. `--sanitizer address` builds with `RUSTC_BOOTSTRAP=1` for the nightly-only
//! `-Zsanitizer` flag.

use crate::workspace_root;
use clap::{Args, ValueEnum};
use std::process::Command;

#[derive(Args)]
pub(crate) struct FuzzArgs {
    /// How long to fuzz, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The fuzz target.
    #[arg(long, value_enum, default_value_t = Target::ParseHeader)]
    target: Target,
    /// Sanitizer to build with.
    #[arg(long, value_enum, default_value_t = Sanitizer::None)]
    sanitizer: Sanitizer,
    /// Parallel fuzzing jobs.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    ParseHeader,
    ParseIndex,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::ParseHeader => "parse_header",
            Target::ParseIndex => "parse_index",
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Sanitizer {
    None,
    Address,
}

pub(crate) fn run(args: &FuzzArgs) -> Result<(), String> {
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let target = args.target.name();
    let corpus = root.join("fuzz/corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("creating {}: {e}", corpus.display()))?;

    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("fuzz")).arg("fuzz").arg("run");
    match args.sanitizer {
        Sanitizer::None => {
            cmd.args(["--sanitizer", "none"]);
        }
        Sanitizer::Address => {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
    }
    cmd.arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", args.seconds));
    if args.jobs > 1 {
        cmd.arg(format!("-fork={}", args.jobs));
    }
    eprintln!(
        "xtask: fuzzing {target} for {} s (new inputs go to {})",
        args.seconds,
        corpus.display()
    );
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo fuzz: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo fuzz exited with {status}; crashing inputs are under fuzz/artifacts/{target}"
        ))
    }
}

fn ensure_cargo_fuzz() -> Result<(), String> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    eprintln!("xtask: cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .map_err(|e| format!("running cargo install: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err("installing cargo-fuzz failed".into())
    }
}
