//! Addresses that must not be mixed up on the connection path, as distinct types (linkerd's
//! `proxy/transport/src/addrs.rs` idea): where the app meant to connect, who connected to us, and
//! a pod's own address.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Where the app meant to connect, recovered from capture (outbound) or from the accepted
/// socket's local address (inbound plaintext) or the CONNECT `:authority` (HBONE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The remote end of an accepted connection, as the socket shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// One of a pod's own addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodIp(pub IpAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for PodIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for (policies and the state name
/// pods by their IPv4 address).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}
