//! Test support for weightlift, kept out of the libraries' public API: the pieces its tests
//! and `cargo xtask` share. (What the CLI needs too, the synthetic checkpoints and the
//! yardsticks, is the publishable `weightlift-workload`.)
//!
//! - [`cgroup`]: a memory cgroup with a limit, a stand-in for a host short of memory.
//! - [`files`]: small checkpoints with known bytes, for tests.
//! - [`fake`]: a stand-in GPU that runs the staged pipeline on any machine and counts
//!   contract violations a real device cannot report.
//! - [`fuse`]: a FUSE passthrough mount (`bindfs`), a stand-in for a network filesystem.
//! - [`servers`] (feature `servers`): nginx, an S3-compatible server and a fault proxy on
//!   127.0.0.1.

pub mod cgroup;
pub mod fake;
pub mod files;
pub mod fuse;
#[cfg(feature = "servers")]
pub mod servers;
