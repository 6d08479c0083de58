//! The one harness behind `bench`, `bench-vllm` and `bench-dist`: every measurement runs in
//! fresh child processes (one, or the ranks of a world started together) that each print one
//! JSON [`Sample`]; a cell (profile x cache) runs every contender `reps` times, interleaved,
//! with one eviction before each cold measurement; the cgroups of a memory limit or a storage
//! profile wrap the children; the results become the records of `record.rs`.

use clap::ValueEnum;
use serde::{Deserialize, Deserializer, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use weightlift_testkit::cgroup::{IoCgroup, IoCount, MemoryCgroup, command_in};
use weightlift_workload::util::{median, parse_size};
use weightlift_workload::yardstick::evict;

/// Page-cache state before each measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Cache {
    /// The files are in the page cache.
    Warm,
    /// Every file evicted (and checked) before each measurement.
    Cold,
    /// Cold, read through a FUSE passthrough mount (`bindfs`) standing in for a network
    /// filesystem: both the mount's and the disk's caches are evicted.
    ColdFuse,
    /// Cold, each measurement in a memory cgroup of `--memory-limit` bytes (a host or
    /// container with less memory than the model): bytes read from storage are reported
    /// beside the time.
    ColdLimited,
}

impl Cache {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cache::Warm => "warm",
            Cache::Cold => "cold",
            Cache::ColdFuse => "cold-fuse",
            Cache::ColdLimited => "cold-limited",
        }
    }
}

/// One measurement, as every timing child prints it: one JSON object on the last line of its
/// output that is one. The Rust `bench-one` child and the scripts in `xtask/bench/` print
/// `secs` and `peak_rss` (and `read_bytes` where they count them); the vLLM worker adds the
/// engine's start time, its tokens or its error; a rank of `bench-dist` the bytes it needed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Sample {
    /// Seconds timed (`NaN` where the child timed nothing: an error, an OOM kill).
    #[serde(deserialize_with = "nan_if_null")]
    pub(crate) secs: f64,
    /// The child's peak resident memory, bytes.
    #[serde(default)]
    pub(crate) peak_rss: u64,
    /// Bytes read from storage, where the child counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read_bytes: Option<u64>,
    /// vLLM: seconds from `LLM(...)` to a ready engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) start_s: Option<f64>,
    /// vLLM: seconds of the loader's whole `load_model` (the model built, its weights loaded,
    /// then processed), of which `secs` is the weights' part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) model_s: Option<f64>,
    /// vLLM: the greedy tokens generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tokens: Option<Vec<u64>>,
    /// What failed, where the child reports a failure as a result (vLLM's engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// Under a storage profile, where the child counts them (the Python children: vLLM's
    /// worker and the scripts in `xtask/bench/`): the read requests and bytes its block-I/O
    /// group sent to the disk while the timed load ran, read from the group's counters before
    /// and after it. The group's count for the whole child ([`Sample::disk`]) also holds what
    /// the process reads before and after the load (its imports; a vLLM engine start reads
    /// hundreds of small pieces of files besides the checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) load_disk_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) load_disk_bytes: Option<u64>,
    /// A rank of `bench-dist`: the bytes of the tensors it had to load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) needed: Option<u64>,
    /// Killed for want of memory (in a memory cgroup): set by the parent.
    #[serde(skip)]
    pub(crate) oom_killed: bool,
    /// Under a storage profile: the read requests and bytes the disk served to the children
    /// (counted by the block-I/O cgroup, not by them): set by the parent.
    #[serde(skip)]
    pub(crate) disk: Option<IoCount>,
    /// Where several children ran together (the ranks of a world): each one's sample. The
    /// measurement itself is the slowest rank's time and the largest peak.
    #[serde(skip)]
    pub(crate) ranks: Vec<Sample>,
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Sample {
    /// The sample a child printed: its output's last line that is a JSON object.
    pub(crate) fn parse(output: &str) -> Result<Sample, String> {
        let line = output
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| format!("no sample in its output {:?}", tail(output, 2000)))?;
        serde_json::from_str(line).map_err(|e| format!("{e} in {line:?}"))
    }

    /// A measurement that timed nothing (its children were OOM-killed).
    fn killed() -> Sample {
        Sample {
            secs: f64::NAN,
            oom_killed: true,
            ..Sample::default()
        }
    }

    /// Several children's samples as one measurement: the slowest time, the largest peak, the
    /// bytes read summed, the first error; the disk reads during the load the largest any
    /// child counted (the ranks of a world share one block-I/O group, and each counts the
    /// group's reads from before its barrier to after the last rank's load).
    fn together(ranks: Vec<Sample>) -> Sample {
        if ranks.len() == 1 {
            return ranks.into_iter().next().expect("one sample");
        }
        Sample {
            secs: ranks.iter().map(|r| r.secs).fold(0.0, f64::max),
            peak_rss: ranks.iter().map(|r| r.peak_rss).max().unwrap_or(0),
            read_bytes: ranks.iter().map(|r| r.read_bytes).sum(),
            error: ranks.iter().find_map(|r| r.error.clone()),
            load_disk_requests: ranks.iter().filter_map(|r| r.load_disk_requests).max(),
            load_disk_bytes: ranks.iter().filter_map(|r| r.load_disk_bytes).max(),
            ranks,
            ..Sample::default()
        }
    }
}

