//! `cargo xtask bench`: weightlift side by side with the raw read of the same bytes and
//! with the reference `safetensors` crate, in one run, interleaved, repeated.
//!
//! Absolute times on shared machines drift; the ratios measured within one run are the
//! result. Cold runs evict every file with `posix_fadvise(DONTNEED)` before each
//! measurement and check with `mincore` that the pages went.

use crate::workspace_root;
use clap::Args;
use rayon::prelude::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use weightlift::synthetic::{self, Profile};
use weightlift::{Backend, Checkpoint, Device, LoadOptions, OpenOptions};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Bytes per profile checkpoint (e.g. 2GiB, 512MiB).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    size: u64,
    /// Repetitions per contender (median, min and max are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// A short run: 256 MiB checkpoints, 2 repetitions.
    #[arg(long)]
    quick: bool,
    /// Profiles to run.
    #[arg(long, value_delimiter = ',', default_value = "dense,moe")]
    profiles: Vec<String>,
    /// Cache states to run.
    #[arg(long, value_delimiter = ',', default_value = "warm,cold")]
    cache: Vec<String>,
    /// Where generated checkpoints are kept (default: target/bench-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Loader threads for weightlift and reference-rayon (default: weightlift's default).
    #[arg(long)]
    threads: Option<usize>,
    /// Run only contenders whose names contain one of these (raw is always run).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Coalesced read size for weightlift, e.g. 16MiB (default: the library's).
    #[arg(long, value_parser = parse_size)]
    request_size: Option<u64>,
    /// Write the records as a JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput per contender against the raw limit as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split]
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    match &s[split..].to_ascii_lowercase()[..] {
        "" | "b" => Ok(n),
        "kib" => Ok(n << 10),
        "mib" => Ok(n << 20),
        "gib" => Ok(n << 30),
        u => Err(format!("unknown unit {u:?}")),
    }
}

/// One thing being timed.
#[derive(Clone)]
enum Contender {
    Raw {
        threads: usize,
    },
    Reference {
        rayon: bool,
    },
    Weightlift {
        backend: &'static str,
        target: &'static str,
    },
    Python,
    /// `weightlift.load_checkpoint` from Python (the bindings in crates/python).
    PythonWeightlift,
    /// weightlift over HTTP from a local nginx serving the same files (loopback only).
    Http,
    /// Not a loader: faults in and fills fresh memory of the checkpoint's size, the floor
    /// under any owned load.
    FreshMemory,
}

impl Contender {
    fn name(&self) -> String {
        match self {
            Contender::Raw { threads: 1 } => "raw-1thread".into(),
            Contender::Raw { threads } => format!("raw-{threads}threads"),
            Contender::Reference { rayon: false } => "reference".into(),
            Contender::Reference { rayon: true } => "reference-rayon".into(),
            Contender::Weightlift { backend, target } => format!("weightlift-{backend}-{target}"),
            Contender::Python => "python-safetensors".into(),
            Contender::PythonWeightlift => "python-weightlift".into(),
            Contender::Http => "weightlift-http-cpu".into(),
            Contender::FreshMemory => "fresh-memory".into(),
        }
    }
}

