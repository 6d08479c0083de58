//! Prefetching: a checkpoint's bytes brought into memory in the background, ahead of the
//! reads that will want them (a `safe_open` handle whose caller will read every tensor), and
//! those reads served from them.
//!
//! Each shard is prefetched one of three ways, decided when the prefetch starts:
//! - a shard the checkpoint maps, and a local file it reads: through the process's
//!   prefetch window ([`crate::window`]), which populates the page cache in the order the
//!   readers read, never more than the window's bytes ahead of them, so a checkpoint larger
//!   than memory is read once;
//! - a shard read into memory of its own while everything prefetched that way fits in the
//!   window (a network filesystem, a URL): loaded whole in the background, reads take their
//!   tensors from the load (a view, no copy);
//! - a URL that does not fit: not prefetched; reads fetch their own bytes.
//!
//! Reads through the window wait for the chunks holding their bytes where the window holds
//! the whole checkpoint (populating them themselves where no thread has taken them: see
//! `State::claim` in [`crate::window`]); on a host short of memory they take the mapping's
//! pages, populated or not. Reads of files loaded whole wait for the load (or, if it
//! failed or was called off, read the file themselves and report their own errors). No lock is held outside this module and
//! the window: a caller cannot keep one while it waits for something else (an interpreter's
//! lock, say), so a reader cannot deadlock against the prefetch or another reader.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::mapping::Use;
use crate::options::LoadOptions;
use crate::pool::default_threads;
use crate::shard::Shard;
use crate::tensor::{StateDict, Tensor};
use crate::window::{Job, window};
use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use weightlift_storage::BackendKind;

/// How one shard is prefetched.
#[derive(Debug)]
enum Way {
    /// Through the prefetch window.
    Window(Arc<Job>),
    /// Loaded whole into memory of its own, with the others that fit.
    Owned,
    /// Not at all.
    None,
}

/// A prefetch of a checkpoint, and the reads it serves.
#[derive(Debug)]
pub struct Prefetch {
    ckpt: Arc<Checkpoint>,
    ways: Vec<Way>,
    cancel: Arc<AtomicBool>,
    /// The load of the shards prefetched whole, and the bytes it holds of the window's
    /// allowance for such loads.
    thread: Mutex<Option<JoinHandle<Result<StateDict>>>>,
    owned_bytes: u64,
    /// The finished load (`None`: it failed, was called off, or there is none).
    done: OnceLock<Option<Arc<StateDict>>>,
}

