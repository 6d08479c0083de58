//! Loading into device memory through reused pinned host buffers: the pipeline a GPU needs,
//! written once over a [`CopyEngine`] so that it runs (and is tested) without one.
//!
//! A [`StagedTarget`] owns a fixed pool of page-locked staging buffers, allocated once. A
//! region's fill borrows a free buffer, lets the reader fill it, and starts an asynchronous
//! copy of it to the region's place in device memory on one of the engine's streams; the
//! buffer then waits in a queue with the copy's event and is handed out again only after
//! that event has completed. Reads of the next requests proceed while earlier copies run,
//! pinned memory never exceeds `buffers x buffer_size`, and device memory is one
//! allocation per group of tensors (no per-tensor allocation).

use crate::{Device, DeviceError, Region, Target, check_ranges};
use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Memory on a device, shared by the tensors that live in it.
pub trait DeviceMemory: Send + Sync + fmt::Debug {
    /// The device it is on.
    fn device(&self) -> Device;

    /// Length in bytes.
    fn len(&self) -> u64;

    /// Whether it holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of byte 0 (for handing tensors to other libraries).
    fn device_ptr(&self) -> u64;

    /// Copies the bytes at `offset..offset + dst.len()` back to host memory (synchronous).
    fn read_back(&self, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError>;
}

/// What the staged pipeline needs of a device: memory, page-locked host buffers, and
/// asynchronous host-to-device copies on several streams, each completing an event.
pub trait CopyEngine: Send + Sync {
    /// One device allocation.
    type Memory: DeviceMemory + 'static;
    /// A page-locked host buffer that copies read from.
    type Pinned: Send;
    /// The completion of one copy.
    type Event: Send;

    /// The device.
    fn device(&self) -> Device;

    /// Number of streams copies may be spread over (at least 1).
    fn streams(&self) -> usize;

    /// Allocates `bytes` of device memory.
    fn alloc(&self, bytes: u64) -> Result<Self::Memory, DeviceError>;

    /// Allocates a page-locked host buffer of `bytes`.
    fn alloc_pinned(&self, bytes: usize) -> Result<Self::Pinned, DeviceError>;

    /// The host bytes of a pinned buffer, to fill.
    fn host_slice<'a>(&self, pinned: &'a mut Self::Pinned) -> &'a mut [u8];

    /// Starts copying `pinned[src]` to `memory[offset..offset + src.len()]` on stream
    /// `stream % streams()`, returning the event that completes with the copy.
    ///
    /// # Safety
    ///
    /// Until [`CopyEngine::wait`] has returned for the event, the caller must neither write
    /// to nor drop `pinned`, nor free `memory`, nor start another copy into the same bytes
    /// of `memory`. `src` must be within `pinned` and `offset + src.len()` within `memory`
    /// (implementations check both and fail rather than copy out of bounds).
    unsafe fn copy_async(
        &self,
        pinned: &Self::Pinned,
        src: Range<usize>,
        memory: &Self::Memory,
        offset: u64,
        stream: usize,
    ) -> Result<Self::Event, DeviceError>;

    /// Blocks until the copy of `event` has completed; returns how long it ran on the device.
    fn wait(&self, event: Self::Event) -> Result<Duration, DeviceError>;
}

/// Size of the pinned staging pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StagingOptions {
    /// Number of staging buffers (default 4).
    pub buffers: usize,
    /// Bytes per buffer (default 32 MiB). A region is at most this long.
    pub buffer_size: usize,
}

impl StagingOptions {
    /// `buffers` buffers of `buffer_size` bytes.
    pub fn new(buffers: usize, buffer_size: usize) -> StagingOptions {
        StagingOptions {
            buffers,
            buffer_size,
        }
    }
}

impl Default for StagingOptions {
    fn default() -> StagingOptions {
        StagingOptions {
            buffers: 4,
            buffer_size: 32 << 20,
        }
    }
}

/// One copy out of a staging buffer (see [`StagedTarget::stage`]): bytes `src` of the
/// buffer to `memory` at byte `offset`.
#[derive(Debug)]
pub struct StagedCopy<'m, M> {
    /// The bytes of the staging buffer copied.
    pub src: Range<usize>,
    /// The device memory copied into.
    pub memory: &'m M,
    /// Where in `memory`.
    pub offset: u64,
}

/// Where a staged load spent its time, summed over threads and streams.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StagingStats {
    /// Bytes copied to the device.
    pub bytes: u64,
    /// Copies started.
    pub copies: u64,
    /// Time readers spent filling staging buffers (storage to host), over all threads.
    pub fill: Duration,
    /// Time copies ran on the device (host to device), over all streams.
    pub copy: Duration,
    /// Time readers waited for a staging buffer to come free.
    pub wait: Duration,
}

