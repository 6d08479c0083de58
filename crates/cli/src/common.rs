//! Pieces shared by the commands: argument types, output, sizes, memory.

use clap::ValueEnum;
use std::io::Write;
use weightlift::{Backend, Mapping, OpenOptions};

/// The checkpoint a command works on, and how to read it.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CheckpointArgs {
    /// A .safetensors file, a directory of shards, or an index file (local, or an
    /// http(s):// or s3:// URL).
    pub(crate) path: String,
    #[command(flatten)]
    pub(crate) source: SourceArgs,
}

impl CheckpointArgs {
    /// Opens the checkpoint.
    pub(crate) fn open(&self) -> Result<weightlift::Checkpoint, String> {
        self.open_with(Mapping::never())
    }

    /// Opens the checkpoint, letting its tensors stay in mappings of the files as `mapping`
    /// says.
    pub(crate) fn open_with(&self, mapping: Mapping) -> Result<weightlift::Checkpoint, String> {
        let options = self.source.open_options().mapping(mapping);
        weightlift::Checkpoint::open_with(self.path.as_str(), &options).map_err(|e| e.to_string())
    }
}

/// Where the bytes come from: `--backend` for local files, and how URLs are read.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SourceArgs {
    /// Storage backend for local files (URLs are always read with range requests).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// For URLs: most HTTP requests in flight at once (also the default loader threads).
    #[cfg(feature = "remote")]
    #[arg(long, value_name = "N", default_value_t = weightlift::remote::RemoteOptions::default().max_in_flight)]
    in_flight: usize,
    /// For URLs: retries of a failed request (timeouts, resets, 429, 5xx) before giving up.
    #[cfg(feature = "remote")]
    #[arg(long, value_name = "N", default_value_t = weightlift::remote::RemoteOptions::default().max_retries)]
    retries: u32,
}

impl SourceArgs {
    pub(crate) fn open_options(&self) -> OpenOptions {
        let options = OpenOptions::default().backend(self.backend.backend());
        #[cfg(feature = "remote")]
        let options = options.remote(
            weightlift::remote::RemoteOptions::default()
                .max_in_flight(self.in_flight.max(1))
                .max_retries(self.retries)
                .bearer_token(weightlift::env::http_token()),
        );
        options
    }
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendArg {
    /// Choose per file (network filesystem, page-cache residency, size).
    Auto,
    /// Memory-map the files.
    Mmap,
    /// Positioned reads through the page cache.
    Pread,
    /// O_DIRECT reads, bypassing the page cache.
    Direct,
}

impl BackendArg {
    pub(crate) fn backend(self) -> Backend {
        match self {
            BackendArg::Auto => Backend::auto(),
            BackendArg::Pread => Backend::pread(),
            BackendArg::Direct => Backend::direct(),
            // SAFETY: the user asked for mmap explicitly; README and --help state that
            // files must not be modified or truncated while weightlift reads them.
            BackendArg::Mmap => unsafe { Backend::mmap() },
        }
    }
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
pub(crate) fn print(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("writing output: {e}")),
        _ => Ok(()),
    }
}

/// `1.23 GiB`-style sizes: the storage layer's formatter, which every message uses.
pub(crate) use weightlift::human as human_bytes;

/// `12,345`-style counts.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Lines of `rows` with columns padded to the widest cell.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }
}

/// The layouts of the built-in synthetic checkpoints (`demo`, `generate`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ProfileArg {
    /// Qwen3-30B-A3B-like: ~20,000 small tensors per GiB.
    Moe,
    /// A few hundred large tensors per GiB.
    Dense,
}

impl ProfileArg {
    pub(crate) fn profile(self) -> weightlift_workload::synthetic::Profile {
        match self {
            ProfileArg::Moe => weightlift_workload::synthetic::Profile::Moe,
            ProfileArg::Dense => weightlift_workload::synthetic::Profile::Dense,
        }
    }
}

/// `--filter GLOB` (`*`, `?`, `[..]`) as a pattern, or None without one.
pub(crate) fn filter_pattern(glob: Option<&str>) -> Result<Option<glob::Pattern>, String> {
    glob.map(glob::Pattern::new)
        .transpose()
        .map_err(|e| format!("invalid --filter pattern: {e}"))
}
