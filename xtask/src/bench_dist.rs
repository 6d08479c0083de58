//! `cargo xtask bench-dist`: loads by several ranks at once (torch.distributed, gloo on
//! 127.0.0.1), as torchrun starts them (`xtask/bench/dist_rank.py`). For each world size it
//! times, interleaved, beside a raw read of the same files: every rank loading the whole
//! checkpoint itself (what users do today), one shared load (`group=`: each rank reads a
//! share, the shares are broadcast), and a tensor-parallel slice plan (`slices=`: each rank
//! reads only its rows of every matrix). Reports the wall time (the slowest rank, after a
//! barrier) and the bytes each rank read from storage.

use crate::bench::{
    ProfileArg, ensure, python, python_imports, python_weightlift_ready, raw_child, script,
};
use crate::harness::{Child, Eviction, Groups, Storage, interleave, write_json};
use crate::record::{Cache, Record, print_table};
use crate::workspace_root;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use weightlift::Checkpoint;
use weightlift_workload::util::parse_size;

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
    /// Repetitions per mode, interleaved (min, median and max reported; at least 3).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Cache states: warm, cold.
    #[arg(long, value_delimiter = ',', default_value = "warm,cold")]
    cache: Vec<Cache>,
    /// Where the ranks read from: local files, or http (a local nginx serving the same
    /// files: object storage's stand-in, where every rank's bytes cross the network).
    #[arg(long, value_delimiter = ',', default_value = "local,http")]
    source: Vec<Source>,
    /// Cold loads from local files on throttled storage shared by the ranks, as `bench
    /// --storage` (volume, netfs, slow, or limits such as `800req/s,1GB/s`).
    #[arg(long, value_parser = crate::harness::parse_storage)]
    storage: Option<Storage>,
    /// Seconds to wait after each eviction before a cold measurement starts, so that storage
    /// is cold below the page cache too (see `harness::Eviction`); 0 measures at once.
    #[arg(long, default_value = "12", value_parser = crate::harness::parse_settle)]
    settle: std::time::Duration,
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

pub(crate) fn run(args: &BenchDistArgs) -> Result<(), String> {
    let profile = args
        .profile
        .profile()
        .ok_or("bench-dist runs the synthetic profiles (dense, moe)")?;
    if args
        .cache
        .iter()
        .any(|&c| c != Cache::Warm && c != Cache::Cold)
    {
        return Err("bench-dist runs warm and cold only".into());
    }
    if !python_imports("torch, torch.distributed") || !python_weightlift_ready() {
        return Err(
            "bench-dist needs torch and the bindings in target/py-venv (bash .ci/run)".into(),
        );
    }
    let reps = args.reps.max(3);
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
    let io = args
        .storage
        .as_ref()
        .map(|st| st.cgroup(&data_dir))
        .transpose()?;
    let modes = [Mode::Each, Mode::Shared, Mode::Sliced];
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
        // The throttle is the local disk's: nginx (outside the group) reads it for http.
        let groups = Groups {
            memory: None,
            io: if cache == Cache::Cold && source == Source::Local {
                io.as_ref()
            } else {
                None
            },
        };
        for &world in &args.worlds {
            eprintln!(
                "== {} ({tensors} tensors, {:.2} GiB), {source:?}, {}, world {world}, {reps} reps",
                profile.name(),
                bytes as f64 / (1u64 << 30) as f64,
                cache.name(),
            );
            let mut eviction = Eviction::new(cache, &paths, &paths, args.settle);
            let samples = interleave(
                reps,
                1 + modes.len(),
                &mut eviction,
                groups.io.is_some(),
                |i| {
                    if i == 0 {
                        return groups
                            .measure("raw", &[raw_child(&dir, cpus.max(2))?])
                            .map(Some);
                    }
                    let mode = modes[i - 1];
                    groups
                        .measure(&mode.name(), &ranks(world, mode, &location)?)
                        .map(Some)
                },
            )?;
            let mut cell: Vec<Record> = std::iter::once("raw".to_string())
                .chain(modes.iter().map(|m| m.name()))
                .zip(&samples)
                .map(|(name, s)| {
                    let mut r = Record::of(profile.name(), cache, name, s, (tensors, bytes));
                    r.reference = Some("each".to_string());
                    r.source = Some(format!("{source:?}").to_lowercase());
                    r.world = Some(world);
                    r.settle_s = eviction.settle_s();
                    r.storage = groups.io.and(args.storage.as_ref()).map(|s| s.name.clone());
                    r
                })
                .collect();
            for (r, (mode, s)) in cell[1..].iter_mut().zip(modes.iter().zip(&samples[1..])) {
                let Some(last) = s.last() else { continue };
                // What a rank had to read: 1/world of the checkpoint (shared), its own
                // slices (sliced), everything (each).
                let due = |rank: &crate::harness::Sample| match mode {
                    Mode::Shared => bytes as f64 / world as f64,
                    _ => rank.needed.unwrap_or(bytes) as f64,
                };
                r.rank_read_bytes = Some(
                    last.ranks
                        .iter()
                        .map(|x| x.read_bytes.unwrap_or(0))
                        .collect(),
                );
                r.read_over_due = Some(
                    last.ranks
                        .iter()
                        .map(|x| x.read_bytes.unwrap_or(0) as f64 / due(x))
                        .fold(0.0, f64::max),
                );
            }
            let (raw, each) = (cell[0].median_s, cell[1].median_s);
            for r in &mut cell {
                r.compare(raw, each);
            }
            print_table(&cell);
            records.extend(cell);
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &records)?;
    }
    Ok(())
}

/// The `world` ranks of a load of `location` in `mode`, as torchrun starts them.
fn ranks(world: usize, mode: Mode, location: &str) -> Result<Vec<Child>, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    Ok((0..world)
        .map(|rank| {
            Child::new(python())
                .arg(script("dist_rank"))
                .arg(mode.name())
                .arg(location)
                .env("RANK", rank)
                .env("LOCAL_RANK", rank)
                .env("WORLD_SIZE", world)
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port)
                .env("OMP_NUM_THREADS", 1)
        })
        .collect())
}
