//! What a load reads and where it puts it: [`LoadOptions`] and the tensor [`Filter`].

use crate::budget::MemoryBudget;
use crate::progress::{Progress, ProgressFn};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use weightlift_device::{Device, StagingOptions};
use weightlift_format::Dtype;

/// Default size of one coalesced read (tuned with `cargo xtask bench`).
pub const DEFAULT_REQUEST_SIZE: u64 = 16 << 20;

/// Which tensors a load reads.
#[derive(Clone, Default)]
pub enum Filter {
    /// Every tensor.
    #[default]
    All,
    /// Tensors whose name starts with the prefix.
    Prefix(String),
    /// Tensors for which the predicate holds.
    Predicate(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl Filter {
    /// Whether the tensor called `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Filter::All => true,
            Filter::Prefix(p) => name.starts_with(p.as_str()),
            Filter::Predicate(f) => f(name),
        }
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::All => f.write_str("All"),
            Filter::Prefix(p) => f.debug_tuple("Prefix").field(p).finish(),
            Filter::Predicate(_) => f.write_str("Predicate(..)"),
        }
    }
}

/// Which block of a tensor to load, by name and shape: one range per leading dimension (as
/// [`crate::Checkpoint::get_slice`] takes them), or `None` for the whole tensor.
pub type SliceFn = Arc<dyn Fn(&str, &[usize]) -> Option<Vec<std::ops::Range<usize>>> + Send + Sync>;

/// Default bound on the unselected bytes a load reads between two runs to keep one request
/// (see [`LoadOptions::max_gap`]): 1 MiB is what a request costs, in bytes, on storage serving
/// 500 requests/s at 500 MB/s (a network filesystem); on a cloud volume a request is worth
/// less (~40 KB at 3,000 requests/s and 125 MB/s), an HTTP round trip far more, and ranks of
/// one host reading each other's rows share the page cache, so the disk reads them once.
pub const DEFAULT_MAX_GAP: u64 = 1 << 20;

/// How to load: built with [`LoadOptions::default`] and the setters (one per option), so
/// that options can be added without breaking callers.
#[derive(Clone)]
pub struct LoadOptions {
    pub(crate) device: Device,
    pub(crate) threads: Option<usize>,
    pub(crate) request_size: u64,
    pub(crate) filter: Filter,
    pub(crate) convert_to: Option<Dtype>,
    pub(crate) progress: Option<ProgressFn>,
    pub(crate) huge_pages: bool,
    pub(crate) staging: StagingOptions,
    pub(crate) streams: usize,
    pub(crate) drop_cache: bool,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
    pub(crate) slices: Option<SliceFn>,
    pub(crate) max_gap: u64,
    pub(crate) memory_budget: Option<MemoryBudget>,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            device: Device::Cpu,
            threads: None,
            request_size: DEFAULT_REQUEST_SIZE,
            filter: Filter::All,
            convert_to: None,
            progress: None,
            huge_pages: false,
            staging: StagingOptions::default(),
            streams: 2,
            drop_cache: false,
            cancel: None,
            slices: None,
            max_gap: DEFAULT_MAX_GAP,
            memory_budget: None,
        }
    }
}

impl fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions")
            .field("device", &self.device)
            .field("threads", &self.threads)
            .field("request_size", &self.request_size)
            .field("filter", &self.filter)
            .field("convert_to", &self.convert_to)
            .field("progress", &self.progress.as_ref().map(|_| ".."))
            .field("huge_pages", &self.huge_pages)
            .field("staging", &self.staging)
            .field("streams", &self.streams)
            .field("drop_cache", &self.drop_cache)
            .field("cancel", &self.cancel.is_some())
            .field("slices", &self.slices.as_ref().map(|_| ".."))
            .field("max_gap", &self.max_gap)
            .field("memory_budget", &self.memory_budget)
            .finish()
    }
}

impl LoadOptions {
    /// Where tensors go (default: the CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Loader threads (default: the number of CPUs, at least 4, since reads block; for a
    /// checkpoint read from URLs, the requests allowed in flight).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Size of one coalesced read in bytes (default [`DEFAULT_REQUEST_SIZE`]).
    pub fn request_size(mut self, bytes: u64) -> Self {
        self.request_size = bytes;
        self
    }

    /// Loads only tensors whose names start with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.filter = Filter::Prefix(prefix.into());
        self
    }

    /// Loads only tensors for which `keep` returns true.
    pub fn filter(mut self, keep: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Filter::Predicate(Arc::new(keep));
        self
    }

    /// Loads the tensors `filter` selects (default: all).
    pub fn select(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Which tensors the load selects.
    pub fn selection(&self) -> &Filter {
        &self.filter
    }

    /// Converts F16/BF16/F32 tensors to `dtype` (one of those three) while loading.
    pub fn convert_to(mut self, dtype: Dtype) -> Self {
        self.convert_to = Some(dtype);
        self
    }

    /// Asks for transparent huge pages for CPU memory (see
    /// [`weightlift_device::HostBuffer::with_huge_pages`] for when it helps and hurts).
    pub fn huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// The pinned staging pool of GPU loads (default 4 x 32 MiB): the only host memory such
    /// a load uses for tensor bytes.
    pub fn staging(mut self, staging: StagingOptions) -> Self {
        self.staging = staging;
        self
    }

    /// Copy streams of GPU loads (default 2).
    pub fn streams(mut self, streams: usize) -> Self {
        self.streams = streams.max(1);
        self
    }

    /// After an owned CPU load, drops the bytes it read from the page cache
    /// (`POSIX_FADV_DONTNEED` on the ranges read), so that the cache does not hold a second
    /// copy of the model (default: off).
    pub fn drop_cache(mut self, on: bool) -> Self {
        self.drop_cache = on;
        self
    }

    /// Loads only the block `block(name, shape)` gives of each tensor (`None`: all of it):
    /// one planned load whose requests cover the byte runs of every tensor's block,
    /// coalesced across tensors (tensor-parallel shards).
    pub fn slices(
        mut self,
        block: impl Fn(&str, &[usize]) -> Option<Vec<std::ops::Range<usize>>> + Send + Sync + 'static,
    ) -> Self {
        self.slices = Some(Arc::new(block));
        self
    }

    /// The most unselected bytes read (and dropped) between two runs to save a request
    /// (default [`DEFAULT_MAX_GAP`]): only bytes of the tensors on either side, which a
    /// slice plan selects in part (the other ranks' rows or columns), never a tensor the load
    /// did not select. 0 reads exactly the selected bytes, in a request per run that is not
    /// next to the one before.
    pub fn max_gap(mut self, bytes: u64) -> Self {
        self.max_gap = bytes;
        self
    }

    /// Stops the load before its next request once `flag` is set (by another thread): it
    /// then fails with [`crate::Error::Cancelled`]. How a load started ahead of need is
    /// called off when nobody wants its result any more.
    pub fn cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// The memory budget and prefetch window of this load (default: the checkpoint's, see
    /// [`crate::OpenOptions::memory_budget`]): an owned CPU load needing more than the budget
    /// fails at planning; a mapped load populates at most the window up front; a prefetch
    /// runs at most the window ahead of its reader.
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.memory_budget = Some(budget);
        self
    }

    /// The budget a load of `ckpt` runs under: the options', else the checkpoint's.
    pub(crate) fn budget_in(&self, ckpt: &crate::Checkpoint) -> MemoryBudget {
        self.memory_budget
            .clone()
            .unwrap_or_else(|| ckpt.budget().clone())
    }

    /// Reports progress to `f`, once per completed read, from loader threads.
    pub fn progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }
}
