//! HTTP in the node proxy (L7): the outbound side serves an enrolled pod's HTTP connections and
//! routes each request as Istio's sidecars do (`routing`), sending it to the chosen endpoint over
//! a pooled upstream connection (`client`), inside HBONE for meshed endpoints.

pub mod body;
pub mod client;
pub mod headers;
pub mod outbound;
pub mod target;
