//! Loads read by several processes at once (ranks of a tensor- or expert-parallel job):
//! each rank reads a byte-balanced, file-contiguous share of the plan's requests into
//! allocations of the full size, then the ranks exchange their shares with whatever
//! transport they have (`torch.distributed` in the Python package), so that every rank ends
//! with every tensor while the storage is read once.
//!
//! ```no_run
//! # use weightlift::{Checkpoint, LoadOptions, Share};
//! # fn broadcast(_from: usize, _bytes: &mut [u8]) {}
//! let ckpt = Checkpoint::open("model/")?;
//! let mut load = ckpt.load_share(&LoadOptions::default(), Share { rank: 1, world: 4 })?;
//! for i in 0..load.spans().len() {
//!     let owner = load.spans()[i].owner;
//!     // The owner sends its bytes, the others receive them in place.
//!     broadcast(owner, load.span_mut(i).expect("host memory"));
//! }
//! let state = load.finish();
//! # Ok::<(), weightlift::Error>(())
//! ```

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::exec::Exec;
use crate::memory::HostMemory;
use crate::options::LoadOptions;
use crate::plan::ReadPlan;
use crate::tensor::{FileReport, Placement, StateDict, Storage};
use std::ops::Range;
use std::sync::Arc;
use weightlift_device::{CopyEngine, CpuTarget, Device, DeviceMemory, HostBuffer, StagedTarget};

/// The smallest request a shared load splits its plan into (see `share_into`).
const MIN_SHARED_REQUEST: u64 = 64 << 10;

/// Which share of a load this process reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This process's position, `0..world`.
    pub rank: usize,
    /// How many processes share the load.
    pub world: usize,
}

/// Bytes one rank read and the others must receive: `range` of allocation `allocation`
/// (allocations are one per shard read, in the order of the load's tensors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpan {
    /// The rank that read them.
    pub owner: usize,
    /// Which allocation.
    pub allocation: usize,
    /// Where in it (alignment padding between tensors included).
    pub range: Range<u64>,
}

enum Memory {
    Host(HostBuffer),
    Device(Arc<dyn DeviceMemory>),
}

/// A load whose share this rank has read: allocations of the full size, exchange spans to
/// fill the rest, then [`SharedLoad::finish`] for the tensors.
pub struct SharedLoad<'c> {
    ckpt: &'c Checkpoint,
    plan: ReadPlan,
    share: Share,
    memories: Vec<Memory>,
    spans: Vec<ExchangeSpan>,
}

impl std::fmt::Debug for SharedLoad<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLoad")
            .field("share", &self.share)
            .field("allocations", &self.memories.len())
            .field("spans", &self.spans)
            .finish()
    }
}

