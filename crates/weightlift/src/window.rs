//! The prefetch window: one per process, shared by every prefetch. Background threads
//! populate the page cache ahead of the readers, shard by shard in the order the shards were
//! registered (the order a loader opens them, which is the order it reads them), file order
//! within a shard, and jump to the shard a reader is reading when that one is not done yet.
//! They never run more than the window's bytes ahead: what is populated and not yet read
//! counts against it, and a reader's read gives its bytes back. So a checkpoint larger than
//! memory is read once, not populated whole and evicted before anyone reads it.
//!
//! Populating: for a file the checkpoint maps, its mapping's pages (`MADV_POPULATE_READ`);
//! for any other local file (a network filesystem, `backend="pread"`), reads through its
//! source into a reused buffer, which leave the bytes in the page cache for the reader's own
//! read. What was read
//! can be released afterwards (`drop_cache`): a file's pages are dropped from the cache once
//! its reader is past them.

use crate::budget::MemoryBudget;
use crate::checkpoint::Checkpoint;
use crate::memory::HostMemory;
use crate::trail::Trail;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Bytes populated per step: large reads, small enough to keep the window fine-grained.
const CHUNK: u64 = 16 << 20;

/// On a host short of memory, a mapped chunk is read and mapped this much at a time: the
/// pages one read brings into the page cache are mapped a moment later, before memory
/// pressure can reclaim them, and each read is still a request of megabytes.
const SHORT_STEP: u64 = 4 << 20;

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
    /// The window of the caller that registered the job: its chunks are populated only while
    /// what is ahead of the readers stays within it (another caller's window never changes
    /// this one's).
    limit: u64,
    /// The memory budget of that caller: where everything registered exceeds it, what
    /// readers are past is released (see [`LetGo`]).
    memory: u64,
    /// The file ranges of the shard's tensors, in file order.
    ranges: Vec<Range<u64>>,
    /// Chunks in file order: (file range, tensor positions it overlaps).
    chunks: Vec<(Range<u64>, Range<usize>)>,
    /// Per chunk: whether a thread took it (populated, being populated, or skipped), and
    /// the first chunk not taken.
    taken: Vec<bool>,
    next: usize,
    /// The chunk a thread is populating: one thread per file at a time (see
    /// [`State::next`]).
    in_flight: Option<usize>,
    /// Per tensor (file order): bytes populated, and whether a reader has read it.
    populated: Vec<u64>,
    consumed: Vec<bool>,
    /// What readers read, not yet let go of (see `drop_pages`).
    trail: Trail,
    /// The shard's data bytes.
    bytes: u64,
}

impl Entry {
    /// Job `job`'s shard in chunks, nothing populated or read yet, within `budget`'s
    /// window.
    fn new(job: Arc<Job>, budget: &MemoryBudget) -> Entry {
        let header = job.ckpt.shards()[job.shard].header();
        let base = header.data_start();
        let ranges: Vec<Range<u64>> = header
            .tensors()
            .iter()
            .map(|t| base + t.data_offsets.0..base + t.data_offsets.1)
            .collect();
        let chunks = chunks(&ranges, base, base + header.data_len());
        let count = ranges.len();
        let bytes = header.data_len();
        Entry {
            job,
            limit: budget.window(),
            memory: budget.bytes(),
            ranges,
            taken: vec![false; chunks.len()],
            chunks,
            next: 0,
            in_flight: None,
            populated: vec![0; count],
            consumed: vec![false; count],
            trail: Trail::default(),
            bytes,
        }
    }

    /// Whether a chunk is left to take.
    fn has_untaken(&self) -> bool {
        self.next < self.chunks.len()
    }

    /// Marks chunk `c` taken (and `next` past what is taken).
    fn mark_taken(&mut self, c: usize) {
        self.taken[c] = true;
        while self.next < self.taken.len() && self.taken[self.next] {
            self.next += 1;
        }
    }

    /// Bytes of chunk `c` that hold tensors no reader has read yet.
    fn unread_in(&self, c: usize) -> u64 {
        let (range, tensors) = &self.chunks[c];
        tensors
            .clone()
            .filter(|&t| !self.consumed[t])
            .map(|t| overlap(&self.ranges[t], range))
            .sum()
    }

    /// The chunks that hold bytes of tensor `t`.
    fn chunks_of(&self, t: usize) -> Range<usize> {
        let range = &self.ranges[t];
        if range.is_empty() {
            return 0..0;
        }
        let first = self.chunks.partition_point(|(c, _)| c.end <= range.start);
        let last = self.chunks.partition_point(|(c, _)| c.start < range.end);
        first..last
    }
}

/// What becomes of the pages of what readers have read, once they are past them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LetGo {
    /// Kept: everything fits the window, the pages can stay from first read to last use.
    Keep,
    /// Marked the first to reclaim (`MADV_COLD`): it fits in memory, not in the window.
    Cool,
    /// Released (dropped from the page cache and the mappings; a touch reads them again):
    /// asked for (`drop_cache`), or more is read than the memory budget holds. Marking was
    /// not enough there: reclaim took pages populated and not yet read (older on the
    /// inactive list) before the marked ones, and read them twice (measured: 1.08-1.22x the
    /// checkpoint in half the runs, 1.000x released).
    Release,
}

