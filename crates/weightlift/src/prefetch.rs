//! Prefetching: a whole load started in the background ahead of the reads that will want
//! it (a `safe_open` handle whose caller will read every tensor), and those reads served
//! from it.
//!
//! Reads of files the checkpoint maps go to the mapping, which the prefetch populates: they
//! never wait. Reads of other files wait for the prefetch and take their tensor from it
//! (or, if it failed or was called off, read the file themselves and report their own
//! errors). No lock is held outside this module: a caller cannot keep one while it waits
//! for something else (an interpreter's lock, say), so a reader cannot deadlock against
//! the prefetch or another reader.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::mapping::Use;
use crate::options::LoadOptions;
use crate::tensor::{StateDict, Tensor};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

/// A load running in the background for a checkpoint, and the reads it serves.
#[derive(Debug)]
pub struct Prefetch {
    ckpt: Arc<Checkpoint>,
    cancel: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<Result<StateDict>>>>,
    /// The finished load (`None`: it failed, was called off, or never started).
    done: OnceLock<Option<Arc<StateDict>>>,
}

impl Checkpoint {
    /// Starts `options`' load of this checkpoint on a thread of its own (its cancel flag is
    /// the prefetch's: see [`Prefetch::cancel`]). Reads through the returned [`Prefetch`]
    /// find their bytes in memory rather than faulting them in one page at a time or waiting
    /// on one small request each.
    pub fn prefetch(self: &Arc<Self>, options: LoadOptions) -> Prefetch {
        let cancel = Arc::new(AtomicBool::new(false));
        let options = options.cancel(Arc::clone(&cancel));
        let ckpt = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("weightlift-prefetch".into())
            .spawn(move || ckpt.load(&options))
            .ok();
        let done = OnceLock::new();
        if thread.is_none() {
            // No thread could be started: reads go to the files.
            let _ = done.set(None);
        }
        Prefetch {
            ckpt: Arc::clone(self),
            cancel,
            thread: Mutex::new(thread),
            done,
        }
    }
}

impl Prefetch {
    /// The checkpoint being prefetched.
    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.ckpt
    }

    /// Calls the load off: it stops before its next request. Reads that follow go to the
    /// files.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the load; its result, unless it failed or was called off.
    pub fn wait(&self) -> Option<&Arc<StateDict>> {
        self.done
            .get_or_init(|| {
                let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
                match thread.map(JoinHandle::join) {
                    Some(Ok(Ok(state))) => Some(Arc::new(state)),
                    _ => None,
                }
            })
            .as_ref()
    }

    /// [`Checkpoint::get_slice`], served by the prefetch: from the file's mapping where the
    /// checkpoint maps it (populated by the prefetch, or now), else from the finished load.
    pub fn get_slice(&self, name: &str, ranges: &[Range<usize>]) -> Result<Tensor> {
        let Some((shard, _)) = self.ckpt.info(name) else {
            return self.ckpt.get_slice(name, ranges);
        };
        if !shard.maps(self.ckpt.mapping(), Use::Read)?.0
            && let Some(state) = self.wait()
            && let Some(t) = state.get(name)
        {
            return t.slice(ranges);
        }
        self.ckpt.get_slice(name, ranges)
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.cancel();
    }
}