impl Checkpoint {
    /// Reads `share`'s part of the load `options` describes into owned CPU memory (or, for
    /// `Device::Cuda`, device memory through the staged pipeline). Every rank must pass the
    /// same options: the plan, and so the shares, depend on them.
    pub fn load_share(&self, options: &LoadOptions, share: Share) -> Result<SharedLoad<'_>> {
        match options.device {
            Device::Cpu => {
                let target = CpuTarget {
                    huge_pages: options.huge_pages,
                };
                self.share_into(&target, None, options, share, Memory::Host)
            }
            Device::Meta => Err(Error::InvalidOption(
                "a meta load reads nothing: there is nothing to share".into(),
            )),
            Device::Cuda(ordinal) => self.share_cuda(ordinal, options, share),
        }
    }

    #[cfg(feature = "cuda")]
    fn share_cuda(
        &self,
        ordinal: usize,
        options: &LoadOptions,
        share: Share,
    ) -> Result<SharedLoad<'_>> {
        let target = StagedTarget::cuda(ordinal, options.streams, options.staging)?;
        self.load_staged_share(&target, options, share)
    }

    #[cfg(not(feature = "cuda"))]
    fn share_cuda(&self, ordinal: usize, _: &LoadOptions, _: Share) -> Result<SharedLoad<'_>> {
        Err(weightlift_device::cuda_not_built(ordinal).into())
    }

    /// [`Checkpoint::load_share`] into the device memory of `target` (any [`CopyEngine`]).
    pub fn load_staged_share<E: CopyEngine>(
        &self,
        target: &StagedTarget<E>,
        options: &LoadOptions,
        share: Share,
    ) -> Result<SharedLoad<'_>> {
        let max = weightlift_device::Target::max_region(target);
        self.share_into(target, max, options, share, |m| {
            Memory::Device(Arc::new(m) as Arc<dyn DeviceMemory>)
        })
    }

    fn share_into<T: weightlift_device::Target>(
        &self,
        target: &T,
        max_dst: Option<u64>,
        options: &LoadOptions,
        share: Share,
        wrap: impl Fn(T::Memory) -> Memory,
    ) -> Result<SharedLoad<'_>> {
        if share.world == 0 || share.rank >= share.world {
            return Err(Error::InvalidOption(format!(
                "rank {} of a world of {}",
                share.rank, share.world
            )));
        }
        let (selected, convert_fn) = self.selection(options)?;
        let mut plan = self.plan(selected.clone(), options, max_dst, &convert_fn);
        // Shares end on request boundaries: requests small against a share keep the ranks'
        // bytes within a few percent of each other (1/64 of a share, not under 64 KiB).
        let total: u64 = plan.requests.iter().map(|r| r.len).sum();
        let balanced = (total / (share.world as u64 * 64)).max(MIN_SHARED_REQUEST);
        if balanced < options.request_size {
            let options = options.clone().request_size(balanced);
            plan = self.plan(selected, &options, max_dst, &convert_fn);
        }
        if max_dst.is_none() {
            // Host memory: every rank holds every tensor.
            self.check_fits_cpu(&plan, options)?;
        }
        let part = plan.share(share.rank, share.world);
        let progress = self.progress_sink(options, plan.bytes);
        let pool = self.pool(options)?;
        let run = Exec {
            shards: self.shards(),
            plan: &plan,
            pool: &pool,
            progress: &progress,
            cancel: options.cancel.as_deref(),
        };
        let memories = run.fill(target, part)?.into_iter().map(wrap).collect();
        let spans = plan
            .spans(share.world)
            .into_iter()
            .map(|(owner, allocation, range)| ExchangeSpan {
                owner,
                allocation,
                range,
            })
            .collect();
        Ok(SharedLoad {
            ckpt: self,
            plan,
            share,
            memories,
            spans,
        })
    }
}

impl Checkpoint {
    /// Tells the page cache that `ranges` (shard position, byte range) will not be read
    /// again, so that a host with less memory than the model does not keep them: after a
    /// shared load, once every rank is done (see [`SharedLoad::read_ranges`]).
    ///
    /// Each range is widened to whole 2 MiB blocks: the kernel drops only the pages and
    /// large folios (up to 2 MiB, aligned to their size) that a range covers whole, and
    /// every rank's range ends where another's begins, inside a folio that neither covers
    /// (two ranks left 432 KiB of a 3-file checkpoint cached that way, in one CI run of
    /// several). Every rank is done reading by then; at most 2 MiB of someone else's pages
    /// on either side of a range go with them.
    pub fn drop_cache(&self, ranges: &[(usize, Range<u64>)]) {
        const BLOCK: u64 = 2 << 20;
        for (shard, range) in ranges {
            if let Some(shard) = self.shards().get(*shard) {
                let start = range.start / BLOCK * BLOCK;
                let end = range.end.div_ceil(BLOCK).saturating_mul(BLOCK);
                shard.source().drop_cache(start, end - start);
            }
        }
    }
}