fn tail(text: &str, chars: usize) -> &str {
    let start = text.len().saturating_sub(chars);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// A child process of a measurement: program, arguments and environment, started inside the
/// measurement's cgroups.
#[derive(Clone, Debug)]
pub(crate) struct Child {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
}

impl Child {
    pub(crate) fn new(program: impl Into<PathBuf>) -> Child {
        Child {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub(crate) fn arg(mut self, arg: impl Into<OsString>) -> Child {
        self.args.push(arg.into());
        self
    }

    pub(crate) fn args<I: Into<OsString>>(mut self, args: impl IntoIterator<Item = I>) -> Child {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub(crate) fn env(mut self, key: &str, value: impl ToString) -> Child {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn command(&self, groups: &[&Path]) -> Command {
        let mut cmd = if groups.is_empty() {
            Command::new(&self.program)
        } else {
            command_in(groups, &self.program)
        };
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// The cgroups a measurement's children run in: a memory limit (`cold-limited`) and a
/// block-I/O throttle (`--storage`, cold measurements).
#[derive(Clone, Copy, Default)]
pub(crate) struct Groups<'a> {
    pub(crate) memory: Option<&'a MemoryCgroup>,
    pub(crate) io: Option<&'a IoCgroup>,
}

impl Groups<'_> {
    /// Runs `children` side by side, each printing one sample, and returns them as one
    /// measurement (see [`Sample::together`]) with the disk's count and OOM kills of the
    /// groups. A child that fails stops the others (ranks would wait for it in a collective);
    /// its standard error is the error. `name` labels errors and the children's logs
    /// (`target/bench-logs/NAME.N.{out,err}`).
    pub(crate) fn measure(&self, name: &str, children: &[Child]) -> Result<Sample, String> {
        let paths: Vec<&Path> = self
            .memory
            .map(MemoryCgroup::path)
            .into_iter()
            .chain(self.io.map(IoCgroup::path))
            .collect();
        let logs = crate::workspace_root().join("target/bench-logs");
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let log = |i: usize, ext: &str| logs.join(format!("{name}.{i}.{ext}"));
        let kills = self.memory.map(MemoryCgroup::oom_kills);
        let before = self.io.map(IoCgroup::reads);
        let mut running = Vec::with_capacity(children.len());
        for (i, child) in children.iter().enumerate() {
            let file = |ext| std::fs::File::create(log(i, ext)).map_err(|e| e.to_string());
            let spawned = child
                .command(&paths)
                .stdin(Stdio::null())
                .stdout(file("out")?)
                .stderr(file("err")?)
                .spawn()
                .map_err(|e| format!("{name}: {}: {e}", child.program.display()));
            match spawned {
                Ok(c) => running.push(c),
                Err(e) => {
                    stop(&mut running);
                    return Err(e);
                }
            }
        }
        let mut failed = None;
        let mut left = running.len();
        while left > 0 && failed.is_none() {
            left = 0;
            for (i, c) in running.iter_mut().enumerate() {
                match c.try_wait().map_err(|e| e.to_string())? {
                    None => left += 1,
                    Some(status) if status.success() => {}
                    Some(_) => failed = Some(i),
                }
            }
            if left > 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        stop(&mut running);
        if let (Some(group), Some(before)) = (self.memory, kills)
            && group.oom_kills() > before
        {
            eprintln!("   {name}: OOM-killed in the memory cgroup");
            return Ok(Sample::killed());
        }
        let read = |i: usize, ext: &str| std::fs::read_to_string(log(i, ext)).unwrap_or_default();
        if let Some(i) = failed {
            return Err(format!("{name}: {}", tail(read(i, "err").trim(), 4000)));
        }
        let ranks = (0..children.len())
            .map(|i| Sample::parse(&read(i, "out")).map_err(|e| format!("{name}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sample = Sample::together(ranks);
        sample.disk = self.io.zip(before).map(|(g, b)| g.reads().since(b));
        Ok(sample)
    }
}

/// Kills and reaps whatever of `children` still runs.
fn stop(children: &mut [std::process::Child]) {
    for c in children {
        if c.try_wait().ok().flatten().is_none() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// Drops a cell's files from the page cache before each cold measurement (through FUSE, the
/// mount's cache and the disk's), waits `settle`, and remembers the most that stayed
/// resident.
///
/// The wait is there because evicting the guest's page cache does not make storage cold at
/// once: on this VM the same 1.4 GB read back 0.40-0.46 s right after eviction, 0.76 s one
/// second later, 0.86-0.99 s after four, 1.22 s after eight and 1.58-1.74 s after ten to 45
/// seconds (`cat`, hf-moe; some cache below the guest). Without it the raw read, which starts
/// at once, was measured on storage several times faster than the loads that start reading
/// after seconds of imports, and every contender's speed depended on its import time. With it
/// every cold measurement reads storage in the state a first load meets: cold all the way down.
pub(crate) struct Eviction {
    paths: Vec<PathBuf>,
    worst: f64,
    settle: Duration,
}

impl Eviction {
    /// For a measurement in `cache` of `paths` (as read), which are `disk_paths` on the disk,
    /// waiting `settle` after each eviction.
    pub(crate) fn new(
        cache: Cache,
        paths: &[PathBuf],
        disk_paths: &[PathBuf],
        settle: Duration,
    ) -> Eviction {
        let paths = match cache {
            Cache::Warm => Vec::new(),
            Cache::ColdFuse => paths.iter().chain(disk_paths).cloned().collect(),
            Cache::Cold | Cache::ColdLimited => paths.to_vec(),
        };
        Eviction {
            paths,
            worst: 0.0,
            settle,
        }
    }

    /// The wait after each eviction, in seconds, where there is eviction (the records say it).
    pub(crate) fn settle_s(&self) -> Option<f64> {
        (!self.paths.is_empty()).then_some(self.settle.as_secs_f64())
    }

    pub(crate) fn run(&mut self) -> Result<(), String> {
        for p in &self.paths {
            let r = evict(p).map_err(|e| format!("{}: evicting: {e}", p.display()))?;
            self.worst = self.worst.max(r.fraction());
        }
        if !self.paths.is_empty() {
            std::thread::sleep(self.settle);
        }
        Ok(())
    }

    /// Says how well eviction worked (cold cells).
    pub(crate) fn report(&self) {
        if !self.paths.is_empty() {
            eprintln!(
                "   evicted with posix_fadvise(DONTNEED); at most {:.2}% of pages still cached after eviction; {:.0} s settled after each",
                self.worst * 100.0,
                self.settle.as_secs_f64()
            );
        }
    }
}

/// One cell: `reps` rounds, each measuring every one of `contenders` contenders once in
/// order (interleaved, so that drifting noise falls on all alike), evicting before each.
/// `measure(i)` is contender `i`'s measurement; the samples come back per contender.
///
/// With `prime`, one round more comes first and its measurements are dropped. Eviction drops
/// the checkpoint's files only: a contender's first run also reads its program, its shared
/// libraries and its Python modules from the disk, which a block-I/O cgroup counts (and
/// throttles) with the checkpoint's reads. After the priming round they are cached, so the
/// requests and bytes reported beside each time are the checkpoint's.
pub(crate) fn interleave(
    reps: usize,
    contenders: usize,
    eviction: &mut Eviction,
    prime: bool,
    mut measure: impl FnMut(usize) -> Result<Option<Sample>, String>,
) -> Result<Vec<Vec<Sample>>, String> {
    if prime {
        eprintln!(
            "   a first round, not recorded, brings each contender's programs and imports into the page cache"
        );
        for i in 0..contenders {
            eviction.run()?;
            measure(i)?;
        }
    }
    let mut samples: Vec<Vec<Sample>> = (0..contenders).map(|_| Vec::new()).collect();
    for _ in 0..reps {
        for (i, s) in samples.iter_mut().enumerate() {
            eviction.run()?;
            if let Some(sample) = measure(i)? {
                s.push(sample);
            }
        }
    }
    eviction.report();
    Ok(samples)
}

/// Median, min and max of some measurements' seconds (NaN ones, of OOM-killed or failed
/// runs, left out).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Stats {
    pub(crate) fn of(samples: &[Sample]) -> Stats {
        Stats::of_secs(&samples.iter().map(|s| s.secs).collect::<Vec<_>>())
    }

    pub(crate) fn of_secs(secs: &[f64]) -> Stats {
        let secs: Vec<f64> = secs.iter().copied().filter(|s| s.is_finite()).collect();
        if secs.is_empty() {
            return Stats {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        Stats {
            median: median(&secs),
            min: secs.iter().copied().fold(f64::INFINITY, f64::min),
            max: secs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// The median of some counts (`None` for none; of an even count, the lower middle one).
pub(crate) fn median_u64(values: impl Iterator<Item = u64>) -> Option<u64> {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// A storage profile: read limits of a block-I/O cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Storage {
    pub(crate) name: String,
    bytes_per_s: Option<u64>,
    requests_per_s: Option<u64>,
    /// The disk's readahead while the profile is in force (`None`: left as it is).
    readahead: Option<u64>,
}

impl Storage {
    /// The block-I/O cgroup of this profile on the disk holding `data_dir` (with the disk's
    /// readahead set, where the profile sets one, until it is dropped).
    pub(crate) fn cgroup(&self, data_dir: &Path) -> Result<IoCgroup, String> {
        let group = IoCgroup::new(
            &format!("weightlift-bench-io-{}", std::process::id()),
            data_dir,
            self.bytes_per_s,
            self.requests_per_s,
        )?;
        match self.readahead {
            Some(bytes) => group.with_readahead(bytes),
            None => Ok(group),
        }
    }
}

/// `--settle`: seconds, whole or not, zero or more.
pub(crate) fn parse_settle(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{text:?}: not a number of seconds (0 or more)"))
}

/// `volume`, `netfs`, `slow`, or `N req/s` and a size per second, comma-separated; any of
/// them with `readahead=SIZE` (the disk's readahead while the profile is in force).
pub(crate) fn parse_storage(text: &str) -> Result<Storage, String> {
    let (mut bps, mut iops, mut readahead) = (None, None, None);
    for (i, part) in text.split(',').map(str::trim).enumerate() {
        match part {
            "volume" | "netfs" | "slow" if i == 0 => {
                (bps, iops) = match part {
                    "volume" => (Some(125_000_000), Some(3000)),
                    "netfs" => (Some(500_000_000), Some(500)),
                    _ => (Some(300_000_000), None),
                }
            }
            _ => {
                if let Some(size) = part.strip_prefix("readahead=") {
                    readahead = Some(parse_size(size.trim())?);
                } else if let Some(n) = part.strip_suffix("req/s") {
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
                         800req/s,1GB/s, with readahead=SIZE if wanted"
                    ));
                }
            }
        }
    }
    Ok(Storage {
        name: text.to_string(),
        bytes_per_s: bps,
        requests_per_s: iops,
        readahead,
    })
}

/// Writes `records` as a pretty JSON array to `path`.
pub(crate) fn write_json<T: Serialize>(path: &Path, records: &[T]) -> Result<(), String> {
    let text = serde_json::to_string_pretty(records).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_priming_round_runs_every_contender_once_and_is_not_recorded() {
        let mut calls = Vec::new();
        let mut eviction = Eviction::new(Cache::Warm, &[], &[], Duration::ZERO);
        let samples = interleave(2, 3, &mut eviction, true, |i| {
            calls.push(i);
            Ok(Some(Sample {
                secs: calls.len() as f64,
                ..Sample::default()
            }))
        })
        .unwrap();
        assert_eq!(calls, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        let secs: Vec<Vec<f64>> = samples
            .iter()
            .map(|s| s.iter().map(|x| x.secs).collect())
            .collect();
        assert_eq!(secs, [[4.0, 7.0], [5.0, 8.0], [6.0, 9.0]]);
        let unprimed = interleave(1, 2, &mut eviction, false, |_| Ok(Some(Sample::default())));
        assert_eq!(unprimed.unwrap().iter().map(Vec::len).sum::<usize>(), 2);
    }

    #[test]
    fn cold_cells_record_the_wait_after_eviction_and_warm_ones_none() {
        let files = [PathBuf::from("a.safetensors")];
        let wait = Duration::from_secs(12);
        assert_eq!(
            Eviction::new(Cache::Cold, &files, &files, wait).settle_s(),
            Some(12.0)
        );
        assert_eq!(
            Eviction::new(Cache::Warm, &files, &files, wait).settle_s(),
            None
        );
    }

    #[test]
    fn settle_parses_seconds_and_refuses_what_is_not_a_wait() {
        assert_eq!(parse_settle("12"), Ok(Duration::from_secs(12)));
        assert_eq!(parse_settle("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_settle("0"), Ok(Duration::ZERO));
        for bad in ["-1", "NaN", "inf", "12s", ""] {
            let e = parse_settle(bad).unwrap_err();
            assert!(e.contains("not a number of seconds"), "{bad}: {e}");
        }
    }

    #[test]
    fn samples_parse_from_the_last_json_line() {
        let s = Sample::parse("log line\n{\"secs\": 1.5, \"peak_rss\": 10}\n").unwrap();
        assert_eq!((s.secs, s.peak_rss), (1.5, 10));
        let s = Sample::parse("{\"secs\": null, \"error\": \"boom\"}").unwrap();
        assert!(s.secs.is_nan());
        assert_eq!(s.error.as_deref(), Some("boom"));
        assert!(Sample::parse("no sample").is_err());
    }

    #[test]
    fn ranks_measure_as_the_slowest() {
        let rank = |secs, rss, read| Sample {
            secs,
            peak_rss: rss,
            read_bytes: Some(read),
            ..Sample::default()
        };
        let s = Sample::together(vec![rank(1.0, 5, 10), rank(2.0, 3, 20)]);
        assert_eq!((s.secs, s.peak_rss, s.read_bytes), (2.0, 5, Some(30)));
        assert_eq!(s.ranks.len(), 2);
    }

    #[test]
    fn stats_leave_out_failed_runs_and_take_the_middle() {
        let st = Stats::of_secs(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!((st.median, st.min, st.max), (2.0, 1.0, 3.0));
        assert_eq!(Stats::of_secs(&[1.0, 2.0]).median, 1.5);
        assert!(Stats::of_secs(&[f64::NAN]).median.is_nan());
    }

    #[test]
    fn storage_profiles_parse() {
        let s = parse_storage("800req/s,1GB/s").unwrap();
        assert_eq!(
            (s.requests_per_s, s.bytes_per_s),
            (Some(800), Some(1_000_000_000))
        );
        assert_eq!(parse_storage("slow").unwrap().requests_per_s, None);
        assert!(parse_storage("fast").is_err());
        let s = parse_storage("netfs,readahead=128KiB").unwrap();
        assert_eq!(
            (s.requests_per_s, s.readahead, s.name.as_str()),
            (Some(500), Some(128 << 10), "netfs,readahead=128KiB")
        );
        assert_eq!(parse_storage("volume").unwrap().readahead, None);
        assert!(parse_storage("1GB/s,netfs").is_err(), "a name comes first");
    }
}
