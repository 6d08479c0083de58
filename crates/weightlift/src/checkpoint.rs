//! Opening a checkpoint: one resolver over any [`Store`]. An index first (the named index
//! file, or `model.safetensors.index.json` in a directory), else the store's listing of
//! `*.safetensors`, else `model.safetensors` where the store cannot be listed (plain HTTP);
//! then every shard opened and its header read and validated, in parallel; then the index
//! checked against the shards before any tensor byte is read.

use crate::budget::MemoryBudget;
use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::pool::thread_pool;
use crate::shard::{Shard, open_shard};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use weightlift_format::{Header, INDEX_FILE_NAME, ShardIndex, TensorInfo};
use weightlift_storage::{Backend, Entry, Location, RemoteStats, Store, StoreOptions, open_store};

/// How to open a checkpoint: how its files are read, and whether its tensors may stay in
/// mappings of them. Built with [`OpenOptions::default`] and the setters.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    backend: Backend,
    mapping: Mapping,
    memory_budget: Option<MemoryBudget>,
    #[cfg(feature = "remote")]
    remote: weightlift_storage::remote::RemoteOptions,
}

impl OpenOptions {
    /// Which storage backend reads local files (default: chosen per file).
    pub fn backend(mut self, backend: Backend) -> OpenOptions {
        self.backend = backend;
        self
    }

    /// Whether CPU loads, lazy reads and prefetches may leave tensors in private mappings
    /// of local files (default: never; see [`Mapping`]). Decided here, once, for every use
    /// of the checkpoint.
    pub fn mapping(mut self, mapping: Mapping) -> OpenOptions {
        self.mapping = mapping;
        self
    }

    /// The memory budget and prefetch window every use of the checkpoint runs under (loads,
    /// lazy reads, prefetches, read-ahead), unless a load sets its own
    /// ([`crate::LoadOptions::memory_budget`]). Default: [`MemoryBudget::detect`], once, when
    /// the checkpoint is opened.
    pub fn memory_budget(mut self, budget: MemoryBudget) -> OpenOptions {
        self.memory_budget = Some(budget);
        self
    }

    /// How URLs (`http://`, `https://`, `s3://`, `hf://`) are read.
    #[cfg(feature = "remote")]
    pub fn remote(mut self, remote: weightlift_storage::remote::RemoteOptions) -> OpenOptions {
        self.remote = remote;
        self
    }

    fn store_options(&self) -> StoreOptions {
        let options = StoreOptions::default().backend(self.backend);
        #[cfg(feature = "remote")]
        let options = options.remote(self.remote.clone());
        options
    }
}

/// An open checkpoint: validated headers of all its shards, files open for reading.
#[derive(Debug)]
pub struct Checkpoint {
    location: Location,
    index: Option<(Location, ShardIndex)>,
    shards: Vec<Shard>,
    tensor_count: usize,
    store: Arc<dyn Store>,
    mapping: Mapping,
    budget: MemoryBudget,
}

/// The file a store that cannot be listed is expected to hold.
const SINGLE_FILE: &str = "model.safetensors";

/// Largest index file read (real ones are a few MiB).
const MAX_INDEX: u64 = 256 << 20;

impl Checkpoint {
    /// Opens `location` with the default options.
    pub fn open(location: impl Into<Location>) -> Result<Checkpoint> {
        Checkpoint::open_with(location, &OpenOptions::default())
    }

