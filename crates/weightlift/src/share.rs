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
//!
//! Or, so that the exchange runs while this rank's share is still being read (the reads of
//! a cold load and the transfers of the exchange overlap, rather than one waiting for the
//! other), [`Checkpoint::plan_share`] and [`SharedLoad::exchange`]:
//!
//! ```no_run
//! # use weightlift::{Checkpoint, Error, LoadOptions, Share};
//! # fn broadcast(_from: usize, _bytes: &mut [u8]) {}
//! # fn all_ok(_mine: Option<&Error>) -> Result<(), String> { Ok(()) }
//! let ckpt = Checkpoint::open("model/")?;
//! let mut load = ckpt.plan_share(&LoadOptions::default(), Share { rank: 1, world: 4 })?;
//! load.exchange(
//!     64 << 20,
//!     |mine| all_ok(mine),                       // every rank's status, once per round
//!     |span, bytes| Ok(broadcast(span.owner, bytes)),
//! )
//! .expect("exchanged");
//! let state = load.finish();
//! # Ok::<(), weightlift::Error>(())
//! ```

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::memory::HostMemory;
use crate::options::LoadOptions;
use crate::plan::{ReadPlan, Request};
use crate::tensor::{FileReport, Placement, StateDict, Storage};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use weightlift_device::{
    CopyEngine, CpuRegion, CpuTarget, Device, DeviceMemory, Region, StagedTarget,
};

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
    /// Owned host memory, and its first byte: the pointer every write into it goes
    /// through (this rank's reads, the exchange), taken once from the buffer before it was
    /// shared (see [`SharedLoad::exchange`] for why the writes never overlap).
    Host(Arc<HostMemory>, Base),
    Device(Arc<dyn DeviceMemory>),
}

/// The first byte of a host allocation of a shared load.
#[derive(Clone, Copy)]
struct Base(*mut u8);

// SAFETY: a `Base` is only dereferenced through `SharedLoad::bytes`, whose callers write
// disjoint ranges from different threads (this rank's reads, the exchange) and read a range
// only once every write into it is done; the allocation it points into is kept alive by the
// `Arc<HostMemory>` beside it.
unsafe impl Send for Base {}
// SAFETY: as for `Send`: shared access never makes two threads touch the same bytes at once.
unsafe impl Sync for Base {}

impl Memory {
    fn host(mut buffer: weightlift_device::HostBuffer) -> Memory {
        let base = Base(buffer.as_mut_slice().as_mut_ptr());
        Memory::Host(Arc::new(HostMemory::owned(buffer)), base)
    }
}

/// What went wrong in [`SharedLoad::exchange`]: this rank's reads, or the caller's
/// transport (its `agree` or `send`).
#[derive(Debug)]
pub enum ExchangeError<E> {
    /// Reading this rank's share failed.
    Load(Error),
    /// The transport failed (or reported another rank's failure).
    Transport(E),
}

impl<E: std::fmt::Display> std::fmt::Display for ExchangeError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Load(e) => write!(f, "reading this rank's share: {e}"),
            ExchangeError::Transport(e) => write!(f, "exchanging the shares: {e}"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for ExchangeError<E> {}

/// A load whose share this rank has read: allocations of the full size, exchange spans to
/// fill the rest, then [`SharedLoad::finish`] for the tensors.
pub struct SharedLoad<'c> {
    ckpt: &'c Checkpoint,
    plan: ReadPlan,
    share: Share,
    memories: Vec<Memory>,
    spans: Vec<ExchangeSpan>,
    /// Whether this rank's share is read (else [`SharedLoad::exchange`] reads it).
    read: bool,
    /// What the reads run with (threads, progress, cancel), for a share not read yet.
    options: LoadOptions,
}

