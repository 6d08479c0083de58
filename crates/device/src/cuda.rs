//! The CUDA [`CopyEngine`]: the driver API through `cudarc`, loaded at run time.
//!
//! The driver library is opened when an engine is created, so this builds without a CUDA
//! toolkit and runs without a GPU: no driver, no device or a failing call is a
//! [`DeviceError`], never a panic. Device memory is one `cuMemAlloc` per allocation (one
//! per shard in a load); staging buffers are `cuMemHostAlloc` page-locked memory (not
//! write-combined, which is slow for the kernel's copies into it on some platforms); copies
//! are `cuMemcpyHtoDAsync` on a few streams, each bracketed by timing events.

use crate::staged::{CopyEngine, DeviceMemory, StagedTarget, StagingOptions};
use crate::{Device, DeviceError};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, result, sys};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn driver_error(ordinal: usize, operation: &'static str) -> impl Fn(DriverError) -> DeviceError {
    move |e| DeviceError::Driver {
        device: format!("cuda:{ordinal}"),
        operation,
        reason: format!("{e:?}"),
    }
}

/// An NVIDIA GPU, with streams for asynchronous copies.
#[derive(Debug)]
pub struct CudaEngine {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    streams: Vec<Arc<CudaStream>>,
    pinned: Arc<PinnedCount>,
}

/// Page-locked bytes an engine's buffers hold now and at most: what a load's report and
/// the GPU tests check against the configured pool.
#[derive(Debug, Default)]
struct PinnedCount {
    now: AtomicU64,
    peak: AtomicU64,
}

impl CudaEngine {
    /// Opens device `ordinal` with `streams` copy streams (at least 1).
    pub fn new(ordinal: usize, streams: usize) -> Result<CudaEngine, DeviceError> {
        let unavailable = |reason: String| DeviceError::Unavailable {
            device: format!("cuda:{ordinal}"),
            reason,
        };
        // SAFETY: only tries to dlopen the driver library by its usual names; cudarc
        // panics on first use of a driver function when the library is missing, so this
        // check must come first.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "no CUDA driver library (libcuda.so) found: is the NVIDIA driver installed?".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| unavailable(format!("the driver did not start: {e:?}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_error(ordinal, "creating a context"))?;
        let streams = (0..streams.max(1))
            .map(|_| ctx.new_stream())
            .collect::<Result<Vec<_>, _>>()
            .map_err(driver_error(ordinal, "creating a stream"))?;
        Ok(CudaEngine {
            ordinal,
            ctx,
            streams,
            pinned: Arc::default(),
        })
    }

    /// `len` bytes of device memory at `ptr` that another library allocated on this
    /// device (a torch tensor's storage, say), to copy into; dropping the value does not
    /// free it. The engine's context is the device's primary context, the one the CUDA
    /// runtime (torch, CuPy, ...) uses, so their addresses are valid here.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be device memory of this device, in the primary context, that
    /// stays allocated while the value lives and that nothing else reads or writes until
    /// the copies into it have completed (the staged target settled).
    pub unsafe fn borrow(&self, ptr: u64, len: u64) -> CudaMemory {
        CudaMemory {
            ptr,
            len,
            ordinal: self.ordinal,
            ctx: Arc::clone(&self.ctx),
            owned: false,
        }
    }

    /// Page-locked host bytes this engine's buffers hold now.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned.now.load(Ordering::Relaxed)
    }

    /// The most page-locked host bytes this engine's buffers held at once.
    pub fn peak_pinned_bytes(&self) -> u64 {
        self.pinned.peak.load(Ordering::Relaxed)
    }

    /// Free and total device memory, in bytes, as the driver reports them.
    pub fn memory_info(&self) -> Result<(u64, u64), DeviceError> {
        self.bind()?;
        let (free, total) =
            result::mem_get_info().map_err(driver_error(self.ordinal, "querying memory"))?;
        Ok((free as u64, total as u64))
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> Result<String, DeviceError> {
        self.ctx
            .name()
            .map_err(driver_error(self.ordinal, "querying the name"))
    }

    fn bind(&self) -> Result<(), DeviceError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_error(self.ordinal, "binding the context"))
    }
}