/// What a populating thread does next.
enum Next {
    /// Populates these ranges of the job's file (one chunk); the flag: whether everything
    /// registered fits the window (else a mapped file's chunk is read and mapped in steps of
    /// [`SHORT_STEP`]; see `populate`).
    Chunk(Arc<Job>, Vec<Range<u64>>, bool, usize),
    /// Waits for a reader to read (the window is full), or for another thread to finish a
    /// chunk (every file with chunks left is being populated).
    Wait,
    /// Nothing is left to populate: the thread ends.
    Done,
}

/// What a reader about to read a tensor does first (see [`Window::serve`]).
enum Claim {
    /// Reads: its bytes are populated (or the window does not serve them).
    Ready,
    /// Waits: a chunk of its bytes is being populated, or its file is busy with another.
    Wait,
    /// Populates this chunk of its bytes itself (as [`Next::Chunk`]), then looks again.
    Take(Arc<Job>, Vec<Range<u64>>, bool, usize),
}

/// The window's bookkeeping: which chunk is populated next, what is ahead of the readers.
/// Pure (no threads, no I/O, no clock): [`Window`] is the shell that runs it.
#[derive(Default)]
struct State {
    /// Bytes populated (or being populated) and not yet read.
    ahead: u64,
    entries: Vec<Entry>,
    /// The job a reader read last: populated first while it has chunks left.
    last_read: Option<u64>,
    workers: usize,
    next_id: u64,
    /// Bytes of shards prefetched whole into memory of their own (see `reserve_owned`).
    owned: u64,
    /// Data bytes of the registered jobs' shards.
    registered: u64,
    /// Data bytes of the checkpoints announced (see [`crate::Announcement`]): what
    /// prefetches started later will serve.
    announced: u64,
    /// Pages readers are past, to let go of on a populating thread (see
    /// [`Window::consumed`]).
    letting_go: Vec<(Arc<Job>, Vec<Range<u64>>, LetGo)>,
}

impl State {
    /// Whether everything registered fits a window of `limit` bytes. Where it does not (a
    /// host short of memory), the pages of what readers have read are marked the first to
    /// reclaim, chunks every tensor of which was read are not populated, and a reader's
    /// shard is populated first; where it does, none of these (marking clears the pages'
    /// accessed bits, which costs every later touch of them; and readers handed views say
    /// nothing of where their callers will touch next: the files are populated in order).
    /// What was announced counts too: a caller that opens every file of a model first and
    /// then reads one file after another registers one at a time.
    fn fits(&self, limit: u64) -> bool {
        self.registered.max(self.announced) <= limit
    }

    /// What becomes of the pages entry `at`'s readers are past.
    fn let_go(&self, at: usize) -> LetGo {
        let entry = &self.entries[at];
        if entry.job.drop_cache || !self.fits(entry.memory) {
            LetGo::Release
        } else if !self.fits(entry.limit) {
            LetGo::Cool
        } else {
            LetGo::Keep
        }
    }

    /// Adds a job's entry.
    fn add(&mut self, entry: Entry) {
        self.registered += entry.bytes;
        self.entries.push(entry);
    }

    /// Removes the entry at `at`, with its bytes.
    fn remove(&mut self, at: usize) -> Entry {
        let entry = self.entries.remove(at);
        self.registered = self.registered.saturating_sub(entry.bytes);
        entry
    }

    /// A reader read tensor `t` (file order) of job `id`'s shard: its populated bytes leave
    /// the window. Returns the ranges the job's readers are now past, and what becomes of
    /// them.
    fn consumed(&mut self, id: u64, t: usize) -> (Vec<Range<u64>>, LetGo) {
        let Some(at) = self.entries.iter().position(|e| e.job.id == id) else {
            return (Vec::new(), LetGo::Keep);
        };
        let let_go = self.let_go(at);
        let fits = let_go == LetGo::Keep;
        if !fits {
            self.last_read = Some(id);
        }
        let entry = &mut self.entries[at];
        let (freed, past) = match entry.consumed.get(t) {
            Some(false) => {
                entry.consumed[t] = true;
                (
                    entry.populated[t],
                    entry.trail.read(entry.ranges[t].clone()),
                )
            }
            _ => (0, Vec::new()),
        };
        self.ahead = self.ahead.saturating_sub(freed);
        (past, let_go)
    }

    /// Whether job `id` has nothing a populating thread would do for it now: it is done,
    /// called off (or forgotten), or its next chunk waits for room in the window that only
    /// readers can make (a warm read's bytes are not read through the window: that room
    /// may never come).
    fn settled(&self, id: u64) -> bool {
        let Some(entry) = self.entries.iter().find(|e| e.job.id == id) else {
            return true;
        };
        if entry.job.cancelled.load(Ordering::Relaxed) {
            return true;
        }
        if entry.in_flight.is_some() {
            return false;
        }
        if !entry.has_untaken() {
            return true;
        }
        no_room(self.ahead, entry.unread_in(entry.next), entry.limit)
    }

