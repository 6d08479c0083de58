//! Workloads and yardsticks for safetensors loaders: what `weightlift demo`, `weightlift
//! generate` and `cargo xtask bench` share.
//!
//! - [`synthetic`]: large checkpoints shaped like real models (dense, MoE), generated
//!   deterministically, sharded with an index, at any size.
//! - [`yardstick`]: what loads are measured against (a raw read of the same bytes, filling
//!   fresh memory) and cold-cache eviction, checked.
//! - [`util`]: sizes as people write them, medians, peak memory, free space.

pub mod synthetic;
pub mod util;
pub mod yardstick;