impl std::fmt::Debug for SharedLoad<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLoad")
            .field("share", &self.share)
            .field("allocations", &self.memories.len())
            .field("spans", &self.spans)
            .field("read", &self.read)
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
                self.share_into(&target, None, options, share, true, Memory::host)
            }
            Device::Meta => Err(Error::InvalidOption(
                "a meta load reads nothing: there is nothing to share".into(),
            )),
            Device::Cuda(ordinal) => self.share_cuda(ordinal, options, share),
        }
    }

    /// Plans `share`'s part of the load `options` describes and allocates the host memory
    /// of every tensor, reading nothing: [`SharedLoad::exchange`] reads this rank's share
    /// while exchanging it. CPU loads only (a device load: [`Checkpoint::load_share`]).
    pub fn plan_share(&self, options: &LoadOptions, share: Share) -> Result<SharedLoad<'_>> {
        if options.device != Device::Cpu {
            return Err(Error::InvalidOption(format!(
                "plan_share loads into host memory, not {:?}: use load_share",
                options.device
            )));
        }
        let target = CpuTarget {
            huge_pages: options.huge_pages,
        };
        self.share_into(&target, None, options, share, false, Memory::host)
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
        self.share_into(target, max, options, share, true, |m| {
            Memory::Device(Arc::new(m) as Arc<dyn DeviceMemory>)
        })
    }

    /// Plans the shared load and allocates its memory; reads this rank's share now when
    /// `read` (else [`SharedLoad::exchange`] does).
    fn share_into<T: weightlift_device::Target>(
        &self,
        target: &T,
        max_dst: Option<u64>,
        options: &LoadOptions,
        share: Share,
        read: bool,
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
        let memories = if read {
            let part = plan.share(share.rank, share.world);
            let memories = self.with_exec(&plan, options, |run| run.fill(target, part))?;
            memories.into_iter().map(wrap).collect()
        } else {
            plan.shards
                .iter()
                .map(|sp| {
                    let alloc = target.allocate(sp.layout.total())?;
                    Ok(wrap(target.finish(alloc)?))
                })
                .collect::<Result<Vec<_>>>()?
        };
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
            read,
            options: options.clone(),
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
    /// (Before [`SharedLoad::exchange`] has read a share planned by
    /// [`Checkpoint::plan_share`], this rank's spans hold no bytes yet.)
    pub fn span_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let span = self.spans.get(i)?;
        // SAFETY: `&mut self` is the only access to the load's memory: no reads are running
        // (they run only inside `exchange`, which borrows `self` mutably too) and no tensor
        // has been handed out (`finish` consumes the load; `state_before_exchange`'s caller
        // promised to touch nothing until the exchange is done).
        unsafe { self.bytes(span.allocation, span.range.clone()) }
    }

    /// `range` of host allocation `allocation` (`None` for device memory or a range
    /// outside it).
    ///
    /// # Safety
    /// No other access to those bytes may happen while the slice lives.
    // Writes from several threads through shared access is the point: the reads and the
    // exchange fill disjoint ranges at once; `# Safety` says who keeps them disjoint.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes(&self, allocation: usize, range: Range<u64>) -> Option<&mut [u8]> {
        match self.memories.get(allocation)? {
            Memory::Host(memory, base) => {
                if range.start > range.end || range.end > memory.len() as u64 {
                    return None;
                }
                let len = (range.end - range.start) as usize;
                if len == 0 {
                    return Some(&mut []);
                }
                // SAFETY: `range` lies within the allocation (checked above), which the
                // `Arc` keeps alive; exclusivity is the caller's promise.
                Some(unsafe {
                    std::slice::from_raw_parts_mut(base.0.add(range.start as usize), len)
                })
            }
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
        self.state()
    }

    /// The tensors the load will hold, before their bytes are there: for a caller whose
    /// transport writes the other ranks' spans through the tensors' own memory (the Python
    /// package hands the allocations to `torch.distributed`), passing
    /// [`SharedLoad::exchange_spans`] a `send` that needs no slice.
    ///
    /// # Safety
    /// Until [`SharedLoad::exchange_spans`] (or [`SharedLoad::exchange`]) has returned `Ok`,
    /// no byte of these tensors may be read, and only the spans `send` is handed for another
    /// rank may be written (this rank's reads write its own spans meanwhile); the same holds
    /// if the exchange fails (then the tensors' bytes are unspecified, never to be read).
    pub unsafe fn state_before_exchange(&self) -> StateDict {
        self.state()
    }

    fn state(&self) -> StateDict {
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
        let memories: Vec<&Memory> = self.memories.iter().collect();
        let tensors = self
            .ckpt
            .shard_tensors(&self.plan, memories, |m| match m {
                Memory::Host(memory, _) => Storage::Host {
                    memory: Arc::clone(memory),
                    offset: 0,
                },
                Memory::Device(memory) => Storage::Device {
                    memory: Arc::clone(memory),
                    offset: 0,
                },
            })
            .into_iter()
            .flat_map(|g| g.1)
            .collect();
        StateDict::new(tensors).with_files(files)
    }
}

