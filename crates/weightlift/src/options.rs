//! What a load reads and where it puts it: [`LoadOptions`] and the tensor [`Filter`].

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

/// Whether a CPU load may leave tensors in private (copy-on-write) mappings of the files
/// instead of copying them into memory of its own.
///
/// A mapped load reads nothing into new memory: the page cache's pages are mapped in place
/// (populated up front, in parallel, in large ranges), so it costs what reading the file
/// costs and no more, and the page cache does not hold a second copy of the model. Tensors
/// are writable; writes go to private copies of the pages, never to the file. The price is
/// the contract of every file mapping, which is why the constructors that allow it are
/// `unsafe`: nobody may truncate or rewrite the files while the tensors live (a truncated
/// mapping raises `SIGBUS` when touched; a rewritten one shows the new bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mapping(MapChoice);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum MapChoice {
    #[default]
    Never,
    Always,
    Auto,
}

impl Mapping {
    /// Copy every tensor into owned memory (the default).
    pub fn never() -> Mapping {
        Mapping(MapChoice::Never)
    }

    /// Map every local file; URLs are an error.
    ///
    /// # Safety
    ///
    /// No file of the checkpoint may be truncated or modified while any tensor of the load
    /// lives (see [`Mapping`]).
    pub unsafe fn always() -> Mapping {
        Mapping(MapChoice::Always)
    }

    /// Map files on local block-device filesystems and in memory (tmpfs); load owned copies
    /// from network and FUSE filesystems and URLs, and of shards whose tensors are converted
    /// (`weightlift_storage::map_advice` is the rule). The reason per file is in
    /// [`crate::StateDict::files`].
    ///
    /// # Safety
    ///
    /// As [`Mapping::always`], for the files that end up mapped.
    pub unsafe fn auto() -> Mapping {
        Mapping(MapChoice::Auto)
    }

    pub(crate) fn is_never(self) -> bool {
        self.0 == MapChoice::Never
    }

    pub(crate) fn is_auto(self) -> bool {
        self.0 == MapChoice::Auto
    }
}

/// Which block of a tensor to load, by name and shape: one range per leading dimension (as
/// [`crate::Checkpoint::get_slice`] takes them), or `None` for the whole tensor.
pub type SliceFn = Arc<dyn Fn(&str, &[usize]) -> Option<Vec<std::ops::Range<usize>>> + Send + Sync>;

/// Default bound on the unselected bytes a slice plan reads between two runs (see
/// [`LoadOptions::max_gap`]).
pub const DEFAULT_MAX_GAP: u64 = 4096;

/// How to load.
#[derive(Clone)]
pub struct LoadOptions {
    /// Where tensors go (default: CPU).
    pub device: Device,
    /// Loader threads (default: the number of CPUs, at least 4, since reads block).
    pub threads: Option<usize>,
    /// Size of one coalesced read in bytes.
    pub request_size: u64,
    /// Which tensors to load.
    pub filter: Filter,
    /// Convert F16/BF16/F32 tensors to this dtype while loading.
    pub convert_to: Option<Dtype>,
    /// Called after every completed read.
    pub progress: Option<ProgressFn>,
    /// Ask for transparent huge pages for CPU memory (see
    /// [`weightlift_device::HostBuffer::with_huge_pages`] for when it helps and hurts).
    pub huge_pages: bool,
    /// Pinned staging buffers for loads to a GPU (default 4 x 32 MiB): the only host
    /// memory such a load uses for tensor bytes.
    pub staging: StagingOptions,
    /// Copy streams for loads to a GPU (default 2).
    pub streams: usize,
    /// Whether CPU loads may map files instead of copying them (default: never).
    pub mapping: Mapping,
    /// After an owned CPU load, drop the bytes it read from the page cache
    /// (`POSIX_FADV_DONTNEED` on the ranges read), so that the cache does not hold a second
    /// copy of the model (default: off).
    pub drop_cache: bool,
    /// When set (by another thread), the load stops before its next request and fails with
    /// [`crate::Error::Cancelled`]: how a load started ahead of need (a prefetch) is called
    /// off when nobody wants its result any more.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Load only a block of some tensors (tensor-parallel shards): one planned load whose
    /// requests cover the byte runs of every tensor's block, coalesced across tensors.
    pub slices: Option<SliceFn>,
    /// With `slices`: the most unselected bytes read between two runs to save a request
    /// (default 4 KiB, and never more than 1/32 of the run that follows, so a slice plan reads
    /// at most ~3% more than its slices).
    pub max_gap: u64,
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
            mapping: Mapping::never(),
            drop_cache: false,
            cancel: None,
            slices: None,
            max_gap: DEFAULT_MAX_GAP,
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
            .field("mapping", &self.mapping)
            .field("drop_cache", &self.drop_cache)
            .field("cancel", &self.cancel.is_some())
            .field("slices", &self.slices.as_ref().map(|_| ".."))
            .field("max_gap", &self.max_gap)
            .finish()
    }
}

impl LoadOptions {
    /// Sets the target device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Sets the number of loader threads.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Sets the coalesced read size.
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

    /// Converts F16/BF16/F32 tensors to `dtype` (one of those three) while loading.
    pub fn convert_to(mut self, dtype: Dtype) -> Self {
        self.convert_to = Some(dtype);
        self
    }

    /// Asks for transparent huge pages for CPU memory.
    pub fn huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// Sets the pinned staging pool of GPU loads.
    pub fn staging(mut self, staging: StagingOptions) -> Self {
        self.staging = staging;
        self
    }

    /// Lets CPU loads map files (see [`Mapping`]).
    pub fn mapping(mut self, mapping: Mapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// Drops what an owned CPU load read from the page cache (see [`LoadOptions::drop_cache`]).
    pub fn drop_cache(mut self, on: bool) -> Self {
        self.drop_cache = on;
        self
    }

    /// Loads only the block `block(name, shape)` gives of each tensor (`None`: all of it).
    pub fn slices(
        mut self,
        block: impl Fn(&str, &[usize]) -> Option<Vec<std::ops::Range<usize>>> + Send + Sync + 'static,
    ) -> Self {
        self.slices = Some(Arc::new(block));
        self
    }

    /// Stops the load before its next request once `flag` is set.
    pub fn cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Reports progress to `f`.
    pub fn progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }
}
