//! The prefetch window: one per process, shared by every prefetch. Background threads
//! populate the page cache ahead of the readers, shard by shard in the order the shards were
//! registered (the order a loader opens them, which is the order it reads them), file order
//! within a shard, and jump to the shard a reader is reading when that one is not done yet.
//! They never run more than the window's bytes ahead: what is populated and not yet read
//! counts against it, and a reader's read gives its bytes back. So a checkpoint larger than
//! memory is read once, not populated whole and evicted before anyone reads it.
//!
//! Populating: for a file the checkpoint maps, its mapping's pages (`MADV_POPULATE_READ`);
//! for any other file (a network filesystem, a URL), reads through its source into a reused
//! buffer, which leave the bytes in the page cache for the reader's own read. What was read
//! can be released afterwards (`drop_cache`): a file's pages are dropped from the cache once
//! its reader is past them.

use crate::checkpoint::Checkpoint;
use crate::memory::HostMemory;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Bytes populated per step: large reads, small enough to keep the window fine-grained.
const CHUNK: u64 = 16 << 20;

/// Bytes a reader may be past a range before its pages are let go (marked the first to
/// reclaim, or released with `drop_cache`): a view handed out is touched after the read
/// returns, so the pages just read must stay.
const RELEASE_LAG: u64 = 32 << 20;

/// One shard being prefetched.
#[derive(Debug)]
pub(crate) struct Job {
    id: u64,
    ckpt: Arc<Checkpoint>,
    shard: usize,
    /// The shard's mapping, for a mapped shard (kept alive while the job runs).
    mapping: Option<Arc<HostMemory>>,
    /// Release the pages of what readers have read (see the module docs).
    drop_cache: bool,
    cancelled: AtomicBool,
}

impl Job {
    /// Calls the job off: no more of its chunks are populated.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        window().forget(self.id);
    }
}

/// A registered job's progress (under the window's lock).
struct Entry {
    job: Arc<Job>,
    /// Chunks in file order: (file range, tensor positions it overlaps).
    chunks: Vec<(Range<u64>, Range<usize>)>,
    next: usize,
    /// Per tensor (file order): bytes populated, and whether a reader has read it.
    populated: Vec<u64>,
    consumed: Vec<bool>,
    /// Ranges read by readers, not yet let go of (see `drop_pages`), and their bytes.
    to_release: Vec<Range<u64>>,
    unreleased: u64,
    /// The shard's data bytes.
    bytes: u64,
}

#[derive(Default)]
struct State {
    limit: u64,
    /// Bytes populated (or being populated) and not yet read.
    ahead: u64,
    entries: Vec<Entry>,
    /// The job a reader read last: populated first while it has chunks left.
    last_read: Option<u64>,
    workers: usize,
    max_workers: usize,
    next_id: u64,
    /// Bytes of shards prefetched whole into memory of their own (see `reserve_owned`).
    owned: u64,
    /// Data bytes of the registered jobs' shards.
    registered: u64,
}

impl State {
    /// Whether everything registered fits the window. Where it does not (a host short of
    /// memory), the pages of what readers have read are marked the first to reclaim, chunks
    /// every tensor of which was read are not populated, and a reader's shard is populated
    /// first; where it does, none of these (marking clears the pages' accessed bits, which
    /// costs every later touch of them; and readers handed views say nothing of where their
    /// callers will touch next: the files are populated in order).
    fn fits(&self) -> bool {
        self.registered <= self.limit
    }

    /// Removes the entry at `at`, with its bytes.
    fn remove(&mut self, at: usize) -> Entry {
        let entry = self.entries.remove(at);
        self.registered = self.registered.saturating_sub(entry.bytes);
        entry
    }
}

/// The process's prefetch window.
pub(crate) struct Window {
    state: Mutex<State>,
    wake: Condvar,
}

/// The window of this process.
pub(crate) fn window() -> &'static Window {
    static WINDOW: OnceLock<Window> = OnceLock::new();
    WINDOW.get_or_init(|| Window {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    })
}

