//! Map key/value types shared by ambit's eBPF programs and the agent's loader.
//!
//! Pinned maps outlive the agent, so every layout here is an ABI: append fields, never reorder,
//! keep retired fields as `reserved`, and rename the map (`..._V2`) when a layout must change.
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so that a dual-stack
//! socket and a plain IPv4 socket produce the same key. Bytes are in network order as the kernel
//! stores them; ports are in host order.
#![no_std]

/// Outbound listener inside each enrolled pod's netns (127.0.0.1 and ::1).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext listener inside each enrolled pod's netns (sk_lookup target).
pub const INBOUND_PORT: u16 = 15006;
/// HBONE listener inside each enrolled pod's netns; never steered.
pub const HBONE_PORT: u16 = 15008;
/// SO_MARK carried by every socket the proxy creates; capture skips it (Istio uses the same mark).
pub const PROXY_MARK: u32 = 0x539;
/// SO_MARK of the proxy's sockets to a pod's own app that carry the client's address as their
/// source (IP_TRANSPARENT). In an enrolled pod's netns a policy-routing rule sends packets with
/// this mark to `TRANSPARENT_ROUTE_TABLE` (everything is local, over lo), and the app's accepted
/// socket inherits it from the SYN (`tcp_fwmark_accept`), so its replies to the client's address
/// come back to the proxy. Distinct from `PROXY_MARK`, whose sockets leave the pod.
pub const TRANSPARENT_MARK: u32 = 0x53a;
/// Routing table (in each enrolled pod's netns) holding `local default dev lo` for
/// `TRANSPARENT_MARK`.
pub const TRANSPARENT_ROUTE_TABLE: u32 = 0x539;
/// ifindex of the loopback device in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Directory under the bpffs root that holds this ABI's pins. Bump when any layout changes
/// incompatibly: aya reuses an existing pinned map without checking its layout.
pub const PIN_ABI: &str = "v1";

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A 16-byte address in network byte order, IPv4 stored IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<IpKey>() == 16);

impl IpKey {
    /// IPv4 address as the kernel stores it (`user_ip4`, `local_ip4`: network order in memory).
    #[inline(always)]
    pub const fn from_v4_raw(ip4: u32) -> Self {
        // ::ffff:a.b.c.d — the 0xffff sits in bytes 10..12, i.e. word 2 in network order.
        IpKey {
            addr: [0, 0, u32::from_be(0x0000_ffff), ip4],
        }
    }
    #[inline(always)]
    pub const fn from_v6_raw(ip6: [u32; 4]) -> Self {
        IpKey { addr: ip6 }
    }
    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == u32::from_be(0x0000_ffff)
    }
    /// 127.0.0.0/8, ::1, and ::ffff:127.0.0.0/104.
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        if self.is_v4_mapped() {
            // First octet of the IPv4 address is the lowest byte of the raw word.
            (self.addr[3].to_ne_bytes()[0]) == 127
        } else {
            self.addr[0] == 0
                && self.addr[1] == 0
                && self.addr[2] == 0
                && self.addr[3] == u32::from_be(1)
        }
    }
    #[inline(always)]
    pub const fn is_unspecified(&self) -> bool {
        (self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == 0 && self.addr[3] == 0)
            || (self.is_v4_mapped() && self.addr[3] == 0)
    }
}

/// An address and a host-order port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddrKey {
    pub ip: IpKey,
    pub port: u32,
}
const _: () = assert!(core::mem::size_of::<SockAddrKey>() == 20);

/// `ENROLLED`: netns cookie → the pod that owns that network namespace.
pub mod enrolled {
    pub const MAP: &str = "AMBIT_ENROLLED";
    pub const MAX_ENTRIES: u32 = 4096;

    pub const FLAG_HAS_IP4: u32 = 1;
    pub const FLAG_HAS_IP6: u32 = 1 << 1;

    /// Keyed by `u64` netns cookie.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct PodNetns {
        pub flags: u32,
        pub reserved0: u32,
        /// The pod's IPv4 address, IPv4-mapped (valid with FLAG_HAS_IP4).
        pub ip4: super::IpKey,
        /// The pod's IPv6 address (valid with FLAG_HAS_IP6).
        pub ip6: super::IpKey,
        pub reserved: [u32; 4],
    }
    const _: () = assert!(core::mem::size_of::<PodNetns>() == 56);
}

