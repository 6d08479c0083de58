//! On-demand access without loading the whole checkpoint: one tensor, a slice of one
//! (reading only its byte runs), or zero-copy views into the shards' mappings.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::mapping::Use;
use crate::memory::HostMemory;
use crate::shard::Shard;
use crate::slice::{self, SlicePlan};
use crate::tensor::{Storage, Tensor, TensorView};
use std::ops::Range;
use std::sync::Arc;
use weightlift_device::HostBuffer;
use weightlift_format::TensorInfo;

impl Checkpoint {
    /// Reads one tensor (see [`Checkpoint::get_slice`]).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.get_slice(name, &[])
    }

    /// Reads the sub-block `ranges` of a tensor: one range per leading dimension (missing
    /// trailing dimensions are taken whole), e.g. `&[0..rows, c0..c1]` for a column shard
    /// of a matrix. Reads only the bytes of the slice: one run per contiguous block.
    ///
    /// Where the checkpoint's [`crate::Mapping`] maps the tensor's file, the block comes from
    /// the file's private mapping (shared with mapped loads and views while any of them
    /// lives): its pages are populated in one call, then a block whose bytes are contiguous
    /// (the whole tensor, or ranges on its leading dimension) is a view of the mapping, any
    /// other block a copy out of it. Elsewhere it is read into memory of its own.
    pub fn get_slice(&self, name: &str, ranges: &[Range<usize>]) -> Result<Tensor> {
        self.read_slice(name, ranges, true)
    }

    /// [`Checkpoint::get_slice`]; `populate`: whether a mapped block's pages are populated
    /// here (where the checkpoint fits the window), or left to the prefetch that serves the
    /// read (see [`crate::Prefetch`]) and to the touches that follow.
    pub(crate) fn read_slice(
        &self,
        name: &str,
        ranges: &[Range<usize>],
        populate: bool,
    ) -> Result<Tensor> {
        let (s, t) = self
            .locate(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let shard = &self.shards()[s];
        let info = &shard.header().tensors()[t];
        let plan = slice_plan(info, ranges)?;
        let (map, _) = shard.maps(self.mapping(), Use::Read)?;
        let base = shard.header().data_start() + info.data_offsets.0;
        let total: u64 = plan.runs.iter().map(|r| r.1).sum();
        let storage = if map {
            // SAFETY: the policy maps only under a `Mapping` made by its unsafe
            // constructors, whose contract the caller took on when opening the checkpoint.
            let memory = unsafe { shard.mapping() }?;
            let fits = self.fits_window();
            from_mapping(shard, info, &plan, memory, base, fits, populate)?
        } else {
            let mut buf = HostBuffer::new(total)?;
            let mut out = buf.as_mut_slice();
            for &(offset, len) in &plan.runs {
                let (dst, rest) = std::mem::take(&mut out).split_at_mut(len as usize);
                out = rest;
                shard
                    .source()
                    .read_exact_at(base + offset, dst)
                    .map_err(|source| Error::Read {
                        location: shard.location().clone(),
                        tensor: name.to_string(),
                        source,
                    })?;
            }
            Storage::Host {
                memory: Arc::new(HostMemory::owned(buf)),
                offset: 0,
            }
        };
        Ok(Tensor {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: plan.shape,
            byte_len: total as usize,
            storage,
        })
    }

    /// Starts reading every shard into the page cache in the background (the kernel's
    /// readahead, asked with `POSIX_FADV_WILLNEED` from a thread of its own), where the
    /// checkpoint fits the prefetch window: for a caller with other work to do before it
    /// reads (planning a load, say). Returns whether it did; on a host short of memory it
    /// does nothing (the bytes would evict each other before they are read).
    pub fn read_ahead(self: &std::sync::Arc<Self>) -> bool {
        if !self.fits_window() {
            return false;
        }
        let ckpt = std::sync::Arc::clone(self);
        std::thread::Builder::new()
            .name("weightlift-readahead".into())
            .spawn(move || {
                for shard in ckpt.shards() {
                    let header = shard.header();
                    shard
                        .source()
                        .will_need(0, header.data_start() + header.data_len());
                }
            })
            .is_ok()
    }

    /// Maps every shard for zero-copy access (the shards' own mappings, shared with mapped
    /// loads and reads). Views borrow the returned value, which borrows the checkpoint: the
    /// compiler rejects any view that outlives either.
    ///
    /// # Safety
    ///
    /// No shard may be truncated or modified while the mapping lives: a truncated file
    /// raises `SIGBUS` on access, and a modified one changes bytes that views hand out as
    /// immutable.
    pub unsafe fn map(&self) -> Result<MappedCheckpoint<'_>> {
        let maps = self
            .shards()
            .iter()
            // SAFETY: passed on from this function's contract.
            .map(|s| unsafe { s.mapping() })
            .collect::<Result<Vec<_>>>()?;
        Ok(MappedCheckpoint {
            checkpoint: self,
            maps,
        })
    }
}

