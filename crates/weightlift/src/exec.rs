//! Running a read plan: its requests are read in parallel on a rayon pool, each landing in
//! its region of a target's memory (or, for mapped files, populating the mapping's range).
//! This is the loop that moves bytes. It is handed what it runs on (the shards' sources, the
//! plan, the pool, a progress sink and a cancel flag) and knows nothing of checkpoints or
//! load options.

use crate::convert::convert;
use crate::error::{Error, Result};
use crate::memory::HostMemory;
use crate::plan::{GAP, ReadPlan, Request};
use crate::progress::ProgressSink;
use crate::shard::Shard;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use weightlift_device::{DeviceError, Region, Target};
use weightlift_format::{Dtype, TensorInfo};
use weightlift_storage::{AccessPattern, ByteSource};

/// Allocates one allocation of `sizes[i]` bytes per entry of `jobs` on `target`, fills
/// each job's range of its allocation with `fill` (in parallel on `pool`, or in order
/// without one) and finishes the allocations. On failure, copies still in flight are
/// waited for before the allocations go.
pub(crate) fn fill_target<T: Target, J: Sync>(
    target: &T,
    sizes: &[u64],
    jobs: &[Vec<(Range<u64>, J)>],
    pool: Option<&rayon::ThreadPool>,
    fill: impl Fn(&J, &mut [u8]) -> Result<()> + Sync,
) -> Result<Vec<T::Memory>> {
    let mut allocs = sizes
        .iter()
        .map(|&bytes| target.allocate(bytes))
        .collect::<Result<Vec<_>, DeviceError>>()?;
    let mut work = Vec::with_capacity(jobs.iter().map(Vec::len).sum());
    for (alloc, jobs) in allocs.iter_mut().zip(jobs) {
        let ranges: Vec<Range<u64>> = jobs.iter().map(|(r, _)| r.clone()).collect();
        let regions = target.regions(alloc, &ranges)?;
        work.extend(jobs.iter().map(|(_, job)| job).zip(regions));
    }
    let run = |(job, region): (&J, T::Region<'_>)| region.fill(|buf| fill(job, buf));
    let filled = match pool {
        Some(pool) => run_jobs(pool, None, work, run),
        None => work.into_iter().try_for_each(run),
    };
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

/// One execution of a read plan: what it reads from, where it reports, what calls it off.
pub(crate) struct Exec<'a> {
    /// Every shard of the checkpoint (the plan refers to them by position).
    pub(crate) shards: &'a [Shard],
    pub(crate) plan: &'a ReadPlan,
    pub(crate) pool: &'a rayon::ThreadPool,
    pub(crate) progress: &'a ProgressSink,
    /// When set, the execution stops before its next request with [`Error::Cancelled`].
    pub(crate) cancel: Option<&'a AtomicBool>,
}

impl Exec<'_> {
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn reported(&self, request: &Request) {
        let sp = &self.plan.shards[request.shard_plan as usize];
        self.progress.done(sp.shard, sp.bytes, request.len);
    }

    /// Reads the requests at positions `part` of the plan (all of them for a whole load,
    /// one rank's share for a shared one) into `target`: one allocation per shard of the
    /// plan (every allocation is made, whatever `part` is), one region per request.
    pub(crate) fn fill<T: Target>(&self, target: &T, part: Range<usize>) -> Result<Vec<T::Memory>> {
        let plan = self.plan;
        self.hint();
        let sizes: Vec<u64> = plan.shards.iter().map(|sp| sp.layout.total()).collect();
        let jobs: Vec<Vec<(Range<u64>, &Request)>> = plan
            .shards
            .iter()
            .map(|sp| {
                let mine = sp.requests.start.max(part.start)..sp.requests.end.min(part.end);
                plan.requests[mine.start..mine.end.max(mine.start)]
                    .iter()
                    .map(|r| (r.dst.clone(), r))
                    .collect()
            })
            .collect();
        fill_target(target, &sizes, &jobs, Some(self.pool), |request, buf| {
            if self.cancelled() {
                return Err(Error::Cancelled);
            }
            self.fill_request(request, buf)?;
            self.reported(request);
            Ok(())
        })
    }

    /// Populates the ranges of `requests` (the plan's, or the first of them) in the shards'
    /// mappings (`maps`, one per shard of the plan, in its order) in parallel: the tensors'
    /// bytes stay where the page cache has them.
    pub(crate) fn populate(&self, maps: &[Arc<HostMemory>], requests: &[Request]) -> Result<()> {
        let plan = self.plan;
        let mapping = |i: usize| {
            maps[i]
                .mapping()
                .expect("a shard's mapping is a mapped file")
        };
        for (i, sp) in plan.shards.iter().enumerate() {
            let header = self.shards[sp.shard].header();
            mapping(i).hint(pattern(sp.bytes, header.data_len()));
        }
        self.cache(maps, requests, |request, _| {
            mapping(request.shard_plan as usize)
                .populate(request.file_offset, request.len)
                .map_err(|source| self.read_error(request, source))
        })
    }

    /// Brings the ranges of `requests` into the page cache (one large read each, where
    /// they are not there already; see `read_ahead`), then runs `then(request, position in
    /// requests)`: populating the shard's mapping (`populate`), or mapping the pages
    /// elsewhere (`Checkpoint::assemble`). `maps`: as `populate`'s. The read's own errors
    /// are left to `then`, or to whatever touches the bytes next.
    pub(crate) fn cache(
        &self,
        maps: &[Arc<HostMemory>],
        requests: &[Request],
        then: impl Fn(&Request, usize) -> Result<()> + Sync,
    ) -> Result<()> {
        self.per_file(requests, |index, request| {
            let map = maps[request.shard_plan as usize]
                .mapping()
                .expect("a shard's mapping is a mapped file");
            if !map.resident(request.file_offset, request.len) {
                self.read_ahead(request);
            }
            then(request, index)
        })
    }

    /// Runs `each(position, request)` on every request, reporting it done, one file per
    /// thread: each thread takes the next file and runs its requests in order, one stream
    /// per file, whose readahead grows as a sequential reader's does. Threads populating
    /// neighbouring ranges of one file split each other's readahead: under a block-I/O
    /// throttle the disk saw requests of 1.2 MiB on average with four threads on one file
    /// at a time, against 2.6 MiB with one (hf-moe, cold).
    fn per_file(
        &self,
        requests: &[Request],
        each: impl Fn(usize, &Request) -> Result<()> + Sync,
    ) -> Result<()> {
        let mut files: Vec<Range<usize>> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match files.last_mut() {
                Some(run) if requests[run.start].shard_plan == r.shard_plan => run.end = i + 1,
                _ => files.push(i..i + 1),
            }
        }
        let next = AtomicUsize::new(0);
        let threads = self.pool.current_num_threads().min(files.len()).max(1);
        self.pool.install(|| {
            (0..threads).into_par_iter().try_for_each(|_| {
                while let Some(file) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    for (index, request) in requests[file.clone()].iter().enumerate() {
                        if self.cancelled() {
                            return Err(Error::Cancelled);
                        }
                        each(file.start + index, request)?;
                        self.reported(request);
                    }
                }
                Ok::<(), Error>(())
            })
        })
    }

    /// Brings a request's bytes into the page cache with one read ([`Shard::read_in`])
    /// before its mapping is populated: faulted in, they came at the file's readahead size
    /// (a 128 KiB readahead, the kernel's default: a mapped load of hf-moe reached the disk
    /// in 5,337 requests of 256 KiB, 3.97x the raw read under `--storage netfs`). The
    /// populate that follows reports any error; this read's are ignored.
    fn read_ahead(&self, request: &Request) {
        let sp = &self.plan.shards[request.shard_plan as usize];
        READ_AHEAD.with(|buf| {
            let _ = self.shards[sp.shard].read_in(
                request.file_offset,
                request.len,
                &mut buf.borrow_mut(),
            );
        });
    }

    /// After an owned load: tells each source that the bytes read from it (the header at
    /// open, the plan's requests now) will not be read again, so the page cache can drop
    /// them. Neighbouring ranges are merged: the kernel only drops pages (and large folios)
    /// that a range covers whole.
    pub(crate) fn drop_cache(&self) {
        for sp in &self.plan.shards {
            let shard = &self.shards[sp.shard];
            let mut run = 0..shard.header().data_start();
            for r in &self.plan.requests[sp.requests.clone()] {
                if r.file_offset == run.end {
                    run.end += r.len;
                } else {
                    shard.source().drop_cache(run.start, run.end - run.start);
                    run = r.file_offset..r.file_offset + r.len;
                }
            }
            shard.source().drop_cache(run.start, run.end - run.start);
        }
    }

    /// Tells each source how the plan reads it.
    pub(crate) fn hint(&self) {
        for sp in &self.plan.shards {
            let shard = &self.shards[sp.shard];
            shard
                .source()
                .hint(pattern(sp.bytes, shard.header().data_len()));
        }
    }

    /// Reads one request into `buf` (its destination range): one scatter read straight
    /// into the tensors' slots, skipping alignment padding (see [`read_stretches`]).
    pub(crate) fn fill_request(&self, request: &Request, buf: &mut [u8]) -> Result<()> {
        let plan = self.plan;
        let sp = &plan.shards[request.shard_plan as usize];
        let shard = &self.shards[sp.shard];
        let infos = shard.header().tensors();
        let pieces = &plan.pieces[request.pieces.start as usize..request.pieces.end as usize];
        let mut stretches = Vec::with_capacity(pieces.len());
        let mut rest = &mut *buf;
        let mut dst_at = request.dst.start;
        for p in pieces {
            if p.slot == GAP {
                stretches.push(Stretch::Gap(p.len));
                continue;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((p.dst - dst_at) as usize);
            let (out, tail) = tail.split_at_mut(p.dst_len as usize);
            rest = tail;
            dst_at = p.dst + p.dst_len;
            let slot = p.slot as usize;
            stretches.push(Stretch::Into {
                len: p.len,
                from: infos[sp.tensors[slot] as usize].dtype,
                to: sp.out_dtypes[slot],
                out,
            });
        }
        read_stretches(shard.source().as_ref(), request.file_offset, stretches).map_err(|e| {
            let tensors = pieces
                .iter()
                .filter(|p| p.slot != GAP)
                .map(|p| &infos[sp.tensors[p.slot as usize] as usize]);
            read_error(shard, tensors, e)
        })
    }

    /// Names the tensor a failed read was for (see [`read_error`]).
    fn read_error(&self, request: &Request, source: std::io::Error) -> Error {
        let plan = self.plan;
        let sp = &plan.shards[request.shard_plan as usize];
        let shard = &self.shards[sp.shard];
        let infos = shard.header().tensors();
        let pieces = &plan.pieces[request.pieces.start as usize..request.pieces.end as usize];
        let tensors = pieces
            .iter()
            .filter(|p| p.slot != GAP)
            .map(|p| &infos[sp.tensors[p.slot as usize] as usize]);
        read_error(shard, tensors, source)
    }
}

