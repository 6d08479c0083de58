use crate::record::{Cache, Record};
use crate::workspace_root;
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use weightlift::{Backend, Checkpoint, Device, LoadOptions, OpenOptions};
use weightlift_testkit::cgroup::{IoCgroup, IoCount};
use weightlift_workload::synthetic::{self, Profile};
use weightlift_workload::util::{median, parse_size, peak_rss, reset_peak_rss};
use weightlift_workload::yardstick::{evict, fresh_memory, raw_read};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Bytes per profile checkpoint (e.g. 2GiB, 512MiB).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    size: u64,
    /// Repetitions per contender, interleaved (min, median and max are reported; at least 3:
    /// a median of fewer says little).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// A short run: 256 MiB checkpoints, 3 repetitions.
    #[arg(long)]
    quick: bool,
    /// Profiles to run.
    #[arg(long, value_delimiter = ',', default_value = "dense,moe")]
    profiles: Vec<ProfileArg>,
    /// Cache states to run.
    #[arg(long, value_delimiter = ',', default_value = "warm,cold")]
    cache: Vec<Cache>,
    /// Where generated checkpoints are kept (default: target/bench-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Loader threads for weightlift and reference-rayon (default: weightlift's default).
    #[arg(long)]
    threads: Option<usize>,
    /// Run only these contenders (the raw reads always run).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Contender>,
    /// Coalesced read size for weightlift, e.g. 16MiB (default: the library's).
    #[arg(long, value_parser = parse_size)]
    request_size: Option<u64>,
    /// The memory cgroup limit of `--cache cold-limited` (below the checkpoint's size, so the
    /// kernel evicts as on a host with less memory than the model).
    #[arg(long, default_value = "768MiB", value_parser = parse_size)]
    memory_limit: u64,
    /// Cold runs on throttled storage: each cold measurement's process reads the disk through
    /// a block-I/O cgroup limiting requests and bandwidth. `volume` (a cloud block volume's
    /// baseline: 3000 req/s, 125 MB/s), `netfs` (500 req/s, 500 MB/s), `slow` (300 MB/s), or
    /// custom limits such as `800req/s,1GB/s`. The table adds the requests the disk served and
    /// their average size.
    #[arg(long, value_parser = parse_storage)]
    storage: Option<Storage>,
    /// Write the records as a JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput per contender against the raw limit as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// A storage profile: read limits of a block-I/O cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Storage {
    name: String,
    bytes_per_s: Option<u64>,
    requests_per_s: Option<u64>,
}

/// `volume`, `netfs`, `slow`, or `N req/s` and a size per second, comma-separated.
fn parse_storage(text: &str) -> Result<Storage, String> {
    let (bps, iops) = match text {
        "volume" => (Some(125_000_000), Some(3000)),
        "netfs" => (Some(500_000_000), Some(500)),
        "slow" => (Some(300_000_000), None),
        custom => {
            let (mut bps, mut iops) = (None, None);
            for part in custom.split(',').map(str::trim) {
                if let Some(n) = part.strip_suffix("req/s") {
                    iops = Some(
                        n.trim()
                            .parse::<u64>()
                            .map_err(|e| format!("{part}: {e}"))?,
                    );
                } else if let Some(size) = part.strip_suffix("/s") {
                    bps = Some(parse_size(size.trim())?);
                } else {
                    return Err(format!(
                        "{part:?}: a storage profile is volume, netfs, slow, or limits such as \
                         800req/s,1GB/s"
                    ));
                }
            }
            (bps, iops)
        }
    };
    Ok(Storage {
        name: text.to_string(),
        bytes_per_s: bps,
        requests_per_s: iops,
    })
}

/// A checkpoint layout: synthetic (`synthetic::Profile`, sized by `--size`), or a random
/// model made and saved by transformers itself (with its config, for `from_pretrained`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProfileArg {
    /// A few hundred large tensors per GiB.
    Dense,
    /// Qwen3-30B-A3B-like: ~20,000 small tensors per GiB.
    Moe,
    /// transformers' Qwen3-MoE, 24 layers x 64 experts (4,827 tensors, ~1.4 GB BF16),
    /// saved with `save_pretrained(max_shard_size="200MB")`.
    HfMoe,
    /// Qwen3-30B-A3B's layout made by transformers: 48 layers x 128 experts (18,867 tensors),
    /// hidden 512, expert intermediate 160 (~3 GiB BF16), saved likewise.
    HfMoeLarge,
    /// transformers' Llama, 12 layers, hidden 2048 (~1.4 GB BF16), saved likewise.
    HfDense,
}

