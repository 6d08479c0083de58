//! Opening a checkpoint: one file, a directory of shards (with or without an index), or an
//! index file. Every header is read and validated up front, in parallel, and an index is
//! checked against the shards before any tensor byte is read.

use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use weightlift_format::{
    FormatError, Header, INDEX_FILE_NAME, PREFIX_LEN, ShardIndex, TensorInfo,
    header_len_from_prefix,
};
use weightlift_storage::{Backend, BackendKind, ByteSource};

/// How to open a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Which storage backend reads local files (default: chosen per file).
    pub backend: Backend,
    /// How URLs (`http://`, `https://`, `s3://`) are read.
    #[cfg(feature = "remote")]
    pub remote: weightlift_storage::remote::RemoteOptions,
}

impl OpenOptions {
    /// Options with `backend` for local files.
    // The other fields depend on cargo features.
    #[allow(clippy::needless_update)]
    pub fn backend(backend: Backend) -> OpenOptions {
        OpenOptions {
            backend,
            ..OpenOptions::default()
        }
    }
}

/// One safetensors file of a checkpoint.
#[derive(Debug)]
pub struct Shard {
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    pub(crate) header: Header,
    pub(crate) source: Arc<dyn ByteSource>,
    pub(crate) backend_reason: String,
}

impl Shard {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name as the index (or directory listing) gives it, relative to the checkpoint
    /// directory.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backend that reads this file.
    pub fn backend(&self) -> BackendKind {
        self.source.kind()
    }

    /// Why that backend was chosen.
    pub fn backend_reason(&self) -> &str {
        &self.backend_reason
    }

    pub(crate) fn source(&self) -> &dyn ByteSource {
        &*self.source
    }
}

/// An open checkpoint: validated headers of all its shards, files open for reading.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    index: Option<(PathBuf, ShardIndex)>,
    shards: Vec<Shard>,
    tensor_count: usize,
    #[cfg(feature = "remote")]
    pub(crate) remote: Option<weightlift_storage::remote::Remote>,
}

impl Checkpoint {
    /// Opens `path` with the default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        Checkpoint::open_with(path, &OpenOptions::default())
    }

    /// Opens `path`: a `.safetensors` file, a directory of shards, or an index file. With
    /// the `remote` feature, `path` may also be an `http://`, `https://` or `s3://` URL of
    /// any of those (a URL "directory" is a prefix: its index is fetched first; an S3 prefix
    /// without one is listed, an HTTP one must hold `model.safetensors`).
    pub fn open_with(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Checkpoint> {
        let path = path.as_ref();
        if let Some(url) = path.to_str().filter(|p| is_url(p)) {
            #[cfg(feature = "remote")]
            return Checkpoint::open_url(url, options);
            #[cfg(not(feature = "remote"))]
            return Err(Error::InvalidOption(format!(
                "{url}: this build of weightlift reads local files only (cargo feature `remote`)"
            )));
        }
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            context: "opening the checkpoint",
            source,
        })?;
        let (index, shard_names, dir) = if meta.is_dir() {
            let index_path = path.join(INDEX_FILE_NAME);
            if index_path.is_file() {
                let index = read_index(&index_path)?;
                let names = index.shards().into_iter().map(String::from).collect();
                (Some((index_path, index)), names, path.to_path_buf())
            } else {
                (None, list_shards(path)?, path.to_path_buf())
            }
        } else if path.extension().is_some_and(|e| e == "json") {
            let index = read_index(path)?;
            let names = index.shards().into_iter().map(String::from).collect();
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (Some((path.to_path_buf(), index)), names, dir)
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (None, vec![name], dir)
        };

        let backend = options.backend;
        let shards: Vec<Shard> = shard_names
            .into_par_iter()
            .map(|name| open_shard(dir.join(&name), name, backend, index.is_some()))
            .collect::<Result<_>>()?;
        Checkpoint::assemble(path.to_path_buf(), index, shards)
    }

    /// Checks the shards against the index (or each other) and builds the checkpoint.
    pub(crate) fn assemble(
        path: PathBuf,
        index: Option<(PathBuf, ShardIndex)>,
        shards: Vec<Shard>,
    ) -> Result<Checkpoint> {
        if let Some((index_path, index)) = &index {
            let pairs: Vec<(&str, &Header)> = shards
                .iter()
                .map(|s| (s.name.as_str(), &s.header))
                .collect();
            index.check(&pairs).map_err(|source| Error::Format {
                path: index_path.clone(),
                source,
            })?;
        }

        // With an index, `check` proved names unique across shards. Without one, look for
        // a name in two shards (each header already rejects repeats within itself).
        if index.is_none() && shards.len() > 1 {
            let mut seen: HashMap<&str, usize> =
                HashMap::with_capacity(shards.iter().map(|s| s.header.len()).sum());
            for (i, shard) in shards.iter().enumerate() {
                for t in shard.header.tensors() {
                    if let Some(first) = seen.insert(&t.name, i) {
                        return Err(Error::DuplicateTensor {
                            tensor: t.name.clone(),
                            first: shards[first].path.clone(),
                            second: shard.path.clone(),
                        });
                    }
                }
            }
        }
        let tensor_count = shards.iter().map(|s| s.header.len()).sum();

        Ok(Checkpoint {
            path,
            index,
            shards,
            tensor_count,
            #[cfg(feature = "remote")]
            remote: None,
        })
    }

    /// The path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shards, in the index's (or the directory's) name order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The index file and its contents, when the checkpoint has one.
    pub fn index(&self) -> Option<(&Path, &ShardIndex)> {
        self.index.as_ref().map(|(p, i)| (p.as_path(), i))
    }

    /// Number of tensors in all shards.
    pub fn len(&self) -> usize {
        self.tensor_count
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensor_count == 0
    }

    /// Total bytes of tensor data in all shards.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header.data_len()).sum()
    }

    /// Every tensor with its shard, shard by shard in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (&Shard, &TensorInfo)> + '_ {
        self.shards
            .iter()
            .flat_map(|s| s.header.tensors().iter().map(move |t| (s, t)))
    }

    /// Tensor names, sorted (built on each call).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors().map(|(_, t)| t.name.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// Finds a tensor by name.
    pub fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        self.locate(name)
            .map(|(s, t)| (&self.shards[s], &self.shards[s].header.tensors()[t]))
    }

    /// (shard, position) of a tensor: a binary search in each shard's own name index
    /// (shards are few; no checkpoint-wide index to build at open).
    pub(crate) fn locate(&self, name: &str) -> Option<(usize, usize)> {
        self.shards
            .iter()
            .enumerate()
            .find_map(|(s, shard)| shard.header.position(name).map(|t| (s, t)))
    }
}

