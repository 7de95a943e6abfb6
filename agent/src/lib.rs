//! ambit: an eBPF-based sidecarless service-mesh node agent. The module list reads like the
//! architecture (ARCHITECTURE.md): capture in the kernel (`ebpf`), pods on this node (`node`),
//! the per-node proxy (`proxy`), config sources (`config`), and the local-mode harness.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod ca;
pub mod config;
pub mod demo;
pub mod dns;
pub mod ebpf;
pub mod harness;
pub mod identity;
pub mod node;
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod snapshot;
pub mod state;
pub mod tls;
pub mod trace;
pub mod zc;