impl StagedTarget<CudaEngine> {
    /// The staged pipeline on GPU `ordinal`: `streams` copy streams and a pinned pool of
    /// `staging`, allocated now.
    pub fn cuda(
        ordinal: usize,
        streams: usize,
        staging: StagingOptions,
    ) -> Result<StagedTarget<CudaEngine>, DeviceError> {
        StagedTarget::new(CudaEngine::new(ordinal, streams)?, staging)
    }
}

/// Device memory: one allocation of the engine's, freed when dropped, or memory another
/// library owns ([`CudaEngine::borrow`]), never freed here.
#[derive(Debug)]
pub struct CudaMemory {
    ptr: sys::CUdeviceptr,
    len: u64,
    ordinal: usize,
    ctx: Arc<CudaContext>,
    owned: bool,
}

// SAFETY: a device pointer is an address in the context's memory, usable from any thread
// that binds the context (every use here binds it first); the allocation is freed once.
unsafe impl Send for CudaMemory {}
// SAFETY: shared use is `read_back` (a synchronous copy that only reads device memory) and
// reading the address; writes happen through `copy_async`, whose contract keeps copies to
// disjoint bytes.
unsafe impl Sync for CudaMemory {}

impl DeviceMemory for CudaMemory {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn device_ptr(&self) -> u64 {
        self.ptr
    }

    fn read_back(&self, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        if offset
            .checked_add(dst.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(DeviceError::InvalidRegions(format!(
                "read of {} bytes at {offset} past the {} byte allocation",
                dst.len(),
                self.len
            )));
        }
        if dst.is_empty() {
            return Ok(());
        }
        let err = driver_error(self.ordinal, "device-to-host copy");
        self.ctx.bind_to_thread().map_err(&err)?;
        // SAFETY: the range was checked to lie inside this live allocation, and `dst` is a
        // host buffer of exactly the copied length; the copy is synchronous.
        unsafe { result::memcpy_dtoh_sync(dst, self.ptr + offset) }.map_err(err)
    }
}

impl Drop for CudaMemory {
    fn drop(&mut self) {
        if self.len == 0 || !self.owned {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `malloc_sync` in this context and is freed only here;
        // copies into it were waited for before it could be dropped (the staged target
        // settles before its allocations are released).
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A page-locked host buffer; freed when dropped.
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
    count: Arc<PinnedCount>,
}

// SAFETY: the buffer is plain host memory owned by this value; moving it between threads
// moves the ownership, and the context it is freed in is bound by whichever thread drops it.
unsafe impl Send for PinnedBuffer {}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `malloc_host` and is freed only here; the staged target
        // drops buffers only after their copies completed.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
        self.count.now.fetch_sub(self.len as u64, Ordering::Relaxed);
    }
}

/// A copy in flight: timing events around it on its stream.
#[derive(Debug)]
pub struct CopyEvent {
    start: CudaEvent,
    end: CudaEvent,
}

impl CopyEngine for CudaEngine {
    type Memory = CudaMemory;
    type Pinned = PinnedBuffer;
    type Event = CopyEvent;

    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn streams(&self) -> usize {
        self.streams.len()
    }

