//! The pod-netns half of "the app sees the client's address": once per enrolled pod, on its netns
//! worker, a policy-routing rule and route that bring packets marked `TRANSPARENT_MARK` back to
//! the proxy over lo, and `net.ipv4.tcp_fwmark_accept` so the app's accepted socket (and its
//! replies) carries the mark of the proxy's SYN. Removal leaves the netns as it was found.
//!
//! Istio's in-pod ztunnel does the same with iptables (a connmark and `ip rule fwmark … lookup
//! 100` + `local 0.0.0.0/0 dev lo table 100`); here the SYN's own mark replaces the connmark.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_common::{LOOPBACK_IFINDEX, TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr as NlAddr};
use thiserror::Error;

use super::netns::NetnsWorker;

/// A pod annotation that keeps this pod's app seeing connections from its own pod address
/// (`"false"` or `"off"`): no routing is set up in its netns.
pub const ORIGINAL_SOURCE_ANNOTATION: &str = "ambit.dev/original-source";

/// The app's accepted socket takes the SYN's mark (`inet_request_mark`; per netns, IPv6 too).
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// Replies the kernel makes without a socket (the RST for a port nobody listens on) take the
/// mark of what they answer; else the RST to the proxy's SYN would leave by eth0 for the client's
/// address, and the proxy's connect would hang instead of being refused.
const FWMARK_REFLECT_V4: &str = "/proc/sys/net/ipv4/fwmark_reflect";
const FWMARK_REFLECT_V6: &str = "/proc/sys/net/ipv6/fwmark_reflect";
/// The kernel's rule for the local table, and where it is moved so ours comes first (see
/// `install`).
const RT_TABLE_LOCAL: u32 = 255;
const RT_TABLE_COMPAT: u8 = 252;
const LOCAL_PREF: u32 = 0;
const LOCAL_MOVED_PREF: u32 = 1;

#[derive(Debug, Error)]
pub enum TransparentError {
    #[error("turned off by the annotation {ORIGINAL_SOURCE_ANNOTATION}: {value:?}")]
    TurnedOff { value: String },
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What `install` changed in one pod's netns, so `remove` undoes exactly that.
#[derive(Debug, Default)]
pub struct Setup {
    families: Vec<FamilySetup>,
    /// Sysctls that were 0 and were set to 1.
    sysctls: Vec<&'static str>,
}

#[derive(Debug, Clone, Copy)]
struct FamilySetup {
    family: AddressFamily,
    /// The kernel's local rule was at pref 0 and was deleted there.
    moved_local: bool,
    /// The copy at `LOCAL_MOVED_PREF` is ours.
    made_copy: bool,
}

/// A pod's routing as the node holds it. Enrolments of the pod's netns use it (a re-enrolment
/// adopts it from the last); once none does, the drain removes it after the last connection that
/// needs it; the agent's shutdown removes it at once. Every proxy stage of the netns, old or new,
/// reads `present` before dialling the app transparently: an HBONE connection accepted before an
/// unenrolment serves its new streams with that enrolment's stages.
#[derive(Debug, Clone)]
pub struct Held {
    state: Arc<Mutex<State>>,
    present: Arc<AtomicBool>,
}

#[derive(Debug)]
struct State {
    setup: Option<Setup>,
    /// An enrolment uses it: no drain may remove it.
    enrolled: bool,
}

impl Held {
    pub fn new(setup: Setup) -> Held {
        Held {
            state: Arc::new(Mutex::new(State {
                setup: Some(setup),
                enrolled: true,
            })),
            present: Arc::new(AtomicBool::new(true)),
        }
    }

