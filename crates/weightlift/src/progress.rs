//! Progress reporting: a callback invoked once per completed read request (a few per
//! 16 MiB), never per tensor, so it costs nothing measurable.

use std::sync::Arc;

/// Where a load stands, after one more read completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
