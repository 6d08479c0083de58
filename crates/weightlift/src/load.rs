//! Running a load: the plan's requests are read in parallel on a rayon pool, each landing
//! in its region of the target's memory. This is the loop that moves bytes.

use crate::checkpoint::Checkpoint;
use crate::convert::{convert, converted, is_conversion_target};
use crate::error::{Error, Result};
use crate::plan::{ReadPlan, Request};
use crate::progress::{Progress, ProgressFn};
use crate::tensor::{StateDict, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use weightlift_device::{
    CopyEngine, CpuTarget, Device, DeviceError, Region, StagedTarget, StagingOptions, Target,
};
use weightlift_format::Dtype;
use weightlift_storage::AccessPattern;

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
    fn matches(&self, name: &str) -> bool {
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

    /// Reports progress to `f`.
    pub fn progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }
}

/// A staged target on GPU `ordinal` (feature `cuda`); without the feature, an error that
/// says so.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_target(
    ordinal: usize,
    streams: usize,
    staging: StagingOptions,
) -> Result<StagedTarget<weightlift_device::CudaEngine>> {
    let engine = weightlift_device::CudaEngine::new(ordinal, streams)?;
    Ok(StagedTarget::new(engine, staging)?)
}

/// See the `cuda` version: this build cannot load to GPUs, so this only ever returns the
/// error (the engine type merely fills the signature).
#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_target(
    ordinal: usize,
    _streams: usize,
    _staging: StagingOptions,
) -> Result<StagedTarget<weightlift_device::fake::FakeEngine>> {
    Err(Error::Device(DeviceError::Unavailable {
        device: Device::Cuda(ordinal).to_string(),
        reason: "this build of weightlift has no CUDA support (cargo feature `cuda`)".into(),
    }))
}

/// A rayon pool of `threads` threads named `name-N`.
pub(crate) fn thread_pool(threads: usize, name: &'static str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool {
            threads,
            reason: e.to_string(),
        })
}

/// Default loader threads: reads block in the kernel, so more threads than cores keep the
/// device queue full; page faults on fresh memory scale with cores too.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .max(4)
}

impl Checkpoint {
    /// Loader threads a load uses when its options leave the number open: the number of
    /// CPUs (at least 4), or the requests allowed in flight for a checkpoint read from URLs.
    pub fn default_threads(&self) -> usize {
        #[cfg(feature = "remote")]
        if let Some(threads) = self.remote_threads() {
            return threads;
        }
        default_threads()
    }

    /// Loads the selected tensors (all by default) onto the options' device.
    ///
    /// Either every selected tensor is returned, complete, or an error: nothing is returned
    /// partially loaded.
    pub fn load(&self, options: &LoadOptions) -> Result<StateDict> {
        if let Device::Cuda(ordinal) = options.device {
            // The staged load selects and plans for itself.
            return self.load_staged(
                &cuda_target(ordinal, options.streams, options.staging)?,
                options,
            );
        }
        let (selected, convert_fn) = self.selection(options)?;
        if options.device == Device::Meta {
            return Ok(self.meta_tensors(&selected, convert_fn));
        }
        let plan = self.plan(selected, options, None, convert_fn);
        let target = CpuTarget {
            huge_pages: options.huge_pages,
        };
        let memories = self.run(&plan, &target, options)?;
        let tensors = self.tensors_in(&plan, memories, |memory| Storage::Host {
            memory: Arc::new(memory),
            offset: 0,
        });
        Ok(StateDict::new(tensors))
    }

    /// The read plan of the selected tensors; `max_dst` caps a request's destination span.
    fn plan(
        &self,
        selected: Vec<Vec<u32>>,
        options: &LoadOptions,
        max_dst: Option<u64>,
        convert_fn: impl Fn(Dtype) -> Dtype,
    ) -> ReadPlan {
        let headers: Vec<_> = self.shards().iter().map(|s| s.header()).collect();
        ReadPlan::build(
            &headers,
            selected,
            options.request_size,
            max_dst,
            convert_fn,
        )
    }

    /// The tensors of an executed plan: `shared` turns each shard's allocation into a
    /// storage its tensors share, each at its slot's offset.
    fn tensors_in<M>(
        &self,
        plan: &ReadPlan,
        memories: Vec<M>,
        shared: impl Fn(M) -> Storage,
    ) -> Vec<Tensor> {
        let mut tensors = Vec::with_capacity(plan.shards.iter().map(|s| s.tensors.len()).sum());
        for (sp, memory) in plan.shards.iter().zip(memories) {
            let base = shared(memory);
            let infos = self.shards()[sp.shard].header().tensors();
            for (slot, &t) in sp.tensors.iter().enumerate() {
                tensors.push(Tensor::from_info(
                    &infos[t as usize],
                    sp.out_dtypes[slot],
                    base.at(sp.layout.offset(slot)),
                ));
            }
        }
        tensors
    }