/// One piece of a span the exchange sends at a time, and, for this rank's own pieces, how
/// many of its requests (in order) must be read before it can be sent.
struct Piece {
    span: ExchangeSpan,
    after: Option<usize>,
}

impl SharedLoad<'_> {
    /// Exchanges the spans while this rank's share is read (for a load from
    /// [`Checkpoint::plan_share`]; one whose share is read already just exchanges).
    ///
    /// The spans go in rounds: in each, every rank's next piece of at most `chunk` bytes of
    /// its spans, in rank order, so that every rank sends while all of them read on. Each
    /// round starts with `agree(mine)`, `mine` being this rank's read failure if it had one:
    /// the transport must tell every rank whether all of them are fine (an all-reduce of a
    /// flag) and fail where one is not, so that ranks fail together rather than wait for a
    /// piece never sent. Then `send(piece, bytes)` for each piece of the round, on every
    /// rank in the same order: its owner sends `bytes` (read by then), the others receive
    /// into them. Reads of this rank's share go on in the background (the load's threads),
    /// requests taken in file order.
    pub fn exchange<E>(
        &mut self,
        chunk: u64,
        agree: impl FnMut(Option<&Error>) -> std::result::Result<(), E>,
        mut send: impl FnMut(&ExchangeSpan, &mut [u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), ExchangeError<E>> {
        self.run_exchange(chunk, agree, |load: &Self, span: &ExchangeSpan| {
            // SAFETY: the piece is either another rank's (no read of this rank writes it:
            // spans of different owners are disjoint) or this rank's, fully read (every
            // request that overlaps it is done: see `Piece::after`); the slice lives for this
            // call only, and no tensor is out (`&mut self`).
            let bytes = unsafe { load.bytes(span.allocation, span.range.clone()) };
            send(
                span,
                bytes.expect("a host load's spans lie within its allocations"),
            )
        })
    }

    /// [`SharedLoad::exchange`] for a transport that reaches the memory another way (the
    /// tensors of [`SharedLoad::state_before_exchange`]): `send` is told the piece only.
    pub fn exchange_spans<E>(
        &mut self,
        chunk: u64,
        agree: impl FnMut(Option<&Error>) -> std::result::Result<(), E>,
        mut send: impl FnMut(&ExchangeSpan) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), ExchangeError<E>> {
        self.run_exchange(chunk, agree, |_: &Self, span: &ExchangeSpan| send(span))
    }

    fn run_exchange<E>(
        &mut self,
        chunk: u64,
        mut agree: impl FnMut(Option<&Error>) -> std::result::Result<(), E>,
        mut send: impl FnMut(&Self, &ExchangeSpan) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), ExchangeError<E>> {
        if self.memories.iter().any(|m| matches!(m, Memory::Device(_))) {
            return Err(ExchangeError::Load(Error::InvalidOption(
                "exchange runs on host memory: exchange a device load's tensors".into(),
            )));
        }
        let part = self.plan.share(self.share.rank, self.share.world);
        let mine = &self.plan.requests[part];
        let rounds = self.rounds(chunk.max(1), mine);
        let this = &*self;
        let mark = Watermark::new(if self.read { 0 } else { mine.len() });
        let stop = AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            if !this.read {
                scope.spawn(|| this.read_in_order(mine, &mark, &stop));
            }
            let outcome = (|| {
                for round in &rounds {
                    let mine = round.iter().find_map(|p| p.after);
                    if let Some(Err(e)) = mine.map(|after| mark.wait(after)) {
                        agree(Some(&e)).map_err(ExchangeError::Transport)?;
                        return Err(ExchangeError::Load(e));
                    }
                    agree(None).map_err(ExchangeError::Transport)?;
                    for piece in round {
                        send(this, &piece.span).map_err(ExchangeError::Transport)?;
                    }
                }
                Ok(())
            })();
            // Reads still running (a failed exchange) stop before their next request.
            stop.store(true, Ordering::Relaxed);
            outcome
        });
        if outcome.is_ok() {
            self.read = true;
        }
        outcome
    }

    /// The exchange's rounds: round `j` holds every rank's `j`-th piece of at most `chunk`
    /// bytes of its spans, in rank order.
    fn rounds(&self, chunk: u64, mine: &[Request]) -> Vec<Vec<Piece>> {
        let mut by_owner: Vec<Vec<Piece>> = (0..self.share.world).map(|_| Vec::new()).collect();
        for span in &self.spans {
            let mut at = span.range.start;
            while at < span.range.end {
                let end = span.range.end.min(at.saturating_add(chunk));
                // This rank's requests are in (allocation, destination) order: those that
                // start before the piece's end cover it.
                let after = (span.owner == self.share.rank && !self.read).then(|| {
                    mine.partition_point(|r| {
                        ((r.shard_plan as usize), r.dst.start) < (span.allocation, end)
                    })
                });
                by_owner[span.owner].push(Piece {
                    span: ExchangeSpan {
                        owner: span.owner,
                        allocation: span.allocation,
                        range: at..end,
                    },
                    after,
                });
                at = end;
            }
        }
        let count = by_owner.iter().map(Vec::len).max().unwrap_or(0);
        let mut owners: Vec<_> = by_owner.into_iter().map(Vec::into_iter).collect();
        (0..count)
            .map(|_| owners.iter_mut().filter_map(Iterator::next).collect())
            .collect()
    }

    /// Reads this rank's requests (`mine`), the load's threads taking them in file order,
    /// marking each one done in `mark` (or the first failure); stops early once `stop` is
    /// set.
    fn read_in_order(&self, mine: &[Request], mark: &Watermark, stop: &AtomicBool) {
        let read = self.ckpt.with_exec(&self.plan, &self.options, |run| {
            run.hint();
            let next = AtomicUsize::new(0);
            let threads = run.pool.current_num_threads().min(mine.len()).max(1);
            run.pool.install(|| {
                (0..threads).into_par_iter().for_each(|_| {
                    while let Some((i, request)) = {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        mine.get(i).map(|r| (i, r))
                    } {
                        if stop.load(Ordering::Relaxed) || mark.failed() {
                            return;
                        }
                        if run.cancelled() {
                            return mark.fail(Error::Cancelled);
                        }
                        // SAFETY: the request's destination lies in this rank's spans, which
                        // no one else writes (the exchange receives only other ranks' spans)
                        // and no one reads until the watermark passes the request;
                        // destinations of different requests are disjoint.
                        let bytes =
                            unsafe { self.bytes(request.shard_plan as usize, request.dst.clone()) };
                        let Some(bytes) = bytes else {
                            return mark.fail(Error::InvalidOption(
                                "a request's destination lies outside its allocation".into(),
                            ));
                        };
                        match CpuRegion::new(bytes).fill(|buf| run.fill_request(request, buf)) {
                            Ok(()) => {
                                // The exchange first: a slow progress callback must not
                                // hold back the pieces this request completes.
                                mark.done(i);
                                run.reported(request);
                            }
                            Err(e) => return mark.fail(e),
                        }
                    }
                })
            });
            Ok(())
        });
        if let Err(e) = read {
            mark.fail(e);
        }
    }
}

