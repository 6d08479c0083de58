//! `weightlift load`: load a checkpoint and say how fast it went.

use crate::common::{CheckpointArgs, human_bytes, print, thousands};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::time::Instant;
use weightlift::{Device, LoadOptions};
use weightlift_workload::util::{parse_size, peak_rss};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  weightlift load model/\n  weightlift load model/ --backend direct --threads 8\n  \
    weightlift load model/ --device meta --json\n  weightlift load model/ --map auto\n\n\
    With --backend mmap, and for files loaded mapped (--map), the files must not be modified \
    or truncated during the load."
)]
pub(crate) struct Args {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Where tensors go: cpu, meta (shapes only) or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = clap::value_parser!(Device))]
    device: Device,
    /// Loader threads (default: number of CPUs, at least 4).
    #[arg(long)]
    threads: Option<usize>,
    /// Size of one coalesced read, e.g. 16MiB.
    #[arg(long, value_parser = parse_size)]
    request_size: Option<u64>,
    /// Ask for transparent huge pages for the loaded tensors (fewer page faults; can stall
    /// in memory compaction where THP defrag is "madvise").
    #[arg(long)]
    huge_pages: bool,
    /// For --device cuda: number of pinned staging buffers.
    #[arg(long, value_name = "N", default_value_t = weightlift::StagingOptions::default().buffers)]
    pinned_buffers: usize,
    /// For --device cuda: size of each pinned staging buffer, e.g. 32MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pinned_buffer_size: Option<u64>,
    /// For --device cuda: copy streams.
    #[arg(long, value_name = "N", default_value_t = 2)]
    streams: usize,
    /// CPU loads: leave tensors in private mappings of the files instead of copying them
    /// (never; always; auto: where the file is on a local disk or in memory).
    #[arg(long, value_enum, default_value_t = MapArg::Never)]
    map: MapArg,
    /// After an owned CPU load, drop the bytes read from the page cache (so it does not hold
    /// a second copy of the model).
    #[arg(long)]
    drop_cache: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `--map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MapArg {
    /// Copy into owned memory.
    Never,
    /// Map every file.
    Always,
    /// Map files on local disks and in memory; copy from network filesystems and URLs.
    Auto,
}

impl MapArg {
    fn mapping(self) -> weightlift::Mapping {
        match self {
            MapArg::Never => weightlift::Mapping::never(),
            // SAFETY: the user asked for mapped loads; --help and the README state that the
            // files must not be modified or truncated while weightlift reads them.
            MapArg::Always => unsafe { weightlift::Mapping::always() },
            // SAFETY: as above.
            MapArg::Auto => unsafe { weightlift::Mapping::auto() },
        }
    }
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    // The GPU's driver and context come up before the clock starts, as in a process that
    // already uses the GPU: what is timed is the load. Kept alive to the end, so the load
    // finds the device's context ready.
    let init = Instant::now();
    #[cfg(feature = "cuda")]
    let _context = match args.device {
        Device::Cuda(n) => Some(weightlift::CudaEngine::new(n, 1).map_err(|e| e.to_string())?),
        _ => None,
    };
    let init_secs = init.elapsed().as_secs_f64();
    let start = Instant::now();
    let ckpt = args.checkpoint.open_with(args.map.mapping())?;
    let open_secs = start.elapsed().as_secs_f64();
    let mut options = LoadOptions::default()
        .device(args.device)
        .huge_pages(args.huge_pages)
        .drop_cache(args.drop_cache)
        .staging(weightlift::StagingOptions::new(
            args.pinned_buffers,
            args.pinned_buffer_size
                .map_or(weightlift::StagingOptions::default().buffer_size, |s| {
                    s as usize
                }),
        ))
        .streams(args.streams);
    if let Some(t) = args.threads {
        options = options.threads(t);
    }
    if let Some(r) = args.request_size {
        options = options.request_size(r);
    }
    // Drawn on stderr only when it is a terminal; piped runs get no bar.
    let bar = ProgressBar::with_draw_target(Some(ckpt.data_bytes()), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    if args.device != Device::Meta {
        let b = bar.clone();
        options = options.progress(move |p| b.set_position(p.bytes_done));
    }
    let state = ckpt.load(&options).map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let bytes = if args.device == Device::Meta {
        0
    } else {
        state.byte_len()
    };
    let gbps = bytes as f64 / secs / 1e9;
    let peak = peak_rss().unwrap_or(0);
    let remote = ckpt.remote_stats();
    let threads = args.threads.unwrap_or_else(|| ckpt.default_threads());
    // Per-stage rates of a device load: storage to pinned buffers with all loader threads
    // busy, and the host-to-device link (copies in one direction share it).
    let stages = state.staging().map(|s| {
        let rate = |secs: f64| {
            if secs > 0.0 {
                s.bytes as f64 / secs / 1e9
            } else {
                0.0
            }
        };
        (
            rate(s.fill.as_secs_f64() / threads as f64),
            rate(s.copy.as_secs_f64()),
            s.wait.as_secs_f64(),
            s.copies,
        )
    });
    // Per file: the backend and, for files the load touched, where their tensors went.
    let placement = |i: usize| {
        state
            .files()
            .iter()
            .find(|f| f.shard == i)
            .map(|f| (f.placement.name(), f.reason.clone(), f.bytes_read))
    };
    let files: Vec<_> = ckpt
        .shards()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = placement(i);
            json!({
                "path": s.location().to_string(),
                "backend": s.backend().name(),
                "reason": p.as_ref().map_or_else(|| s.backend_reason().to_string(), |p| p.1.clone()),
                "placement": p.as_ref().map(|p| p.0),
                "bytes_read": p.as_ref().map_or(0, |p| p.2),
            })
        })
        .collect();
    if args.json {
        let out = json!({
            "path": args.checkpoint.path,
            "device": args.device.to_string(),
            "seconds": secs,
            "open_seconds": open_secs,
            "device_init_seconds": init_secs,
            "bytes": bytes,
            "gbps": gbps,
            "tensors": state.len(),
            "peak_rss_bytes": peak,
            "requests": remote.map(|r| r.requests),
            "retries": remote.map(|r| r.retries),
            "disk_to_host_gbps": stages.map(|s| s.0),
            "host_to_device_gbps": stages.map(|s| s.1),
            "staging_wait_seconds": stages.map(|s| s.2),
            "copies": stages.map(|s| s.3),
            "bytes_read": state.bytes_read(),
            "files": files,
        });
        return print(&format!("{out}\n"));
    }
    let mut out = format!(
        "loaded {} tensors, {} to {} in {:.3} s ({:.2} GB/s; headers {:.3} s)\npeak memory {}\n",
        thousands(state.len() as u64),
        human_bytes(bytes),
        args.device,
        secs,
        gbps,
        open_secs,
        human_bytes(peak)
    );
    if let Some((fill, copy, wait, copies)) = stages {
        out.push_str(&format!(
            "stages: storage->pinned {fill:.2} GB/s ({threads} threads), host->device {copy:.2} GB/s \
             ({} copies), {wait:.3} s waiting for a free staging buffer\n",
            thousands(copies)
        ));
    }
    if let Some(r) = remote {
        out.push_str(&format!(
            "{} HTTP requests ({} retries), {} received\n",
            thousands(r.requests),
            thousands(r.retries),
            human_bytes(r.bytes)
        ));
    }
    for (i, s) in ckpt.shards().iter().enumerate() {
        let line = match placement(i) {
            Some(("mapped", reason, _)) => format!("mapped ({reason})"),
            Some((place, reason, _)) => format!("{}, {place} ({reason})", s.backend()),
            None => format!("{} ({})", s.backend(), s.backend_reason()),
        };
        out.push_str(&format!("  {}: {line}\n", s.name()));
    }
    print(&out)
}