    /// The tensors a load selects (positions per shard, in file order) and the dtype each
    /// becomes.
    fn selection(
        &self,
        options: &LoadOptions,
    ) -> Result<(Vec<Vec<u32>>, impl Fn(Dtype) -> Dtype + use<>)> {
        let to = options.convert_to;
        if let Some(to) = to.filter(|&d| !is_conversion_target(d)) {
            return Err(Error::InvalidOption(format!(
                "cannot convert to {to}: conversion targets are F16, BF16 and F32"
            )));
        }
        let selected: Vec<Vec<u32>> = self
            .shards()
            .iter()
            .map(|s| {
                s.header()
                    .tensors()
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| options.filter.matches(&t.name))
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .collect();
        let convert_fn = move |d: Dtype| to.map_or(d, |to| converted(d, to));
        Ok((selected, convert_fn))
    }

    /// Loads the selected tensors into device memory through `target`'s pinned staging
    /// pool: what `load` does for `Device::Cuda`, open to any [`CopyEngine`] (the tests
    /// run it on [`weightlift_device::fake::FakeEngine`]). One device allocation per shard;
    /// each request is read into a staging buffer (converted there if asked) and copied
    /// asynchronously while the next requests are read. The device is the target's;
    /// `options.device` is not consulted.
    pub fn load_staged<E: CopyEngine>(
        &self,
        target: &StagedTarget<E>,
        options: &LoadOptions,
    ) -> Result<StateDict> {
        let (selected, convert_fn) = self.selection(options)?;
        let plan = self.plan(selected, options, target.max_region(), convert_fn);
        let memories = self.run(&plan, target, options)?;
        let tensors = self.tensors_in(&plan, memories, |memory| Storage::Device {
            memory: Arc::new(memory),
            offset: 0,
        });
        Ok(StateDict::new(tensors).with_staging(target.stats()))
    }

    fn meta_tensors(
        &self,
        selected: &[Vec<u32>],
        convert_fn: impl Fn(Dtype) -> Dtype,
    ) -> StateDict {
        let mut tensors = Vec::with_capacity(selected.iter().map(Vec::len).sum());
        for (shard, picks) in self.shards().iter().zip(selected) {
            for &i in picks {
                let info = &shard.header().tensors()[i as usize];
                tensors.push(Tensor::from_info(
                    info,
                    convert_fn(info.dtype),
                    Storage::Meta,
                ));
            }
        }
        StateDict::new(tensors)
    }

    /// Executes `plan` into `target`: one allocation per shard, one region per request,
    /// all requests in parallel.
    pub(crate) fn run<T: Target>(
        &self,
        plan: &ReadPlan,
        target: &T,
        options: &LoadOptions,
    ) -> Result<Vec<T::Memory>> {
        let threads = options.threads.unwrap_or_else(|| self.default_threads());
        let pool = thread_pool(threads, "weightlift")?;
        for sp in &plan.shards {
            let header = self.shards()[sp.shard].header();
            // Under half of the shard selected: keep the kernel from reading the rest ahead.
            let pattern = if sp.bytes * 2 < header.data_len() {
                AccessPattern::Sparse
            } else {
                AccessPattern::Sequential
            };
            self.shards()[sp.shard].source().hint(pattern);
        }
        let mut allocs = plan
            .shards
            .iter()
            .map(|sp| target.allocate(sp.layout.total()))
            .collect::<Result<Vec<_>, DeviceError>>()?;
        let mut work = Vec::with_capacity(plan.requests.len());
        for (sp, alloc) in plan.shards.iter().zip(allocs.iter_mut()) {
            let requests = &plan.requests[sp.requests.clone()];
            let ranges: Vec<_> = requests.iter().map(|r| r.dst.clone()).collect();
            work.extend(requests.iter().zip(target.regions(alloc, &ranges)?));
        }
        let counters = Counters::new(plan);
        let filled = pool.install(|| {
            work.into_par_iter()
                .with_max_len(1)
                .try_for_each(|(request, mut region)| {
                    region.fill(|buf| self.fill_request(plan, request, buf))?;
                    counters.done(plan, request, options.progress.as_deref());
                    Ok::<(), Error>(())
                })
        });
        if let Err(e) = filled {
            // Copies still in flight may target the allocations about to be dropped.
            let _ = target.settle();
            return Err(e);
        }
        allocs
            .into_iter()
            .map(|a| target.finish(a).map_err(Error::from))
            .collect()
    }

    /// Reads one request into `buf` (its destination range): one scatter read straight
    /// into the tensors' slots, skipping alignment padding; converted pieces go through a
    /// per-thread scratch buffer.
    fn fill_request(&self, plan: &ReadPlan, request: &Request, buf: &mut [u8]) -> Result<()> {
        let sp = &plan.shards[request.shard_plan as usize];
        let shard = &self.shards()[sp.shard];
        let infos = shard.header().tensors();
        let pieces = &plan.pieces[request.pieces.start as usize..request.pieces.end as usize];
        let needs_conversion = |slot: u32| {
            infos[sp.tensors[slot as usize] as usize].dtype != sp.out_dtypes[slot as usize]
        };
        let scratch_len: u64 = pieces
            .iter()
            .filter(|p| needs_conversion(p.slot))
            .map(|p| p.len)
            .sum();

        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < scratch_len as usize {
                scratch.resize(scratch_len as usize, 0);
            }
            let mut slices: Vec<&mut [u8]> = Vec::with_capacity(pieces.len());
            let mut rest_dst = &mut *buf;
            let mut dst_at = request.dst.start;
            let mut rest_scratch = &mut scratch[..scratch_len as usize];
            let mut conversions = Vec::new();
            for p in pieces {
                let (_, tail) =
                    std::mem::take(&mut rest_dst).split_at_mut((p.dst - dst_at) as usize);
                let (dst, tail) = tail.split_at_mut(p.dst_len as usize);
                rest_dst = tail;
                dst_at = p.dst + p.dst_len;
                if needs_conversion(p.slot) {
                    let (src, tail) =
                        std::mem::take(&mut rest_scratch).split_at_mut(p.len as usize);
                    rest_scratch = tail;
                    slices.push(src);
                    conversions.push((p.slot, dst));
                } else {
                    slices.push(dst);
                }
            }
            shard
                .source()
                .read_scatter_at(request.file_offset, &mut slices)
                .map_err(|source| self.read_error(plan, request, source))?;
            drop(slices);
            let mut src_at = 0usize;
            for (slot, dst) in conversions {
                let from = infos[sp.tensors[slot as usize] as usize].dtype;
                let to = sp.out_dtypes[slot as usize];
                let src_len = dst.len() * from.bits() / to.bits();
                convert(from, to, &scratch[src_at..src_at + src_len], dst);
                src_at += src_len;
            }
            Ok(())
        })
    }

    /// Names the tensor a failed read was for: the first of the request that runs past the
    /// file's current end (a file that shrank), else the request's first tensor.
    fn read_error(&self, plan: &ReadPlan, request: &Request, source: std::io::Error) -> Error {
        let sp = &plan.shards[request.shard_plan as usize];
        let shard = &self.shards()[sp.shard];
        let infos = shard.header().tensors();
        let current_len = std::fs::metadata(shard.path())
            .map(|m| m.len())
            .unwrap_or(0);
        let data_start = shard.header().data_start();
        let pieces = &plan.pieces[request.pieces.start as usize..request.pieces.end as usize];
        let tensor_of = |slot: u32| &infos[sp.tensors[slot as usize] as usize];
        let culprit = pieces
            .iter()
            .map(|p| tensor_of(p.slot))
            .find(|t| data_start + t.data_offsets.1 > current_len)
            .or_else(|| pieces.first().map(|p| tensor_of(p.slot)));
        Error::Read {
            path: shard.path().to_path_buf(),
            tensor: culprit.map(|t| t.name.clone()).unwrap_or_default(),
            source,
        }
    }
}

thread_local! {
    /// Per-thread staging for converted pieces: bounded by the request size.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Byte counters for progress reports.
struct Counters {
    total: AtomicU64,
    per_file: Vec<AtomicU64>,
    bytes_total: u64,
}

impl Counters {
    fn new(plan: &ReadPlan) -> Counters {
        Counters {
            total: AtomicU64::new(0),
            per_file: plan.shards.iter().map(|_| AtomicU64::new(0)).collect(),
            bytes_total: plan.bytes,
        }
    }

    fn done(
        &self,
        plan: &ReadPlan,
        request: &Request,
        progress: Option<&(dyn Fn(&Progress) + Send + Sync)>,
    ) {
        let bytes_done = self.total.fetch_add(request.len, Ordering::Relaxed) + request.len;
        let file_done = self.per_file[request.shard_plan as usize]
            .fetch_add(request.len, Ordering::Relaxed)
            + request.len;
        if let Some(report) = progress {
            let sp = &plan.shards[request.shard_plan as usize];
            report(&Progress {
                file: sp.shard,
                file_bytes_done: file_done,
                file_bytes_total: sp.bytes,
                bytes_done,
                bytes_total: self.bytes_total,
            });
        }
    }
}