    /// Opens `location`: a `.safetensors` file, a directory of shards, or an index file.
    /// With the `remote` feature, it may also be an `http://`, `https://` or `s3://` URL of
    /// any of those (a URL "directory" is a prefix: its index is fetched first; an S3 prefix
    /// without one is listed, an HTTP one must hold `model.safetensors`). A `&str` or
    /// `String` is read as a URL when it starts with one of those schemes; a `Path` is
    /// always a path.
    pub fn open_with(location: impl Into<Location>, options: &OpenOptions) -> Result<Checkpoint> {
        let location = location.into();
        if let (Location::Url(url), Some(kind)) = (&location, options.backend.fixed()) {
            return Err(Error::InvalidOption(format!(
                "backend {kind} reads local files; {url} is read with range requests"
            )));
        }
        let (store, entry) =
            open_store(&location, &options.store_options()).map_err(|source| Error::Io {
                location: location.clone(),
                context: "opening the checkpoint",
                source,
            })?;
        Checkpoint::open_in(store, entry, location, options)
    }

    /// Opens the checkpoint `entry` of `store` (what [`Checkpoint::open_with`] does once it
    /// has found the store): for stores of your own, or to share one store between opens.
    /// `location` is how the checkpoint is named in messages. Of `options`, only what is not
    /// the store's business applies (the mapping): the store already reads its files.
    pub fn open_in(
        store: Arc<dyn Store>,
        entry: Entry,
        location: Location,
        options: &OpenOptions,
    ) -> Result<Checkpoint> {
        let io = |location: Location, context| {
            move |source| Error::Io {
                location,
                context,
                source,
            }
        };
        let (index, names, guessed) = match entry {
            Entry::Index(name) => {
                let at = store.location().join(&name);
                let bytes = store
                    .fetch(&name, MAX_INDEX)
                    .map_err(io(at.clone(), "reading the index file"))?
                    .ok_or_else(|| {
                        io(at.clone(), "reading the index file")(
                            std::io::Error::from(std::io::ErrorKind::NotFound).into(),
                        )
                    })?;
                let index = parse_index(&at, &bytes)?;
                let names = shard_names(&index);
                (Some((at, index)), names, false)
            }
            Entry::File(name) => (None, vec![name], false),
            Entry::Directory => {
                let at = store.location().join(INDEX_FILE_NAME);
                let fetched = store
                    .fetch(INDEX_FILE_NAME, MAX_INDEX)
                    .map_err(io(at.clone(), "reading the index file"))?;
                match fetched {
                    Some(bytes) => {
                        let index = parse_index(&at, &bytes)?;
                        let names = shard_names(&index);
                        (Some((at, index)), names, false)
                    }
                    None => match store.list(".safetensors") {
                        Ok(names) if names.is_empty() => {
                            return Err(Error::NoShards {
                                location: store.location().clone(),
                            });
                        }
                        Ok(names) => (None, names, false),
                        Err(weightlift_storage::Error::Unsupported(_)) => {
                            (None, vec![SINGLE_FILE.to_string()], true)
                        }
                        Err(e) => {
                            return Err(io(store.location().clone(), "listing the files")(e));
                        }
                    },
                }
            }
        };

        let from_index = index.is_some();
        let open_all = || {
            names
                .into_par_iter()
                .map(|name| open_shard(&*store, name, from_index))
                .collect::<Result<Vec<Shard>>>()
        };
        // Local headers open on rayon's global pool; a remote store asks for as many
        // threads as requests it allows in flight, since each open waits on the network.
        let opened = match store.preferred_threads() {
            Some(threads) => {
                thread_pool(threads.clamp(1, 64), "weightlift-open")?.install(open_all)
            }
            None => open_all(),
        };
        let shards = opened.map_err(|e| match e {
            // An unlistable store without `model.safetensors`: nothing to load.
            Error::Io { source, .. }
                if guessed && source.kind() == std::io::ErrorKind::NotFound =>
            {
                Error::NoShards {
                    location: store.location().clone(),
                }
            }
            other => other,
        })?;
        let budget = options
            .memory_budget
            .clone()
            .unwrap_or_else(MemoryBudget::detect);
        Checkpoint::from_parts(location, index, shards, store, options.mapping, budget)
    }

