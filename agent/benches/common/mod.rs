//! Code the two network benches (`hbone`, `capture`) share. Each bench is its own crate, so each
//! includes this directory with `#[path = "common/mod.rs"] mod common;`.
// Each bench uses only part of this module.
#![allow(dead_code)]

pub mod counters;
pub mod cpu;
pub mod json;
pub mod machine;
pub mod stats;
pub mod workload;
