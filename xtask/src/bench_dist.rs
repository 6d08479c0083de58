//! `cargo xtask bench-dist`: loads by several ranks at once (torch.distributed, gloo on
//! 127.0.0.1), as torchrun starts them. For each world size it times, side by side:
//! every rank loading the whole checkpoint itself (what users do today), one shared load
//! (`group=`: each rank reads a share, the shares are broadcast), and a tensor-parallel
//! slice plan (`slices=`: each rank reads only its rows of every matrix). Reports the wall
//! time (the slowest rank, after a barrier) and the bytes each rank read from storage.

use crate::bench::{ProfileArg, ensure, python, python_imports, python_weightlift_ready};
use crate::record::Cache;
use crate::workspace_root;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use weightlift::Checkpoint;
use weightlift_workload::util::{median, parse_size};
use weightlift_workload::yardstick::{evict_all, raw_read};

#[derive(Args)]
pub(crate) struct BenchDistArgs {
    /// Bytes of the checkpoint (e.g. 1GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// The synthetic layout (dense or moe).
    #[arg(long, default_value = "moe")]
    profile: ProfileArg,
    /// Numbers of ranks.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    worlds: Vec<usize>,
    /// Repetitions per mode (median, min and max are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Cache states: warm, cold.
    #[arg(long, value_delimiter = ',', default_value = "warm,cold")]
    cache: Vec<Cache>,
    /// Where the ranks read from: local files, or http (a local nginx serving the same
    /// files: object storage's stand-in, where every rank's bytes cross the network).
    #[arg(long, value_delimiter = ',', default_value = "local,http")]
    source: Vec<Source>,
    /// Where generated checkpoints are kept (default: target/bench-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the records as a JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Where the ranks read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum Source {
    /// The files on the local disk (one page cache serves every rank).
    Local,
    /// The same files from nginx on 127.0.0.1.
    Http,
}

/// How the ranks load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// Every rank `load_checkpoint`s everything itself.
    Each,
    /// `load_checkpoint(group=WORLD)`: a share each, then broadcast.
    Shared,
    /// `load_checkpoint(slices=...)`: each rank its rows of every matrix, nothing else.
    Sliced,
}