    /// Checks the shards against the index (or each other) and builds the checkpoint.
    fn from_parts(
        location: Location,
        index: Option<(Location, ShardIndex)>,
        shards: Vec<Shard>,
        store: Arc<dyn Store>,
        mapping: Mapping,
        budget: MemoryBudget,
    ) -> Result<Checkpoint> {
        if let Some((index_location, index)) = &index {
            let pairs: Vec<(&str, &Header)> =
                shards.iter().map(|s| (s.name(), s.header())).collect();
            index.check(&pairs).map_err(|source| Error::Format {
                location: index_location.clone(),
                source,
            })?;
        }

        // With an index, `check` proved names unique across shards. Without one, look for
        // a name in two shards (each header already rejects repeats within itself).
        if index.is_none() && shards.len() > 1 {
            let mut seen: HashMap<&str, usize> =
                HashMap::with_capacity(shards.iter().map(|s| s.header().len()).sum());
            for (i, shard) in shards.iter().enumerate() {
                for t in shard.header().tensors() {
                    if let Some(first) = seen.insert(&t.name, i) {
                        return Err(Error::DuplicateTensor {
                            tensor: t.name.clone(),
                            first: shards[first].location().clone(),
                            second: shard.location().clone(),
                        });
                    }
                }
            }
        }
        let tensor_count = shards.iter().map(|s| s.header().len()).sum();

        Ok(Checkpoint {
            location,
            index,
            shards,
            tensor_count,
            store,
            mapping,
            budget,
        })
    }

    /// Where the checkpoint was opened from.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether its tensors may stay in mappings of the files (see [`OpenOptions::mapping`]).
    pub fn mapping(&self) -> Mapping {
        self.mapping
    }

    /// The memory budget its uses run under (see [`OpenOptions::memory_budget`]).
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Whether all of its data fits the prefetch window of its budget: where it does, its
    /// pages can stay in memory from first read to last use (populated ahead, never marked
    /// the first to reclaim); where it does not, what readers are past is let go of.
    pub(crate) fn fits_window(&self) -> bool {
        self.data_bytes() <= self.budget.window()
    }

    /// The store holding the checkpoint's files.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The shards, in the index's (or the directory's) name order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The index file and its contents, when the checkpoint has one.
    pub fn index(&self) -> Option<(&Location, &ShardIndex)> {
        self.index.as_ref().map(|(p, i)| (p, i))
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
        self.shards.iter().map(|s| s.header().data_len()).sum()
    }

    /// Every tensor with its shard, shard by shard in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (&Shard, &TensorInfo)> + '_ {
        self.shards
            .iter()
            .flat_map(|s| s.header().tensors().iter().map(move |t| (s, t)))
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
            .map(|(s, t)| (&self.shards[s], &self.shards[s].header().tensors()[t]))
    }

    /// (shard, position) of a tensor: a binary search in each shard's own name index
    /// (shards are few; no checkpoint-wide index to build at open).
    pub(crate) fn locate(&self, name: &str) -> Option<(usize, usize)> {
        self.shards
            .iter()
            .enumerate()
            .find_map(|(s, shard)| shard.header().position(name).map(|t| (s, t)))
    }

    /// Requests, retries and bytes received so far, when the checkpoint is read over the
    /// network.
    pub fn remote_stats(&self) -> Option<RemoteStats> {
        self.store.remote_stats()
    }

    /// Loader threads a load uses when its options leave the number open: the number of
    /// CPUs (at least 4), or the requests allowed in flight for a checkpoint read from URLs.
    pub fn default_threads(&self) -> usize {
        self.store
            .preferred_threads()
            .unwrap_or_else(crate::pool::default_threads)
    }
}

fn shard_names(index: &ShardIndex) -> Vec<String> {
    index.shards().into_iter().map(String::from).collect()
}

fn parse_index(location: &Location, bytes: &[u8]) -> Result<ShardIndex> {
    ShardIndex::parse(bytes).map_err(|source| Error::Format {
        location: location.clone(),
        source,
    })
}