/// `ORIG_DST_SK`: socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`) of a captured socket's
/// original destination, written at connect and read by `getpeername()`/`getsockname()` and by
/// sockops. The kernel frees it with the socket: no entry outlives its socket (a refused connect
/// included), none is evicted while its socket lives, and no state callback is needed to drop it.
/// It replaces `AMBIT_ORIG_DST_COOKIE`, an LRU map keyed by socket cookie (the agent unpins that
/// map where an earlier version left it).
pub mod orig_dst_sk {
    pub const MAP: &str = "AMBIT_ORIG_DST_SK";
    /// The map an earlier version kept the same values in, keyed by socket cookie.
    pub const LEGACY_COOKIE_MAP: &str = "AMBIT_ORIG_DST_COOKIE";
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Value {
        /// The socket's netns (sockets never change netns), for the key sockops writes.
        pub netns_cookie: u64,
        pub dst: super::SockAddrKey,
        pub reserved: u32,
    }
    const _: () = assert!(core::mem::size_of::<Value>() == 32);
}

/// `ORIG_DST`: (netns cookie, client address, rewritten destination) → original destination.
/// Filled by sockops when the captured connection is established, before the proxy can accept it;
/// the proxy deletes the entry after reading it. LRU as a backstop.
pub mod orig_dst {
    pub const MAP: &str = "AMBIT_ORIG_DST";
    pub const MAX_ENTRIES: u32 = 131_072;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ConnKey {
        pub netns_cookie: u64,
        /// The app's side of the captured socket (the proxy's accepted peer).
        pub src: super::SockAddrKey,
        /// The proxy listener it was rewritten to.
        pub dst: super::SockAddrKey,
    }
    const _: () = assert!(core::mem::size_of::<ConnKey>() == 48);
    /// Value type.
    pub type Value = super::SockAddrKey;
}

/// `EXCLUDED_OUT_PORTS`: (netns cookie, destination port) present ⇒ outbound connects to that port
/// are not captured for that pod.
pub mod excluded_out_ports {
    pub const MAP: &str = "AMBIT_EXCL_OUT_PORTS";
    pub const MAX_ENTRIES: u32 = 16_384;
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Key {
        pub netns_cookie: u64,
        pub port: u32,
        pub reserved: u32,
    }
    const _: () = assert!(core::mem::size_of::<Key>() == 16);
}

/// `POD_IPS`: pod IP → inbound settings; sk_lookup's "is this one of ours" test. A pod IP present
/// here whose listener is missing from `INBOUND_LISTENERS` is refused (fail closed).
pub mod pod_ips {
    pub const MAP: &str = "AMBIT_POD_IPS";
    pub const MAX_ENTRIES: u32 = 8192;
    /// Keyed by [`super::IpKey`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct PodIp {
        pub flags: u32,
        pub reserved: [u32; 3],
    }
    const _: () = assert!(core::mem::size_of::<PodIp>() == 16);
}

/// `INBOUND_LISTENERS` (SockHash): pod IP → that pod's 15006 listener. An entry vanishes by itself
/// when the listener closes (agent death), which is what makes inbound capture fail closed.
pub mod inbound_listeners {
    pub const MAP: &str = "AMBIT_INBOUND_LISTENERS";
    pub const MAX_ENTRIES: u32 = 8192;
}

/// `EXCLUDED_IN_PORTS`: (pod IP, local port) present ⇒ inbound connections to that port are not
/// captured.
pub mod excluded_in_ports {
    pub const MAP: &str = "AMBIT_EXCL_IN_PORTS";
    pub const MAX_ENTRIES: u32 = 16_384;
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Key {
        pub ip: super::IpKey,
        pub port: u32,
    }
    const _: () = assert!(core::mem::size_of::<Key>() == 20);
}

/// `EXEMPT_SOURCES`: source IPs never captured inbound (the node's own addresses, so kubelet probes
/// keep working under STRICT mTLS, as in Istio). Keyed by [`IpKey`], value `u32` (unused, 1).
pub mod exempt_sources {
    pub const MAP: &str = "AMBIT_EXEMPT_SRC";
    pub const MAX_ENTRIES: u32 = 256;
}