impl ProfileArg {
    /// The synthetic layout, or `None` for a transformers model.
    pub(crate) fn profile(self) -> Option<Profile> {
        match self {
            ProfileArg::Dense => Some(Profile::Dense),
            ProfileArg::Moe => Some(Profile::Moe),
            ProfileArg::HfMoe | ProfileArg::HfMoeLarge | ProfileArg::HfDense => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ProfileArg::Dense => "dense",
            ProfileArg::Moe => "moe",
            ProfileArg::HfMoe => "hf-moe",
            ProfileArg::HfMoeLarge => "hf-moe-large",
            ProfileArg::HfDense => "hf-dense",
        }
    }
}

/// One thing being timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Contender {
    /// `cat`-like read of every file into one reused buffer, one thread.
    #[value(name = "raw-1thread")]
    Raw1,
    /// The same with one thread per CPU (at least 2).
    #[value(name = "raw-nthreads")]
    RawN,
    /// crates.io `safetensors`: mmap + deserialize + a copy of every tensor.
    Reference,
    /// The same, copies in parallel on rayon.
    ReferenceRayon,
    /// Not a loader: faults in and fills fresh memory of the checkpoint's size.
    FreshMemory,
    WeightliftMmapCpu,
    WeightliftPreadCpu,
    WeightliftDirectCpu,
    WeightliftAutoCpu,
    WeightliftMmapView,
    WeightliftPreadView,
    WeightliftDirectView,
    WeightliftAutoView,
    WeightliftMmapMeta,
    WeightliftPreadMeta,
    WeightliftDirectMeta,
    WeightliftAutoMeta,
    /// `safetensors.numpy.load_file` per shard (Python).
    PythonSafetensors,
    /// `weightlift.load_checkpoint` from Python (the bindings in crates/python).
    PythonWeightlift,
    /// weightlift over HTTP from a local nginx serving the same files (loopback only).
    WeightliftHttpCpu,
    /// A mapped CPU load (`Mapping::always`): tensors in private mappings of the files,
    /// populated in parallel.
    WeightliftMappedCpu,
    /// `safetensors.torch.load_file` per shard, then one byte of every page touched.
    PythonSafetensorsTorch,
    /// `weightlift.torch.load_file` per shard (the drop-in), then the same touch.
    PythonWeightliftTorch,
    /// `weightlift.load_checkpoint(framework="pt")` of the directory, then the same touch.
    PythonWeightliftTorchCheckpoint,
    /// safetensors' `safe_open` of every shard first, then each tensor read in file order,
    /// one byte of each page touched, and dropped (as transformers and vLLM's default loader
    /// read): the pattern a prefetch must not overrun.
    PythonSafetensorsStream,
    /// The same under `weightlift.patch()` (prefetching through the window).
    PythonWeightliftStream,
    /// transformers' `AutoModelForCausalLM.from_pretrained` as shipped (hf-* profiles), then
    /// one byte of every page of every parameter touched.
    TransformersStock,
    /// The same under `weightlift.patch()`.
    TransformersWeightlift,
    /// The same under `weightlift.patch(conversion=False)`: transformers' conversion step
    /// its own, only safetensors' entry points weightlift's (what a transformers that lacks
    /// an internal the adapter relies on gets).
    TransformersPlain,
}

/// What a `weightlift-<backend>-<target>` contender produces.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Owned CPU memory.
    Cpu,
    /// Zero-copy views of mapped files (bytes not touched).
    View,
    /// Shapes only.
    Meta,
}

impl Contender {
    pub(crate) fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Backend and target of a `weightlift-<backend>-<target>` contender.
    fn weightlift(self) -> Option<(&'static str, Target)> {
        use Contender::*;
        Some(match self {
            WeightliftMmapCpu => ("mmap", Target::Cpu),
            WeightliftPreadCpu => ("pread", Target::Cpu),
            WeightliftDirectCpu => ("direct", Target::Cpu),
            WeightliftAutoCpu => ("auto", Target::Cpu),
            WeightliftMmapView => ("mmap", Target::View),
            WeightliftPreadView => ("pread", Target::View),
            WeightliftDirectView => ("direct", Target::View),
            WeightliftAutoView => ("auto", Target::View),
            WeightliftMmapMeta => ("mmap", Target::Meta),
            WeightliftPreadMeta => ("pread", Target::Meta),
            WeightliftDirectMeta => ("direct", Target::Meta),
            WeightliftAutoMeta => ("auto", Target::Meta),
            _ => return None,
        })
    }

