//! A stand-in GPU for testing the staged pipeline on any machine.
//!
//! [`FakeEngine`] copies on background threads after pseudo-random delays, so copies
//! complete out of order, as they do across CUDA streams. It checks the contract a real
//! device cannot: handing out a staging buffer while a copy from it has not completed, starting a copy into bytes another copy in flight is writing, or
//! freeing device memory a copy is still writing, each counts a violation
//! ([`FakeEngine::violations`]; a real device would copy whatever the buffer holds by then,
//! or write into freed memory). It can fail the n-th copy or allocation to test error
//! paths.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use weightlift_device::{CopyEngine, Device, DeviceError, DeviceMemory};

/// Device memory of the [`FakeEngine`]: host bytes behind a lock.
#[derive(Debug)]
pub struct FakeMemory {
    bytes: Arc<Mutex<Vec<u8>>>,
    len: u64,
    /// Destination ranges of the copies into this memory still in flight.
    writing: Arc<Mutex<Vec<Range<u64>>>>,
    violations: Arc<AtomicU64>,
}

impl Drop for FakeMemory {
    fn drop(&mut self) {
        // A real device would go on writing into freed memory.
        if !self
            .writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl DeviceMemory for FakeMemory {
    fn device(&self) -> Device {
        Device::Cuda(0)
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn device_ptr(&self) -> u64 {
        self.bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ptr() as u64
    }

    fn read_back(&self, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        let bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        let src = bytes
            .get(start..start + dst.len())
            .ok_or_else(|| DeviceError::InvalidRegions("read past the allocation".into()))?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// A staging buffer of the [`FakeEngine`].
#[derive(Debug)]
pub struct FakePinned {
    bytes: Vec<u8>,
    /// Copies from this buffer in flight.
    in_flight: Arc<AtomicUsize>,
}

/// The outcome of a copy, once it landed, and the signal that it did.
type Completion = (Mutex<Option<Result<Duration, String>>>, Condvar);

/// Completion of one fake copy.
#[derive(Debug)]
pub struct FakeEvent {
    done: Arc<Completion>,
}

/// A CPU stand-in for a GPU: delayed, out-of-order copies; counts contract violations.
#[derive(Debug, Default)]
pub struct FakeEngine {
    max_delay: Duration,
    fail_copy: Option<u64>,
    fail_alloc: Option<u64>,
    copies: AtomicU64,
    allocs: AtomicU64,
    pinned_bytes: AtomicU64,
    device_bytes: AtomicU64,
    violations: Arc<AtomicU64>,
}

impl FakeEngine {
    /// A fake whose copies land after up to `max_delay` (each a pseudo-random part of it).
    pub fn new(max_delay: Duration) -> FakeEngine {
        FakeEngine {
            max_delay,
            ..FakeEngine::default()
        }
    }

    /// Fails the copy with number `n` (0-based); its event reports the failure.
    pub fn failing_copy(mut self, n: u64) -> FakeEngine {
        self.fail_copy = Some(n);
        self
    }

    /// Fails the device allocation with number `n` (0-based).
    pub fn failing_alloc(mut self, n: u64) -> FakeEngine {
        self.fail_alloc = Some(n);
        self
    }

    /// Copies started so far.
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::SeqCst)
    }

    /// Times a buffer was handed out or copied from while a copy from it was in flight, a
    /// copy started into bytes another copy was writing, or memory was freed while a copy
    /// wrote into it (must stay 0).
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::SeqCst)
    }

    /// Device bytes allocated so far.
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes.load(Ordering::SeqCst)
    }

    /// Pinned bytes allocated so far (the pipeline allocates its pool once).
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes.load(Ordering::SeqCst)
    }
}

impl CopyEngine for FakeEngine {
    type Memory = FakeMemory;
    type Pinned = FakePinned;
    type Event = FakeEvent;

    fn device(&self) -> Device {
        Device::Cuda(0)
    }

    fn streams(&self) -> usize {
        3
    }