/// Bytes of a tensor (its file range `tensor`) inside the file range `chunk`.
fn overlap(tensor: &Range<u64>, chunk: &Range<u64>) -> u64 {
    tensor
        .end
        .min(chunk.end)
        .saturating_sub(tensor.start.max(chunk.start))
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers shard `shard` of `ckpt` for prefetching within a window of `limit` bytes
    /// (the latest registration sets the window), with at most `threads` threads populating.
    pub(crate) fn register(
        &'static self,
        ckpt: &Arc<Checkpoint>,
        shard: usize,
        mapping: Option<Arc<HostMemory>>,
        drop_cache: bool,
        limit: u64,
        threads: usize,
    ) -> Arc<Job> {
        let header = ckpt.shards()[shard].header();
        let base = header.data_start();
        let count = header.tensors().len();
        let mut state = self.lock();
        state.next_id += 1;
        let job = Arc::new(Job {
            id: state.next_id,
            ckpt: Arc::clone(ckpt),
            shard,
            mapping,
            drop_cache,
            cancelled: AtomicBool::new(false),
        });
        let chunks = chunks(&tensor_ranges(&job), base, base + header.data_len());
        state.limit = limit;
        state.max_workers = threads.max(1);
        state.registered += header.data_len();
        state.entries.push(Entry {
            job: Arc::clone(&job),
            chunks,
            next: 0,
            populated: vec![0; count],
            consumed: vec![false; count],
            to_release: Vec::new(),
            unreleased: 0,
            bytes: header.data_len(),
        });
        if state.workers < state.max_workers {
            state.workers += 1;
            let spawned = std::thread::Builder::new()
                .name("weightlift-window".into())
                .spawn(move || self.work());
            if spawned.is_err() {
                state.workers -= 1;
            }
        }
        self.wake.notify_all();
        job
    }

    /// Reserves `bytes` of memory of its own for a shard prefetched whole, if what is held
    /// that way stays within a window of `limit` bytes: such memory cannot be given back
    /// while its tensors live, so it must fit.
    pub(crate) fn reserve_owned(&self, bytes: u64, limit: u64) -> bool {
        let mut state = self.lock();
        if state.owned + bytes <= limit {
            state.owned += bytes;
            true
        } else {
            false
        }
    }

    /// Gives back what `reserve_owned` reserved.
    pub(crate) fn release_owned(&self, bytes: u64) {
        let mut state = self.lock();
        state.owned = state.owned.saturating_sub(bytes);
    }

    /// A reader read tensor `t` (file order) of `job`'s shard: its populated bytes leave the
    /// window, the job is populated next, and the pages the reader is well past are let go
    /// of (see `drop_pages`).
    pub(crate) fn consumed(&self, job: &Job, t: usize) {
        let mut release = Vec::new();
        let fits;
        {
            let mut state = self.lock();
            fits = state.fits();
            if !fits {
                state.last_read = Some(job.id);
            }
            let Some(at) = state.entries.iter().position(|e| e.job.id == job.id) else {
                return;
            };
            let mut freed = 0;
            let entry = &mut state.entries[at];
            if let Some(false) = entry.consumed.get(t).copied() {
                entry.consumed[t] = true;
                freed = entry.populated[t];
                let info = &job.ckpt.shards()[job.shard].header().tensors()[t];
                let base = job.ckpt.shards()[job.shard].header().data_start();
                let range = base + info.data_offsets.0..base + info.data_offsets.1;
                entry.unreleased += range.end - range.start;
                entry.to_release.push(range);
                // Let go of the oldest ranges once the reader is well past them.
                while entry.unreleased > RELEASE_LAG && entry.to_release.len() > 1 {
                    let r = entry.to_release.remove(0);
                    entry.unreleased -= r.end - r.start;
                    release.push(r);
                }
            }
            state.ahead = state.ahead.saturating_sub(freed);
            self.wake.notify_all();
        }
        for r in release {
            drop_pages(job, r, fits);
        }
    }

    /// Forgets job `id` (cancelled or done): its unread bytes leave the window, and what its
    /// readers read is let go of.
    fn forget(&self, id: u64) {
        let removed = {
            let mut state = self.lock();
            let Some(at) = state.entries.iter().position(|e| e.job.id == id) else {
                return;
            };
            let fits = state.fits();
            let entry = state.remove(at);
            let unread: u64 = entry
                .populated
                .iter()
                .zip(&entry.consumed)
                .filter(|(_, c)| !**c)
                .map(|(p, _)| p)
                .sum();
            state.ahead = state.ahead.saturating_sub(unread);
            self.wake.notify_all();
            (entry, fits)
        };
        let (removed, fits) = removed;
        for r in removed.to_release {
            drop_pages(&removed.job, r, fits);
        }
    }

    /// A populating thread: takes the next chunk when the window has room for it, until no
    /// job has chunks left.
    fn work(&self) {
        let mut buf: Vec<u8> = Vec::new();
        let mut state = self.lock();
        loop {
            let (guard, next) = self.next_chunk(state);
            state = guard;
            let Some((job, range)) = next else {
                state.workers -= 1;
                return;
            };
            drop(state);
            populate(&job, range, &mut buf);
            state = self.lock();
        }
    }

    /// Hands out the next chunk to populate, waiting while the window is full; `None` when
    /// there is nothing left to populate.
    #[allow(clippy::type_complexity)]
    fn next_chunk<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
    ) -> (MutexGuard<'a, State>, Option<(Arc<Job>, Range<u64>)>) {
        loop {
            while let Some(at) = state
                .entries
                .iter()
                .position(|e| e.job.cancelled.load(Ordering::Relaxed))
            {
                state.remove(at);
            }
            let fits = state.fits();
            let preferred = state.last_read;
            let pick = state
                .entries
                .iter()
                .position(|e| Some(e.job.id) == preferred && e.next < e.chunks.len())
                .or_else(|| state.entries.iter().position(|e| e.next < e.chunks.len()));
            let Some(pick) = pick else {
                return (state, None);
            };
            let (limit, ahead) = (state.limit, state.ahead);
            let entry = &mut state.entries[pick];
            let (range, tensors) = entry.chunks[entry.next].clone();
            let ranges = tensor_ranges(&entry.job);
            let unread: u64 = tensors
                .clone()
                .filter(|&t| !entry.consumed[t])
                .map(|t| overlap(&ranges[t], &range))
                .sum();
            if unread == 0 && !fits {
                // Every tensor of the chunk was read already, on a host short of memory:
                // whatever its readers left unpopulated, their own touches bring in (a
                // reader handed a view of a mapping populates nothing). Where the checkpoint
                // fits, the chunk is populated all the same, ahead of those touches.
                entry.next += 1;
                continue;
            }
            if ahead > 0 && ahead + unread > limit {
                // Full: wait for a reader (or a cancellation), then look again.
                state = self
                    .wake
                    .wait_timeout(state, Duration::from_millis(200))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            entry.next += 1;
            for t in tensors {
                if !entry.consumed[t] {
                    entry.populated[t] += overlap(&ranges[t], &range);
                }
            }
            let job = Arc::clone(&entry.job);
            state.ahead += unread;
            return (state, Some((job, range)));
        }
    }
}

