//! The in-process tier (ambit issue 10): the stages, the HBONE pool and the HBONE server over
//! loopback in one process, with a test socket factory and a table of original destinations in
//! place of the pod's netns and capture. Milliseconds per scenario, no root, no netns, no eBPF;
//! what crosses the kernel stays with the namespaced tests (`tests/hbone.rs`, `tests/capture.rs`).
//!
//! The fixture (`fixture` re-exports it all): `world` describes the cluster and builds the
//! snapshot through the store, `nodes` runs each node's stages, `apps` are what runs in the pods,
//! `io` and `scrape` wait and read. Each other file is one topic.

mod apps;
mod fixture;
mod io;
mod nodes;
mod scrape;
mod web;
mod world;

mod close;
mod drain;
mod hbone_hygiene;
mod hbone_server;
mod http_behaviour;
mod http_grpc;
mod http_handling;
mod http_outlier;
mod http_passthrough;
mod http_resilience;
mod http_routing;
mod http_smoke;
mod http_source_relay;
mod inbound_plain;
mod l7;
mod outbound;
mod pool;
mod round_trip;