struct Pool<P, V> {
    free: Vec<P>,
    /// Buffers whose copies may still run, oldest first, with their events.
    pending: VecDeque<(P, Vec<V>)>,
}

/// A [`Target`] that stages every region through a pool of pinned buffers and copies it to
/// device memory asynchronously: a fixed pool of pinned buffers, each reused only after
/// its copy completed, and one device allocation per group of tensors.
pub struct StagedTarget<E: CopyEngine> {
    shared: Arc<Shared<E>>,
}

/// The pool and counters, shared by the target and its allocations: an allocation dropped
/// before `finish` must be able to wait for the copies into it.
struct Shared<E: CopyEngine> {
    engine: E,
    buffer_size: usize,
    pool: Mutex<Pool<E::Pinned, E::Event>>,
    returned: Condvar,
    next_stream: AtomicUsize,
    bytes: AtomicU64,
    copies: AtomicU64,
    fill_ns: AtomicU64,
    copy_ns: AtomicU64,
    wait_ns: AtomicU64,
}

impl<E: CopyEngine> fmt::Debug for StagedTarget<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagedTarget")
            .field("device", &self.shared.engine.device())
            .field("buffer_size", &self.shared.buffer_size)
            .field("stats", &self.stats())
            .finish()
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl<E: CopyEngine> StagedTarget<E> {
    /// A target over `engine` with its staging pool allocated now, once.
    pub fn new(engine: E, options: StagingOptions) -> Result<StagedTarget<E>, DeviceError> {
        let buffers = options.buffers.max(1);
        let buffer_size = options.buffer_size.max(4096);
        let free = (0..buffers)
            .map(|_| engine.alloc_pinned(buffer_size))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StagedTarget {
            shared: Arc::new(Shared {
                engine,
                buffer_size,
                pool: Mutex::new(Pool {
                    free,
                    pending: VecDeque::new(),
                }),
                returned: Condvar::new(),
                next_stream: AtomicUsize::new(0),
                bytes: AtomicU64::new(0),
                copies: AtomicU64::new(0),
                fill_ns: AtomicU64::new(0),
                copy_ns: AtomicU64::new(0),
                wait_ns: AtomicU64::new(0),
            }),
        })
    }

    /// The engine.
    pub fn engine(&self) -> &E {
        &self.shared.engine
    }

    /// The longest region this target can stage.
    pub fn buffer_size(&self) -> usize {
        self.shared.buffer_size
    }

    /// Time and bytes so far.
    pub fn stats(&self) -> StagingStats {
        let s = &self.shared;
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        StagingStats {
            bytes: s.bytes.load(Ordering::Relaxed),
            copies: s.copies.load(Ordering::Relaxed),
            fill: d(&s.fill_ns),
            copy: d(&s.copy_ns),
            wait: d(&s.wait_ns),
        }
    }

    /// Waits for every copy in flight. Called before device memory is used or dropped.
    pub fn settle(&self) -> Result<(), DeviceError> {
        self.shared.settle()
    }

    /// Fills the first `len` bytes of a staging buffer with `fill`, then copies parts of
    /// them (`copies`) into device memory the caller holds, asynchronously: what placement
    /// loads into memory the caller owns use, where one read serves blocks of several
    /// tensors. The buffer is reused only after every copy from it completed; the copies
    /// have completed once [`StagedTarget::settle`] returned.
    ///
    /// Fails before anything is copied if `len` exceeds the buffer size, a copy's source
    /// lies outside `0..len`, its destination outside its memory, or its memory is on
    /// another device.
    ///
    /// # Safety
    ///
    /// Until [`StagedTarget::settle`] has returned, the caller must keep every copy's memory
    /// alive, and neither read nor write its destination bytes nor let another copy (of
    /// this call or another) write them.
    pub unsafe fn stage<Er: From<DeviceError>>(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), Er>,
        copies: &[StagedCopy<'_, E::Memory>],
    ) -> Result<(), Er> {
        let shared = &*self.shared;
        if len > shared.buffer_size {
            return Err(DeviceError::InvalidRegions(format!(
                "{len} bytes to stage; the staging buffers hold {}",
                shared.buffer_size
            ))
            .into());
        }
        for c in copies {
            let n = (c.src.end.saturating_sub(c.src.start)) as u64;
            if c.src.start > c.src.end || c.src.end > len {
                return Err(DeviceError::InvalidRegions(format!(
                    "copy of staged bytes {:?} of {len}",
                    c.src
                ))
                .into());
            }
            if c.offset
                .checked_add(n)
                .is_none_or(|end| end > c.memory.len())
            {
                return Err(DeviceError::InvalidRegions(format!(
                    "copy of {n} bytes to {} past the {} byte memory",
                    c.offset,
                    c.memory.len()
                ))
                .into());
            }
            if c.memory.device() != shared.engine.device() {
                return Err(DeviceError::InvalidRegions(format!(
                    "memory on {} staged through {}",
                    c.memory.device(),
                    shared.engine.device()
                ))
                .into());
            }
        }
        let Some((buffer, stream)) = shared.filled(len, fill)? else {
            return Ok(());
        };
        let mut events = Vec::with_capacity(copies.len());
        let mut failed = None;
        for c in copies.iter().filter(|c| !c.src.is_empty()) {
            // SAFETY: the buffer goes into the pending queue with every event started from
            // it and is written again or dropped only after `wait` returned for each
            // (`acquire`, `settle`, `Shared`'s drop). The source and destination ranges were
            // checked above; the caller keeps the memory alive and its destination bytes to
            // this copy until `settle` (this function's contract).
            let copied = unsafe {
                shared
                    .engine
                    .copy_async(&buffer, c.src.clone(), c.memory, c.offset, stream)
            };
            match copied {
                Ok(event) => {
                    shared
                        .bytes
                        .fetch_add(c.src.len() as u64, Ordering::Relaxed);
                    shared.copies.fetch_add(1, Ordering::Relaxed);
                    events.push(event);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Even after a failed start, the copies that did start must finish before the
        // buffer is reused.
        shared.lock().pending.push_back((buffer, events));
        shared.returned.notify_one();
        failed.map_or(Ok(()), |e| Err(e.into()))
    }

    fn check_own(&self, alloc: &StagedAlloc<E>) -> Result<(), DeviceError> {
        if Arc::ptr_eq(&self.shared, &alloc.shared) {
            Ok(())
        } else {
            Err(DeviceError::InvalidRegions(
                "the allocation belongs to another staged target".into(),
            ))
        }
    }
}

impl<E: CopyEngine> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, Pool<E::Pinned, E::Event>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a buffer's events (every one, even after a failure), counting their
    /// device time. The buffer goes back to the pool whether or not the copies succeeded
    /// (after the waits nothing is copying from it).
    fn complete(&self, events: Vec<E::Event>) -> Result<(), DeviceError> {
        let mut first_error = None;
        for event in events {
            match self.engine.wait(event) {
                Ok(took) => {
                    self.copy_ns.fetch_add(nanos(took), Ordering::Relaxed);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A free buffer whose first `len` bytes `fill` wrote, and the stream its copies go on
    /// (one per buffer: they run in order, after the fill); `None` where `len` is 0 (`fill`
    /// saw an empty slice). A failed fill gives the buffer back.
    fn filled<Er: From<DeviceError>>(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), Er>,
    ) -> Result<Option<(E::Pinned, usize)>, Er> {
        if len == 0 {
            return fill(&mut []).map(|()| None);
        }
        let mut buffer = self.acquire()?;
        let start = Instant::now();
        if let Err(e) = fill(&mut self.engine.host_slice(&mut buffer)[..len]) {
            self.give_back(buffer);
            return Err(e);
        }
        self.fill_ns
            .fetch_add(nanos(start.elapsed()), Ordering::Relaxed);
        let stream =
            self.next_stream.fetch_add(1, Ordering::Relaxed) % self.engine.streams().max(1);
        Ok(Some((buffer, stream)))
    }

    /// A free buffer: an unused one, else the oldest in flight once its copy completed.
    fn acquire(&self) -> Result<E::Pinned, DeviceError> {
        let start = Instant::now();
        let mut pool = self.lock();
        let result = loop {
            if let Some(buffer) = pool.free.pop() {
                break Ok(buffer);
            }
            if let Some((buffer, events)) = pool.pending.pop_front() {
                drop(pool);
                let done = self.complete(events);
                if let Err(e) = done {
                    self.give_back(buffer);
                    break Err(e);
                }
                break Ok(buffer);
            }
            // Every buffer is being filled by another thread.
            pool = self.returned.wait(pool).unwrap_or_else(|e| e.into_inner());
        };
        self.wait_ns
            .fetch_add(nanos(start.elapsed()), Ordering::Relaxed);
        result
    }

    fn give_back(&self, buffer: E::Pinned) {
        self.lock().free.push(buffer);
        self.returned.notify_one();
    }

    fn settle(&self) -> Result<(), DeviceError> {
        let mut first_error = None;
        loop {
            let next = self.lock().pending.pop_front();
            let Some((buffer, events)) = next else { break };
            if let Err(e) = self.complete(events) {
                first_error.get_or_insert(e);
            }
            self.give_back(buffer);
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<E: CopyEngine> Drop for Shared<E> {
    fn drop(&mut self) {
        // No buffer may be freed while a copy reads from it.
        let _ = self.settle();
    }
}

/// Device memory being filled by a [`StagedTarget`]. Dropping it before
/// [`Target::finish`] waits for the copies in flight first, so that no copy writes into
/// freed memory.
pub struct StagedAlloc<E: CopyEngine> {
    /// Present until `finish` takes it.
    memory: Option<E::Memory>,
    shared: Arc<Shared<E>>,
    /// Whether regions were handed out already: handing out more first waits for the
    /// copies of the earlier ones, so two copies never write the same bytes at once.
    used: bool,
}

impl<E: CopyEngine> StagedAlloc<E> {
    fn memory(&self) -> &E::Memory {
        self.memory
            .as_ref()
            .expect("present until finish consumes the allocation")
    }
}

impl<E: CopyEngine> fmt::Debug for StagedAlloc<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagedAlloc")
            .field("memory", &self.memory)
            .finish()
    }
}

impl<E: CopyEngine> Drop for StagedAlloc<E> {
    fn drop(&mut self) {
        if self.memory.is_some() {
            let _ = self.shared.settle();
        }
    }
}

/// One region of a staged allocation.
pub struct StagedRegion<'a, E: CopyEngine> {
    shared: &'a Shared<E>,
    memory: &'a E::Memory,
    range: Range<u64>,
}

impl<E: CopyEngine> Region for StagedRegion<'_, E> {
    fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    fn fill<Er: From<DeviceError>>(
        self,
        fill: impl FnOnce(&mut [u8]) -> Result<(), Er>,
    ) -> Result<(), Er> {
        let shared = self.shared;
        let len = self.len() as usize;
        let Some((buffer, stream)) = shared.filled(len, fill)? else {
            return Ok(());
        };
        // SAFETY: the buffer goes into the pending queue with the copy's event, and leaves it
        // (to be written again or dropped) only after `wait` returned for that event
        // (`acquire`, `settle`, and `Shared`'s drop, which settles). The range was checked in
        // `regions` to lie inside `memory` and not to overlap another region of the same
        // call; a region is filled once (`fill` consumes it), and a later `regions` call on
        // the same allocation first waits for these copies. The memory is freed only after a
        // settle: `finish` settles before handing it out, and `StagedAlloc`'s drop settles.
        let copied = unsafe {
            shared
                .engine
                .copy_async(&buffer, 0..len, self.memory, self.range.start, stream)
        };
        match copied {
            Ok(event) => {
                shared.bytes.fetch_add(len as u64, Ordering::Relaxed);
                shared.copies.fetch_add(1, Ordering::Relaxed);
                shared.lock().pending.push_back((buffer, vec![event]));
                shared.returned.notify_one();
                Ok(())
            }
            Err(e) => {
                shared.give_back(buffer);
                Err(e.into())
            }
        }
    }
}

impl<E: CopyEngine> Target for StagedTarget<E> {
    type Alloc = StagedAlloc<E>;
    type Memory = E::Memory;
    type Region<'a>
        = StagedRegion<'a, E>
    where
        Self: 'a;

    fn device(&self) -> Device {
        self.shared.engine.device()
    }

    fn allocate(&self, bytes: u64) -> Result<StagedAlloc<E>, DeviceError> {
        Ok(StagedAlloc {
            memory: Some(self.shared.engine.alloc(bytes)?),
            shared: Arc::clone(&self.shared),
            used: false,
        })
    }

    fn regions<'a>(
        &'a self,
        alloc: &'a mut StagedAlloc<E>,
        ranges: &[Range<u64>],
    ) -> Result<Vec<StagedRegion<'a, E>>, DeviceError> {
        self.check_own(alloc)?;
        check_ranges(ranges, alloc.memory().len())?;
        if let Some(r) = ranges
            .iter()
            .find(|r| r.end - r.start > self.shared.buffer_size as u64)
        {
            return Err(DeviceError::InvalidRegions(format!(
                "region {r:?} is longer than the {} byte staging buffers",
                self.shared.buffer_size
            )));
        }
        if alloc.used {
            self.shared.settle()?;
        }
        alloc.used = true;
        let memory: &'a E::Memory = alloc.memory();
        Ok(ranges
            .iter()
            .map(|r| StagedRegion {
                shared: &self.shared,
                memory,
                range: r.clone(),
            })
            .collect())
    }

    fn finish(&self, mut alloc: StagedAlloc<E>) -> Result<E::Memory, DeviceError> {
        self.check_own(&alloc)?;
        self.shared.settle()?;
        Ok(alloc.memory.take().expect("present until finish"))
    }

    fn max_region(&self) -> Option<u64> {
        Some(self.shared.buffer_size as u64)
    }

    fn settle(&self) -> Result<(), DeviceError> {
        self.shared.settle()
    }
}