impl Mode {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// One (cache, world, mode) cell.
#[derive(Debug, Serialize)]
struct Record {
    profile: String,
    source: Source,
    cache: Cache,
    world: usize,
    mode: Mode,
    /// The slowest rank's time, median over the repetitions.
    median_s: f64,
    min_s: f64,
    max_s: f64,
    /// A raw parallel read of the same files, then the same ratio (>1: faster than it).
    ratio_to_raw: f64,
    /// The same world loading each its own copy (`each`), over this mode's time.
    speedup_vs_each: f64,
    /// Bytes of the checkpoint's tensors.
    bytes: u64,
    /// Bytes each rank read from storage (the last repetition).
    bytes_read: Vec<u64>,
    /// The most any rank read, over what it had to: 1/world of the checkpoint (shared), its
    /// own slices (sliced), the whole checkpoint (each).
    read_over_due: f64,
    /// The largest rank's peak RSS.
    peak_rss_bytes: u64,
}

/// One rank's measurement: timed from a barrier to the last page of its tensors touched.
const PY_RANK: &str = r#"import datetime, json, resource, sys, time
import torch, torch.distributed as dist
import weightlift
mode, path = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
rank, world = dist.get_rank(), dist.get_world_size()
def rows(name, shape):
    if len(shape) < 2:
        return None
    n = shape[0]
    return (slice(rank * n // world, (rank + 1) * n // world),)
dist.barrier()
t = time.perf_counter()
if mode == "each":
    state = weightlift.load_checkpoint(path, framework="pt")
elif mode == "shared":
    state = weightlift.load_checkpoint(path, framework="pt", group=True)
else:
    state = weightlift.load_checkpoint(path, framework="pt", slices=rows)
seen, total = set(), 0
for v in state.values():
    s = v.untyped_storage()
    if s.nbytes() == 0 or s.data_ptr() in seen:
        continue
    seen.add(s.data_ptr())
    total += int(torch.empty(0, dtype=torch.uint8).set_(s)[::4096].sum())
secs = time.perf_counter() - t
needed = sum(v.numel() * v.element_size() for v in state.values())
read = sum(f["bytes_read"] for f in state.report)
print(json.dumps({"secs": secs, "read": read, "needed": needed,
    "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
dist.barrier()
dist.destroy_process_group()
"#;

#[derive(Deserialize)]
struct RankSample {
    secs: f64,
    read: u64,
    needed: u64,
    rss: u64,
}

pub(crate) fn run(args: &BenchDistArgs) -> Result<(), String> {
    let profile = args
        .profile
        .profile()
        .ok_or("bench-dist runs the synthetic profiles (dense, moe)")?;
    if args.cache.contains(&Cache::ColdFuse) {
        return Err("bench-dist runs warm and cold only".into());
    }
    if !python_imports("torch, torch.distributed") || !python_weightlift_ready() {
        return Err(
            "bench-dist needs torch and the bindings in target/py-venv (bash .ci/run)".into(),
        );
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench-data"));
    let dir = data_dir.join(format!("{}-{}MiB", profile.name(), args.size >> 20));
    let paths = ensure(&dir, profile, args.size)?;
    let ckpt = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
    let (tensors, bytes) = (ckpt.len(), ckpt.data_bytes());
    drop(ckpt);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nginx = args
        .source
        .contains(&Source::Http)
        .then(|| weightlift_testkit::servers::Nginx::start(&data_dir));
    let mut records = Vec::new();
    for (&source, &cache) in args
        .source
        .iter()
        .flat_map(|s| args.cache.iter().map(move |c| (s, c)))
    {
        let location = match (source, &nginx) {
            (Source::Http, Some(nginx)) => {
                nginx.url(&dir.file_name().unwrap_or_default().to_string_lossy())
            }
            _ => dir.display().to_string(),
        };
        let cold = cache == Cache::Cold;
        let evict = || -> Result<(), String> {
            if cold {
                evict_all(&paths).map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        let mut raw = Vec::new();
        for _ in 0..args.reps.max(1) {
            evict()?;
            let start = Instant::now();
            raw_read(&paths, cpus.max(2), 16 << 20).map_err(|e| e.to_string())?;
            raw.push(start.elapsed().as_secs_f64());
        }
        let raw = median(&raw);
        for &world in &args.worlds {
            eprintln!(
                "== {} ({tensors} tensors, {:.2} GiB), {source:?}, {}, world {world}, {} reps (raw read {raw:.3} s)",
                profile.name(),
                bytes as f64 / (1u64 << 30) as f64,
                cache.name(),
                args.reps
            );
            let mut cells: Vec<(Mode, Vec<f64>, Vec<RankSample>)> = Vec::new();
            for _ in 0..args.reps.max(1) {
                for mode in [Mode::Each, Mode::Shared, Mode::Sliced] {
                    evict()?;
                    let ranks = run_world(world, mode, &location)?;
                    let wall = ranks.iter().map(|r| r.secs).fold(0.0, f64::max);
                    match cells.iter_mut().find(|c| c.0 == mode) {
                        Some(cell) => {
                            cell.1.push(wall);
                            cell.2 = ranks;
                        }
                        None => cells.push((mode, vec![wall], ranks)),
                    }
                }
            }
            let each = median(&cells[0].1);
            for (mode, walls, ranks) in &cells {
                let due = |r: &RankSample| match mode {
                    Mode::Shared => bytes as f64 / world as f64,
                    _ => r.needed as f64,
                };
                let m = median(walls);
                records.push(Record {
                    profile: profile.name().to_string(),
                    source,
                    cache,
                    world,
                    mode: *mode,
                    median_s: m,
                    min_s: walls.iter().copied().fold(f64::INFINITY, f64::min),
                    max_s: walls.iter().copied().fold(0.0, f64::max),
                    ratio_to_raw: raw / m,
                    speedup_vs_each: each / m,
                    bytes,
                    bytes_read: ranks.iter().map(|r| r.read).collect(),
                    read_over_due: ranks
                        .iter()
                        .map(|r| r.read as f64 / due(r))
                        .fold(0.0, f64::max),
                    peak_rss_bytes: ranks.iter().map(|r| r.rss).max().unwrap_or(0),
                });
            }
            print_table(&records[records.len() - cells.len()..]);
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&records).expect("json"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Starts `world` ranks loading `location` in `mode`; their samples in rank order. A rank that
/// fails stops the others (they would wait for it in a collective until the timeout).
fn run_world(world: usize, mode: Mode, location: &str) -> Result<Vec<RankSample>, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let logs = workspace_root().join("target/bench-dist-logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let log = |rank: usize, ext: &str| logs.join(format!("rank{rank}.{ext}"));
    let mut children = Vec::with_capacity(world);
    for rank in 0..world {
        let file = |ext| std::fs::File::create(log(rank, ext)).map_err(|e| e.to_string());
        let child = Command::new(python())
            .arg("-c")
            .arg(PY_RANK)
            .arg(mode.name())
            .arg(location)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", "1")
            .stdout(file("out")?)
            .stderr(file("err")?)
            .spawn()
            .map_err(|e| e.to_string());
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                children.iter_mut().for_each(|c| drop(c.kill()));
                return Err(e);
            }
        }
    }
    let mut running = world;
    while running > 0 {
        running = 0;
        for (rank, child) in children.iter_mut().enumerate() {
            match child.try_wait().map_err(|e| e.to_string())? {
                None => running += 1,
                Some(status) if status.success() => {}
                Some(_) => {
                    for c in children.iter_mut() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    let err = std::fs::read_to_string(log(rank, "err")).unwrap_or_default();
                    return Err(format!("{} rank {rank}: {}", mode.name(), err.trim()));
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (0..world)
        .map(|rank| {
            let text = std::fs::read_to_string(log(rank, "out")).map_err(|e| e.to_string())?;
            let line = text.lines().last().unwrap_or_default();
            serde_json::from_str(line)
                .map_err(|e| format!("{} rank {rank}: {e}: {text:?}", mode.name()))
        })
        .collect()
}

fn print_table(records: &[Record]) {
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>7} {:>8} {:>14} {:>9} {:>10}",
        "mode",
        "median s",
        "min s",
        "max s",
        "x raw",
        "x each",
        "MiB read/rank",
        "read/due",
        "peak RSS"
    );
    for r in records {
        let mib: Vec<String> = r
            .bytes_read
            .iter()
            .map(|b| format!("{:.0}", *b as f64 / 1048576.0))
            .collect();
        println!(
            "{:<8} {:>9.3} {:>9.3} {:>9.3} {:>7.2} {:>8.2} {:>14} {:>9.3} {:>9.0}M",
            r.mode.name(),
            r.median_s,
            r.min_s,
            r.max_s,
            r.ratio_to_raw,
            r.speedup_vs_each,
            mib.join("/"),
            r.read_over_due,
            r.peak_rss_bytes as f64 / 1048576.0,
        );
    }
    println!();
}