impl SharedLoad<'_> {
    /// What each rank read, to be exchanged (this rank's own spans included: it sends them).
    pub fn spans(&self) -> &[ExchangeSpan] {
        &self.spans
    }

    /// The bytes of span `i`, in host memory: to send (this rank's) or to receive into.
    /// `None` for a device load (use the finished tensors' device allocations) or a bad `i`.
    pub fn span_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let span = self.spans.get(i)?;
        match self.memories.get_mut(span.allocation)? {
            Memory::Host(buf) => buf
                .as_mut_slice()
                .get_mut(span.range.start as usize..span.range.end as usize),
            Memory::Device(_) => None,
        }
    }

    /// What this load covers, as a number every rank that asked for the same load computes
    /// alike (the checkpoint's location, every tensor's name, dtype and shape as loaded,
    /// and the plan's requests): ranks compare it before exchanging, so that ranks that
    /// were asked for different loads fail together rather than exchange the wrong bytes.
    /// Stable across processes of one build (not across weightlift versions).
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same input gives the same number in every process.
        let mut h = std::hash::DefaultHasher::new();
        self.ckpt.location().to_string().hash(&mut h);
        for sp in &self.plan.shards {
            let infos = self.ckpt.shards()[sp.shard].header().tensors();
            for (slot, &t) in sp.tensors.iter().enumerate() {
                let info = &infos[t as usize];
                let shape = sp.shapes[slot].as_deref().unwrap_or(&info.shape);
                (&info.name, sp.out_dtypes[slot].name(), shape).hash(&mut h);
            }
        }
        (self.plan.requests.len(), self.plan.bytes).hash(&mut h);
        h.finish()
    }

    /// The file ranges the load read, every rank's shares together, as (shard position in
    /// the checkpoint, byte range): the files' headers and data regions. What
    /// [`Checkpoint::drop_cache`] releases once every rank is done reading (after the
    /// exchange): ranks on one host share the page cache, and the pages where one rank's
    /// share meets another's are dropped only by a range that covers both.
    pub fn read_ranges(&self) -> Vec<(usize, Range<u64>)> {
        self.plan
            .shards
            .iter()
            .map(|sp| {
                let header = self.ckpt.shards()[sp.shard].header();
                (sp.shard, 0..header.data_start() + header.data_len())
            })
            .collect()
    }

    /// Bytes this rank read from storage (its share of the requests).
    pub fn bytes_read(&self) -> u64 {
        let part = self.plan.share(self.share.rank, self.share.world);
        self.plan.requests[part].iter().map(|r| r.len).sum()
    }

    /// The tensors, once every span has been exchanged (before, only this rank's share holds
    /// the file's bytes). [`StateDict::files`] reports, per file, the bytes this rank read.
    pub fn finish(self) -> StateDict {
        let part = self.plan.share(self.share.rank, self.share.world);
        let mut read = vec![0u64; self.plan.shards.len()];
        for r in &self.plan.requests[part] {
            read[r.shard_plan as usize] += r.len;
        }
        let device = self.memories.iter().any(|m| matches!(m, Memory::Device(_)));
        let files = self
            .plan
            .shards
            .iter()
            .zip(&read)
            .map(|(sp, &bytes)| {
                let shard = &self.ckpt.shards()[sp.shard];
                FileReport {
                    shard: sp.shard,
                    location: shard.location().clone(),
                    placement: if device {
                        Placement::Device
                    } else {
                        Placement::Owned
                    },
                    reason: format!(
                        "rank {} of {}: read its share, received the rest",
                        self.share.rank, self.share.world
                    ),
                    bytes_read: bytes,
                }
            })
            .collect();
        let tensors = self
            .ckpt
            .shard_tensors(&self.plan, self.memories, |m| match m {
                Memory::Host(buf) => Storage::Host {
                    memory: Arc::new(HostMemory::owned(buf)),
                    offset: 0,
                },
                Memory::Device(memory) => Storage::Device { memory, offset: 0 },
            })
            .into_iter()
            .flat_map(|g| g.1)
            .collect();
        StateDict::new(tensors).with_files(files)
    }
}
