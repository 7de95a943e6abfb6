//! HTTP-aware proxying: what the per-node proxy does per request once it has parsed HTTP.
//! `balance` picks a cluster's endpoint per request (or connection) and keeps the load-balancer
//! state that outlives config snapshots.

pub mod balance;
