//! Test support for weightlift, kept out of the libraries' public API: the pieces its tests,
//! `cargo xtask bench` and the CLI's `demo` share.
//!
//! - [`synthetic`]: large checkpoints shaped like real models (dense, MoE), generated.
//! - [`files`]: small checkpoints with known bytes, for tests.
//! - [`yardstick`]: what loads are measured against (a raw read of the same bytes, filling
//!   fresh memory) and cold-cache eviction.
//! - [`fake`]: a stand-in GPU that runs the staged pipeline on any machine and counts
//!   contract violations a real device cannot report.
//! - [`servers`] (feature `servers`): nginx, an S3-compatible server and a fault proxy on
//!   127.0.0.1.
//! - [`util`]: sizes, medians, peak memory, free space.

pub mod fake;
pub mod files;
#[cfg(feature = "servers")]
pub mod servers;
pub mod synthetic;
pub mod util;
pub mod yardstick;
