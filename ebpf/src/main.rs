//! ambit's capture programs. Every decision that needs configuration arrives as a map entry written
//! by the agent; the programs only look up and steer. Each program is a thin entry that maps
//! `try_x`'s error to the verdict that keeps traffic safe.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

    use ambit_common::{
        config::{self, Config},
        enrolled::{self, PodNetns},
        excluded_in_ports, excluded_out_ports, exempt_sources, fast_path,
        fast_path_sent::{self, Sent},
        inbound_listeners, orig_dst, orig_dst_sk, pod_ips, stats, IpKey, SockAddrKey, AF_INET6,
        HBONE_PORT, LOOPBACK_IFINDEX, OUTBOUND_PORT, PROXY_MARK,
    };
    use aya_ebpf::{
        bindings::{
            bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, bpf_sock_addr, BPF_ANY, BPF_F_INGRESS,
            BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        },
        helpers::{bpf_get_netns_cookie, bpf_sk_storage_get},
        macros::{btf_map, cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
        programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
        EbpfContext,
    };

    const IPPROTO_TCP: u32 = 6;
    /// cgroup/connect*: 1 lets the syscall proceed, 0 fails it with EPERM.
    const ALLOW: i32 = 1;
    const REJECT: i32 = 0;
    const SK_PASS: u32 = 1;
    const SK_DROP: u32 = 0;

    #[map(name = "AMBIT_ENROLLED")]
    static ENROLLED: HashMap<u64, PodNetns> = HashMap::pinned(enrolled::MAX_ENTRIES, 0);
    #[btf_map(name = "AMBIT_ORIG_DST_SK")]
    static ORIG_DST_SK: PinnedSkStorage<orig_dst_sk::Value> = PinnedSkStorage::new();
    #[map(name = "AMBIT_ORIG_DST")]
    static ORIG_DST: LruHashMap<orig_dst::ConnKey, SockAddrKey> =
        LruHashMap::pinned(orig_dst::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_EXCL_OUT_PORTS")]
    static EXCL_OUT_PORTS: HashMap<excluded_out_ports::Key, u32> =
        HashMap::pinned(excluded_out_ports::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_POD_IPS")]
    static POD_IPS: HashMap<IpKey, pod_ips::PodIp> = HashMap::pinned(pod_ips::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_INBOUND_LISTENERS")]
    static INBOUND_LISTENERS: SockHash<IpKey> = SockHash::pinned(inbound_listeners::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_EXCL_IN_PORTS")]
    static EXCL_IN_PORTS: HashMap<excluded_in_ports::Key, u32> =
        HashMap::pinned(excluded_in_ports::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_EXEMPT_SRC")]
    static EXEMPT_SRC: HashMap<IpKey, u32> = HashMap::pinned(exempt_sources::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_FAST_PATH")]
    static FAST_PATH: SockHash<orig_dst::ConnKey> = SockHash::pinned(fast_path::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_FP_SENT")]
    static FAST_PATH_SENT: LruHashMap<orig_dst::ConnKey, Sent> =
        LruHashMap::pinned(fast_path_sent::MAX_ENTRIES, 0);
    #[map(name = "AMBIT_CONFIG")]
    static CONFIG: Array<Config> = Array::pinned(1, 0);
    #[map(name = "AMBIT_STATS")]
    static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::MAX_ENTRIES, 0);

    /// A socket-local storage map (`BPF_MAP_TYPE_SK_STORAGE`) in BTF form, pinned by name like the
    /// other maps so that a restarted agent's programs find what the last one's stored.
    /// aya-ebpf's `btf_maps::SkStorage` has no `pinning` field and reads only sock_addr contexts;
    /// the fields are libbpf's (`__uint(pinning, LIBBPF_PIN_BY_NAME)`), which aya's loader reads.
    #[repr(C)]
    struct PinnedSkStorage<T> {
        r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
        key: *const i32,
        value: *const T,
        max_entries: *const [i32; 0],
        map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
        /// LIBBPF_PIN_BY_NAME.
        pinning: *const [i32; 1],
    }

    // SAFETY: the fields are placeholders the loader reads from BTF; nothing dereferences them.
    unsafe impl<T> Sync for PinnedSkStorage<T> {}

    impl<T> PinnedSkStorage<T> {
        const fn new() -> Self {
            PinnedSkStorage {
                r#type: core::ptr::null(),
                key: core::ptr::null(),
                value: core::ptr::null(),
                max_entries: core::ptr::null(),
                map_flags: core::ptr::null(),
                pinning: core::ptr::null(),
            }
        }

        /// The storage of `sk`, created (zeroed) if `create` and it has none; None if it has none
        /// and `create` is false, or if the kernel could not allocate it.
        #[inline(always)]
        fn get(&self, sk: *mut bpf_sock, create: bool) -> Option<*mut T> {
            let flags = if create {
                BPF_SK_STORAGE_GET_F_CREATE as u64
            } else {
                0
            };
            let map = core::ptr::from_ref(self).cast_mut().cast();
            // SAFETY: `map` is this map's definition, which the loader relocates to the map; `sk`
            // is a full socket taken from the program's context.
            let p = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), flags) };
            (!p.is_null()).then_some(p.cast())
        }
    }

    /// The socket of a cgroup sock_addr program (always set, and a full socket).
    #[inline(always)]
    fn addr_sk(ctx: &SockAddrContext) -> *mut bpf_sock {
        // SAFETY: the context's `sk` field, valid for the program's run.
        unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
    }

    /// A captured socket's original destination, copied out.
    #[inline(always)]
    fn captured(ctx: &SockAddrContext) -> Option<orig_dst_sk::Value> {
        let p = ORIG_DST_SK.get(addr_sk(ctx), false)?;
        // SAFETY: the storage lives as long as the socket, which outlives this program's run.
        Some(unsafe { *p })
    }

    #[inline(always)]
    fn count(index: u32) {
        if let Some(p) = STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
        // Read word by word: the verifier accepts 4-byte context loads of ip6 fields everywhere.
        let w = words as *const u32;
        // SAFETY: `words` points into the program context.
        unsafe {
            [
                read_volatile(w),
                read_volatile(w.add(1)),
                read_volatile(w.add(2)),
                read_volatile(w.add(3)),
            ]
        }
    }

    // ---------------------------------------------------------------- outbound: connect4/6

    /// What connect should do with a destination, decided the same way for both families.
    #[inline(always)]
    fn should_capture(sa: *mut bpf_sock_addr, netns: u64, dst: &IpKey, port: u16) -> bool {
        // SAFETY: ctx pointers are valid for the program's run; `sk` is always set for connect.
        let (protocol, mark) = unsafe {
            let sk = (*sa).__bindgen_anon_1.sk;
            (
                read_volatile(addr_of!((*sa).protocol)),
                read_volatile(addr_of!((*sk).mark)),
            )
        };
        if protocol != IPPROTO_TCP {
            return false;
        }
        if mark == PROXY_MARK {
            count(stats::OUT_SKIPPED_MARK);
            return false;
        }
        // SAFETY: plain map lookup; the value is copied out immediately.
        let pod = match unsafe { ENROLLED.get(&netns) } {
            Some(p) => *p,
            None => return false,
        };
        // Istio: loopback and the pod's own addresses are never captured.
        if dst.is_loopback() || dst.is_unspecified() {
            return false;
        }
        if (pod.flags & enrolled::FLAG_HAS_IP4 != 0 && pod.ip4 == *dst)
            || (pod.flags & enrolled::FLAG_HAS_IP6 != 0 && pod.ip6 == *dst)
        {
            return false;
        }
        let key = excluded_out_ports::Key {
            netns_cookie: netns,
            port: port as u32,
            reserved: 0,
        };
        if EXCL_OUT_PORTS.get_ptr(&key).is_some() {
            return false;
        }
        true
    }

    /// Record the original destination in the socket's own storage. Failing to record it refuses
    /// the connect: a captured connection without a destination must not bypass the proxy.
    #[inline(always)]
    fn record(ctx: &SockAddrContext, netns: u64, dst: IpKey, port: u16) -> Result<(), ()> {
        let p = ORIG_DST_SK.get(addr_sk(ctx), true).ok_or(())?;
        let value = orig_dst_sk::Value {
            netns_cookie: netns,
            dst: SockAddrKey {
                ip: dst,
                port: port as u32,
            },
            reserved: 0,
        };
        // SAFETY: the socket's storage, valid while the socket lives. A socket that connects again
        // (after a failed non-blocking connect) overwrites its last destination.
        unsafe { *p = value };
        Ok(())
    }

    #[cgroup_sock_addr(connect4)]
    pub fn ambit_conn4(ctx: SockAddrContext) -> i32 {
        try_connect4(&ctx).unwrap_or(REJECT)
    }

    fn try_connect4(ctx: &SockAddrContext) -> Result<i32, ()> {
        let sa = ctx.sock_addr;
        // SAFETY: context fields of a cgroup/connect4 program.
        let (ip4, port_be) = unsafe {
            (
                read_volatile(addr_of!((*sa).user_ip4)),
                read_volatile(addr_of!((*sa).user_port)),
            )
        };
        let dst = IpKey::from_v4_raw(ip4);
        let port = u16::from_be(port_be as u16);
        // SAFETY: helper valid for cgroup sock_addr programs (5.7+).
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if !should_capture(sa, netns, &dst, port) {
            return Ok(ALLOW);
        }
        record(ctx, netns, dst, port)?;
        // SAFETY: user_ip4/user_port are writable, as u32 (the port in network order, low 16 bits).
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_be(0x7f00_0001));
            write_volatile(addr_of_mut!((*sa).user_port), OUTBOUND_PORT.to_be() as u32);
        }
        count(stats::OUT_CAPTURED);
        Ok(ALLOW)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn ambit_conn6(ctx: SockAddrContext) -> i32 {
        try_connect6(&ctx).unwrap_or(REJECT)
    }

    fn try_connect6(ctx: &SockAddrContext) -> Result<i32, ()> {
        let sa = ctx.sock_addr;
        // SAFETY: context fields of a cgroup/connect6 program.
        let (ip6, port_be) = unsafe {
            (
                read_ip6(addr_of!((*sa).user_ip6)),
                read_volatile(addr_of!((*sa).user_port)),
            )
        };
        let dst = IpKey::from_v6_raw(ip6);
        let port = u16::from_be(port_be as u16);
        // SAFETY: helper valid for cgroup sock_addr programs (5.7+).
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if !should_capture(sa, netns, &dst, port) {
            return Ok(ALLOW);
        }
        record(ctx, netns, dst, port)?;
        // A dual-stack socket connecting to ::ffff:a.b.c.d must land on the IPv4 listener.
        let target = if dst.is_v4_mapped() {
            IpKey::from_v4_raw(u32::from_be(0x7f00_0001)).addr
        } else {
            [0, 0, 0, u32::from_be(1)]
        };
        // SAFETY: user_ip6 words and user_port are writable as u32.
        unsafe {
            let w = addr_of_mut!((*sa).user_ip6) as *mut u32;
            write_volatile(w, target[0]);
            write_volatile(w.add(1), target[1]);
            write_volatile(w.add(2), target[2]);
            write_volatile(w.add(3), target[3]);
            write_volatile(addr_of_mut!((*sa).user_port), OUTBOUND_PORT.to_be() as u32);
        }
        count(stats::OUT_CAPTURED);
        Ok(ALLOW)
    }

    // ---------------------------------------------------------------- getpeername4/6

    /// Capture is invisible to the app, as iptables REDIRECT is: `getpeername()` on a captured socket
    /// reports the original destination, not the proxy listener.
    #[cgroup_sock_addr(getpeername4)]
    pub fn ambit_peer4(ctx: SockAddrContext) -> i32 {
        if let Some(orig) = captured(&ctx) {
            // SAFETY: writable ctx fields.
            unsafe {
                let orig = orig.dst;
                if orig.ip.is_v4_mapped() {
                    let sa = ctx.sock_addr;
                    write_volatile(addr_of_mut!((*sa).user_ip4), orig.ip.addr[3]);
                    write_volatile(
                        addr_of_mut!((*sa).user_port),
                        (orig.port as u16).to_be() as u32,
                    );
                }
            }
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn ambit_peer6(ctx: SockAddrContext) -> i32 {
        if let Some(orig) = captured(&ctx) {
            // SAFETY: writable ctx fields.
            unsafe {
                let orig = orig.dst;
                let sa = ctx.sock_addr;
                let w = addr_of_mut!((*sa).user_ip6) as *mut u32;
                write_volatile(w, orig.ip.addr[0]);
                write_volatile(w.add(1), orig.ip.addr[1]);
                write_volatile(w.add(2), orig.ip.addr[2]);
                write_volatile(w.add(3), orig.ip.addr[3]);
                write_volatile(
                    addr_of_mut!((*sa).user_port),
                    (orig.port as u16).to_be() as u32,
                );
            }
        }
        ALLOW
    }

    // ---------------------------------------------------------------- getsockname4/6

    /// `getsockname()` on a captured socket reports the pod's own address, as it would be without
    /// capture (and as iptables REDIRECT leaves it): connect4/6 sent the socket to the loopback
    /// listener, so the kernel bound it to loopback. The port is the socket's real one.
    #[cgroup_sock_addr(getsockname4)]
    pub fn ambit_sockname4(ctx: SockAddrContext) -> i32 {
        let _ = try_sockname4(&ctx);
        // The verifier accepts only 1 here: getsockname cannot be failed, only left unchanged.
        ALLOW
    }

    fn try_sockname4(ctx: &SockAddrContext) -> Result<(), ()> {
        let ip = captured_local(ctx).ok_or(())?;
        // An AF_INET socket only ever records IPv4 destinations, so `ip` is IPv4-mapped.
        // SAFETY: user_ip4 is writable (network order, as stored in the map).
        unsafe { write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip4), ip.addr[3]) };
        Ok(())
    }

    #[cgroup_sock_addr(getsockname6)]
    pub fn ambit_sockname6(ctx: SockAddrContext) -> i32 {
        let _ = try_sockname6(&ctx);
        // The verifier accepts only 1 here: getsockname cannot be failed, only left unchanged.
        ALLOW
    }

    fn try_sockname6(ctx: &SockAddrContext) -> Result<(), ()> {
        // A dual-stack socket that dialled ::ffff:a.b.c.d gets the pod's IPv4 in the same mapped
        // form, which is how the map stores it.
        let ip = captured_local(ctx).ok_or(())?;
        // SAFETY: user_ip6 words are writable as u32.
        unsafe {
            let w = addr_of_mut!((*ctx.sock_addr).user_ip6) as *mut u32;
            write_volatile(w, ip.addr[0]);
            write_volatile(w.add(1), ip.addr[1]);
            write_volatile(w.add(2), ip.addr[2]);
            write_volatile(w.add(3), ip.addr[3]);
        }
        Ok(())
    }

    /// For a captured socket, the pod's address of the family its original destination has; None
    /// for any other socket, or when the pod has no address of that family (the socket keeps the
    /// loopback address then, which is all it really has).
    #[inline(always)]
    fn captured_local(ctx: &SockAddrContext) -> Option<IpKey> {
        let entry = captured(ctx)?;
        // SAFETY: map value pointer valid during the program; copied out at once.
        let pod = unsafe { *ENROLLED.get_ptr(&entry.netns_cookie)? };
        if entry.dst.ip.is_v4_mapped() {
            (pod.flags & enrolled::FLAG_HAS_IP4 != 0).then_some(pod.ip4)
        } else {
            (pod.flags & enrolled::FLAG_HAS_IP6 != 0).then_some(pod.ip6)
        }
    }

    // ---------------------------------------------------------------- sockops

    /// Copies a captured socket's original destination from its storage to its address pair, which
    /// is all the proxy knows after `accept()`. Runs at ACTIVE_ESTABLISHED, before the client's ACK,
    /// so the entry exists before the proxy can accept.
    #[sock_ops]
    pub fn ambit_sockops(ctx: SockOpsContext) -> u32 {
        let _ = try_sockops(&ctx);
        // sockops verdicts do not affect the connection here.
        1
    }

    fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
        let op = ctx.op();
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            // SAFETY: the context's `sk` field, a full socket at ACTIVE_ESTABLISHED.
            let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
            if sk.is_null() {
                return Ok(());
            }
            let entry = match ORIG_DST_SK.get(sk, false) {
                // SAFETY: the socket's storage, copied out.
                Some(p) => unsafe { *p },
                None => return Ok(()),
            };
            // The netns recorded at connect is the socket's netns (sockets never change netns).
            let (orig, netns) = (entry.dst, entry.netns_cookie);
            let ops = ctx.ops;
            // Unconditional reads, for the same verifier reason as in sk_lookup.
            // SAFETY: sock_ops context fields.
            let (l6, r6) = unsafe {
                (
                    read_ip6(addr_of!((*ops).local_ip6)),
                    read_ip6(addr_of!((*ops).remote_ip6)),
                )
            };
            let (l4, r4) = (ctx.local_ip4(), ctx.remote_ip4());
            let (src, dst) = if ctx.family() == AF_INET6 as u32 {
                (IpKey::from_v6_raw(l6), IpKey::from_v6_raw(r6))
            } else {
                (IpKey::from_v4_raw(l4), IpKey::from_v4_raw(r4))
            };
            // local_port is host order; remote_port is the network-order port shifted left by 16.
            let key = orig_dst::ConnKey {
                netns_cookie: netns,
                src: SockAddrKey {
                    ip: src,
                    port: ctx.local_port(),
                },
                dst: SockAddrKey {
                    ip: dst,
                    port: u16::from_be((ctx.remote_port() >> 16) as u16) as u32,
                },
            };
            let recorded = ORIG_DST.insert(&key, &orig, 0).is_ok();
            count(if recorded {
                stats::ORIG_DST_RECORDED
            } else {
                stats::ORIG_DST_MISSING
            });
            if fast_path_on() {
                // The app's end of the loopback hop, keyed (netns, its local, its remote). Both
                // directions' counts start afresh (a reused address pair leaves none behind);
                // the proxy's end is not established yet, so it keeps what this one sends first.
                let _ = FAST_PATH_SENT.insert(&key, &Sent::default(), BPF_ANY as u64);
                let _ = FAST_PATH_SENT.insert(&swapped(&key), &Sent::default(), BPF_ANY as u64);
                let mut key = key;
                // SAFETY: `ops` is this program's context.
                if FAST_PATH
                    .update(&mut key, unsafe { &mut *ops }, BPF_NOEXIST as u64)
                    .is_ok()
                {
                    count(stats::FAST_PATH_SOCKETS);
                }
            }
        } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
            && ctx.local_port() == OUTBOUND_PORT as u32
            && fast_path_on()
        {
            // The proxy's end of a captured connection, accepted on 15001 in an enrolled netns.
            // SAFETY: helper valid for sock_ops programs (5.15+).
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            if ENROLLED.get_ptr(&netns).is_none() {
                return Ok(());
            }
            let ops = ctx.ops;
            // SAFETY: sock_ops context fields.
            let (l6, r6) = unsafe {
                (
                    read_ip6(addr_of!((*ops).local_ip6)),
                    read_ip6(addr_of!((*ops).remote_ip6)),
                )
            };
            let (l4, r4) = (ctx.local_ip4(), ctx.remote_ip4());
            let (local, remote) = if ctx.family() == AF_INET6 as u32 {
                (IpKey::from_v6_raw(l6), IpKey::from_v6_raw(r6))
            } else {
                (IpKey::from_v4_raw(l4), IpKey::from_v4_raw(r4))
            };
            let mut key = orig_dst::ConnKey {
                netns_cookie: netns,
                src: SockAddrKey {
                    ip: local,
                    port: ctx.local_port(),
                },
                dst: SockAddrKey {
                    ip: remote,
                    port: u16::from_be((ctx.remote_port() >> 16) as u16) as u32,
                },
            };
            // The app's end created this end's count when it was established, and may already
            // have sent to it: keep it.
            let _ = FAST_PATH_SENT.insert(&key, &Sent::default(), BPF_NOEXIST as u64);
            // SAFETY: `ops` is this program's context.
            if FAST_PATH
                .update(&mut key, unsafe { &mut *ops }, BPF_NOEXIST as u64)
                .is_ok()
            {
                count(stats::FAST_PATH_SOCKETS);
            }
        }
        Ok(())
    }

    /// The key of the other end of a connection keyed `key`.
    #[inline(always)]
    fn swapped(key: &orig_dst::ConnKey) -> orig_dst::ConnKey {
        orig_dst::ConnKey {
            netns_cookie: key.netns_cookie,
            src: key.dst,
            dst: key.src,
        }
    }

    #[inline(always)]
    fn fast_path_on() -> bool {
        CONFIG
            .get(0)
            .is_some_and(|c| c.flags & config::FLAG_FAST_PATH != 0)
    }

    // ---------------------------------------------------------------- fast path: sk_msg

    /// On the app ↔ proxy loopback hop, hands a connection's first messages in each direction
    /// straight to the peer socket's receive queue, skipping the loopback TCP stack.
    ///
    /// The kernel queues a redirected message on the peer without any limit but the machine's
    /// TCP memory (`tcp_mem`), and once that is reached the writer's send fails (ENOMEM) or waits
    /// for a wakeup that never comes (its own TCP send queue is empty, so no ACK frees it): a
    /// writer faster than its reader used to queue gigabytes and then stall for good. So a
    /// direction is redirected only for its first `LIMIT` bytes; from the first message that
    /// does not fit on, it goes through loopback TCP for good, whose flow control blocks and
    /// wakes the writer as usual (TCP data queued behind redirected data is read after it, so
    /// nothing is reordered). A peer that is missing (closed, or not in the map) also sends the
    /// direction to TCP: never SK_DROP, which would lose data.
    #[sk_msg]
    pub fn ambit_sk_msg(ctx: SkMsgContext) -> u32 {
        let md = ctx.msg;
        // Unconditional reads, for the same verifier reason as in sk_lookup.
        // SAFETY: sk_msg context fields.
        let (family, l4, r4, l6, r6, lport, rport, size) = unsafe {
            (
                read_volatile(addr_of!((*md).family)),
                read_volatile(addr_of!((*md).local_ip4)),
                read_volatile(addr_of!((*md).remote_ip4)),
                read_ip6(addr_of!((*md).local_ip6)),
                read_ip6(addr_of!((*md).remote_ip6)),
                read_volatile(addr_of!((*md).local_port)),
                read_volatile(addr_of!((*md).remote_port)),
                read_volatile(addr_of!((*md).size)),
            )
        };
        let (local, remote) = if family == AF_INET6 as u32 {
            (IpKey::from_v6_raw(l6), IpKey::from_v6_raw(r6))
        } else {
            (IpKey::from_v4_raw(l4), IpKey::from_v4_raw(r4))
        };
        // SAFETY: helper valid for sk_msg programs (5.15+).
        let netns = unsafe { bpf_get_netns_cookie(md as *mut _) };
        // The peer's key: its local address is our remote one.
        let peer = orig_dst::ConnKey {
            netns_cookie: netns,
            src: SockAddrKey {
                ip: remote,
                port: u16::from_be((rport >> 16) as u16) as u32,
            },
            dst: SockAddrKey {
                ip: local,
                port: lport,
            },
        };
        // No count: the peer was never put in the fast path (or its count was evicted): TCP.
        let Some(sent) = FAST_PATH_SENT.get_ptr_mut(&peer) else {
            return SK_PASS;
        };
        // Verdicts on one socket run under its lock, one at a time, and only this socket sends
        // to the peer: this program is the entry's only writer. Aligned 8-byte accesses.
        // SAFETY: a map value stays valid for the program's run (RCU).
        let (redirected, flags) = unsafe {
            (
                addr_of_mut!((*sent).redirected),
                addr_of_mut!((*sent).flags),
            )
        };
        // SAFETY: as above.
        let (so_far, tcp) = unsafe {
            (
                read_volatile(redirected),
                read_volatile(flags) & fast_path_sent::FLAG_TCP != 0,
            )
        };
        let size = size as u64;
        if !tcp
            && so_far + size <= fast_path_sent::LIMIT
            && FAST_PATH.redirect_msg(&ctx, peer, BPF_F_INGRESS as u64) == SK_PASS as i64
        {
            // SAFETY: as above.
            unsafe { write_volatile(redirected, so_far + size) };
            count(stats::FAST_PATH_REDIRECTS);
        } else if !tcp {
            // SAFETY: as above.
            unsafe { write_volatile(flags, fast_path_sent::FLAG_TCP) };
            count(stats::FAST_PATH_TO_TCP);
        }
        SK_PASS
    }

    // ---------------------------------------------------------------- inbound: sk_lookup

    /// Attached to each enrolled pod's netns: steers TCP connections for the pod's IP on any port
    /// (except HBONE 15008) to the pod's inbound listener. Runs before the normal socket lookup.
    #[sk_lookup]
    pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
        try_sk_lookup(&ctx).unwrap_or(SK_DROP)
    }

    fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, ()> {
        let l = ctx.lookup;
        // SAFETY: sk_lookup context fields.
        let (protocol, family, local_port, ingress_ifindex) = unsafe {
            (
                read_volatile(addr_of!((*l).protocol)),
                read_volatile(addr_of!((*l).family)),
                read_volatile(addr_of!((*l).local_port)),
                read_volatile(addr_of!((*l).ingress_ifindex)),
            )
        };
        if protocol != IPPROTO_TCP {
            return Ok(SK_PASS);
        }
        // Read every address field unconditionally: choosing the field by family lets the compiler
        // compute a variable context offset, which the verifier rejects.
        // SAFETY: sk_lookup context fields.
        let (l4, r4, l6, r6) = unsafe {
            (
                read_volatile(addr_of!((*l).local_ip4)),
                read_volatile(addr_of!((*l).remote_ip4)),
                read_ip6(addr_of!((*l).local_ip6)),
                read_ip6(addr_of!((*l).remote_ip6)),
            )
        };
        let (local, remote) = if family == AF_INET6 as u32 {
            (IpKey::from_v6_raw(l6), IpKey::from_v6_raw(r6))
        } else {
            (IpKey::from_v4_raw(l4), IpKey::from_v4_raw(r4))
        };
        // Only the pod's own addresses are steered; this also skips loopback SYNs.
        if POD_IPS.get_ptr(&local).is_none() {
            return Ok(SK_PASS);
        }
        if local_port == HBONE_PORT as u32 {
            return Ok(SK_PASS);
        }
        // The pod talking to itself, which is also how the proxy reaches the app: never captured.
        // (ingress_ifindex cannot narrow this: for traffic to a local address the kernel reports the
        // device owning the address, not lo. A SYN spoofed from outside with this source cannot
        // complete a handshake, since the SYN-ACK goes to the pod itself.)
        if remote == local {
            return Ok(SK_PASS);
        }
        // The proxy reaching the app from the client's address (TRANSPARENT_MARK): the pod's rule
        // routes it by its table, whose only route is `local default dev lo`, so the kernel reports
        // lo; every other SYN for a pod address reports the device owning the address (above), and
        // one from outside its real interface.
        if ingress_ifindex == LOOPBACK_IFINDEX {
            return Ok(SK_PASS);
        }
        if EXEMPT_SRC.get_ptr(&remote).is_some() {
            return Ok(SK_PASS);
        }
        let key = excluded_in_ports::Key {
            ip: local,
            port: local_port,
        };
        if EXCL_IN_PORTS.get_ptr(&key).is_some() {
            return Ok(SK_PASS);
        }
        match INBOUND_LISTENERS.redirect_sk_lookup(ctx, local, 0) {
            Ok(()) => {
                count(stats::IN_STEERED);
                Ok(SK_PASS)
            }
            Err(_) => {
                // Enrolled but no listener (agent down): refuse rather than bypass the proxy.
                count(stats::IN_DROPPED_NO_LISTENER);
                Ok(SK_DROP)
            }
        }
    }

    /// GPL-compatible, so the kernel offers every helper we use.
    #[link_section = "license"]
    #[no_mangle]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The kernel programs only exist for bpfel-unknown-none; this stub keeps host builds happy.
}
