//! A checkpoint's home: a local directory, an HTTP(S) prefix or an S3 prefix, behind one
//! trait. The facade resolves checkpoints against a [`Store`] without knowing which kind
//! it is: list the files, fetch a small one (the index), open one for positioned reads
//! together with its first bytes (the header probe).

use crate::error::{Error, Result};
use crate::location::Location;
use crate::{Backend, ByteSource, open_file};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file of a store, opened for reading.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The source.
    pub source: Arc<dyn ByteSource>,
    /// Why this backend: the caller's choice, the automatic rule that applied, or the
    /// protocol for a URL.
    pub reason: String,
    /// The file's first bytes as read with the opening: as many as asked for (fewer when
    /// the file is shorter), or none where that first read failed or was not asked for.
    /// Callers read what they miss through `source`.
    pub head: Vec<u8>,
}

/// Request counters of a store that reads over the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// HTTP requests sent (including retries).
    pub requests: u64,
    /// Requests that were retries.
    pub retries: u64,
    /// Body bytes received into callers' buffers.
    pub bytes: u64,
}

/// Where a checkpoint's files live, and how to reach them.
pub trait Store: Send + Sync + fmt::Debug {
    /// The directory or URL prefix.
    fn location(&self) -> &Location;

    /// Names of the files directly in the store that end with `suffix`, sorted and
    /// relative to it. A store that cannot be listed (plain HTTP) answers
    /// [`Error::Unsupported`].
    fn list(&self, suffix: &str) -> Result<Vec<String>>;

    /// The whole of the small file `name`, or `None` when there is no such file. Files
    /// longer than `max_len` are an [`Error::TooLarge`].
    fn fetch(&self, name: &str, max_len: u64) -> Result<Option<Vec<u8>>>;

    /// Opens `name` for positioned reads and reads its first `probe` bytes.
    fn open(&self, name: &str, probe: u64) -> Result<Opened>;

    /// Loader threads that suit this store, when it has an opinion (a remote store: one
    /// per request allowed in flight).
    fn preferred_threads(&self) -> Option<usize> {
        None
    }

    /// Request counters, for a store that reads over the network.
    fn remote_stats(&self) -> Option<RemoteStats> {
        None
    }
}

/// What a location names inside its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The store itself: a directory or a URL prefix.
    Directory,
    /// One file of it (a `.safetensors` file).
    File(String),
    /// An index file of it (`.json`).
    Index(String),
}

/// How to reach stores.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Which backend reads local files.
    pub backend: Backend,
    /// How URLs are read.
    #[cfg(feature = "remote")]
    pub remote: crate::remote::RemoteOptions,
}

impl StoreOptions {
    /// Which backend reads local files.
    pub fn backend(mut self, backend: Backend) -> StoreOptions {
        self.backend = backend;
        self
    }

    /// How URLs are read.
    #[cfg(feature = "remote")]
    pub fn remote(mut self, remote: crate::remote::RemoteOptions) -> StoreOptions {
        self.remote = remote;
        self
    }
}

/// The store holding `location`, and what `location` is inside it: a local directory,
/// file or index file (told apart by `stat` and the extension), or a URL (told apart by
/// its ending: `.safetensors`, `.json`, anything else a prefix).
pub fn open_store(location: &Location, options: &StoreOptions) -> Result<(Arc<dyn Store>, Entry)> {
    match location {
        Location::Local(path) => {
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                // Not a path here: perhaps a model id (`org/name`) in the Hugging Face cache.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let id = path.to_str().and_then(crate::hub::ModelId::parse);
                    let cache = crate::hub::cache_dir(&crate::hub::process_env);
                    let (Some(id), Some(cache)) = (id, cache) else {
                        return Err(e.into());
                    };
                    let snapshot = crate::hub::cached_snapshot(&cache, &id)?;
                    let store = LocalStore::new(snapshot, options.backend);
                    return Ok((Arc::new(store), Entry::Directory));
                }
                Err(e) => return Err(e.into()),
            };
            if meta.is_dir() {
                let store = LocalStore::new(path.clone(), options.backend);
                return Ok((Arc::new(store), Entry::Directory));
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let store = Arc::new(LocalStore::new(dir, options.backend));
            Ok((store, entry_of(name)))
        }
        Location::Url(_) => open_remote(location, options),
    }
}

/// A file name as an entry: index files end with `.json`.
fn entry_of(name: String) -> Entry {
    if name.ends_with(".json") {
        Entry::Index(name)
    } else {
        Entry::File(name)
    }
}

