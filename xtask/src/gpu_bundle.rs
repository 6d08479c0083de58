//! `cargo xtask gpu-bundle`: everything a GPU machine without a Rust toolchain or network
//! needs to check and measure weightlift's CUDA path in one call, built here into one folder
//! (default `target/gpu-bundle`, under 64 MiB):
//!
//! - `bin/weightlift`: the stripped release CLI (with `cuda`), which generates the
//!   checkpoints there, hashes loads to the device and reports per-stage rates;
//! - `tests/`: the release test binaries that run the real `CudaEngine` (`tests/cuda.rs`
//!   and the device crate's tests), stripped;
//! - `wheels/`: the weightlift abi3 wheel and the peers' wheels (fastsafetensors,
//!   InstantTensor, Run:ai model streamer; their other needs are preinstalled there);
//! - `run.sh`, `run.py`, `gpu_tasks.py`, `pagecache.py` (from `xtask/gpu/`) and
//!   `MANIFEST.json` (commit, date, files and sizes).
//!
//! Run it there with `bash target/gpu-bundle/run.sh`; without a GPU it runs every stage that
//! needs none and stops with the device's "not available" error (`--device cpu` rehearses
//! all of it on the CPU instead).

use crate::workspace_root;
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The peers, pinned: the versions the bundle was checked with.
const PEERS: &[&str] = &[
    "fastsafetensors==0.5.0",
    "instanttensor==0.2.2",
    "runai-model-streamer==0.17.1",
];

/// What may travel to the GPU machine beside the working tree.
const LIMIT: u64 = 60 << 20;

/// Arguments of `gpu-bundle`.
#[derive(Args)]
pub(crate) struct GpuBundleArgs {
    /// Output folder (default: target/gpu-bundle; emptied first).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Python with maturin and pip (default: target/py-venv/bin/python, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Leave the peers' wheels out.
    #[arg(long)]
    no_peers: bool,
}

#[derive(Serialize)]
struct Manifest {
    commit: String,
    dirty: bool,
    built: String,
    rustc: String,
    files: Vec<(String, u64)>,
    total_bytes: u64,
}

pub(crate) fn run(args: &GpuBundleArgs) -> Result<(), String> {
    let root = workspace_root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/gpu-bundle"));
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = root.join("target/py-venv/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let _ = std::fs::remove_dir_all(&out);
    for sub in ["bin", "tests", "wheels"] {
        mkdir(&out.join(sub))?;
    }

    eprintln!("== the CLI (release, cuda)");
    cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "weightlift-cli",
    ]))?;
    strip_into(
        &root.join("target/release/weightlift"),
        &out.join("bin/weightlift"),
    )?;

    eprintln!("== the GPU test binaries (release)");
    for (package, selector, name) in [
        ("weightlift-tests", ["--test", "cuda"], "cuda"),
        ("weightlift-device", ["--lib", ""], "device"),
    ] {
        let mut c = Command::new("cargo");
        c.current_dir(&root).args([
            "test",
            "--release",
            "--locked",
            "--no-run",
            "--message-format=json",
            "-p",
            package,
            "--features",
            "cuda",
        ]);
        c.args(selector.iter().filter(|s| !s.is_empty()));
        let json = cmd(&mut c)?;
        let exe = test_executable(&json)
            .ok_or_else(|| format!("cargo test --no-run -p {package}: no test executable"))?;
        strip_into(Path::new(&exe), &out.join("tests").join(name))?;
    }

    eprintln!("== the weightlift wheel (abi3)");
    cmd(Command::new(&python)
        .current_dir(root.join("crates/python"))
        .args([
            "-m",
            "maturin",
            "build",
            "--release",
            "--locked",
            "--strip",
            "--out",
        ])
        .arg(out.join("wheels")))?;

    if !args.no_peers {
        eprintln!("== the peers' wheels (for CPython 3.12, manylinux x86-64)");
        let cache = root.join("target/gpu-peer-wheels");
        mkdir(&cache)?;
        let mut c = Command::new(&python);
        c.args([
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
        ]);
        for tag in [
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
        ] {
            c.args(["--platform", tag]);
        }
        c.arg("-d").arg(&cache).args(PEERS);
        cmd(&mut c)?;
        for peer in PEERS {
            let stem = peer
                .split("==")
                .collect::<Vec<_>>()
                .join("-")
                .replace('-', "_");
            let wheel = std::fs::read_dir(&cache)
                .map_err(|e| format!("{}: {e}", cache.display()))?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.replace('-', "_").starts_with(&stem))
                })
                .ok_or_else(|| format!("no wheel for {peer} in {}", cache.display()))?;
            copy(
                &wheel,
                &out.join("wheels").join(wheel.file_name().expect("a file")),
            )?;
        }
    }

    for script in ["run.sh", "run.py", "gpu_tasks.py", "pagecache.py"] {
        copy(&root.join("xtask/gpu").join(script), &out.join(script))?;
    }

    let mut files = Vec::new();
    collect(&out, &out, &mut files)?;
    files.sort();
    let total_bytes = files.iter().map(|f| f.1).sum();
    let manifest = Manifest {
        commit: output(
            Command::new("git")
                .current_dir(&root)
                .args(["rev-parse", "HEAD"]),
        ),
        dirty: !output(
            Command::new("git")
                .current_dir(&root)
                .args(["status", "--porcelain"]),
        )
        .is_empty(),
        built: output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        rustc: output(Command::new("rustc").arg("--version")),
        files,
        total_bytes,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(out.join("MANIFEST.json"), text).map_err(|e| e.to_string())?;
    for (name, size) in &manifest.files {
        eprintln!("   {:>6.1} MiB  {name}", *size as f64 / (1u64 << 20) as f64);
    }
    let rel = out
        .strip_prefix(&root)
        .unwrap_or(&out)
        .display()
        .to_string();
    eprintln!(
        "bundle: {rel}, {:.1} MiB in all",
        total_bytes as f64 / (1u64 << 20) as f64
    );
    if total_bytes > LIMIT {
        return Err(format!(
            "the bundle is {total_bytes} bytes, over the {LIMIT} that may travel to the GPU machine"
        ));
    }
    println!(
        "run it on the GPU machine from the repository root (carry {rel}):\n  bash {rel}/run.sh --budget 450\n\
         or rehearse it here, without a GPU:\n  PYTHON={} bash {rel}/run.sh --device cpu --size 256MiB --hf-scale 0.125",
        python.display()
    );
    Ok(())
}

/// The executable of the test target in `cargo --message-format=json` output.
fn test_executable(json: &str) -> Option<String> {
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .filter_map(|v| v["executable"].as_str().map(str::to_string))
        .next_back()
}

fn cmd(c: &mut Command) -> Result<String, String> {
    let out = c
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("{:?}: {e}", c.get_program()))?;
    if !out.status.success() {
        return Err(format!("{c:?} failed: {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn output(c: &mut Command) -> String {
    c.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn mkdir(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))
}

/// Copies an executable without its symbols and debug information (a fraction of its size).
fn strip_into(from: &Path, to: &Path) -> Result<(), String> {
    cmd(Command::new("strip").arg("-o").arg(to).arg(from)).map(drop)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<(), String> {
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        let meta = entry.metadata().map_err(|e| e.to_string())?;
        if meta.is_dir() {
            collect(root, &path, out)?;
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            out.push((rel, meta.len()));
        }
    }
    Ok(())
}