    /// A thread finished populating a chunk of job `id`'s file: the file's next chunk can
    /// be taken.
    fn finished(&mut self, id: u64, c: usize) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.job.id == id)
            && entry.in_flight == Some(c)
        {
            entry.in_flight = None;
        }
    }

    /// What a reader about to read tensor `t` of job `id`'s shard does first, where the
    /// window holds the whole checkpoint: each chunk of the tensor's bytes is populated,
    /// or the reader waits for it (being populated) or populates it itself (not taken yet,
    /// its file not busy: the reader takes the place of the file's populating thread, so
    /// the file is still read one chunk at a time, in large reads). A reader that touched
    /// bytes not populated yet would fault them in through the mapping's readahead, beside
    /// the window's read of the same file: a patched stream of 8 MiB tensors reached the
    /// disk in 264-620 KiB requests that way, its faults in single pages. Where the window
    /// does not hold everything (a host short of memory), readers go ahead and fault:
    /// waiting there would hold them to the window's pace for bytes it may not read.
    fn claim(&mut self, id: u64, t: usize) -> Claim {
        let Some(at) = self.entries.iter().position(|e| e.job.id == id) else {
            return Claim::Ready;
        };
        if t >= self.entries[at].ranges.len() || !self.fits(self.entries[at].limit) {
            return Claim::Ready;
        }
        let entry = &self.entries[at];
        for c in entry.chunks_of(t) {
            if entry.in_flight == Some(c) || (!entry.taken[c] && entry.in_flight.is_some()) {
                return Claim::Wait;
            }
            if !entry.taken[c] {
                let (job, ranges, fits) = self.take(at, c);
                return Claim::Take(job, ranges, fits, c);
            }
        }
        Claim::Ready
    }

    /// Takes chunk `c` of entry `at` to populate (counted ahead of the readers from now
    /// on): its job, the ranges to populate, and whether everything fits the window.
    fn take(&mut self, at: usize, c: usize) -> (Arc<Job>, Vec<Range<u64>>, bool) {
        let fits = self.fits(self.entries[at].limit);
        let entry = &mut self.entries[at];
        let unread = entry.unread_in(c);
        let (range, tensors) = entry.chunks[c].clone();
        entry.mark_taken(c);
        entry.in_flight = Some(c);
        // On a host short of memory, only what no reader has read yet: the pages of what
        // they read may be gone already (released past the lag), and reading them again
        // would read those bytes from storage twice (a populating thread slower than its
        // readers read 1.16x the checkpoint in a 256 MiB cgroup).
        let ranges = if fits {
            vec![range.clone()]
        } else {
            unread_runs(&entry.ranges, &entry.consumed, tensors.clone(), &range)
        };
        for t in tensors {
            if !entry.consumed[t] {
                entry.populated[t] += overlap(&entry.ranges[t], &range);
            }
        }
        let job = Arc::clone(&entry.job);
        self.ahead += unread;
        (job, ranges, fits)
    }

    /// Forgets job `id` (cancelled or done): its unread bytes leave the window. Returns what
    /// its readers read and was not let go of yet, and what becomes of it.
    fn forget(&mut self, id: u64) -> Option<(Arc<Job>, Vec<Range<u64>>, LetGo)> {
        let at = self.entries.iter().position(|e| e.job.id == id)?;
        let let_go = self.let_go(at);
        let mut entry = self.remove(at);
        let unread: u64 = entry
            .populated
            .iter()
            .zip(&entry.consumed)
            .filter(|(_, c)| !**c)
            .map(|(p, _)| p)
            .sum();
        self.ahead = self.ahead.saturating_sub(unread);
        Some((entry.job, entry.trail.drain(), let_go))
    }

    /// The next chunk to populate (counted ahead of the readers from now on), or whether to
    /// wait or stop.
    fn next(&mut self) -> Next {
        while let Some(at) = self
            .entries
            .iter()
            .position(|e| e.job.cancelled.load(Ordering::Relaxed))
        {
            self.remove(at);
        }
        let preferred = self.last_read;
        loop {
            // One thread per file at a time, as a load's populating threads go (see
            // `Exec::populate`: threads on neighbouring ranges of one file split its
            // readahead, 1.2 MiB requests against 2.6 MiB); a thread finding the reader's
            // file busy takes the next file's chunk instead, where everything fits. On a
            // host short of memory, only the file a reader reads (before any read, the
            // first): chunks of the files after it, populated while the reader was on it,
            // were reclaimed before it came to them and read twice (a patched reader in a
            // 256 MiB cgroup read 1.08-1.15x the checkpoint with every opened file
            // registered at the first read).
            let first = |want: fn(&Entry) -> bool| {
                self.entries
                    .iter()
                    .position(|e| Some(e.job.id) == preferred && want(e))
                    .or_else(|| self.entries.iter().position(want))
            };
            let Some(head) = first(Entry::has_untaken) else {
                return Next::Done;
            };
            let pick = if self.fits(self.entries[head].limit) {
                first(|e| e.in_flight.is_none() && e.has_untaken())
            } else {
                let readers_file_taken = self
                    .entries
                    .iter()
                    .any(|e| Some(e.job.id) == preferred && !e.has_untaken());
                Some(head).filter(|&h| !readers_file_taken && self.entries[h].in_flight.is_none())
            };
            let Some(pick) = pick else {
                return Next::Wait;
            };
            let fits = self.fits(self.entries[pick].limit);
            let ahead = self.ahead;
            let entry = &mut self.entries[pick];
            let c = entry.next;
            let unread = entry.unread_in(c);
            if unread == 0 && !fits {
                // Every tensor of the chunk was read already, on a host short of memory:
                // whatever its readers left unpopulated, their own touches bring in (a
                // reader handed a view of a mapping populates nothing). Where the checkpoint
                // fits, the chunk is populated all the same, ahead of those touches.
                entry.mark_taken(c);
                continue;
            }
            if no_room(ahead, unread, entry.limit) {
                return Next::Wait;
            }
            let (job, ranges, fits) = self.take(pick, c);
            return Next::Chunk(job, ranges, fits, c);
        }
    }
}