    /// True while the routing is in place: transparent dials are safe.
    pub fn present(&self) -> Arc<AtomicBool> {
        self.present.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A re-enrolment takes it over, if it is still there.
    pub fn adopt(&self) -> bool {
        let mut s = self.lock();
        s.enrolled = s.setup.is_some();
        s.enrolled
    }

    /// The enrolment using it ended.
    pub fn release(&self) {
        self.lock().enrolled = false;
    }

    /// Removed (or to be removed by the caller) whatever uses it.
    pub fn take(&self) -> Option<Setup> {
        let mut s = self.lock();
        self.present.store(false, Ordering::Release);
        s.setup.take()
    }

    /// For the drain: only while no enrolment uses it.
    fn take_released(&self) -> Option<Setup> {
        let mut s = self.lock();
        if s.enrolled {
            return None;
        }
        self.present.store(false, Ordering::Release);
        s.setup.take()
    }

    /// Gone, or in use again: nothing left to drain.
    pub fn is_settled(&self) -> bool {
        let s = self.lock();
        s.setup.is_none() || s.enrolled
    }
}

/// How often a drain looks for the proxy's connections in an unenrolled pod's netns. The
/// routing goes after two looks in a row find none (a dial between socket and SYN is not listed).
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// After a pod's unenrolment, on a thread of its own: waits until the proxy has no transparent
/// connection left in the pod's netns (each needs the routing for its replies), then removes the
/// routing, unless something else took it first. The worker only runs the short looks.
pub fn drain(
    held: Held,
    pod: String,
    pod_ips: Vec<IpAddr>,
    worker: Arc<NetnsWorker>,
) -> io::Result<()> {
    let name: String = format!("drain-{pod}").chars().take(15).collect();
    std::thread::Builder::new().name(name).spawn(move || {
        let mut idle_looks = 0;
        loop {
            if held.is_settled() {
                return;
            }
            let ips = pod_ips.clone();
            match worker.run(move || transparent_sockets(&ips)) {
                Ok(Ok(0)) => idle_looks += 1,
                Ok(Ok(_)) => idle_looks = 0,
                Ok(Err(e)) => {
                    tracing::warn!(%pod, error = %e, "cannot list the pod's connections; its transparent routing stays");
                    return;
                }
                Err(e) => {
                    tracing::debug!(%pod, error = %e, "pod netns worker gone");
                    return;
                }
            }
            if idle_looks >= 2 {
                if let Some(setup) = held.take_released() {
                    match worker.run(move || setup.remove()) {
                        Ok(Ok(())) => tracing::debug!(%pod, "transparent routing removed"),
                        Ok(Err(e)) => {
                            tracing::warn!(%pod, error = %e, "removing the transparent routing")
                        }
                        Err(e) => tracing::debug!(%pod, error = %e, "pod netns worker gone"),
                    }
                }
                return;
            }
            std::thread::sleep(DRAIN_POLL);
        }
    })?;
    Ok(())
}

/// Connections in the current netns whose local address is none of the pod's (nor loopback):
/// only the proxy's transparent sockets have one. TIME_WAIT, CLOSE and LISTEN entries need no
/// route and are not counted.
fn transparent_sockets(pod_ips: &[IpAddr]) -> io::Result<usize> {
    let mut n = 0;
    for (file, v6) in [
        ("/proc/thread-self/net/tcp", false),
        ("/proc/thread-self/net/tcp6", true),
    ] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            // No IPv6 in this netns.
            Err(e) if v6 && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        n += count_foreign(&text, v6, pod_ips);
    }
    Ok(n)
}

fn count_foreign(text: &str, v6: bool, pod_ips: &[IpAddr]) -> usize {
    let mut n = 0;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (cols.get(1), cols.get(3)) else {
            continue;
        };
        if matches!(*state, "0A" | "06" | "07") {
            continue;
        }
        let Some(ip) = local.split(':').next().and_then(|h| proc_ip(h, v6)) else {
            continue;
        };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if !ip.is_loopback() && !pod_ips.contains(&ip) {
            n += 1;
        }
    }
    n
}

/// An address as /proc/net/tcp{,6} prints it: 32-bit words in hex, each in host byte order.
fn proc_ip(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |i: usize| {
        hex.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(|w| w.to_ne_bytes())
    };
    if v6 {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        Some(IpAddr::V4(Ipv4Addr::from(word(0)?)))
    }
}

