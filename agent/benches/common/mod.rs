//! Code the network benches (`capture`, `hbone`, `l7`) share. Each bench is its own crate, so each
//! includes this directory with `#[path = "common/mod.rs"] mod common;`.
// Each bench uses only part of this module.
#![allow(dead_code)]

pub mod agents;
pub mod counters;
pub mod cpu;
pub mod h2load;
pub mod http_server;
pub mod json;
pub mod machine;
pub mod stats;
pub mod tools;
pub mod workload;