    fn alloc(&self, bytes: u64) -> Result<CudaMemory, DeviceError> {
        let memory = |ptr| CudaMemory {
            ptr,
            len: bytes,
            ordinal: self.ordinal,
            ctx: Arc::clone(&self.ctx),
            owned: true,
        };
        if bytes == 0 {
            return Ok(memory(0));
        }
        self.bind()?;
        let len = usize::try_from(bytes).map_err(|_| DeviceError::Alloc {
            bytes,
            device: format!("cuda:{}", self.ordinal),
            reason: "larger than the address space".into(),
        })?;
        // SAFETY: allocates `len` bytes in the bound context; the contents are unset, which
        // is fine for bytes (every byte a tensor uses is copied in before it is read).
        let ptr = unsafe { result::malloc_sync(len) }.map_err(|e| DeviceError::Alloc {
            bytes,
            device: format!("cuda:{}", self.ordinal),
            reason: format!("{e:?}"),
        })?;
        Ok(memory(ptr))
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuffer, DeviceError> {
        self.bind()?;
        // SAFETY: allocates `bytes` of page-locked host memory (flags 0: cacheable, not
        // write-combined); freed in `PinnedBuffer::drop`.
        let ptr =
            unsafe { result::malloc_host(bytes.max(1), 0) }.map_err(|e| DeviceError::Alloc {
                bytes: bytes as u64,
                device: format!("cuda:{} (pinned host memory)", self.ordinal),
                reason: format!("{e:?}"),
            })?;
        let now = self.pinned.now.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.pinned.peak.fetch_max(now, Ordering::Relaxed);
        Ok(PinnedBuffer {
            ptr: ptr.cast(),
            len: bytes,
            ctx: Arc::clone(&self.ctx),
            count: Arc::clone(&self.pinned),
        })
    }

    fn host_slice<'a>(&self, pinned: &'a mut PinnedBuffer) -> &'a mut [u8] {
        // SAFETY: `ptr` points to `len` bytes of host memory owned by `pinned`, which is
        // borrowed mutably for 'a, so no other reference to them exists meanwhile.
        unsafe { std::slice::from_raw_parts_mut(pinned.ptr, pinned.len) }
    }

    unsafe fn copy_async(
        &self,
        pinned: &PinnedBuffer,
        src: std::ops::Range<usize>,
        memory: &CudaMemory,
        offset: u64,
        stream: usize,
    ) -> Result<CopyEvent, DeviceError> {
        let err = driver_error(self.ordinal, "host-to-device copy");
        let len = src.end.saturating_sub(src.start);
        if src.start > src.end
            || src.end > pinned.len
            || offset
                .checked_add(len as u64)
                .is_none_or(|end| end > memory.len)
        {
            return Err(DeviceError::InvalidRegions(format!(
                "copy of staged bytes {src:?} to {offset} does not fit"
            )));
        }
        let stream = &self.streams[stream % self.streams.len()];
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(timing).map_err(&err)?;
        let end = self.ctx.new_event(timing).map_err(&err)?;
        start.record(stream).map_err(&err)?;
        // SAFETY: `pinned[src]` (checked to lie in the buffer) is page-locked host memory
        // that the caller keeps unwritten and alive until `wait` returns for the event
        // recorded after the copy on the same stream; the destination range was checked to
        // lie in `memory`, which the caller keeps alive and does not copy into elsewhere
        // meanwhile.
        unsafe {
            let src = std::slice::from_raw_parts(pinned.ptr.add(src.start), len);
            result::memcpy_htod_async(memory.ptr + offset, src, stream.cu_stream())
        }
        .map_err(&err)?;
        end.record(stream).map_err(&err)?;
        Ok(CopyEvent { start, end })
    }

    fn wait(&self, event: CopyEvent) -> Result<Duration, DeviceError> {
        let err = driver_error(self.ordinal, "host-to-device copy");
        event.end.synchronize().map_err(&err)?;
        let ms = event.start.elapsed_ms(&event.end).map_err(&err)?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a driver (CI), opening a device is an error value, not a panic;
    /// with one, a round trip through the engine returns the bytes.
    #[test]
    fn no_driver_is_an_error_and_a_driver_round_trips() {
        match CudaEngine::new(0, 2) {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("cuda:0"), "{msg}");
            }
            Ok(engine) => {
                let memory = engine.alloc(1 << 20).unwrap();
                let mut pinned = engine.alloc_pinned(1 << 20).unwrap();
                let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
                engine.host_slice(&mut pinned).copy_from_slice(&data);
                // SAFETY: `pinned` and `memory` are neither touched nor dropped before the
                // wait below.
                let event = unsafe { engine.copy_async(&pinned, 0..data.len(), &memory, 0, 1) };
                engine.wait(event.unwrap()).unwrap();
                let mut back = vec![0u8; data.len()];
                memory.read_back(0, &mut back).unwrap();
                assert_eq!(back, data);
            }
        }
        assert!(CudaEngine::new(10_000, 1).is_err());
    }
}
