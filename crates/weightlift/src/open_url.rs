//! Opening a checkpoint from URLs: `http(s)://` and `s3://` files, index files and
//! prefixes ("directories"). The index is fetched first, then every shard's header with one
//! ranged request each (its first 64 KiB, which usually hold the whole header), on a pool
//! as wide as the requests allowed in flight.

use crate::checkpoint::{
    Checkpoint, HEADER_PROBE, OpenOptions, Shard, header_of, open_error, parse_index,
};
use crate::error::{Error, Result};
use crate::load::thread_pool;
use rayon::prelude::*;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use weightlift_format::{INDEX_FILE_NAME, ShardIndex};
use weightlift_storage::remote::{Remote, RemoteStats, join};
use weightlift_storage::{BackendKind, ByteSource};

/// The file a prefix that cannot be listed is expected to hold.
const SINGLE_FILE: &str = "model.safetensors";

/// Largest index file fetched (real ones are a few MiB).
const MAX_INDEX: u64 = 256 << 20;

impl Checkpoint {
    /// Opens a checkpoint at `url` (see [`Checkpoint::open_with`]).
    pub(crate) fn open_url(url: &str, options: &OpenOptions) -> Result<Checkpoint> {
        if let Some(kind) = options.backend.fixed() {
            return Err(Error::InvalidOption(format!(
                "backend {kind} reads local files; {url} is read with ranged requests"
            )));
        }
        let remote = Remote::new(options.remote.clone()).map_err(|source| Error::Io {
            path: PathBuf::from(url),
            context: "setting up the HTTP client",
            source,
        })?;
        let io_error = |at: &str, context, source| Error::Io {
            path: PathBuf::from(at),
            context,
            source,
        };
        let fetch_index = |at: &str| -> Result<Option<(PathBuf, ShardIndex)>> {
            let Some(bytes) = remote
                .fetch(at, MAX_INDEX)
                .map_err(|e| io_error(at, "fetching the index file", e))?
            else {
                return Ok(None);
            };
            let index = parse_index(Path::new(at), &bytes)?;
            Ok(Some((PathBuf::from(at), index)))
        };
        let index_names =
            |index: &ShardIndex| index.shards().into_iter().map(String::from).collect();

        let (index, names, base): (_, Vec<String>, String) = if url.ends_with(".json") {
            let index = fetch_index(url)?
                .ok_or_else(|| io_error(url, "fetching the index file", not_found()))?;
            let names = index_names(&index.1);
            (Some(index), names, parent(url).to_string())
        } else if url.ends_with(".safetensors") {
            let name = url.rsplit('/').next().unwrap_or_default().to_string();
            (None, vec![name], parent(url).to_string())
        } else {
            let base = url.trim_end_matches('/').to_string();
            match fetch_index(&join(&base, INDEX_FILE_NAME))? {
                Some(index) => {
                    let names = index_names(&index.1);
                    (Some(index), names, base)
                }
                None => (None, list_prefix(&remote, &base)?, base),
            }
        };

        let from_index = index.is_some();
        let threads = remote.options().max_in_flight.clamp(1, 64);
        let pool = thread_pool(threads, "weightlift-open")?;
        let guessed = !from_index && url.trim_end_matches('/') == base && names == [SINGLE_FILE];
        let shards: Vec<Shard> = pool
            .install(|| {
                names
                    .into_par_iter()
                    .map(|name| open_shard(&remote, join(&base, &name), name, from_index))
                    .collect::<Result<_>>()
            })
            .map_err(|e| match e {
                Error::Io { source, .. } if guessed && source.kind() == io::ErrorKind::NotFound => {
                    Error::NoShards {
                        path: PathBuf::from(&base),
                    }
                }
                other => other,
            })?;
        let mut checkpoint = Checkpoint::assemble(PathBuf::from(url), index, shards)?;
        checkpoint.remote = Some(remote);
        Ok(checkpoint)
    }

    /// Requests, retries and bytes received so far, when the checkpoint was opened from URLs.
    pub fn remote_stats(&self) -> Option<RemoteStats> {
        self.remote.as_ref().map(Remote::stats)
    }

    /// Default loader threads: as many as the requests allowed in flight for remote
    /// checkpoints (each thread has one request out at a time).
    pub(crate) fn remote_threads(&self) -> Option<usize> {
        self.remote
            .as_ref()
            .map(|r| r.options().max_in_flight.max(1))
    }
}

/// The shards of a prefix without an index: an S3 listing, or `model.safetensors` over
/// plain HTTP (which cannot be listed).
fn list_prefix(remote: &Remote, base: &str) -> Result<Vec<String>> {
    let names = match remote.list(base, ".safetensors") {
        Ok(names) => names,
        // Opening it tells whether it exists (see `open_url`).
        Err(e) if e.kind() == io::ErrorKind::Unsupported => vec![SINGLE_FILE.to_string()],
        Err(source) => {
            return Err(Error::Io {
                path: PathBuf::from(base),
                context: "listing the prefix",
                source,
            });
        }
    };
    if names.is_empty() {
        return Err(Error::NoShards {
            path: PathBuf::from(base),
        });
    }
    Ok(names)
}

fn open_shard(remote: &Remote, url: String, name: String, from_index: bool) -> Result<Shard> {
    let path = PathBuf::from(&url);
    let (source, head) = remote
        .open(&url, HEADER_PROBE)
        .map_err(open_error(&path, from_index))?;
    let header = header_of(&path, &source, head)?;
    let reason = match source.kind() {
        BackendKind::S3 => "s3:// URL: SigV4-presigned range requests",
        _ => "URL: HTTP range requests",
    };
    let source: Arc<dyn ByteSource> = Arc::new(source);
    Ok(Shard {
        path,
        name,
        header,
        source,
        backend_reason: reason.to_string(),
    })
}

fn parent(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(dir, _)| dir)
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "HTTP 404 Not Found")
}