/// Whether `path` is a URL this build can read.
fn is_url(path: &str) -> bool {
    ["http://", "https://", "s3://"].iter().any(|scheme| {
        path.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    })
}

fn read_index(path: &Path) -> Result<ShardIndex> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        context: "reading the index file",
        source,
    })?;
    parse_index(path, &bytes)
}

pub(crate) fn parse_index(path: &Path, bytes: &[u8]) -> Result<ShardIndex> {
    ShardIndex::parse(bytes).map_err(|source| Error::Format {
        path: path.to_path_buf(),
        source,
    })
}

fn list_shards(dir: &Path) -> Result<Vec<String>> {
    let io_err = |source| Error::Io {
        path: dir.to_path_buf(),
        context: "listing the directory",
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !name.starts_with('.') {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err(Error::NoShards {
            path: dir.to_path_buf(),
        });
    }
    names.sort();
    Ok(names)
}

/// First read of a file: usually covers the whole header, so one request suffices.
pub(crate) const HEADER_PROBE: u64 = 64 << 10;

fn open_shard(path: PathBuf, name: String, backend: Backend, from_index: bool) -> Result<Shard> {
    let opened = weightlift_storage::open(&path, backend).map_err(open_error(&path, from_index))?;
    let header = header_of(&path, &*opened.source, Vec::new())?;
    Ok(Shard {
        path,
        name,
        header,
        source: opened.source,
        backend_reason: opened.reason,
    })
}

/// The error for a shard that cannot be opened.
pub(crate) fn open_error(path: &Path, from_index: bool) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        path,
        context: if from_index {
            "opening a shard listed in the index"
        } else {
            "opening the file"
        },
        source,
    }
}

/// Reads and validates the header of the shard at `path` (see [`read_header`]).
pub(crate) fn header_of(path: &Path, source: &dyn ByteSource, head: Vec<u8>) -> Result<Header> {
    read_header(source, head).map_err(|e| match e {
        HeaderError::Format(source) => Error::Format {
            path: path.to_path_buf(),
            source,
        },
        HeaderError::Io(source) => Error::Io {
            path: path.to_path_buf(),
            context: "reading the header",
            source,
        },
    })
}

enum HeaderError {
    Format(FormatError),
    Io(std::io::Error),
}

/// Reads and validates a header through a byte source, checking every length against the
/// source's real length before allocating for it. `head` holds the file's first bytes when
/// the caller already has them (a remote open's first request), else it is empty.
fn read_header(
    source: &dyn ByteSource,
    mut head: Vec<u8>,
) -> std::result::Result<Header, HeaderError> {
    let len = source.len();
    if len < PREFIX_LEN {
        return Err(HeaderError::Format(FormatError::HeaderTooSmall { len }));
    }
    if head.len() < PREFIX_LEN as usize {
        head = vec![0u8; len.min(HEADER_PROBE) as usize];
        source
            .read_exact_at(0, &mut head)
            .map_err(HeaderError::Io)?;
    }
    let prefix: [u8; 8] = head[..8].try_into().expect("at least 8 bytes");
    let header_len = header_len_from_prefix(prefix, len).map_err(HeaderError::Format)?;
    let end = (PREFIX_LEN + header_len) as usize;
    if end > head.len() {
        let have = head.len();
        head.resize(end, 0);
        source
            .read_exact_at(have as u64, &mut head[have..])
            .map_err(HeaderError::Io)?;
    }
    Header::parse(&head[PREFIX_LEN as usize..end], len).map_err(HeaderError::Format)
}