    /// Whether it runs in the Python interpreter.
    fn is_python(self) -> bool {
        self.name().starts_with("python-") || self.name().starts_with("transformers-")
    }

    fn is_reference(self) -> bool {
        matches!(self, Contender::Reference | Contender::ReferenceRayon)
    }
}

fn backend(name: &str) -> Backend {
    match name {
        "pread" => Backend::pread(),
        "direct" => Backend::direct(),
        // SAFETY: the bench's own generated files are not modified while it runs.
        "mmap" => unsafe { Backend::mmap() },
        _ => Backend::auto(),
    }
}

/// One measurement, as every timing child prints it: one JSON object on its last line of
/// output (`secs`, `peak_rss` in bytes, `read_bytes` where the child counts them), the same
/// for the Rust `bench-one` child and the Python scripts in `xtask/bench/`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sample {
    secs: f64,
    peak_rss: u64,
    /// Bytes read from storage, where the child reported them.
    #[serde(default)]
    read_bytes: Option<u64>,
    /// Killed for want of memory (in a memory cgroup).
    #[serde(default, skip)]
    oom_killed: bool,
    /// Under `--storage`: the read requests and bytes the disk served (counted by the
    /// block-I/O cgroup, not by the child).
    #[serde(default, skip)]
    disk: Option<IoCount>,
}

impl Sample {
    /// The sample a child printed: its output's last line that is a JSON object.
    fn parse(output: &str) -> Result<Sample, String> {
        let line = output
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| format!("no sample in its output {output:?}"))?;
        serde_json::from_str(line).map_err(|e| format!("{e} in {line:?}"))
    }
}