impl Checkpoint {
    /// Starts prefetching this checkpoint (see [`Prefetch`]) with `options`: its memory
    /// budget sets the window, its threads the loads of shards prefetched whole, and
    /// `drop_cache` releases the pages of what readers have read once they are past them.
    /// Reads through the returned [`Prefetch`] find their bytes in memory rather than
    /// faulting them in one page at a time or waiting on one small request each.
    pub fn prefetch(self: &Arc<Self>, options: LoadOptions) -> Prefetch {
        let budget = options.budget_in(self);
        let limit = budget.window();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut ways = Vec::with_capacity(self.shards().len());
        let mut owned = HashSet::new();
        let mapped: Vec<bool> = self
            .shards()
            .iter()
            .map(|shard| {
                shard
                    .maps(self.mapping(), Use::Read)
                    .map(|(m, _)| m)
                    .unwrap_or(false)
            })
            .collect();
        // Shards read into memory of their own are prefetched whole only where all of them
        // fit the window: held until the handle closes, a part of them would take memory the
        // window needs for the rest (in a memory cgroup smaller than the checkpoint, the
        // first shards held whole left the window's pages no room: they were evicted before
        // their reader came, and 1.3-1.5x the checkpoint was read).
        let unmapped: u64 = self
            .shards()
            .iter()
            .zip(&mapped)
            .filter(|(_, m)| !**m)
            .map(|(shard, _)| shard.header().data_len())
            .sum();
        let whole = unmapped > 0 && window().reserve_owned(unmapped, limit);
        let owned_bytes = if whole { unmapped } else { 0 };
        for (s, shard) in self.shards().iter().enumerate() {
            let way = if mapped[s] {
                // SAFETY: the policy maps only under a `Mapping` made by its unsafe
                // constructors, whose contract the caller took on when opening the checkpoint.
                match unsafe { shard.mapping() } {
                    Ok(map) => Way::Window(window().register(
                        self,
                        s,
                        Some(map),
                        options.drop_cache,
                        &budget,
                        default_threads(),
                    )),
                    Err(_) => Way::None,
                }
            } else if whole {
                owned.insert(s);
                Way::Owned
            } else if reads_ahead(shard) {
                Way::Window(window().register(
                    self,
                    s,
                    None,
                    options.drop_cache,
                    &budget,
                    default_threads(),
                ))
            } else {
                Way::None
            };
            ways.push(way);
        }
        let done = OnceLock::new();
        let mut thread = None;
        if owned.is_empty() {
            let _ = done.set(None);
        } else {
            let ckpt = Arc::clone(self);
            let names: HashSet<String> = self
                .shards()
                .iter()
                .enumerate()
                .filter(|(s, _)| owned.contains(s))
                .flat_map(|(_, shard)| shard.header().tensors().iter().map(|t| t.name.clone()))
                .collect();
            let options = options
                .cancel(Arc::clone(&cancel))
                .filter(move |n| names.contains(n));
            thread = std::thread::Builder::new()
                .name("weightlift-prefetch".into())
                .spawn(move || ckpt.load(&options))
                .ok();
            if thread.is_none() {
                let _ = done.set(None);
            }
        }
        Prefetch {
            ckpt: Arc::clone(self),
            ways,
            cancel,
            thread: Mutex::new(thread),
            owned_bytes,
            done,
        }
    }
}

impl Checkpoint {
    /// Starts reading this checkpoint's local files into the page cache in the background,
    /// in file order, through the process's prefetch window, where the whole checkpoint fits
    /// half the window (the readers' own prefetches, which follow, fit beside it) and a file
    /// is not mostly there already: for a caller that knows it will
    /// read the files but has other work to do first (transformers builds the model before it
    /// opens them). Nothing is mapped, and the returned [`Prefetch`] serves no reads: the
    /// loads that follow find the bytes in the page cache. Dropping it calls the rest off.
    pub fn warm(self: &Arc<Self>) -> Prefetch {
        let limit = self.budget().window();
        let fits = self.data_bytes().saturating_mul(2) <= limit;
        let ways = self
            .shards()
            .iter()
            .enumerate()
            .map(|(s, shard)| {
                let cold = reads_ahead(shard)
                    && shard.path().is_some_and(|path| {
                        weightlift_storage::residency(path).is_ok_and(|r| r.fraction() < 0.9)
                    });
                if fits && cold {
                    let budget = self.budget();
                    Way::Window(window().register(self, s, None, false, budget, default_threads()))
                } else {
                    Way::None
                }
            })
            .collect();
        let done = OnceLock::new();
        let _ = done.set(None);
        Prefetch {
            ckpt: Arc::clone(self),
            ways,
            cancel: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            owned_bytes: 0,
            done,
        }
    }
}

/// Whether the window can read `shard` ahead of its readers when it is not mapped: a local
/// file read through the page cache (one read with `O_DIRECT` bypasses it, so reading ahead
/// there would read every byte twice).
fn reads_ahead(shard: &Shard) -> bool {
    shard.path().is_some() && shard.backend() != BackendKind::Direct
}

/// A checkpoint announced to the process's prefetch window (see [`Checkpoint::announce`]);
/// dropping it takes the announcement back.
#[derive(Debug)]
pub struct Announcement {
    bytes: u64,
}

impl Drop for Announcement {
    fn drop(&mut self) {
        window().withdraw(self.bytes);
    }
}