/// The file ranges of a job's shard's tensors, in file order.
fn tensor_ranges(job: &Job) -> Vec<Range<u64>> {
    let header = job.ckpt.shards()[job.shard].header();
    let base = header.data_start();
    header
        .tensors()
        .iter()
        .map(|t| base + t.data_offsets.0..base + t.data_offsets.1)
        .collect()
}

/// The data region `start..end` in pieces of [`CHUNK`] bytes, each with the tensors (file
/// order positions; `ranges` sorted by offset) it overlaps.
fn chunks(ranges: &[Range<u64>], start: u64, end: u64) -> Vec<(Range<u64>, Range<usize>)> {
    let mut out = Vec::new();
    let mut at = start;
    let mut first = 0usize;
    while at < end {
        let stop = (at + CHUNK).min(end);
        while first < ranges.len() && ranges[first].end <= at {
            first += 1;
        }
        let mut last = first;
        while last < ranges.len() && ranges[last].start < stop {
            last += 1;
        }
        out.push((at..stop, first..last));
        at = stop;
    }
    out
}

/// Brings `range` of the job's file into memory: its mapping's pages, or the page cache
/// through a read into `buf`. Failures are left to the readers, which read the bytes
/// themselves and report their own errors.
fn populate(job: &Job, range: Range<u64>, buf: &mut Vec<u8>) {
    if job.cancelled.load(Ordering::Relaxed) {
        return;
    }
    let len = range.end - range.start;
    let read = |buf: &mut Vec<u8>| {
        buf.resize(len as usize, 0);
        job.ckpt.shards()[job.shard]
            .source()
            .read_exact_at(range.start, buf)
            .is_err()
    };
    let failed = match &job.mapping {
        Some(memory) => memory
            .mapping()
            .is_none_or(|m| m.populate(range.start, len).is_err()),
        None => read(buf),
    };
    if failed {
        job.cancelled.store(true, Ordering::Relaxed);
    }
}