impl Contender {
    fn parse(name: &str) -> Option<Contender> {
        Some(match name {
            "raw-1thread" => Contender::Raw { threads: 1 },
            "reference" => Contender::Reference { rayon: false },
            "reference-rayon" => Contender::Reference { rayon: true },
            "python-safetensors" => Contender::Python,
            "python-weightlift" => Contender::PythonWeightlift,
            "weightlift-http-cpu" => Contender::Http,
            "fresh-memory" => Contender::FreshMemory,
            _ => {
                if let Some(n) = name
                    .strip_prefix("raw-")
                    .and_then(|r| r.strip_suffix("threads"))
                {
                    Contender::Raw {
                        threads: n.parse().ok()?,
                    }
                } else {
                    let rest = name.strip_prefix("weightlift-")?;
                    let (b, t) = rest.split_once('-')?;
                    let backend = ["mmap", "pread", "direct", "auto"]
                        .into_iter()
                        .find(|x| *x == b)?;
                    let target = ["cpu", "view", "meta"].into_iter().find(|x| *x == t)?;
                    Contender::Weightlift { backend, target }
                }
            }
        })
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

struct Sample {
    secs: f64,
    peak_rss: u64,
}

pub(crate) fn run(args: &BenchArgs) -> Result<(), String> {
    let (size, reps) = if args.quick {
        (256 << 20, 2)
    } else {
        (args.size, args.reps.max(1))
    };
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench-data"));
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get())
            .max(4)
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let python = python_available();
    if !python {
        eprintln!(
            "note: python3 cannot import safetensors.numpy and ml_dtypes (numpy has no bfloat16); skipping the python-safetensors contender"
        );
    }
    let mut contenders = vec![
        Contender::Raw { threads: 1 },
        Contender::Raw {
            threads: cpus.max(2),
        },
        Contender::Reference { rayon: false },
        Contender::Reference { rayon: true },
        Contender::FreshMemory,
    ];
    // Every backend x target. For `view` and `meta` the backend only reads the headers
    // (views map the files themselves; meta reads no data).
    for target in ["cpu", "view", "meta"] {
        for backend in ["mmap", "pread", "direct", "auto"] {
            contenders.push(Contender::Weightlift { backend, target });
        }
    }
    if python {
        contenders.push(Contender::Python);
        if python_weightlift_ready() {
            contenders.push(Contender::PythonWeightlift);
        }
    }
    let nginx_binary = weightlift_tests::servers::Nginx::binary();
    if nginx_binary.is_some() {
        contenders.push(Contender::Http);
    } else {
        eprintln!(
            "note: nginx not found (apt-get install nginx-light); skipping the weightlift-http-cpu contender"
        );
    }
    // The first two (raw) always run: every ratio is relative to them.
    let mut kept = 0;
    contenders.retain(|c| {
        kept += 1;
        kept <= 2 || args.only.is_empty() || args.only.iter().any(|o| c.name().contains(o.as_str()))
    });

    // One nginx serves every profile's directory for the http contender.
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let nginx = contenders
        .iter()
        .any(|c| matches!(c, Contender::Http))
        .then(|| weightlift_tests::servers::Nginx::start(&data_dir));

    let mut records: Vec<Value> = Vec::new();
    for profile_name in &args.profiles {
        let profile = match profile_name.as_str() {
            "dense" => Profile::Dense,
            "moe" => Profile::Moe,
            other => return Err(format!("unknown profile {other:?}")),
        };
        let dir = data_dir.join(format!("{}-{}MiB", profile.name(), size >> 20));
        let paths = ensure(&dir, profile, size)?;
        let ckpt = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
        let (tensors, bytes) = (ckpt.len(), ckpt.data_bytes());
        drop(ckpt);
        for cache in &args.cache {
            let cold = match cache.as_str() {
                "warm" => false,
                "cold" => true,
                other => return Err(format!("unknown cache state {other:?}")),
            };
            eprintln!(
                "== {} ({tensors} tensors, {:.2} GiB), {cache}, {reps} reps",
                profile.name(),
                bytes as f64 / (1u64 << 30) as f64
            );
            if !cold {
                weightlift_storage::raw_read(&paths, cpus, 16 << 20).map_err(|e| e.to_string())?;
            }
            let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
            let mut max_resident: f64 = 0.0;
            for _ in 0..reps {
                for (i, c) in contenders.iter().enumerate() {
                    if cold {
                        for p in &paths {
                            let (_, r) = weightlift_storage::evict(p).map_err(|e| e.to_string())?;
                            max_resident = max_resident.max(r.fraction());
                        }
                    }
                    let url = nginx
                        .as_ref()
                        .map(|n| n.url(&dir.file_name().unwrap_or_default().to_string_lossy()));
                    samples[i].push(measure_in_child(
                        c,
                        &dir,
                        url.as_deref(),
                        threads,
                        args.request_size,
                    )?);
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
                .map(|s| median(s.iter().map(|x| x.secs).collect()))
                .collect();
            // "raw" is the better of the one-thread and many-thread reads.
            let best_raw = if medians[0] <= medians[1] { 0 } else { 1 };
            let raw = medians[best_raw];
            let reference = contenders
                .iter()
                .zip(&medians)
                .filter(|(c, _)| matches!(c, Contender::Reference { .. }))
                .map(|(_, m)| *m)
                .fold(f64::NAN, f64::min);
            // The http contender is compared with the same load from the local files.
            let local = contenders
                .iter()
                .zip(&medians)
                .find(|(c, _)| c.name() == "weightlift-auto-cpu")
                .map(|(_, m)| *m);
            let named = std::iter::once((best_raw, "raw".to_string()))
                .chain(contenders.iter().enumerate().map(|(i, c)| (i, c.name())));
            for (i, name) in named {
                let secs: Vec<f64> = samples[i].iter().map(|x| x.secs).collect();
                let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
                let max = secs.iter().copied().fold(0.0, f64::max);
                records.push(json!({
                    "profile": profile.name(),
                    "cache": cache,
                    "contender": name,
                    "median_s": medians[i],
                    "min_s": min,
                    "max_s": max,
                    "gbps": bytes as f64 / medians[i] / 1e9,
                    "ratio_to_raw": raw / medians[i],
                    "ratio_to_reference": reference / medians[i],
                    "peak_rss_bytes": samples[i].iter().map(|x| x.peak_rss).max().unwrap_or(0),
                    "tensors": tensors,
                    "bytes": bytes,
                }));
                if name == "weightlift-http-cpu"
                    && let Some(local) = local
                {
                    let ratio = local / medians[i];
                    records.last_mut().expect("just pushed")["ratio_to_local"] = json!(ratio);
                    eprintln!(
                        "   weightlift-http-cpu (loopback nginx) runs at {ratio:.2}x the local-file load (weightlift-auto-cpu)"
                    );
                }
            }
            print_table(
                records
                    .iter()
                    .filter(|r| r["profile"] == profile.name() && r["cache"] == cache.as_str()),
            );
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

pub(crate) fn ensure(dir: &Path, profile: Profile, size: u64) -> Result<Vec<PathBuf>, String> {
    if let Ok(c) = Checkpoint::open(dir) {
        return Ok(c.shards().iter().map(|s| s.path().to_path_buf()).collect());
    }
    eprintln!(
        "generating {} ({} MiB) in {}",
        profile.name(),
        size >> 20,
        dir.display()
    );
    let _ = std::fs::remove_dir_all(dir);
    synthetic::generate(dir, profile, size).map_err(|e| e.to_string())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Resets the peak-RSS watermark (Linux: writing 5 to clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Runs one measurement in a fresh process, so that its peak RSS is its own and no
/// allocator state carries over between contenders.
fn measure_in_child(
    c: &Contender,
    dir: &Path,
    url: Option<&str>,
    threads: usize,
    request_size: Option<u64>,
) -> Result<Sample, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let request_size = request_size.unwrap_or(weightlift::DEFAULT_REQUEST_SIZE);
    let out = Command::new(exe)
        .args([
            "bench-one",
            "--contender",
            &c.name(),
            "--threads",
            &threads.to_string(),
            "--request-size",
            &request_size.to_string(),
        ])
        .arg("--dir")
        .arg(dir)
        .args(url.map(|u| ["--url", u]).into_iter().flatten())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            c.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let secs = parts.next().and_then(|s| s.parse().ok());
    let peak = parts.next().and_then(|s| s.parse().ok());
    match (secs, peak) {
        (Some(secs), Some(peak_rss)) => Ok(Sample { secs, peak_rss }),
        _ => Err(format!("{}: unexpected output {text:?}", c.name())),
    }
}

/// Arguments of the hidden `bench-one` task (one measurement, run by `bench`).
#[derive(Args)]
pub(crate) struct OneArgs {
    #[arg(long)]
    contender: String,
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    threads: usize,
    #[arg(long)]
    request_size: u64,
    /// The checkpoint's URL on the bench's nginx (for the http contender).
    #[arg(long)]
    url: Option<String>,
}

pub(crate) fn run_one(args: &OneArgs) -> Result<(), String> {
    let c = Contender::parse(&args.contender)
        .ok_or_else(|| format!("unknown contender {:?}", args.contender))?;
    let ckpt = Checkpoint::open(&args.dir).map_err(|e| e.to_string())?;
    let paths: Vec<PathBuf> = ckpt
        .shards()
        .iter()
        .map(|s| s.path().to_path_buf())
        .collect();
    let bytes = ckpt.data_bytes();
    drop(ckpt);
    reset_peak_rss();
    let sample = measure(
        &c,
        &args.dir,
        args.url.as_deref(),
        &paths,
        args.threads,
        args.request_size,
        bytes,
    )?;
    println!("{} {}", sample.secs, sample.peak_rss);
    Ok(())
}

fn measure(
    c: &Contender,
    dir: &Path,
    url: Option<&str>,
    paths: &[PathBuf],
    threads: usize,
    request_size: u64,
    bytes: u64,
) -> Result<Sample, String> {
    reset_peak_rss();
    let start = Instant::now();
    match c {
        Contender::Raw { threads } => {
            weightlift_storage::raw_read(paths, *threads, 16 << 20).map_err(|e| e.to_string())?;
        }
        Contender::Reference { rayon } => {
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
                let copies: Vec<Vec<u8>> = if *rayon {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .map_err(|e| e.to_string())?;
                    pool.install(|| names.par_iter().map(copy).collect::<Result<_, _>>())?
                } else {
                    names.iter().map(copy).collect::<Result<_, _>>()?
                };
                owned.extend(copies);
            }
            std::hint::black_box(&owned);
        }
        Contender::Weightlift { backend: b, target } => {
            let ckpt = Checkpoint::open_with(dir, &OpenOptions::backend(backend(b)))
                .map_err(|e| e.to_string())?;
            let opts = LoadOptions::default()
                .threads(threads)
                .request_size(request_size);
            match *target {
                "cpu" => {
                    let state = ckpt.load(&opts).map_err(|e| e.to_string())?;
                    std::hint::black_box(&state);
                }
                "meta" => {
                    let state = ckpt
                        .load(&opts.device(Device::Meta))
                        .map_err(|e| e.to_string())?;
                    std::hint::black_box(&state);
                }
                _ => {
                    // SAFETY: the bench's generated files are not modified while mapped.
                    let mapped = unsafe { ckpt.map() }.map_err(|e| e.to_string())?;
                    let views: Vec<_> = mapped.views().collect();
                    std::hint::black_box(&views);
                }
            }
        }
        Contender::Http => {
            let url = url.ok_or("the http contender needs --url")?;
            let ckpt = Checkpoint::open(url).map_err(|e| e.to_string())?;
            // Threads default to the requests allowed in flight.
            let opts = LoadOptions::default().request_size(request_size);
            let state = ckpt.load(&opts).map_err(|e| e.to_string())?;
            std::hint::black_box(&state);
        }
        Contender::Python => return python_load(PY_SAFETENSORS, paths),
        Contender::PythonWeightlift => return python_load(PY_WEIGHTLIFT, &[dir.to_path_buf()]),
        Contender::FreshMemory => {
            let mut mem = weightlift::device::HostBuffer::new(bytes).map_err(|e| e.to_string())?;
            let chunk = (bytes as usize).div_ceil(threads).max(1);
            mem.as_mut_slice()
                .par_chunks_mut(chunk)
                .for_each(|c| c.fill(0x5a));
            std::hint::black_box(&mem);
        }
    }
    Ok(Sample {
        secs: start.elapsed().as_secs_f64(),
        peak_rss: peak_rss(),
    })
}

/// The interpreter of the Python contenders: the project's virtualenv (`.ci/run` makes
/// it), else `python3`.
fn python() -> PathBuf {
    let venv = workspace_root().join("target/py-venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

fn python_available() -> bool {
    Command::new(python())
        .args(["-c", "import safetensors.numpy, ml_dtypes"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the bindings in release mode into the virtualenv (incremental after the first
/// time), so that `python-weightlift` times optimised code.
fn python_weightlift_ready() -> bool {
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

/// Times `safetensors.numpy.load_file` over every shard (interpreter start excluded).
const PY_SAFETENSORS: &str = "import sys,time,resource\ntry:\n import ml_dtypes\nexcept ImportError:\n pass\n\
    from safetensors.numpy import load_file\nt=time.perf_counter()\nd=[load_file(p) for p in sys.argv[1:]]\n\
    print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)";
/// Times `weightlift.load_checkpoint` of the checkpoint directory (imports done first, as
/// for safetensors: numpy and ml_dtypes cost ~0.1 s each to import).
const PY_WEIGHTLIFT: &str = "import sys,time,resource\nimport numpy\ntry:\n import ml_dtypes\nexcept ImportError:\n pass\nimport weightlift\nt=time.perf_counter()\n\
    d=weightlift.load_checkpoint(sys.argv[1])\n\
    print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)";

/// Runs a timing script; it prints seconds and peak RSS in KiB.
fn python_load(script: &str, args: &[PathBuf]) -> Result<Sample, String> {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("python: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let secs = parts.next().and_then(|s| s.parse().ok());
    let kib: Option<u64> = parts.next().and_then(|s| s.parse().ok());
    match (secs, kib) {
        (Some(secs), Some(kib)) => Ok(Sample {
            secs,
            peak_rss: kib * 1024,
        }),
        _ => Err(format!("python output: {text:?}")),
    }
}

fn print_table<'a>(records: impl Iterator<Item = &'a Value>) {
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10}",
        "contender", "median s", "min s", "max s", "GB/s", "x raw", "x ref", "peak RSS"
    );
    for r in records {
        println!(
            "{:<26} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2} {:>8.2} {:>9.0}M",
            r["contender"].as_str().unwrap_or(""),
            r["median_s"].as_f64().unwrap_or(0.0),
            r["min_s"].as_f64().unwrap_or(0.0),
            r["max_s"].as_f64().unwrap_or(0.0),
            r["gbps"].as_f64().unwrap_or(0.0),
            r["ratio_to_raw"].as_f64().unwrap_or(0.0),
            r["ratio_to_reference"].as_f64().unwrap_or(0.0),
            r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        );
    }
    println!();
}