impl Checkpoint {
    /// Tells the process's prefetch window that prefetches started later will serve all of
    /// this checkpoint (a caller that opens every file of a model first, then reads them one
    /// after another, each prefetched from its first read): the window decides from the
    /// first read whether everything fits in memory, rather than from the files registered
    /// so far, and on a host short of memory lets go of what readers are past from the
    /// start. Nothing is read. Dropping the returned value takes it back.
    pub fn announce(&self) -> Announcement {
        let bytes = self.data_bytes();
        window().announce(bytes);
        Announcement { bytes }
    }
}

impl Prefetch {
    /// The checkpoint being prefetched.
    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.ckpt
    }

    /// Waits until shard `shard`'s prefetch has brought in all it will (nothing more is
    /// coming: done, called off, or held back by a full window); at once for a shard not
    /// prefetched through the window. For a reader of the whole file that reads it on its own
    /// handle (a planned load) after a [`Checkpoint::warm`]: started before the warm read is
    /// through, it would be a second reader of the file, and two readers split each other's
    /// requests.
    pub fn wait_for_shard(&self, shard: usize) {
        if let Some(Way::Window(job)) = self.ways.get(shard) {
            window().wait_settled(job);
        }
    }

    /// Whether any shard is being prefetched.
    pub fn is_active(&self) -> bool {
        self.ways.iter().any(|w| !matches!(w, Way::None))
    }

    /// Calls the prefetch off: nothing more is brought in. Reads that follow go to the
    /// files.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        for way in &self.ways {
            if let Way::Window(job) = way {
                job.cancel();
            }
        }
    }

    /// Waits for the load of the shards prefetched whole; its result, unless it failed or
    /// was called off (or no shard is prefetched that way).
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

    /// [`Checkpoint::get_slice`], served by the prefetch (see [`Prefetch`]).
    pub fn get_slice(&self, name: &str, ranges: &[Range<usize>]) -> Result<Tensor> {
        let Some((s, t)) = self.ckpt.locate(name) else {
            return self.ckpt.get_slice(name, ranges);
        };
        match &self.ways[s] {
            Way::Window(job) => {
                window().serve(job, t);
                let read = self.ckpt.read_slice(name, ranges, false);
                window().consumed(job, t);
                read
            }
            Way::Owned => match self.wait().and_then(|state| state.get(name)) {
                Some(tensor) => tensor.slice(ranges),
                None => self.ckpt.get_slice(name, ranges),
            },
            Way::None => self.ckpt.get_slice(name, ranges),
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.cancel();
        window().release_owned(self.owned_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mapping, MemoryBudget, OpenOptions};

    #[test]
    fn shards_read_into_memory_of_their_own_are_prefetched_whole_only_all_together() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![3u8; 1 << 20];
        for s in 0..3 {
            let name = format!("t{s}");
            let tensor = weightlift_format::TensorRef {
                name: &name,
                dtype: weightlift_format::Dtype::U8,
                shape: &[1 << 20],
                data: &data,
            };
            let path = dir.path().join(format!("model-{s:05}.safetensors"));
            weightlift_format::write_file(&path, &[tensor], None).unwrap();
        }
        let options = OpenOptions::default().mapping(Mapping::never());
        let ckpt = Arc::new(Checkpoint::open_with(dir.path(), &options).unwrap());
        let whole = |window: u64| {
            let budget = MemoryBudget::of(window * 2).with_window(window);
            let prefetch = ckpt.prefetch(LoadOptions::default().memory_budget(budget));
            let ways: Vec<bool> = prefetch
                .ways
                .iter()
                .map(|w| matches!(w, Way::Owned))
                .collect();
            assert_eq!(ckpt.get("t1").unwrap().bytes(), Some(data.as_slice()));
            ways
        };
        // Two of the three 1 MiB shards would fit a 2.5 MiB window: none is held whole, all
        // go through the window (held whole, two would leave the third no room).
        assert_eq!(whole(5 << 19), vec![false; 3]);
        // All three fit: all are loaded whole.
        assert_eq!(whole(4 << 20), vec![true; 3]);
    }
}