/// Sets up the pod's netns (call on its worker thread) for the address families it has. On
/// failure whatever was already changed is undone.
pub fn install(v4: bool, v6: bool) -> Result<Setup, TransparentError> {
    let nl = Netlink::open()?;
    let mut setup = Setup::default();
    let families = [(v4, AddressFamily::Inet), (v6, AddressFamily::Inet6)];
    for family in families.into_iter().filter(|(has, _)| *has).map(|(_, f)| f) {
        match install_family(&nl, family) {
            Ok(done) => setup.families.push(done),
            Err(e) => {
                // This family's own steps so far, then the others'.
                let _ = nl.rule(false, our_rule(family), 0);
                let _ = nl.route(false, our_route(family), 0);
                let _ = setup.undo(&nl);
                return Err(e);
            }
        }
    }
    let mut sysctls = vec![FWMARK_ACCEPT, FWMARK_REFLECT_V4];
    if v6 {
        sysctls.push(FWMARK_REFLECT_V6);
    }
    for path in sysctls {
        match enable(path) {
            Ok(true) => setup.sysctls.push(path),
            Ok(false) => {}
            Err(e) => {
                let _ = setup.undo(&nl);
                return Err(e);
            }
        }
    }
    Ok(setup)
}

impl Setup {
    /// Undoes `install` (call on the pod's worker thread).
    pub fn remove(self) -> Result<(), TransparentError> {
        let nl = Netlink::open()?;
        self.undo(&nl)
    }