/// How far a rank's in-order reads have got: the requests done, the first failure.
struct Watermark {
    state: Mutex<Mark>,
    moved: Condvar,
}

struct Mark {
    done: Vec<bool>,
    /// Requests `..frontier` are all done.
    frontier: usize,
    failure: Option<Error>,
    failed: bool,
}

impl Watermark {
    fn new(requests: usize) -> Watermark {
        Watermark {
            state: Mutex::new(Mark {
                done: vec![false; requests],
                frontier: 0,
                failure: None,
                failed: false,
            }),
            moved: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mark> {
        // A panic while holding the lock leaves the marks consistent (plain stores).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn done(&self, i: usize) {
        let mut m = self.lock();
        m.done[i] = true;
        while m.frontier < m.done.len() && m.done[m.frontier] {
            m.frontier += 1;
        }
        self.moved.notify_all();
    }

    fn fail(&self, e: Error) {
        let mut m = self.lock();
        if !m.failed {
            m.failed = true;
            m.failure = Some(e);
        }
        self.moved.notify_all();
    }

    fn failed(&self) -> bool {
        self.lock().failed
    }

    /// Waits until requests `..after` are done, or returns the reads' failure.
    fn wait(&self, after: usize) -> Result<()> {
        let mut m = self.lock();
        loop {
            if m.frontier >= after {
                return Ok(());
            }
            if m.failed {
                return Err(m.failure.take().unwrap_or(Error::Cancelled));
            }
            m = self.moved.wait(m).unwrap_or_else(|e| e.into_inner());
        }
    }
}