/// `STATS`: per-CPU counters, indexed by the constants below. Value `u64`.
pub mod stats {
    pub const MAP: &str = "AMBIT_STATS";
    pub const OUT_CAPTURED: u32 = 0;
    pub const OUT_SKIPPED_MARK: u32 = 1;
    pub const IN_STEERED: u32 = 2;
    pub const IN_DROPPED_NO_LISTENER: u32 = 3;
    pub const ORIG_DST_RECORDED: u32 = 4;
    pub const ORIG_DST_MISSING: u32 = 5;
    pub const FAST_PATH_SOCKETS: u32 = 6;
    pub const FAST_PATH_REDIRECTS: u32 = 7;
    /// Connection directions that moved to loopback TCP (redirect limit reached, or the peer
    /// was missing).
    pub const FAST_PATH_TO_TCP: u32 = 8;
    pub const MAX_ENTRIES: u32 = 16;
}

/// `FAST_PATH` (SockHash): the two ends of the app ↔ proxy loopback hop, keyed by
/// [`orig_dst::ConnKey`] as (netns, the socket's local address, its remote address). sk_msg sends a
/// socket's data straight into its peer's receive queue, found under the swapped key.
pub mod fast_path {
    pub const MAP: &str = "AMBIT_FAST_PATH";
    pub const MAX_ENTRIES: u32 = 65_536;
}

/// `FAST_PATH_SENT` (LRU hash): for each receiving socket of the fast path, keyed like
/// `FAST_PATH` by its own (netns, local, remote), what its peer's sk_msg has redirected to it.
///
/// The kernel queues a redirected message on the receiver (`bpf_tcp_ingress`) without looking at
/// its receive buffer, and nothing wakes a writer the machine's TCP memory limit stopped (its own
/// send queue is empty, so no ACK comes): a writer faster than its reader queued without bound
/// and then failed (ENOMEM) or stalled for good. So each direction of a connection is redirected
/// for its first [`fast_path_sent::LIMIT`] bytes only, and from the first message that does not
/// fit on, for good, goes through loopback TCP, whose flow control blocks and wakes the writer.
/// Never back: a redirected message could overtake one still in TCP.
pub mod fast_path_sent {
    pub const MAP: &str = "AMBIT_FP_SENT";
    /// Two entries per connection (one per direction).
    pub const MAX_ENTRIES: u32 = super::fast_path::MAX_ENTRIES * 2;
    /// Bytes a direction may redirect: the default `tcp_wmem` maximum, what one loopback TCP
    /// connection buffers on its send side, so the fast path never holds more than TCP would.
    pub const LIMIT: u64 = 4 << 20;
    /// Set once the direction has moved to TCP (limit reached, or the peer was missing).
    pub const FLAG_TCP: u64 = 1;
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Sent {
        /// Bytes redirected to this socket.
        pub redirected: u64,
        pub flags: u64,
    }
    const _: () = assert!(core::mem::size_of::<Sent>() == 16);
}

/// `CONFIG` (Array, one entry): switches read by the programs.
pub mod config {
    pub const MAP: &str = "AMBIT_CONFIG";
    /// Insert app ↔ proxy sockets into `FAST_PATH` (sk_msg redirect).
    pub const FLAG_FAST_PATH: u32 = 1;
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Config {
        pub flags: u32,
        pub reserved: [u32; 7],
    }
    const _: () = assert!(core::mem::size_of::<Config>() == 32);
}

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::config::Config {}
    // SAFETY: all types are #[repr(C)], Copy, contain only integers, and have no padding
    // (asserted by size above).
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::SockAddrKey {}
    unsafe impl aya::Pod for super::enrolled::PodNetns {}
    unsafe impl aya::Pod for super::orig_dst::ConnKey {}
    unsafe impl aya::Pod for super::orig_dst_sk::Value {}
    unsafe impl aya::Pod for super::excluded_out_ports::Key {}
    unsafe impl aya::Pod for super::pod_ips::PodIp {}
    unsafe impl aya::Pod for super::excluded_in_ports::Key {}
    unsafe impl aya::Pod for super::fast_path_sent::Sent {}
}