#[cfg(feature = "remote")]
fn open_remote(location: &Location, options: &StoreOptions) -> Result<(Arc<dyn Store>, Entry)> {
    if options.backend.fixed().is_some() {
        return Err(Error::Unsupported(
            "a fixed backend reads local files; URLs are read with range requests",
        ));
    }
    let text = location.to_string();
    if crate::location::has_scheme(&text, "hf://") {
        // The hub: its resolve prefix, with the user's token unless one was given.
        let env = crate::hub::process_env;
        let (_, url) = crate::hub::resolve_url(&text, &crate::hub::endpoint(&env))?;
        let mut remote_options = options.remote.clone();
        if remote_options.bearer_token.is_none() {
            remote_options.bearer_token = crate::hub::token(&env);
        }
        let remote = crate::remote::Remote::new(remote_options)?;
        let store = crate::remote::RemoteStore::new(remote, Location::Url(url))?;
        return Ok((Arc::new(store), Entry::Directory));
    }
    let remote = crate::remote::Remote::new(options.remote.clone())?;
    let name = location.file_name().unwrap_or_default().to_string();
    if name.ends_with(".safetensors") || name.ends_with(".json") {
        let store = crate::remote::RemoteStore::new(remote, location.parent())?;
        Ok((Arc::new(store), entry_of(name)))
    } else {
        let base = Location::Url(text.trim_end_matches('/').to_string());
        Ok((
            Arc::new(crate::remote::RemoteStore::new(remote, base)?),
            Entry::Directory,
        ))
    }
}

#[cfg(not(feature = "remote"))]
fn open_remote(_: &Location, _: &StoreOptions) -> Result<(Arc<dyn Store>, Entry)> {
    Err(Error::Unsupported(
        "this build of weightlift reads local files only (cargo feature `remote`)",
    ))
}

/// A local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    dir: PathBuf,
    location: Location,
    backend: Backend,
}

impl LocalStore {
    /// The directory `dir`, whose files are opened with `backend`.
    pub fn new(dir: PathBuf, backend: Backend) -> LocalStore {
        LocalStore {
            location: Location::Local(dir.clone()),
            dir,
            backend,
        }
    }
}

impl Store for LocalStore {
    fn location(&self) -> &Location {
        &self.location
    }

    fn list(&self, suffix: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let dir = if self.dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &self.dir
        };
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(suffix) && !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn fetch(&self, name: &str, max_len: u64) -> Result<Option<Vec<u8>>> {
        let path = self.dir.join(name);
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_file() => return Ok(None),
            Ok(m) if m.len() > max_len => {
                return Err(Error::TooLarge {
                    len: m.len(),
                    max: max_len,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(std::fs::read(&path)?))
    }

    fn open(&self, name: &str, probe: u64) -> Result<Opened> {
        let mut opened = open_file(&self.dir.join(name), self.backend)?;
        let mut head = vec![0u8; opened.source.len().min(probe) as usize];
        // A file that opens but cannot be read (a directory, say) fails at its first read,
        // which the caller makes through the source and reports as such.
        if opened.source.read_exact_at(0, &mut head).is_ok() {
            opened.head = head;
        }
        Ok(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_entries_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.safetensors"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("a.safetensors"), b"x").unwrap();
        std::fs::write(dir.path().join(".hidden.safetensors"), b"x").unwrap();
        std::fs::write(dir.path().join("i.json"), b"{}").unwrap();
        let options = StoreOptions::default();
        let (store, entry) = open_store(&dir.path().into(), &options).unwrap();
        assert_eq!(entry, Entry::Directory);
        assert_eq!(
            store.list(".safetensors").unwrap(),
            ["a.safetensors", "b.safetensors"]
        );
        assert_eq!(store.fetch("i.json", 10).unwrap().unwrap(), b"{}");
        assert!(store.fetch("none.json", 10).unwrap().is_none());
        assert!(matches!(
            store.fetch("b.safetensors", 3),
            Err(Error::TooLarge { len: 10, max: 3 })
        ));
        let opened = store.open("b.safetensors", 4).unwrap();
        assert_eq!(opened.head, b"0123");
        assert_eq!(opened.source.len(), 10);
        let (_, entry) = open_store(&dir.path().join("i.json").into(), &options).unwrap();
        assert_eq!(entry, Entry::Index("i.json".into()));
        let (store, entry) =
            open_store(&dir.path().join("a.safetensors").into(), &options).unwrap();
        assert_eq!(entry, Entry::File("a.safetensors".into()));
        assert_eq!(store.open("a.safetensors", 64).unwrap().head, b"x");
        let err = open_store(&dir.path().join("nope").into(), &options).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