pub(crate) fn run(args: &BenchArgs) -> Result<(), String> {
    let (size, reps) = if args.quick {
        (256 << 20, 3)
    } else {
        (args.size, args.reps.max(3))
    };
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench-data"));
    let threads = args.threads.unwrap_or_else(weightlift::default_threads);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let python = python_available();
    if !python {
        eprintln!(
            "note: python3 cannot import safetensors.numpy and ml_dtypes (numpy has no bfloat16); skipping the python-safetensors contender"
        );
    }
    let torch = python_imports("torch, safetensors.torch");
    if !torch {
        eprintln!("note: python3 cannot import torch: skipping the torch contenders");
    }
    let transformers = args.profiles.iter().any(|p| p.profile().is_none())
        && python_imports("torch, transformers");
    let nginx_binary = weightlift_testkit::servers::Nginx::binary();
    if nginx_binary.is_none() {
        eprintln!(
            "note: nginx not found (apt-get install nginx-light); skipping the weightlift-http-cpu contender"
        );
    }
    let wanted = |c: Contender| args.only.is_empty() || args.only.contains(&c);
    let software = python_versions();
    if let Some(v) = &software {
        eprintln!("python contenders run with {v}");
    }
    // The raw reads always run: every ratio is relative to them.
    let mut contenders = vec![Contender::Raw1, Contender::RawN];
    for c in Contender::value_variants().iter().copied().skip(2) {
        let available = match c {
            Contender::PythonSafetensors => python,
            Contender::PythonWeightlift => python && wanted(c) && python_weightlift_ready(),
            Contender::PythonSafetensorsTorch => torch,
            Contender::PythonSafetensorsStream => torch,
            Contender::PythonWeightliftTorch
            | Contender::PythonWeightliftTorchCheckpoint
            | Contender::PythonWeightliftStream => torch && wanted(c) && python_weightlift_ready(),
            Contender::WeightliftHttpCpu => nginx_binary.is_some(),
            Contender::TransformersStock => transformers,
            Contender::TransformersWeightlift | Contender::TransformersPlain => {
                transformers && wanted(c) && python_weightlift_ready()
            }
            _ => true,
        };
        if available && wanted(c) {
            contenders.push(c);
        }
    }

    // One nginx serves every profile's directory for the http contender.
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let nginx = contenders
        .contains(&Contender::WeightliftHttpCpu)
        .then(|| weightlift_testkit::servers::Nginx::start(&data_dir));

    // A FUSE passthrough of the data directory for `cold-fuse`.
    let fuse = crate::record::fuse_mount(&args.cache, &data_dir)?;

    // A memory cgroup for `cold-limited`, made once.
    let cgroup = if args.cache.contains(&Cache::ColdLimited) {
        let name = format!("weightlift-bench-{}", std::process::id());
        Some(weightlift_testkit::cgroup::MemoryCgroup::new(
            &name,
            args.memory_limit,
        )?)
    } else {
        None
    };

    // A block-I/O cgroup for `--storage`, made once (on the disk holding the data).
    let io = match &args.storage {
        Some(st) => Some(IoCgroup::new(
            &format!("weightlift-bench-io-{}", std::process::id()),
            &data_dir,
            st.bytes_per_s,
            st.requests_per_s,
        )?),
        None => None,
    };

    let mut records: Vec<Record> = Vec::new();
    for &profile_arg in &args.profiles {
        let (disk_dir, disk_paths) = match profile_arg.profile() {
            Some(profile) => {
                let dir = data_dir.join(format!("{}-{}MiB", profile.name(), size >> 20));
                let paths = ensure(&dir, profile, size)?;
                (dir, paths)
            }
            None => {
                let dir = data_dir.join(profile_arg.name());
                let paths = ensure_transformers(&dir, profile_arg)?;
                (dir, paths)
            }
        };
        let hf = profile_arg.profile().is_none();
        let ckpt = Checkpoint::open(&disk_dir).map_err(|e| e.to_string())?;
        let (tensors, bytes) = (ckpt.len(), ckpt.data_bytes());
        drop(ckpt);
        for &cache in &args.cache {
            let cold = cache != Cache::Warm;
            // Through the FUSE mount: the same files under another path.
            let (dir, paths) =
                crate::record::cache_paths(cache, fuse.as_ref(), &disk_dir, &disk_paths);
            eprintln!(
                "== {} ({tensors} tensors, {:.2} GiB), {}, {reps} reps",
                profile_arg.name(),
                bytes as f64 / (1u64 << 30) as f64,
                cache.name()
            );
            if !cold {
                raw_read(&paths, cpus, 16 << 20).map_err(|e| e.to_string())?;
            }
            let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
            let mut max_resident: f64 = 0.0;
            let url = nginx
                .as_ref()
                .map(|n| n.url(&disk_dir.file_name().unwrap_or_default().to_string_lossy()));
            // The transformers contenders need a model with its config; the others run on
            // any checkpoint.
            let runs: Vec<bool> = contenders
                .iter()
                .map(|c| {
                    let needs_model = matches!(
                        c,
                        Contender::TransformersStock
                            | Contender::TransformersWeightlift
                            | Contender::TransformersPlain
                    );
                    needs_model == hf || !needs_model
                })
                .collect();
            for _ in 0..reps {
                for (i, &c) in contenders.iter().enumerate() {
                    if !runs[i] {
                        continue;
                    }
                    if cold {
                        // Through FUSE, both the mount's cache and the disk's are dropped.
                        for p in paths.iter().chain(if cache == Cache::ColdFuse {
                            &disk_paths[..]
                        } else {
                            &[]
                        }) {
                            let r = evict(p).map_err(|e| e.to_string())?;
                            max_resident = max_resident.max(r.fraction());
                        }
                    }
                    let one = One {
                        contender: c,
                        dir: &dir,
                        url: url.as_deref(),
                        threads,
                        raw_threads: cpus.max(2),
                        request_size: args.request_size,
                        cgroup: if cache == Cache::ColdLimited {
                            cgroup.as_ref()
                        } else {
                            None
                        },
                        io: if cold { io.as_ref() } else { None },
                    };
                    samples[i].push(measure_in_child(&one)?);
                }
            }
            if cold {
                eprintln!(
                    "   evicted with posix_fadvise(DONTNEED); at most {:.2}% of pages still cached after eviction",
                    max_resident * 100.0
                );
            }
            let medians: Vec<f64> = samples
                .iter()
                .map(|s| median(&s.iter().map(|x| x.secs).collect::<Vec<_>>()))
                .collect();
            let skipped = |i: usize| samples[i].is_empty();
            // "raw" is the better of the one-thread and many-thread reads.
            let best_raw = if medians[0] <= medians[1] { 0 } else { 1 };
            let raw = medians[best_raw];
            let reference = contenders
                .iter()
                .zip(&medians)
                .filter(|(c, _)| c.is_reference())
                .map(|(_, m)| *m)
                .fold(f64::NAN, f64::min);
            // The http contender is compared with the same load from the local files.
            let local = contenders
                .iter()
                .position(|&c| c == Contender::WeightliftAutoCpu)
                .map(|i| medians[i]);
            let named = std::iter::once((best_raw, "raw".to_string()))
                .chain(contenders.iter().enumerate().map(|(i, c)| (i, c.name())));
            let first = records.len();
            for (i, name) in named {
                if skipped(i) {
                    continue;
                }
                let secs: Vec<f64> = samples[i].iter().map(|x| x.secs).collect();
                let ratio_to_local = (contenders[i] == Contender::WeightliftHttpCpu
                    && name != "raw")
                    .then_some(local)
                    .flatten()
                    .map(|local| local / medians[i]);
                if let Some(ratio) = ratio_to_local {
                    eprintln!(
                        "   weightlift-http-cpu (loopback nginx) runs at {ratio:.2}x the local-file load (weightlift-auto-cpu)"
                    );
                }
                records.push(Record {
                    profile: profile_arg.name().to_string(),
                    cache,
                    contender: name,
                    median_s: medians[i],
                    min_s: secs.iter().copied().fold(f64::INFINITY, f64::min),
                    max_s: secs.iter().copied().fold(0.0, f64::max),
                    gbps: bytes as f64 / medians[i] / 1e9,
                    ratio_to_raw: raw / medians[i],
                    ratio_to_reference: reference / medians[i],
                    peak_rss_bytes: samples[i].iter().map(|x| x.peak_rss).max().unwrap_or(0),
                    tensors,
                    bytes,
                    ratio_to_local,
                    read_bytes: median_u64(samples[i].iter().filter_map(|x| x.read_bytes)),
                    storage: (cold && io.is_some())
                        .then(|| args.storage.as_ref().map(|s| s.name.clone()))
                        .flatten(),
                    disk_requests: median_u64(
                        samples[i].iter().filter_map(|x| x.disk.map(|d| d.requests)),
                    ),
                    disk_bytes: median_u64(
                        samples[i].iter().filter_map(|x| x.disk.map(|d| d.bytes)),
                    ),
                    memory_limit: (cache == Cache::ColdLimited).then_some(args.memory_limit),
                    oom_kills: (cache == Cache::ColdLimited)
                        .then(|| samples[i].iter().filter(|x| x.oom_killed).count() as u64),
                    software: contenders[i]
                        .is_python()
                        .then(|| software.clone())
                        .flatten(),
                });
            }
            print_table(&records[first..]);
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&records).expect("json"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, crate::plot::svg(&records))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The shard files of a generated checkpoint in `dir`, generating it first if needed.
pub(crate) fn ensure(dir: &Path, profile: Profile, size: u64) -> Result<Vec<PathBuf>, String> {
    if let Ok(c) = Checkpoint::open(dir) {
        return Ok(shard_paths(&c));
    }
    eprintln!(
        "generating {} ({} MiB) in {}",
        profile.name(),
        size >> 20,
        dir.display()
    );
    let _ = std::fs::remove_dir_all(dir);
    synthetic::generate(dir, profile, size)
}

pub(crate) fn shard_paths(ckpt: &Checkpoint) -> Vec<PathBuf> {
    ckpt.shards()
        .iter()
        .filter_map(|s| s.path().map(Path::to_path_buf))
        .collect()
}

/// The median of some byte counts (`None` for none).
fn median_u64(values: impl Iterator<Item = u64>) -> Option<u64> {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// One measurement: what the parent passes to its `bench-one` child.
struct One<'a> {
    contender: Contender,
    dir: &'a Path,
    url: Option<&'a str>,
    threads: usize,
    raw_threads: usize,
    request_size: Option<u64>,
    /// The memory cgroup the child runs in (`cold-limited`).
    cgroup: Option<&'a weightlift_testkit::cgroup::MemoryCgroup>,
    /// The block-I/O cgroup it reads through (`--storage`, cold runs).
    io: Option<&'a IoCgroup>,
}

/// Runs one measurement in a fresh process, so that its peak RSS is its own and no
/// allocator state carries over between contenders.
fn measure_in_child(one: &One<'_>) -> Result<Sample, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let request_size = one.request_size.unwrap_or(weightlift::DEFAULT_REQUEST_SIZE);
    let c = one.contender;
    let kills = one.cgroup.map(|g| g.oom_kills());
    let groups: Vec<&Path> = one
        .cgroup
        .map(|g| g.path())
        .into_iter()
        .chain(one.io.map(|g| g.path()))
        .collect();
    let before = one.io.map(IoCgroup::reads);
    let out = if groups.is_empty() {
        Command::new(exe)
    } else {
        weightlift_testkit::cgroup::command_in(&groups, &exe)
    }
    .args([
        "bench-one",
        "--contender",
        &c.name(),
        "--threads",
        &one.threads.to_string(),
        "--raw-threads",
        &one.raw_threads.to_string(),
        "--request-size",
        &request_size.to_string(),
    ])
    .arg("--dir")
    .arg(one.dir)
    .args(one.url.map(|u| ["--url", u]).into_iter().flatten())
    .output()
    .map_err(|e| e.to_string())?;
    if let (Some(group), Some(before)) = (one.cgroup, kills)
        && group.oom_kills() > before
    {
        eprintln!("   {}: OOM-killed in the memory cgroup", c.name());
        return Ok(Sample {
            secs: f64::NAN,
            peak_rss: 0,
            read_bytes: None,
            oom_killed: true,
            disk: None,
        });
    }
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            c.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut sample = Sample::parse(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| format!("{}: {e}", c.name()))?;
    sample.disk = one
        .io
        .zip(before)
        .map(|(g, before)| g.reads().since(before));
    Ok(sample)
}

/// Bytes this process (and the children it waited for) read from storage so far.
fn read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("read_bytes: "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Arguments of the hidden `bench-one` task (one measurement, run by `bench`).
#[derive(Args)]
pub(crate) struct OneArgs {
    #[arg(long)]
    contender: Contender,
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    threads: usize,
    #[arg(long)]
    raw_threads: usize,
    #[arg(long)]
    request_size: u64,
    /// The checkpoint's URL on the bench's nginx (for the http contender).
    #[arg(long)]
    url: Option<String>,
}

pub(crate) fn run_one(args: &OneArgs) -> Result<(), String> {
    let ckpt = Checkpoint::open(&args.dir).map_err(|e| e.to_string())?;
    let paths = shard_paths(&ckpt);
    let bytes = ckpt.data_bytes();
    drop(ckpt);
    reset_peak_rss();
    let before = read_bytes();
    let mut sample = measure(args, &paths, bytes)?;
    // This process's count includes the children it waited for (the Python contenders).
    sample.read_bytes = Some(read_bytes() - before);
    println!(
        "{}",
        serde_json::to_string(&sample).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn measure(args: &OneArgs, paths: &[PathBuf], bytes: u64) -> Result<Sample, String> {
    let (dir, threads, request_size) = (&args.dir, args.threads, args.request_size);
    reset_peak_rss();
    let start = Instant::now();
    if let Some((b, target)) = args.contender.weightlift() {
        let ckpt = Checkpoint::open_with(dir, &OpenOptions::default().backend(backend(b)))
            .map_err(|e| e.to_string())?;
        let opts = LoadOptions::default()
            .threads(threads)
            .request_size(request_size);
        match target {
            Target::Cpu => {
                let state = ckpt.load(&opts).map_err(|e| e.to_string())?;
                std::hint::black_box(&state);
            }
            Target::Meta => {
                let state = ckpt
                    .load(&opts.device(Device::Meta))
                    .map_err(|e| e.to_string())?;
                std::hint::black_box(&state);
            }
            Target::View => {
                // SAFETY: the bench's generated files are not modified while mapped.
                let mapped = unsafe { ckpt.map() }.map_err(|e| e.to_string())?;
                let views: Vec<_> = mapped.views().collect();
                std::hint::black_box(&views);
            }
        }
    } else {
        match args.contender {
            Contender::Raw1 => {
                raw_read(paths, 1, 16 << 20).map_err(|e| e.to_string())?;
            }
            Contender::RawN => {
                raw_read(paths, args.raw_threads, 16 << 20).map_err(|e| e.to_string())?;
            }
            Contender::Reference | Contender::ReferenceRayon => {
                reference_load(
                    paths,
                    (args.contender == Contender::ReferenceRayon).then_some(threads),
                )?;
            }
            Contender::WeightliftHttpCpu => {
                let url = args
                    .url
                    .as_deref()
                    .ok_or("the http contender needs --url")?;
                let ckpt = Checkpoint::open(url).map_err(|e| e.to_string())?;
                // Threads default to the requests allowed in flight.
                let opts = LoadOptions::default().request_size(request_size);
                let state = ckpt.load(&opts).map_err(|e| e.to_string())?;
                std::hint::black_box(&state);
            }
            Contender::WeightliftMappedCpu => {
                // SAFETY: the bench's generated files are not modified while mapped.
                let mapping = unsafe { weightlift::Mapping::always() };
                let ckpt = Checkpoint::open_with(dir, &OpenOptions::default().mapping(mapping))
                    .map_err(|e| e.to_string())?;
                let opts = LoadOptions::default()
                    .threads(threads)
                    .request_size(request_size);
                let state = ckpt.load(&opts).map_err(|e| e.to_string())?;
                std::hint::black_box(&state);
            }
            Contender::PythonSafetensorsTorch => {
                return python_load_with("torch_load", "safetensors", paths);
            }
            Contender::PythonWeightliftTorch => {
                return python_load_with("torch_load", "weightlift", paths);
            }
            Contender::PythonSafetensorsStream => {
                return python_load_with("stream", "safetensors", paths);
            }
            Contender::PythonWeightliftStream => {
                return python_load_with("stream", "weightlift", paths);
            }
            Contender::PythonWeightliftTorchCheckpoint => {
                return python_load_with(
                    "torch_load",
                    "weightlift-checkpoint",
                    &[dir.to_path_buf()],
                );
            }
            Contender::TransformersStock => {
                return python_load_with("transformers_load", "stock", &[dir.to_path_buf()]);
            }
            Contender::TransformersWeightlift => {
                return python_load_with("transformers_load", "weightlift", &[dir.to_path_buf()]);
            }
            Contender::TransformersPlain => {
                return python_load_with("transformers_load", "plain", &[dir.to_path_buf()]);
            }
            Contender::PythonSafetensors => return python_load("safetensors_numpy", paths),
            Contender::PythonWeightlift => {
                return python_load("weightlift_numpy", &[dir.to_path_buf()]);
            }
            Contender::FreshMemory => fresh_memory(bytes, threads).map_err(|e| e.to_string())?,
            _ => return Err(format!("{}: not measurable here", args.contender.name())),
        }
    }
    Ok(Sample {
        secs: start.elapsed().as_secs_f64(),
        peak_rss: peak_rss().unwrap_or(0),
        read_bytes: None,
        oom_killed: false,
        disk: None,
    })
}

/// crates.io `safetensors`: map, deserialize, copy every tensor into an owned `Vec`, on
/// `threads` rayon threads or sequentially.
fn reference_load(paths: &[PathBuf], threads: Option<usize>) -> Result<(), String> {
    let mut owned: Vec<Vec<u8>> = Vec::new();
    for p in paths {
        let file = std::fs::File::open(p).map_err(|e| e.to_string())?;
        // SAFETY: the bench's generated files are not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| e.to_string())?;
        let names = st.names();
        let copy = |n: &&str| {
            st.tensor(n)
                .map(|t| t.data().to_vec())
                .map_err(|e| e.to_string())
        };
        let copies: Vec<Vec<u8>> = match threads {
            Some(threads) => {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map_err(|e| e.to_string())?;
                pool.install(|| names.par_iter().map(copy).collect::<Result<_, _>>())?
            }
            None => names.iter().map(copy).collect::<Result<_, _>>()?,
        };
        owned.extend(copies);
    }
    std::hint::black_box(&owned);
    Ok(())
}

/// The interpreter of the Python contenders: the project's virtualenv (`.ci/run` makes
/// it), else `python3`.
pub(crate) fn python() -> PathBuf {
    let venv = workspace_root().join("target/py-venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The versions of the Python libraries the contenders use, as "name version, ...".
pub(crate) fn python_versions() -> Option<String> {
    let script = "import importlib.metadata as m\nout=[]\nfor n in ('transformers','torch','safetensors','vllm'):\n    try: out.append(n+' '+m.version(n))\n    except m.PackageNotFoundError: pass\nprint(', '.join(out))";
    let out = Command::new(python()).args(["-c", script]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn python_available() -> bool {
    python_imports("safetensors.numpy, ml_dtypes")
}

/// Whether the bench's interpreter can import `modules`.
pub(crate) fn python_imports(modules: &str) -> bool {
    Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the bindings in release mode into the virtualenv (incremental after the first
/// time), so that `python-weightlift` times optimised code.
pub(crate) fn python_weightlift_ready() -> bool {
    let venv = workspace_root().join("target/py-venv");
    if !venv.join("bin/maturin").is_file() {
        eprintln!(
            "note: no target/py-venv with maturin (bash .ci/run creates it); skipping the python-weightlift contender"
        );
        return false;
    }
    eprintln!("building the Python bindings (release) into target/py-venv");
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let built = Command::new(venv.join("bin/maturin"))
        .args(["develop", "--release", "-q"])
        .current_dir(workspace_root().join("crates/python"))
        .env("VIRTUAL_ENV", &venv)
        .env("PATH", path)
        .status()
        .is_ok_and(|s| s.success());
    let release = Command::new(python())
        .args([
            "-c",
            "import weightlift._native as n; assert n.__build__ == 'release'",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !(built && release) {
        eprintln!(
            "note: could not build the Python bindings in release mode; skipping python-weightlift"
        );
    }
    built && release
}

/// The shard files of a transformers model in `dir`, made first if needed.
pub(crate) fn ensure_transformers(dir: &Path, kind: ProfileArg) -> Result<Vec<PathBuf>, String> {
    if let Ok(c) = Checkpoint::open(dir)
        && dir.join("config.json").is_file()
    {
        return Ok(shard_paths(&c));
    }
    eprintln!(
        "making a random {} with transformers in {}",
        kind.name(),
        dir.display()
    );
    let _ = std::fs::remove_dir_all(dir);
    let out = Command::new(python())
        .arg(script("make_model"))
        .arg(kind.name())
        .arg(dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "making {}: {}",
            kind.name(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let c = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    Ok(shard_paths(&c))
}

/// Runs timing script `name` (`xtask/bench/NAME.py`) with `mode` as its first argument.
fn python_load_with(name: &str, mode: &str, args: &[PathBuf]) -> Result<Sample, String> {
    let mut all = vec![PathBuf::from(mode)];
    all.extend_from_slice(args);
    python_load(name, &all)
}

/// A Python script of the bench (`xtask/bench/NAME.py`: the timing children, and what makes
/// their checkpoints).
pub(crate) fn script(name: &str) -> PathBuf {
    workspace_root()
        .join("xtask/bench")
        .join(format!("{name}.py"))
}

/// Runs timing script `name`; it prints one sample (see [`Sample::parse`]).
fn python_load(name: &str, args: &[PathBuf]) -> Result<Sample, String> {
    let out = Command::new(python())
        .arg(script(name))
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("python: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Sample::parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| format!("{name}: {e}"))
}

fn print_table(records: &[Record]) {
    let disk = records.iter().any(|r| r.disk_requests.is_some());
    print!(
        "{:<26} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10} {:>7} {:>4}",
        "contender",
        "median s",
        "min s",
        "max s",
        "GB/s",
        "x raw",
        "x ref",
        "peak RSS",
        "read x",
        "oom"
    );
    if disk {
        print!(" {:>9} {:>9}", "requests", "avg KiB");
    }
    println!();
    for r in records {
        let read = r.read_bytes.map_or("-".to_string(), |b| {
            format!("{:.2}", b as f64 / r.bytes as f64)
        });
        let oom = r.oom_kills.map_or("-".to_string(), |n| n.to_string());
        print!(
            "{:<26} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2} {:>8.2} {:>9.0}M {:>7} {:>4}",
            r.contender,
            r.median_s,
            r.min_s,
            r.max_s,
            r.gbps,
            r.ratio_to_raw,
            r.ratio_to_reference,
            r.peak_rss_bytes as f64 / 1048576.0,
            read,
            oom,
        );
        if let (true, Some(n), Some(b)) = (disk, r.disk_requests, r.disk_bytes) {
            print!(" {:>9} {:>9.0}", n, b as f64 / n.max(1) as f64 / 1024.0);
        }
        println!();
    }
    println!();
}