    fn alloc(&self, bytes: u64) -> Result<FakeMemory, DeviceError> {
        let n = self.allocs.fetch_add(1, Ordering::SeqCst);
        if self.fail_alloc == Some(n) {
            return Err(DeviceError::Alloc {
                bytes,
                device: "cuda:0 (fake)".into(),
                reason: "out of memory (injected)".into(),
            });
        }
        self.device_bytes.fetch_add(bytes, Ordering::SeqCst);
        Ok(FakeMemory {
            // Not zero: bytes the load forgot to write must not pass for zeros.
            bytes: Arc::new(Mutex::new(vec![0xa5; bytes as usize])),
            len: bytes,
            writing: Arc::new(Mutex::new(Vec::new())),
            violations: Arc::clone(&self.violations),
        })
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<FakePinned, DeviceError> {
        self.pinned_bytes.fetch_add(bytes as u64, Ordering::SeqCst);
        Ok(FakePinned {
            bytes: vec![0; bytes],
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn host_slice<'a>(&self, pinned: &'a mut FakePinned) -> &'a mut [u8] {
        if pinned.in_flight.load(Ordering::SeqCst) > 0 {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
        &mut pinned.bytes
    }

    unsafe fn copy_async(
        &self,
        pinned: &FakePinned,
        src: Range<usize>,
        memory: &FakeMemory,
        offset: u64,
        _stream: usize,
    ) -> Result<FakeEvent, DeviceError> {
        let len = src.end.saturating_sub(src.start);
        if src.start > src.end
            || src.end > pinned.bytes.len()
            || offset
                .checked_add(len as u64)
                .is_none_or(|e| e > memory.len)
        {
            return Err(DeviceError::InvalidRegions(format!(
                "copy of staged bytes {src:?} to {offset} does not fit"
            )));
        }
        let n = self.copies.fetch_add(1, Ordering::SeqCst);
        pinned.in_flight.fetch_add(1, Ordering::SeqCst);
        let dst = offset..offset + len as u64;
        {
            let mut writing = memory.writing.lock().unwrap_or_else(|e| e.into_inner());
            if writing
                .iter()
                .any(|w| w.start < dst.end && dst.start < w.end)
            {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
            writing.push(dst.clone());
        }
        let writing = Arc::clone(&memory.writing);
        // What the device will read: the buffer as it is now. Had the pipeline handed the
        // buffer out again before the copy completed, `host_slice` counted a violation.
        let data = pinned.bytes[src].to_vec();
        let in_flight = Arc::clone(&pinned.in_flight);
        let done = Arc::new((Mutex::new(None), Condvar::new()));
        let fail = self.fail_copy == Some(n);
        let delay = self.max_delay.mul_f64(pseudo_random(n));
        let target = Arc::clone(&memory.bytes);
        let event = FakeEvent {
            done: Arc::clone(&done),
        };
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let result = if fail {
                Err("copy failed (injected)".to_string())
            } else {
                let mut bytes = target.lock().unwrap_or_else(|e| e.into_inner());
                bytes[offset as usize..offset as usize + len].copy_from_slice(&data);
                Ok(delay)
            };
            in_flight.fetch_sub(1, Ordering::SeqCst);
            {
                let mut writing = writing.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = writing.iter().position(|w| *w == dst) {
                    writing.swap_remove(i);
                }
            }
            let (cell, signal) = &*done;
            *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            signal.notify_all();
        });
        Ok(event)
    }

    fn wait(&self, event: FakeEvent) -> Result<Duration, DeviceError> {
        let (cell, signal) = &*event.done;
        let mut state = cell.lock().unwrap_or_else(|e| e.into_inner());
        while state.is_none() {
            state = signal.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state
            .take()
            .expect("set")
            .map_err(|reason| DeviceError::Driver {
                device: "cuda:0 (fake)".into(),
                operation: "host-to-device copy",
                reason,
            })
    }
}

/// A number in [0, 1) from `n` (splitmix64): delays that differ copy to copy.
fn pseudo_random(n: u64) -> f64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