/// The process's prefetch window: [`State`] under a lock, and the threads that populate.
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

/// The parts of `chunk` that hold tensors of `tensors` no reader has read, as runs of
/// neighbouring ones.
fn unread_runs(
    ranges: &[Range<u64>],
    consumed: &[bool],
    tensors: Range<usize>,
    chunk: &Range<u64>,
) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for t in tensors.filter(|&t| !consumed[t]) {
        let (start, end) = (
            ranges[t].start.max(chunk.start),
            ranges[t].end.min(chunk.end),
        );
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(run) if run.end >= start => run.end = run.end.max(end),
            _ => out.push(start..end),
        }
    }
    out
}

/// Bytes of a tensor (its file range `tensor`) inside the file range `chunk`.
fn overlap(tensor: &Range<u64>, chunk: &Range<u64>) -> u64 {
    tensor
        .end
        .min(chunk.end)
        .saturating_sub(tensor.start.max(chunk.start))
}

impl Window {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers shard `shard` of `ckpt` for prefetching within `budget`'s window (this
    /// caller's: see [`Entry::limit`]), with at most `threads` threads populating.
    pub(crate) fn register(
        &'static self,
        ckpt: &Arc<Checkpoint>,
        shard: usize,
        mapping: Option<Arc<HostMemory>>,
        drop_cache: bool,
        budget: &MemoryBudget,
        threads: usize,
    ) -> Arc<Job> {
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
        state.add(Entry::new(Arc::clone(&job), budget));
        if state.workers < threads.max(1) {
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

    /// Counts `bytes` that prefetches started later will serve (see [`State::fits`]).
    pub(crate) fn announce(&self, bytes: u64) {
        self.lock().announced += bytes;
    }

    /// Takes back what `announce` counted.
    pub(crate) fn withdraw(&self, bytes: u64) {
        let mut state = self.lock();
        state.announced = state.announced.saturating_sub(bytes);
    }

    /// Gives back what `reserve_owned` reserved.
    pub(crate) fn release_owned(&self, bytes: u64) {
        let mut state = self.lock();
        state.owned = state.owned.saturating_sub(bytes);
    }

    /// A reader read tensor `t` (file order) of `job`'s shard (see [`State::consumed`]); the
    /// pages the readers are past are let go of (see `drop_pages`).
    ///
    /// Where a populating thread runs, it lets go of them, not the reader: releasing pages
    /// reclaims them there and then (a page-table walk, a TLB flush on every core), work a
    /// reader of tens of thousands of tensors would otherwise do on its own thread between
    /// reads (a tenth of a patched stream's time in a memory cgroup). Not a thread of its
    /// own: releases then lag the populating, and memory pressure reclaims for them (a
    /// patched stream of hf-moe-large in a 768 MiB cgroup, `cargo xtask bench --cache
    /// cold-limited`, 3 runs each: 2.25-2.28 s on the populating threads, 2.91-3.20 s on a
    /// thread of their own, 2.49 s on the reader's).
    pub(crate) fn consumed(&self, job: &Arc<Job>, t: usize) {
        let mut state = self.lock();
        let (mut past, let_go) = state.consumed(job.id, t);
        if !past.is_empty() && let_go != LetGo::Keep && state.workers > 0 {
            state
                .letting_go
                .push((Arc::clone(job), std::mem::take(&mut past), let_go));
        }
        drop(state);
        self.wake.notify_all();
        drop_pages(job, past, let_go);
    }

    /// Before a reader reads tensor `t` (file order) of `job`'s shard: waits for the chunks
    /// holding its bytes to be populated, populating them on this thread where the file's
    /// next chunk is free (see [`State::claim`]). Returns at once where the window does not
    /// hold the whole checkpoint, or the job is done or called off.
    pub(crate) fn serve(&self, job: &Arc<Job>, t: usize) {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut state = self.lock();
        loop {
            if job.cancelled.load(Ordering::Relaxed) {
                return;
            }
            match state.claim(job.id, t) {
                Claim::Ready => return,
                Claim::Wait => {
                    state = self
                        .wake
                        .wait_timeout(state, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Claim::Take(job, ranges, fits, c) => {
                    drop(state);
                    BUF.with(|buf| self.run_chunk(&job, c, ranges, fits, &mut buf.borrow_mut()));
                    state = self.lock();
                }
            }
        }
    }

    /// Waits until `job` is settled (see [`State::settled`]): every chunk of its file
    /// populated, or none more coming. For a caller about to read a file that a warm read
    /// is bringing in: reading it beside that read would split both reads' requests.
    pub(crate) fn wait_settled(&self, job: &Arc<Job>) {
        let mut state = self.lock();
        while !state.settled(job.id) {
            state = self
                .wake
                .wait_timeout(state, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Populates chunk `c` of `job`'s file (its `ranges`), then marks it finished and wakes
    /// whoever waits for it, even where populating panics: a reader waiting for the chunk
    /// must not wait forever.
    fn run_chunk(
        &self,
        job: &Arc<Job>,
        c: usize,
        ranges: Vec<Range<u64>>,
        fits: bool,
        buf: &mut Vec<u8>,
    ) {
        struct Finish<'a>(&'a Window, u64, usize);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.lock().finished(self.1, self.2);
                self.0.wake.notify_all();
            }
        }
        let _finish = Finish(self, job.id, c);
        for range in ranges {
            populate(job, range, fits, buf);
        }
    }

    /// Forgets job `id` (see [`State::forget`]) and lets go of what its readers read.
    fn forget(&self, id: u64) {
        let removed = self.lock().forget(id);
        self.wake.notify_all();
        if let Some((job, past, let_go)) = removed {
            drop_pages(&job, past, let_go);
        }
    }

    /// A populating thread: takes the next chunk when the window has room for it, until no
    /// job has chunks left.
    fn work(&self) {
        let mut buf: Vec<u8> = Vec::new();
        let mut state = self.lock();
        loop {
            // Pages readers are past first: letting go of them makes room for the chunks.
            let letting_go = std::mem::take(&mut state.letting_go);
            if !letting_go.is_empty() {
                drop(state);
                for (job, past, let_go) in letting_go {
                    drop_pages(&job, past, let_go);
                }
                state = self.lock();
                continue;
            }
            match state.next() {
                Next::Chunk(job, ranges, fits, c) => {
                    drop(state);
                    self.run_chunk(&job, c, ranges, fits, &mut buf);
                    state = self.lock();
                }
                // Full: wait for a reader (or a cancellation), then look again.
                Next::Wait => {
                    state = self
                        .wake
                        .wait_timeout(state, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Next::Done => {
                    state.workers -= 1;
                    return;
                }
            }
        }
    }
}

/// Whether a chunk with `unread` bytes no reader has read would take the bytes ahead of the
/// readers past a window of `limit`: it waits for readers to read. (Where nothing is ahead, it
/// is taken all the same: a chunk larger than the window must not wait forever.)
fn no_room(ahead: u64, unread: u64, limit: u64) -> bool {
    ahead > 0 && ahead + unread > limit
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

/// Brings `range` of the job's file into memory: for a mapped file its mapping's pages, read
/// in through the shard's source first where they are not in the page cache (in one read
/// where everything registered `fits` the window, else in steps of [`SHORT_STEP`]); for any
/// other file the page cache, through a read into `buf`. Failures are left to the readers,
/// which read the bytes themselves and report their own errors.
fn populate(job: &Job, range: Range<u64>, fits: bool, buf: &mut Vec<u8>) {
    if job.cancelled.load(Ordering::Relaxed) {
        return;
    }
    let shard = &job.ckpt.shards()[job.shard];
    let read = |at: u64, len: u64, buf: &mut Vec<u8>| shard.read_in(at, len, buf).is_err();
    // Not `POSIX_FADV_WILLNEED`, which would save the copy: the kernel reads ahead that way
    // in requests of at most 1 MiB (single pages in the bio, not the large folios of a read),
    // 618 KiB on average against 2.5 MiB for 16 MiB reads (cold, this VM's virtio disk); a
    // patched reader of a file read, not mapped, made 24k requests of 90 KiB and read 1.6x
    // the checkpoint that way, against 533 of 2.5 MiB and 1.0x.
    let Some(memory) = &job.mapping else {
        if read(range.start, range.end - range.start, buf) {
            job.cancelled.store(true, Ordering::Relaxed);
        }
        return;
    };
    // Where a step is not in the page cache yet, one large read through the shard's source
    // brings it in first (its own file handle, and so its own readahead state), then
    // populating the mapping does no I/O. Populating it cold faults it in through the
    // mapping's readahead state, which readers faulting the same file at the same time
    // share, a readahead's worth at a time: under a request-counting throttle the disk then
    // saw ~200 KiB requests from a prefetching reader of 8 MiB tensors, against ~1 MiB this
    // way (`crates/python/tests/test_storage.py`), and with a 128 KiB readahead a patched
    // stream in a 768 MiB cgroup populating without reading first made 250-580 KiB
    // requests (1.9-2.3x the raw read under the netfs profile; 3.2-4.0 s with 1-2 MiB steps,
    // 2.76-2.79 s with 4-16 MiB, raw 2.7 s). On a host short of memory the pages one 16 MiB
    // read brought in were once reclaimed before the mapping took them, and read again (a
    // patched reader in a 256 MiB cgroup read 1.16x the checkpoint,
    // `crates/python/tests/test_memory.py`; 1.000x in 3 runs each with 4 and 16 MiB steps
    // now): there each step is mapped right after its read.
    let step = if fits { CHUNK } else { SHORT_STEP };
    let failed = memory.mapping().is_none_or(|m| {
        let mut at = range.start;
        while at < range.end {
            let len = step.min(range.end - at);
            if (!m.resident(at, len) && read(at, len, buf)) || m.populate(at, len).is_err() {
                return true;
            }
            at += len;
        }
        false
    });
    if failed {
        job.cancelled.store(true, Ordering::Relaxed);
    }
}

/// Lets go of the pages of `ranges` of the job's file, which its readers are past: released
/// with `drop_cache`; else, in a mapping, marked the first to reclaim (so that memory
/// pressure evicts what was read before what was not yet).
fn drop_pages(job: &Job, ranges: Vec<Range<u64>>, let_go: LetGo) {
    let map = job.mapping.as_ref().and_then(|m| m.mapping());
    for range in ranges {
        let len = range.end - range.start;
        match (map, let_go) {
            (_, LetGo::Keep) | (None, LetGo::Cool) => {}
            (Some(map), LetGo::Release) => map.release(range.start, len),
            (Some(map), LetGo::Cool) => map.cool(range.start, len),
            (None, LetGo::Release) => job.ckpt.shards()[job.shard]
                .source()
                .drop_cache(range.start, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpenOptions;

    /// A checkpoint of `count` U8 tensors of `len` bytes each, written in `dir`.
    fn checkpoint(dir: &std::path::Path, name: &str, count: usize, len: usize) -> Arc<Checkpoint> {
        let path = dir.join(name);
        let data = vec![7u8; len];
        let names: Vec<String> = (0..count).map(|i| format!("t{i:02}")).collect();
        let shape = [len];
        let tensors: Vec<_> = names
            .iter()
            .map(|n| weightlift_format::TensorRef {
                name: n,
                dtype: weightlift_format::Dtype::U8,
                shape: &shape,
                data: &data,
            })
            .collect();
        weightlift_format::write_file(&path, &tensors, None).unwrap();
        Arc::new(Checkpoint::open_with(&path, &OpenOptions::default()).unwrap())
    }

    /// A budget of twice `bytes` with a window of `bytes`.
    fn window_of(bytes: u64) -> MemoryBudget {
        MemoryBudget::of(bytes.saturating_mul(2)).with_window(bytes)
    }

    /// A job of this test's own (never registered with the process's window).
    fn job(id: u64, ckpt: &Arc<Checkpoint>) -> Arc<Job> {
        Arc::new(Job {
            id,
            ckpt: Arc::clone(ckpt),
            shard: 0,
            mapping: None,
            drop_cache: false,
            cancelled: AtomicBool::new(false),
        })
    }

    /// The file offset of a chunk handed out (and populated at once: its file is free again),
    /// or `None` for a wait, `Some(u64::MAX)` for done.
    fn step(state: &mut State) -> Option<u64> {
        match state.next() {
            Next::Chunk(job, ranges, _, c) => {
                state.finished(job.id, c);
                Some(ranges[0].start)
            }
            Next::Wait => None,
            Next::Done => Some(u64::MAX),
        }
    }

    #[test]
    fn never_more_than_the_window_ahead_of_the_readers() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        let ckpt = checkpoint(dir.path(), "m.safetensors", 48, mb as usize);
        let base = ckpt.shards()[0].header().data_start();
        let mut state = State::default();
        // A window of 20 MiB over 48 MiB: one 16 MiB chunk fits, a second would not.
        state.add(Entry::new(job(1, &ckpt), &window_of(20 * mb)));
        assert_eq!(step(&mut state), Some(base));
        assert_eq!(state.ahead, 16 * mb);
        assert_eq!(step(&mut state), None, "full: wait");
        // Readers read the first 16 tensors: the next chunk, and no more.
        for t in 0..16 {
            let (past, let_go) = state.consumed(1, t);
            assert_eq!(let_go, LetGo::Release, "48 MiB read, a budget of 40 MiB");
            assert!(past.is_empty(), "16 MiB read: within the lag");
        }
        assert_eq!(state.ahead, 0);
        // A reader ahead of the window read four tensors of the next chunk: only the rest
        // of it counts ahead of the readers, and only the rest is read (the host is short).
        for t in 16..20 {
            state.consumed(1, t);
        }
        assert_eq!(step(&mut state), Some(base + 20 * mb));
        assert_eq!(state.ahead, 12 * mb);
        assert_eq!(step(&mut state), None);
        // Readers skip ahead and read the third chunk's tensors before the second's: the
        // chunk all of whose tensors were read is not populated (the host is short).
        for t in 16..48 {
            state.consumed(1, t);
        }
        assert_eq!(state.ahead, 0);
        assert_eq!(step(&mut state), Some(u64::MAX), "nothing left to populate");
        // The readers are past all but the last LAG bytes: those go when the job is forgotten.
        let (_, past, _) = state.forget(1).unwrap();
        assert_eq!(past.iter().map(|r| r.end - r.start).sum::<u64>(), 32 * mb);
        assert_eq!(state.registered, 0);
    }

    #[test]
    fn on_a_host_short_of_memory_only_unread_tensors_are_read() {
        let mb = 1u64 << 20;
        let ranges: Vec<Range<u64>> = (0..8).map(|t| t * mb..(t + 1) * mb).collect();
        let mut consumed = vec![false; 8];
        consumed[0] = true;
        consumed[3] = true;
        // The chunk cuts tensors 1 and 6: clipped to it; the read tensors 0 and 3 left out.
        let chunk = mb / 2..6 * mb + mb / 2;
        assert_eq!(
            unread_runs(&ranges, &consumed, 0..7, &chunk),
            vec![mb..3 * mb, 4 * mb..6 * mb + mb / 2]
        );
        consumed.iter_mut().for_each(|c| *c = true);
        assert!(unread_runs(&ranges, &consumed, 0..7, &chunk).is_empty());
    }

    #[test]
    fn a_window_that_fits_populates_every_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        let ckpt = checkpoint(dir.path(), "m.safetensors", 40, mb as usize);
        let base = ckpt.shards()[0].header().data_start();
        let mut state = State::default();
        state.add(Entry::new(job(1, &ckpt), &window_of(64 * mb)));
        // Readers read everything before the window populated it: where the checkpoint
        // fits, the chunks are populated all the same (callers touch views later).
        for t in 0..40 {
            // What the readers are past is let go of only with `drop_cache` where it fits.
            assert_eq!(state.consumed(1, t).1, LetGo::Keep);
        }
        let starts: Vec<_> = std::iter::from_fn(|| step(&mut state))
            .take_while(|&s| s != u64::MAX)
            .collect();
        assert_eq!(starts, vec![base, base + 16 * mb, base + 32 * mb]);
    }

    #[test]
    fn one_thread_at_a_time_populates_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        let a = checkpoint(dir.path(), "a.safetensors", 32, mb as usize);
        let b = checkpoint(dir.path(), "b.safetensors", 32, mb as usize);
        let (a_base, b_base) = (
            a.shards()[0].header().data_start(),
            b.shards()[0].header().data_start(),
        );
        let mut state = State::default();
        state.add(Entry::new(job(1, &a), &window_of(1 << 30)));
        state.add(Entry::new(job(2, &b), &window_of(1 << 30)));
        let take = |state: &mut State| match state.next() {
            Next::Chunk(job, ranges, _, _) => Some((job.id, ranges[0].start)),
            Next::Wait => None,
            Next::Done => Some((0, u64::MAX)),
        };
        // File a's first chunk is being populated: a second thread takes file b's, a third
        // waits (each file has a chunk left, neither is free).
        assert_eq!(take(&mut state), Some((1, a_base)));
        assert_eq!(take(&mut state), Some((2, b_base)));
        assert_eq!(take(&mut state), None);
        state.finished(1, 0);
        assert_eq!(take(&mut state), Some((1, a_base + 16 * mb)));
        // File a has no chunk left; file b's last waits for its first to finish. Then
        // nothing is left to take: a thread ends while the last chunk is being populated.
        state.finished(1, 1);
        assert_eq!(take(&mut state), None);
        state.finished(2, 0);
        assert_eq!(take(&mut state), Some((2, b_base + 16 * mb)));
        assert_eq!(take(&mut state), Some((0, u64::MAX)));

        // On a host short of memory (a window of 40 MiB for 64 MiB registered), one file at
        // a time: the first, then the one a reader reads; never the next file's chunks
        // beside it.
        let mut short = State::default();
        short.add(Entry::new(job(1, &a), &window_of(40 * mb)));
        short.add(Entry::new(job(2, &b), &window_of(40 * mb)));
        assert_eq!(take(&mut short), Some((1, a_base)));
        assert_eq!(take(&mut short), None, "file a is busy; file b waits");
        short.finished(1, 0);
        short.consumed(2, 0);
        // (Its tensor read already is left out.)
        assert_eq!(
            take(&mut short),
            Some((2, b_base + mb)),
            "the reader's file first"
        );
        assert_eq!(take(&mut short), None);
        short.finished(2, 0);
        for t in 1..16 {
            short.consumed(2, t);
        }
        assert_eq!(take(&mut short), Some((2, b_base + 16 * mb)));
        short.finished(2, 1);
        // The reader's file is all taken: file a's last chunk waits for a reader there.
        assert_eq!(take(&mut short), None);
        for t in 0..16 {
            short.consumed(1, t);
        }
        assert_eq!(take(&mut short), Some((1, a_base + 16 * mb)));
    }

    #[test]
    fn a_job_is_settled_once_nothing_more_of_it_is_coming() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        let ckpt = checkpoint(dir.path(), "m.safetensors", 32, mb as usize);
        let mut state = State::default();
        state.add(Entry::new(job(1, &ckpt), &window_of(1 << 30)));
        assert!(!state.settled(1), "two chunks to populate");
        let take = |state: &mut State| match state.next() {
            Next::Chunk(_, _, _, c) => c,
            _ => panic!("a chunk to take"),
        };
        let first = take(&mut state);
        assert!(!state.settled(1), "one chunk being populated, one left");
        state.finished(1, first);
        assert!(!state.settled(1), "one chunk left");
        let last = take(&mut state);
        assert!(!state.settled(1), "the last chunk being populated");
        state.finished(1, last);
        assert!(state.settled(1), "every chunk populated");
        assert!(state.settled(9), "an unknown (forgotten) job");

        // A window too small for the next chunk, which only readers could make room for: a
        // caller waiting for the job would wait forever.
        let mut full = State::default();
        full.add(Entry::new(job(2, &ckpt), &window_of(20 * mb)));
        let Next::Chunk(_, _, _, c) = full.next() else {
            panic!("the first chunk fits")
        };
        full.finished(2, c);
        assert!(matches!(full.next(), Next::Wait));
        assert!(full.settled(2), "held back by a full window");

        // Called off.
        let mut off = State::default();
        let cancelled = job(3, &ckpt);
        off.add(Entry::new(Arc::clone(&cancelled), &window_of(1 << 30)));
        cancelled.cancelled.store(true, Ordering::Relaxed);
        assert!(off.settled(3));
    }

    #[test]
    fn a_reader_waits_for_its_bytes_or_populates_them_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        // Six tensors of 8 MiB: two per 16 MiB chunk (three chunks).
        let ckpt = checkpoint(dir.path(), "m.safetensors", 6, 8 * mb as usize);
        let base = ckpt.shards()[0].header().data_start();
        let mut state = State::default();
        state.add(Entry::new(job(1, &ckpt), &window_of(1 << 30)));
        let claim = |state: &mut State, t| match state.claim(1, t) {
            Claim::Ready => "ready",
            Claim::Wait => "wait",
            Claim::Take(_, ranges, _, c) => {
                assert_eq!(
                    ranges,
                    vec![base + c as u64 * 16 * mb..base + (c as u64 + 1) * 16 * mb]
                );
                "take"
            }
        };
        // A populating thread has chunk 0: its reader waits; a reader of chunk 2 waits too
        // (one read of the file at a time).
        assert!(matches!(state.next(), Next::Chunk(_, _, _, 0)));
        assert_eq!(claim(&mut state, 1), "wait");
        assert_eq!(claim(&mut state, 4), "wait");
        // Chunk 0 done: its tensors are read at once; the reader of tensor 4 takes chunk 2
        // itself, and the populating thread finds the file busy.
        state.finished(1, 0);
        assert_eq!(claim(&mut state, 0), "ready");
        assert_eq!(claim(&mut state, 4), "take");
        assert_eq!(state.ahead, 32 * mb, "chunks 0 and 2 ahead of the readers");
        assert!(matches!(state.next(), Next::Wait));
        assert_eq!(claim(&mut state, 5), "wait");
        state.finished(1, 2);
        assert_eq!(claim(&mut state, 5), "ready");
        // The thread takes the chunk left (1), the only one not taken.
        assert!(matches!(state.next(), Next::Chunk(_, _, _, 1)));
        assert!(matches!(state.next(), Next::Done));
        // A host short of memory (the window holds less than the file): readers never wait.
        let mut short = State::default();
        short.add(Entry::new(job(2, &ckpt), &window_of(20 * mb)));
        assert!(matches!(short.next(), Next::Chunk(..)));
        assert!(matches!(short.claim(2, 0), Claim::Ready));
        assert!(matches!(short.claim(2, 4), Claim::Ready));
        // A job the window does not know (done, called off): nothing to wait for.
        assert!(matches!(short.claim(9, 0), Claim::Ready));
    }

    #[test]
    fn one_callers_window_never_changes_anothers() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        let a = checkpoint(dir.path(), "a.safetensors", 32, mb as usize);
        let b = checkpoint(dir.path(), "b.safetensors", 32, mb as usize);
        let mut state = State::default();
        state.add(Entry::new(job(1, &a), &window_of(20 * mb)));
        state.add(Entry::new(job(2, &b), &window_of(1 << 40)));
        // Job 1 (registered first) within its 20 MiB: one chunk, then it waits, and so does
        // everything after it in order; the huge window registered later does not lift it.
        assert!(step(&mut state).is_some_and(|s| s != u64::MAX));
        assert_eq!(step(&mut state), None);
        // Job 2's reader reads: its shard goes first, within its own window.
        state.consumed(2, 0);
        assert!(!state.fits(20 * mb) && state.fits(1 << 40));
        assert_eq!(state.last_read, None, "job 2's window fits: no preference");
        state.forget(1);
        let b_base = b.shards()[0].header().data_start();
        assert_eq!(step(&mut state), Some(b_base));
        assert_eq!(step(&mut state), Some(b_base + 16 * mb));
        assert_eq!(step(&mut state), Some(u64::MAX));
    }

    #[test]
    fn announced_bytes_decide_whether_it_fits_before_they_register() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1u64 << 20;
        let ckpt = checkpoint(dir.path(), "m.safetensors", 32, mb as usize);
        // Four files of 32 MiB opened first, one registered: 128 MiB do not fit 64 MiB.
        let mut state = State {
            announced: 4 * 32 * mb,
            ..State::default()
        };
        state.add(Entry::new(job(1, &ckpt), &window_of(64 * mb)));
        assert!(!state.fits(64 * mb));
        state.consumed(1, 0);
        assert_eq!(
            state.last_read,
            Some(1),
            "a host short of memory: the reader's first"
        );
        state.announced = 0;
        assert!(state.fits(64 * mb));
    }

    #[test]
    fn a_cancelled_jobs_bytes_leave_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), "m.safetensors", 8, 1 << 20);
        let mut state = State::default();
        let j = job(1, &ckpt);
        state.add(Entry::new(Arc::clone(&j), &window_of(64 << 20)));
        assert!(step(&mut state).is_some());
        assert_eq!(state.ahead, 8 << 20);
        state.forget(1);
        assert_eq!(state.ahead, 0);
        // A job cancelled while registered is dropped at the next pick.
        state.add(Entry::new(Arc::clone(&j), &window_of(64 << 20)));
        j.cancelled.store(true, Ordering::Relaxed);
        assert_eq!(step(&mut state), Some(u64::MAX));
        assert!(state.entries.is_empty());
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
