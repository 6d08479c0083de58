//! This crate holds weightlift's cross-crate integration tests (`tests/tests/*.rs`); the
//! checkpoints and servers they use come from `weightlift-testkit`.
