//! Progress reporting: a callback invoked once per completed read request (a few per
//! 16 MiB), never per tensor, so it costs nothing measurable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a load stands, after one more read completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Position of the file (shard) the read was from.
    pub file: usize,
    /// Bytes read so far from that file.
    pub file_bytes_done: u64,
    /// Bytes to read from that file.
    pub file_bytes_total: u64,
    /// Bytes read so far in all.
    pub bytes_done: u64,
    /// Bytes to read in all.
    pub bytes_total: u64,
}

/// A progress callback; called from loader threads, concurrently.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Where an executing load reports completed reads: byte counters over every plan of one
/// load (a CPU load may run an owned and a mapped plan), and the caller's callback.
pub(crate) struct ProgressSink {
    total: AtomicU64,
    /// Per shard of the checkpoint.
    per_file: Vec<AtomicU64>,
    bytes_total: u64,
    callback: Option<ProgressFn>,
}

impl ProgressSink {
    /// Counters for `shards` files and `bytes_total` bytes to read.
    pub(crate) fn new(shards: usize, bytes_total: u64, callback: Option<ProgressFn>) -> Self {
        ProgressSink {
            total: AtomicU64::new(0),
            per_file: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            bytes_total,
            callback,
        }
    }

    /// `len` more bytes read from file `file`, which has `file_total` to read.
    pub(crate) fn done(&self, file: usize, file_total: u64, len: u64) {
        let bytes_done = self.total.fetch_add(len, Ordering::Relaxed) + len;
        let file_done = self.per_file[file].fetch_add(len, Ordering::Relaxed) + len;
        if let Some(report) = &self.callback {
            report(&Progress {
                file,
                file_bytes_done: file_done,
                file_bytes_total: file_total,
                bytes_done,
                bytes_total: self.bytes_total,
            });
        }
    }
}
