//! `cargo xtask gpu-check`: on a machine with an NVIDIA GPU, load a dense and a MoE
//! checkpoint to the GPU, copy every tensor back and compare its SHA-256 with the file's
//! bytes, then time weightlift against `safetensors.torch.load_file(device="cuda")` and
//! against the plain host-to-device copy rate. Prints a short table last.

use crate::bench::ensure;
use clap::Args;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use weightlift::device::{CopyEngine, CudaEngine, DeviceMemory};
use weightlift::{Checkpoint, Device, LoadOptions};
use weightlift_testkit::synthetic::Profile;
use weightlift_testkit::util::{median, parse_size};

/// Arguments of `gpu-check`.
#[derive(Args)]
pub(crate) struct GpuCheckArgs {
    /// Checkpoint size per profile (e.g. 1GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Timed repetitions per contender (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The GPU.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Where checkpoints are generated (default: target/gpu-check-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

struct Row {
    profile: &'static str,
    tensors: usize,
    bytes: u64,
    weightlift: f64,
    torch: Option<f64>,
    bound_gbps: f64,
}

pub(crate) fn run(args: &GpuCheckArgs) -> Result<(), String> {
    let started = Instant::now();
    let engine = CudaEngine::new(args.device, 2).map_err(|e| e.to_string())?;
    let name = engine.name().unwrap_or_else(|_| "unknown".into());
    eprintln!("== cuda:{} ({name})", args.device);
    let bound_gbps = copy_bound(&engine)?;
    eprintln!("   plain pinned host-to-device copy: {bound_gbps:.2} GB/s");
    // `engine` stays alive to the end: it holds the device's primary context, so loads do
    // not pay for creating it again each time.

    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("target/gpu-check-data"));
    let torch = torch_available();
    if !torch {
        eprintln!("note: python3 cannot import torch and safetensors.torch: no torch column");
    }
    let mut rows = Vec::new();
    for profile in [Profile::Dense, Profile::Moe] {
        let dir = data_dir.join(format!("{}-{}MiB", profile.name(), args.size >> 20));
        let paths = ensure(&dir, profile, args.size)?;
        let ckpt = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
        let options = LoadOptions::default().device(Device::Cuda(args.device));

        // Correctness: every tensor back from the GPU hashes like the file's bytes.
        let expected = file_hashes(&paths)?;
        let state = ckpt.load(&options).map_err(|e| e.to_string())?;
        let mut checked = 0;
        for t in &state {
            let host = t.to_host().map_err(|e| e.to_string())?;
            let got = Sha256::digest(host.bytes().unwrap_or_default());
            if expected.get(t.name()) != Some(&got.into()) {
                return Err(format!(
                    "{}: SHA-256 after the GPU round trip differs from the file",
                    t.name()
                ));
            }
            checked += 1;
        }
        if checked != expected.len() {
            return Err(format!(
                "{checked} tensors loaded, {} in the files",
                expected.len()
            ));
        }
        eprintln!(
            "   {}: {checked} tensors: SHA-256 of every tensor read back equals the file's",
            profile.name()
        );
        drop(state);

        // Timing, warm page cache (the files were just read).
        let mut secs = Vec::new();
        for _ in 0..args.reps {
            let t = Instant::now();
            let state = ckpt.load(&options).map_err(|e| e.to_string())?;
            secs.push(t.elapsed().as_secs_f64());
            drop(state);
        }
        let torch_secs = if torch {
            let mut s = Vec::new();
            for _ in 0..args.reps {
                s.push(torch_load(&paths, args.device)?);
            }
            Some(median(&s))
        } else {
            None
        };
        rows.push(Row {
            profile: profile.name(),
            tensors: ckpt.len(),
            bytes: ckpt.data_bytes(),
            weightlift: median(&secs),
            torch: torch_secs,
            bound_gbps,
        });
    }
    eprintln!("   done in {:.0} s", started.elapsed().as_secs_f64());

    println!(
        "gpu-check: cuda:{} {name}, warm page cache, median of {}",
        args.device, args.reps
    );
    println!(
        "{:<8} {:>8} {:>9}  {:>16}  {:>22}  {:>10}  {:>8}",
        "profile", "tensors", "GiB", "weightlift", "safetensors.torch", "h2d bound", "x torch"
    );
    for r in rows {
        let gib = r.bytes as f64 / (1u64 << 30) as f64;
        let gbps = |s: f64| r.bytes as f64 / s / 1e9;
        let torch = r
            .torch
            .map_or("-".to_string(), |s| format!("{s:.3} s {:.2} GB/s", gbps(s)));
        let ratio = r
            .torch
            .map_or("-".to_string(), |s| format!("{:.2}", s / r.weightlift));
        println!(
            "{:<8} {:>8} {:>9.2}  {:>16}  {:>22}  {:>5.2} GB/s  {:>8}",
            r.profile,
            r.tensors,
            gib,
            format!("{:.3} s {:.2} GB/s", r.weightlift, gbps(r.weightlift)),
            torch,
            r.bound_gbps,
            ratio
        );
    }
    Ok(())
}

/// SHA-256 of every tensor's bytes, read from the files with the reference crate.
fn file_hashes(paths: &[PathBuf]) -> Result<std::collections::HashMap<String, [u8; 32]>, String> {
    let mut out = std::collections::HashMap::new();
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        for (name, view) in st.tensors() {
            out.insert(name, Sha256::digest(view.data()).into());
        }
    }
    Ok(out)
}

/// The host-to-device rate of plain copies from one pinned buffer (256 MiB, 8 times).
fn copy_bound(engine: &CudaEngine) -> Result<f64, String> {
    let len = 256usize << 20;
    let memory = engine.alloc(len as u64).map_err(|e| e.to_string())?;
    let mut pinned = engine.alloc_pinned(len).map_err(|e| e.to_string())?;
    engine.host_slice(&mut pinned).fill(7);
    let mut best = 0.0f64;
    for _ in 0..8 {
        let t = Instant::now();
        // SAFETY: `pinned` and `memory` live past the wait below and are not written meanwhile.
        let event =
            unsafe { engine.copy_async(&pinned, len, &memory, 0, 0) }.map_err(|e| e.to_string())?;
        engine.wait(event).map_err(|e| e.to_string())?;
        best = best.max(len as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    debug_assert_eq!(memory.len(), len as u64);
    Ok(best)
}

fn torch_available() -> bool {
    Command::new("python3")
        .args([
            "-c",
            "import torch, safetensors.torch; assert torch.cuda.is_available()",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Seconds for `safetensors.torch.load_file(p, device="cuda:N")` of every shard, synchronised.
fn torch_load(paths: &[PathBuf], device: usize) -> Result<f64, String> {
    let script = "import sys,time,torch\nfrom safetensors.torch import load_file\n\
        dev=sys.argv[1]\ntorch.zeros(1,device=dev)\ntorch.cuda.synchronize()\n\
        t=time.perf_counter()\nd=[load_file(p,device=dev) for p in sys.argv[2:]]\n\
        torch.cuda.synchronize()\nprint(time.perf_counter()-t)";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(format!("cuda:{device}"))
        .args(paths)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("python: {}", String::from_utf8_lossy(&out.stderr)));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("python output: {e}"))
}
