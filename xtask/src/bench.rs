use crate::harness::{Child, Eviction, Groups, Sample, Storage, interleave, write_json};
use crate::record::{Cache, Record, print_table};
use crate::workspace_root;
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use weightlift::{Backend, Checkpoint, Device, LoadOptions, OpenOptions};
use weightlift_workload::synthetic::{self, Profile};
use weightlift_workload::util::{parse_size, peak_rss, reset_peak_rss};
use weightlift_workload::yardstick::{fresh_memory, raw_read};

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
    /// custom limits such as `800req/s,1GB/s`; any of them with `,readahead=128KiB` sets the
    /// disk's readahead meanwhile (the kernel's default on a cloud VM's volume; restored after).
    /// The table adds the requests the disk served and their average size.
    #[arg(long, value_parser = crate::harness::parse_storage)]
    storage: Option<Storage>,
    /// Seconds to wait after each eviction before a cold measurement starts, so that storage
    /// is cold below the page cache too (see `harness::Eviction`); 0 measures at once.
    #[arg(long, default_value = "12", value_parser = crate::harness::parse_settle)]
    settle: std::time::Duration,
    /// Write the records as a JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput per contender against the raw limit as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
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

    /// Whether it loads a model with its config (the transformers contenders: hf-* profiles
    /// only).
    fn needs_model(self) -> bool {
        matches!(
            self,
            Contender::TransformersStock
                | Contender::TransformersWeightlift
                | Contender::TransformersPlain
        )
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
    let io = args
        .storage
        .as_ref()
        .map(|st| st.cgroup(&data_dir))
        .transpose()?;

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
        // The transformers contenders need a model with its config; the others run on any
        // checkpoint.
        let cell: Vec<Contender> = contenders
            .iter()
            .copied()
            .filter(|c| !c.needs_model() || hf)
            .collect();
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
            let url = nginx
                .as_ref()
                .map(|n| n.url(&disk_dir.file_name().unwrap_or_default().to_string_lossy()));
            let groups = Groups {
                memory: if cache == Cache::ColdLimited {
                    cgroup.as_ref()
                } else {
                    None
                },
                io: if cold { io.as_ref() } else { None },
            };
            let mut eviction = Eviction::new(cache, &paths, &disk_paths, args.settle);
            let samples = interleave(reps, cell.len(), &mut eviction, groups.io.is_some(), |i| {
                let one = One {
                    contender: cell[i],
                    dir: &dir,
                    url: url.as_deref(),
                    threads,
                    raw_threads: cpus.max(2),
                    request_size: args.request_size,
                };
                groups.measure(&cell[i].name(), &[one.child()?]).map(Some)
            })?;
            let first = records.len();
            let mut cell_records: Vec<Record> = cell
                .iter()
                .zip(&samples)
                .filter(|(_, s)| !s.is_empty())
                .map(|(c, s)| {
                    let mut r =
                        Record::of(profile_arg.name(), cache, c.name(), s, (tensors, bytes));
                    r.storage = groups.io.and(args.storage.as_ref()).map(|s| s.name.clone());
                    r.memory_limit = groups.memory.map(|_| args.memory_limit);
                    r.settle_s = eviction.settle_s();
                    r.oom_kills = groups
                        .memory
                        .map(|_| s.iter().filter(|x| x.oom_killed).count() as u64);
                    r.software = c.is_python().then(|| software.clone()).flatten();
                    r
                })
                .collect();
            let median_of = |c: Contender| {
                cell_records
                    .iter()
                    .find(|r| r.contender == c.name())
                    .map_or(f64::NAN, |r| r.median_s)
            };
            // "raw" is the better of the one-thread and many-thread reads; the reference the
            // better of the crate's two loads; the http contender is also compared with the
            // same load from the local files.
            let raw = median_of(Contender::Raw1).min(median_of(Contender::RawN));
            let reference =
                median_of(Contender::Reference).min(median_of(Contender::ReferenceRayon));
            let local = median_of(Contender::WeightliftAutoCpu);
            for r in &mut cell_records {
                r.compare(raw, reference);
                if r.contender == Contender::WeightliftHttpCpu.name() && local.is_finite() {
                    let ratio = local / r.median_s;
                    eprintln!(
                        "   weightlift-http-cpu (loopback nginx) runs at {ratio:.2}x the local-file load (weightlift-auto-cpu)"
                    );
                    r.ratio_to_local = Some(ratio);
                }
            }
            if let Some(best) = cell_records
                .iter()
                .filter(|r| r.contender.starts_with("raw-"))
                .min_by(|a, b| a.median_s.total_cmp(&b.median_s))
            {
                let mut raw = best.clone();
                raw.contender = "raw".to_string();
                records.push(raw);
            }
            records.extend(cell_records);
            print_table(&records[first..]);
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &records)?;
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

/// One measurement: what the parent passes to its `bench-one` child.
struct One<'a> {
    contender: Contender,
    dir: &'a Path,
    url: Option<&'a str>,
    threads: usize,
    raw_threads: usize,
    request_size: Option<u64>,
}

impl One<'_> {
    /// The `bench-one` child that makes this measurement, in a fresh process (so that its
    /// peak RSS is its own and no allocator state carries over between contenders).
    fn child(&self) -> Result<Child, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let request_size = self
            .request_size
            .unwrap_or(weightlift::DEFAULT_REQUEST_SIZE);
        Ok(Child::new(exe)
            .args([
                "bench-one",
                "--contender",
                &self.contender.name(),
                "--threads",
                &self.threads.to_string(),
                "--raw-threads",
                &self.raw_threads.to_string(),
                "--request-size",
                &request_size.to_string(),
            ])
            .arg("--dir")
            .arg(self.dir)
            .args(self.url.map(|u| ["--url", u]).into_iter().flatten()))
    }
}

/// The `bench-one` child of a raw parallel read of the checkpoint in `dir` (`cat`'s yardstick,
/// for the benches that time other loaders).
pub(crate) fn raw_child(dir: &Path, threads: usize) -> Result<Child, String> {
    One {
        contender: Contender::RawN,
        dir,
        url: None,
        threads,
        raw_threads: threads,
        request_size: None,
    }
    .child()
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
        ..Sample::default()
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

/// Builds the bindings in release mode into the project's virtualenv (incremental after the
/// first time), so that the Python contenders time optimised code.
pub(crate) fn python_weightlift_ready() -> bool {
    bindings_ready_in(&workspace_root().join("target/py-venv"))
}

/// Builds the bindings in release mode into the virtualenv `venv` (which `.ci/run` makes,
/// with maturin), and checks that its interpreter imports that build.
pub(crate) fn bindings_ready_in(venv: &Path) -> bool {
    if !venv.join("bin/maturin").is_file() {
        eprintln!(
            "note: no {} with maturin (bash .ci/run creates it); skipping the weightlift contenders that run in it",
            venv.display()
        );
        return false;
    }
    eprintln!(
        "building the Python bindings (release) into {}",
        venv.display()
    );
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let built = Command::new(venv.join("bin/maturin"))
        .args(["develop", "--release", "-q"])
        .current_dir(workspace_root().join("crates/python"))
        .env("VIRTUAL_ENV", venv)
        .env("PATH", path)
        .status()
        .is_ok_and(|s| s.success());
    let release = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import weightlift._native as n; assert n.__build__ == 'release'",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !(built && release) {
        eprintln!(
            "note: could not build the Python bindings in release mode into {}",
            venv.display()
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