/// Lets go of the pages of `range` of the job's file, which its readers are past: released
/// with `drop_cache`; else, in a mapping, marked the first to reclaim (so that memory
/// pressure evicts what was read before what was not yet).
fn drop_pages(job: &Job, range: Range<u64>, fits: bool) {
    let len = range.end - range.start;
    match (
        job.mapping.as_ref().and_then(|m| m.mapping()),
        job.drop_cache,
    ) {
        (Some(map), true) => map.release(range.start, len),
        (Some(map), false) if !fits => map.cool(range.start, len),
        (Some(_), false) => {}
        (None, true) => job.ckpt.shards()[job.shard]
            .source()
            .drop_cache(range.start, len),
        (None, false) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Checkpoint, Mapping, OpenOptions};
    use std::time::Instant;

    /// The window's bytes ahead and the chunks handed out of job `id`, sampled for a while.
    fn watch(id: u64, for_ms: u64) -> (u64, usize) {
        let (mut most, mut next) = (0, 0);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(for_ms) {
            let state = window().lock();
            most = most.max(state.ahead);
            next = state
                .entries
                .iter()
                .find(|e| e.job.id == id)
                .map_or(next, |e| e.next);
            drop(state);
            std::thread::sleep(Duration::from_millis(5));
        }
        (most, next)
    }

    #[test]
    fn never_more_than_the_window_ahead_of_the_readers() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("m.safetensors");
        let data = vec![7u8; 1 << 20];
        let names: Vec<String> = (0..48).map(|i| format!("t{i:02}")).collect();
        let tensors: Vec<_> = names
            .iter()
            .map(|n| weightlift_format::TensorRef {
                name: n,
                dtype: weightlift_format::Dtype::U8,
                shape: &[1 << 20],
                data: &data,
            })
            .collect();
        weightlift_format::write_file(&path, &tensors, None).unwrap();
        // SAFETY: the test's own file is not modified while mapped.
        let options = OpenOptions::default().mapping(unsafe { Mapping::auto() });
        let ckpt = Arc::new(Checkpoint::open_with(&path, &options).unwrap());
        // SAFETY: as above.
        let map = unsafe { ckpt.shards()[0].mapping() }.unwrap();
        let limit = 20 << 20;
        let job = window().register(&ckpt, 0, Some(map), false, limit, 2);
        // One 16 MiB chunk fits; a second would not: the window stops there.
        let (most, next) = watch(job.id, 300);
        assert!(most <= limit, "{most} bytes ahead");
        assert_eq!(next, 1, "one chunk handed out");
        // Readers read the first 16 tensors: the window moves on, still within its limit.
        for t in 0..16 {
            window().consumed(&job, t);
        }
        let (most, next) = watch(job.id, 300);
        assert!(most <= limit, "{most} bytes ahead");
        assert_eq!(next, 2, "the next chunk, and no more");
        job.cancel();
        assert!(window().lock().entries.iter().all(|e| e.job.id != job.id));
        assert_eq!(
            window().lock().ahead,
            0,
            "a cancelled job's bytes leave the window"
        );
    }

    #[test]
    fn chunks_cover_the_data_and_name_their_tensors() {
        let mb = 1u64 << 20;
        // Tensors of 10, 30 and 1 MiB from offset 100.
        let ranges = [
            100..100 + 10 * mb,
            100 + 10 * mb..100 + 40 * mb,
            100 + 40 * mb..100 + 41 * mb,
        ];
        let c = chunks(&ranges, 100, 100 + 41 * mb);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], (100..100 + 16 * mb, 0..2));
        assert_eq!(c[1], (100 + 16 * mb..100 + 32 * mb, 1..2));
        assert_eq!(c[2], (100 + 32 * mb..100 + 41 * mb, 1..3));
        let covered: u64 = c.iter().map(|(r, _)| r.end - r.start).sum();
        assert_eq!(covered, 41 * mb);
        assert_eq!(overlap(&ranges[1], &c[0].0), 6 * mb);
        assert!(chunks(&[], 5, 5).is_empty());
    }
}
