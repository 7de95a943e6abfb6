//! HTTP in the node proxy (L7): the outbound side serves an enrolled pod's HTTP connections and
//! routes each request as Istio's sidecars do (`routing`): `target` resolves the host and the
//! cluster on the snapshot, `balance` picks the cluster's endpoint per request (or connection)
//! and keeps the load-balancer state that outlives snapshots, and `client` sends the request over
//! a pooled upstream connection, inside HBONE for meshed endpoints. The inbound side serves the
//! HTTP an HBONE stream carries at its destination, forwarding each request to the app.

pub mod balance;
pub mod body;
pub mod breaker;
pub mod client;
pub mod fault;
pub mod forward;
pub mod headers;
pub mod inbound;
pub mod mirror;
pub mod outbound;
mod passthrough;
pub mod replay;
pub mod retry;
pub mod target;