/// A failed read of `shard` as an error naming its tensor: the first of `tensors` (the
/// request's, in file order) that runs past the file's current end (a file that shrank),
/// else the first of them. One rule for loads and placement loads.
pub(crate) fn read_error<'a>(
    shard: &Shard,
    mut tensors: impl Iterator<Item = &'a TensorInfo> + Clone,
    source: std::io::Error,
) -> Error {
    let current_len = shard.source().current_len().unwrap_or(0);
    let data_start = shard.header().data_start();
    let culprit = tensors
        .clone()
        .find(|t| data_start + t.data_offsets.1 > current_len)
        .or_else(|| tensors.next());
    Error::Read {
        location: shard.location().clone(),
        tensor: culprit.map(|t| t.name.clone()).unwrap_or_default(),
        source,
    }
}

/// One stretch of a request's bytes, in file order.
pub(crate) enum Stretch<'o> {
    /// Bytes read and dropped (a gap bridged between two runs).
    Gap(u64),
    /// `len` bytes of the file into `out`, converted from `from` to `to` where they differ.
    Into {
        len: u64,
        from: Dtype,
        to: Dtype,
        out: &'o mut [u8],
    },
}

/// Reads `stretches`, which follow one another in `source` from `offset`, with one scatter
/// read: straight into their outputs; gaps and the source bytes of converted stretches
/// through this thread's scratch buffer (bounded by the request size), converted after.
/// The one read of both loads and placement loads.
pub(crate) fn read_stretches(
    source: &dyn ByteSource,
    offset: u64,
    mut stretches: Vec<Stretch<'_>>,
) -> std::io::Result<()> {
    let through_scratch = |s: &Stretch<'_>| match s {
        Stretch::Gap(len) => Some(*len),
        Stretch::Into { len, from, to, .. } => (from != to).then_some(*len),
    };
    let scratch_len: u64 = stretches.iter().filter_map(through_scratch).sum();
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < scratch_len as usize {
            scratch.resize(scratch_len as usize, 0);
        }
        let mut rest = &mut scratch[..scratch_len as usize];
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(stretches.len());
        for stretch in &mut stretches {
            match stretch {
                Stretch::Into { from, to, out, .. } if from == to => bufs.push(&mut out[..]),
                Stretch::Gap(len) | Stretch::Into { len, .. } => {
                    let (buf, tail) = std::mem::take(&mut rest).split_at_mut(*len as usize);
                    rest = tail;
                    bufs.push(buf);
                }
            }
        }
        source.read_scatter_at(offset, &mut bufs)?;
        drop(bufs);
        let mut at = 0usize;
        for stretch in stretches {
            match stretch {
                Stretch::Gap(len) => at += len as usize,
                Stretch::Into { from, to, .. } if from == to => {}
                Stretch::Into { len, from, to, out } => {
                    convert(from, to, &scratch[at..at + len as usize], out);
                    at += len as usize;
                }
            }
        }
        Ok(())
    })
}

/// Runs `jobs` on `pool`, one at a time per thread, stopping at the first error, or before
/// the next job once `cancel` is set ([`Error::Cancelled`]): the loop of loads and placement
/// loads alike.
pub(crate) fn run_jobs<J: Send>(
    pool: &rayon::ThreadPool,
    cancel: Option<&AtomicBool>,
    jobs: Vec<J>,
    run: impl Fn(J) -> Result<()> + Sync,
) -> Result<()> {
    pool.install(|| {
        jobs.into_par_iter().with_max_len(1).try_for_each(|job| {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Cancelled);
            }
            run(job)
        })
    })
}

/// Under half of a shard selected: keep the kernel from reading the rest ahead.
fn pattern(selected: u64, data_len: u64) -> AccessPattern {
    if selected * 2 < data_len {
        AccessPattern::Sparse
    } else {
        AccessPattern::Sequential
    }
}

thread_local! {
    /// Per-thread staging for converted pieces: bounded by the request size.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffer of [`Exec::read_ahead`]: bounded by the request size.
    static READ_AHEAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}