/// The block `plan` of a tensor at `base` in a shard's mapping: its pages populated, then a
/// view where the block is one run, else a copy of its runs.
fn from_mapping(
    shard: &Shard,
    info: &TensorInfo,
    plan: &SlicePlan,
    memory: Arc<HostMemory>,
    base: u64,
    fits: bool,
    populate: bool,
) -> Result<Storage> {
    let map = memory
        .mapping()
        .expect("a shard's mapping is a mapped file");
    // Populated in one call where the checkpoint (`whole` bytes) fits the prefetch window;
    // where it does not (a host short of memory), populating each read's pages ahead of the touch that follows
    // measured 4-30% of the file read twice (they were evicted in between): the touch faults
    // them in instead, with the kernel's readahead.
    // Where it does not fit, the ranges read lately are marked the first to reclaim; where it
    // does, they are left alone: marking clears the pages' accessed bits, which made the
    // touches that follow 3.5x slower (4,827 tensors, 1.3 GB: 0.15 s against 0.043 s).
    if let (Some(first), Some(last)) = (plan.runs.first(), plan.runs.last()) {
        let (start, end) = (base + first.0, base + last.0 + last.1);
        if !fits {
            shard.read_mapped(map, start..end);
        } else if populate {
            map.populate(start, end - start)
                .map_err(|source| Error::Read {
                    location: shard.location().clone(),
                    tensor: info.name.clone(),
                    source,
                })?;
        }
    }
    Ok(match plan.runs.as_slice() {
        [] => Storage::Host {
            memory,
            offset: base as usize,
        },
        [(offset, _)] => Storage::Host {
            memory,
            offset: (base + offset) as usize,
        },
        runs => {
            let total: u64 = runs.iter().map(|r| r.1).sum();
            let mut buf = HostBuffer::new(total)?;
            let mut at = 0usize;
            for &(offset, len) in runs {
                let from = (base + offset) as usize;
                buf.as_mut_slice()[at..at + len as usize]
                    .copy_from_slice(&memory.as_slice()[from..from + len as usize]);
                at += len as usize;
            }
            Storage::Host {
                memory: Arc::new(HostMemory::owned(buf)),
                offset: 0,
            }
        }
    })
}

/// The byte runs of `ranges` of a tensor (the whole tensor for no ranges).
fn slice_plan(info: &TensorInfo, ranges: &[Range<usize>]) -> Result<SlicePlan> {
    if ranges.is_empty() {
        // The whole tensor: one run, for every dtype (sub-byte ones included).
        return Ok(SlicePlan {
            shape: info.shape.clone(),
            runs: vec![(0, info.byte_len())],
        });
    }
    slice::plan(&info.shape, ranges, info.dtype.bits() as u64).map_err(|reason| {
        Error::InvalidSlice {
            tensor: info.name.clone(),
            reason,
        }
    })
}

/// A checkpoint whose shards are memory-mapped; hands out zero-copy [`TensorView`]s.
///
/// A view cannot outlive the mapping (nor the mapping the checkpoint); this does not
/// compile:
///
/// ```compile_fail,E0597
/// let view = {
///     let ckpt = weightlift::Checkpoint::open("model.safetensors").unwrap();
///     // SAFETY: the file is not modified while mapped.
///     let mapped = unsafe { ckpt.map() }.unwrap();
///     mapped.view("w").unwrap()
/// };
/// println!("{:?}", view.bytes);
/// ```
#[derive(Debug)]
pub struct MappedCheckpoint<'a> {
    checkpoint: &'a Checkpoint,
    maps: Vec<Arc<HostMemory>>,
}

impl MappedCheckpoint<'_> {
    /// A zero-copy view of the tensor called `name`.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let (s, t) = self
            .checkpoint
            .locate(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(self.view_at(s, t))
    }

    /// Views of every tensor, shard by shard in file order.
    pub fn views(&self) -> impl Iterator<Item = TensorView<'_>> + '_ {
        self.checkpoint
            .shards()
            .iter()
            .enumerate()
            .flat_map(move |(s, shard)| (0..shard.header().len()).map(move |t| self.view_at(s, t)))
    }

    fn view_at(&self, s: usize, t: usize) -> TensorView<'_> {
        let shard = &self.checkpoint.shards()[s];
        let info = &shard.header().tensors()[t];
        let start = (shard.header().data_start() + info.data_offsets.0) as usize;
        let end = (shard.header().data_start() + info.data_offsets.1) as usize;
        TensorView {
            name: &info.name,
            dtype: info.dtype,
            shape: &info.shape,
            // In bounds: the shard's mapping was checked to be at least as long as its
            // header says.
            bytes: &self.maps[s].as_slice()[start..end],
        }
    }
}