    fn undo(&self, nl: &Netlink) -> Result<(), TransparentError> {
        let mut first_error = None;
        let mut keep = |r: Result<(), TransparentError>| {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        };
        for f in &self.families {
            if f.moved_local {
                // Back at pref 0 (after ours, which goes next), then the moved copy goes.
                keep(nl.rule(true, local_rule(f.family, LOCAL_PREF), NLM_F_CREATE));
                keep(nl.rule(false, our_rule(f.family), 0));
                if f.made_copy {
                    keep(nl.rule(false, local_rule(f.family, LOCAL_MOVED_PREF), 0));
                }
            } else {
                keep(nl.rule(false, our_rule(f.family), 0));
            }
            keep(nl.route(false, our_route(f.family), 0));
        }
        for path in &self.sysctls {
            keep(
                std::fs::write(path, "0")
                    .map_err(|source| TransparentError::Sysctl { path, source }),
            );
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The route, then our rule ahead of the kernel's local rule: the proxy's SYN to the pod's own
/// address must be routed by our table (over lo), which is how sk_lookup tells it from a client's.
/// Rules of equal pref keep insertion order, so: ours at 0 (after local), a copy of local at 1,
/// then local at 0 deleted; local lookups never have a gap.
fn install_family(nl: &Netlink, family: AddressFamily) -> Result<FamilySetup, TransparentError> {
    nl.route(true, our_route(family), NLM_F_CREATE | NLM_F_REPLACE)?;
    // A rule left by an agent that did not stop cleanly.
    for _ in 0..16 {
        if nl.rule(false, our_rule(family), 0).is_err() {
            break;
        }
    }
    nl.rule(true, our_rule(family), NLM_F_CREATE)?;
    let made_copy = match nl.rule(
        true,
        local_rule(family, LOCAL_MOVED_PREF),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => true,
        Err(TransparentError::Netlink { source, .. })
            if source.raw_os_error() == Some(libc::EEXIST) =>
        {
            false
        }
        Err(e) => return Err(e),
    };
    match nl.rule(false, local_rule(family, LOCAL_PREF), 0) {
        Ok(()) => Ok(FamilySetup {
            family,
            moved_local: true,
            made_copy,
        }),
        Err(TransparentError::Netlink { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT) =>
        {
            if made_copy {
                // Already elsewhere (a CNI may have moved it): ours at 0 comes first anyway.
                let _ = nl.rule(false, local_rule(family, LOCAL_MOVED_PREF), 0);
            }
            // Not at 0 but at our pref: an agent that did not stop cleanly moved it; put it back
            // on removal.
            Ok(FamilySetup {
                family,
                moved_local: !made_copy,
                made_copy: !made_copy,
            })
        }
        Err(e) => Err(e),
    }
}

/// Sets a per-netns boolean sysctl to 1; true if it was 0.
fn enable(path: &'static str) -> Result<bool, TransparentError> {
    let err = |source| TransparentError::Sysctl { path, source };
    let now = std::fs::read_to_string(path).map_err(err)?;
    if now.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, "1").map_err(err)?;
    Ok(true)
}

fn our_rule(family: AddressFamily) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family;
    m.header.table = RT_TABLE_COMPAT;
    m.header.action = RuleAction::ToTable;
    m.attributes = vec![
        RuleAttribute::Priority(LOCAL_PREF),
        RuleAttribute::FwMark(TRANSPARENT_MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(TRANSPARENT_ROUTE_TABLE),
    ];
    m
}

fn local_rule(family: AddressFamily, pref: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family;
    m.header.table = RT_TABLE_LOCAL as u8;
    m.header.action = RuleAction::ToTable;
    // As the kernel makes it, so the netns is left exactly as found.
    m.attributes = vec![
        RuleAttribute::Priority(pref),
        RuleAttribute::Table(RT_TABLE_LOCAL),
        RuleAttribute::Protocol(RouteProtocol::Kernel),
    ];
    m
}

/// `local default dev lo table TRANSPARENT_ROUTE_TABLE`.
fn our_route(family: AddressFamily) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family;
    m.header.destination_prefix_length = 0;
    m.header.table = RT_TABLE_COMPAT;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Host;
    m.header.kind = RouteType::Local;
    let any: IpAddr = if family == AddressFamily::Inet6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    m.attributes = vec![
        RouteAttribute::Table(TRANSPARENT_ROUTE_TABLE),
        RouteAttribute::Destination(any.into()),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    m
}

/// A NETLINK_ROUTE socket in the current netns, for acknowledged requests one at a time.
struct Netlink {
    socket: Socket,
}

impl Netlink {
    fn open() -> Result<Netlink, TransparentError> {
        let err = |source| TransparentError::Netlink {
            op: "open".into(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
        socket.bind_auto().map_err(err)?;
        socket.connect(&NlAddr::new(0, 0)).map_err(err)?;
        Ok(Netlink { socket })
    }

    fn rule(&self, add: bool, m: RuleMessage, flags: u16) -> Result<(), TransparentError> {
        let op = format!(
            "{} rule {:?}",
            if add { "add" } else { "del" },
            m.attributes
        );
        let msg = if add {
            RouteNetlinkMessage::NewRule(m)
        } else {
            RouteNetlinkMessage::DelRule(m)
        };
        self.request(msg, flags)
            .map_err(|source| TransparentError::Netlink { op, source })
    }

    fn route(&self, add: bool, m: RouteMessage, flags: u16) -> Result<(), TransparentError> {
        let op = format!(
            "{} route {:?}",
            if add { "add" } else { "del" },
            m.attributes
        );
        let msg = if add {
            RouteNetlinkMessage::NewRoute(m)
        } else {
            RouteNetlinkMessage::DelRoute(m)
        };
        self.request(msg, flags)
            .map_err(|source| TransparentError::Netlink { op, source })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = 1;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if let NetlinkPayload::Error(e) = reply.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_parse_as_the_kernel_prints_them() {
        // 127.0.0.1 and ::1 as /proc/net/tcp{,6} print them on a little-endian machine; on a
        // big-endian one the words read back the same way they were written.
        let v4 = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(
            proc_ip(&format!("{v4:08X}"), false),
            Some(IpAddr::from([127, 0, 0, 1]))
        );
        let last = u32::from_ne_bytes([0, 0, 0, 1]);
        let hex = format!("{:08X}{:08X}{:08X}{last:08X}", 0, 0, 0);
        assert_eq!(proc_ip(&hex, true), Some(IpAddr::from(Ipv6Addr::LOCALHOST)));
        assert_eq!(proc_ip("0100", false), None);
    }

    #[test]
    fn only_live_sockets_with_a_foreign_local_address_are_counted() {
        let hex4 = |ip: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(ip));
        let line = |local: [u8; 4], state: &str| {
            format!(
                "   0: {}:1F90 {}:9C40 {state} 00000000:00000000 00:00000000 00000000     0        0 1 1 0 20 4 30 10 -1",
                hex4(local),
                hex4([10, 0, 0, 9])
            )
        };
        let (pod, client) = ([10, 0, 0, 2], [10, 0, 0, 9]);
        let text = [
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode".to_string(),
            line(client, "01"),    // the proxy's transparent socket: counted
            line(client, "06"),    // TIME_WAIT: not
            line(pod, "01"),       // the app's side: not
            line([127, 0, 0, 1], "01"),
            line(client, "0A"),
        ]
        .join("\n");
        assert_eq!(count_foreign(&text, false, &[IpAddr::from(pod)]), 1);
        assert_eq!(
            count_foreign(&text, false, &[IpAddr::from(pod), IpAddr::from(client)]),
            0
        );
    }
}
