//! The load balancers against Envoy's own test vectors and behaviours, and the state that must
//! survive config snapshots.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::hash::{cookie_value, query_value, xxhash64, xxhash64_chained};
use super::maglev::{effective_table_size, Maglev};
use super::ring::{effective_min_ring_size, Ring};
use super::*;
use crate::routing::HashKey;

impl Balancers {
    /// A pick by the load balancer alone (no outlierDetection).
    fn pick_lb(
        &self,
        cluster: &ClusterKey,
        policy: &LbPolicy,
        endpoints: &Arc<[SocketAddr]>,
        ctx: &PickContext<'_>,
    ) -> Option<Picked> {
        self.pick_by(cluster, policy, None, endpoints, ctx)
    }
}

fn cluster(host: &str) -> ClusterKey {
    ClusterKey {
        host: Arc::from(host),
        subset: None,
        port: 8080,
    }
}

/// `n` endpoints 10.0.0.1:8080 … , sorted as the snapshot gives them.
fn endpoints(n: u8) -> Arc<[SocketAddr]> {
    (1..=n)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect()
}

fn local(port: u16) -> Vec<SocketAddr> {
    (port..port + 6)
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .collect()
}

const SOURCE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 7)), 40000);
const DESTINATION: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);

fn ctx(headers: &HeaderMap) -> PickContext<'_> {
    PickContext {
        headers: Some(headers),
        query: None,
        source: SOURCE,
        destination: DESTINATION,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

fn by_header(ring: HashRing) -> LbPolicy {
    LbPolicy::ConsistentHash {
        key: HashKey::Header(HeaderName::from_static("x-user")),
        ring,
    }
}

const RING: HashRing = HashRing::RingHash {
    minimum_ring_size: 1024,
};
const MAGLEV: HashRing = HashRing::Maglev { table_size: 65537 };

fn pick(
    b: &Balancers,
    policy: &LbPolicy,
    list: &Arc<[SocketAddr]>,
    ctx: &PickContext<'_>,
) -> SocketAddr {
    b.pick_lb(&cluster("reviews"), policy, list, ctx)
        .expect("a pick")
        .addr
}

// ---- Envoy's vectors ---------------------------------------------------------------------------

#[test]
fn xxhash64_is_envoys_including_its_chained_multi_value_hash() {
    // Envoy test/common/common/hash_test.cc.
    assert_eq!(xxhash64(b"foo"), 3728699739546630719);
    assert_eq!(xxhash64(b"lyft"), 4400747396090729504);
    assert_eq!(xxhash64(b""), 17241709254077376921);
    assert_eq!(
        xxhash64_chained([b"foo".as_slice(), b"bar".as_slice()]),
        17745830980996999794
    );
}

#[test]
fn ring_hash_builds_envoys_ring() {
    // Envoy ring_hash_lb_test.cc `Basic`: 127.0.0.1:90-95, minimum_ring_size 12; the ring is
    // :94 833437586790550860, :92, :90, :95 3551244743356806947, :93, :91, …, :90 last.
    let hosts = local(90);
    let ring = Ring::build(&hosts, 12);
    assert_eq!(ring.len(), 12, "2 entries for each of 6 hosts");
    assert_eq!(ring.host(0), Some(4));
    assert_eq!(ring.host(u64::MAX), Some(4), "wraps to the first entry");
    assert_eq!(
        ring.host(3551244743356806947),
        Some(5),
        "an entry's own hash"
    );
    assert_eq!(ring.host(3551244743356806948), Some(3), "the next entry");
    assert_eq!(ring.host(16117243373044804880), Some(0));
}

#[test]
fn maglev_builds_envoys_table() {
    // Envoy maglev_lb_test.cc `Basic`: 127.0.0.1:90-95, table size 7.
    let table = Maglev::build(&local(90), 7);
    let expected = [2, 4, 0, 1, 5, 0, 3];
    for hash in 0..21u64 {
        assert_eq!(
            table.host(hash),
            Some(expected[(hash % 7) as usize]),
            "hash {hash}"
        );
    }
}

#[test]
fn maglev_fill_order_does_not_depend_on_list_order() {
    // Envoy sorts hosts by their address text before filling the table.
    let mut reversed = local(90);
    reversed.reverse();
    let table = Maglev::build(&reversed, 7);
    let expected = [2, 4, 0, 1, 5, 0, 3].map(|i| 5 - i);
    for hash in 0..7u64 {
        assert_eq!(table.host(hash), Some(expected[hash as usize]));
    }
}

#[test]
fn ring_and_table_sizes_are_clamped_as_envoy_bounds_them() {
    assert_eq!(effective_min_ring_size(0), 1024, "Istio: 0 is unset, 1024");
    assert_eq!(
        effective_min_ring_size(u64::MAX),
        8 * 1024 * 1024,
        "Envoy's maximum"
    );
    // More hosts than the minimum: one entry each (Envoy's scale rounds up per host).
    assert_eq!(Ring::build(&endpoints(10), 1).len(), 10);

    assert_eq!(effective_table_size(0), 65537);
    assert_eq!(
        effective_table_size(8),
        65537,
        "Envoy rejects a non-prime size"
    );
    assert_eq!(effective_table_size(u64::MAX), 65537);
    assert_eq!(effective_table_size(7), 7);
    // A 1-slot table (Envoy's isPrime says 1 is prime) must not divide by zero.
    let one = Maglev::build(&endpoints(3), 1);
    assert!(one.host(u64::MAX).is_some_and(|i| i < 3));
    // Fewer slots than hosts: the table fills and the build ends.
    let small = Maglev::build(&endpoints(10), 3);
    assert!((0..3).all(|h| small.host(h).is_some()));

    // Through `pick`: a non-prime size falls back to the default, and picks work.
    let b = Balancers::with_seed(1);
    let policy = by_header(HashRing::Maglev { table_size: 4 });
    let h = headers(&[("x-user", "a")]);
    assert!(endpoints(3).contains(&pick(&b, &policy, &endpoints(3), &ctx(&h))));
}

// ---- simple policies ---------------------------------------------------------------------------

#[test]
fn round_robin_cycles_in_order_and_its_position_survives_a_new_snapshot() {
    // Envoy round robin: hosts[rr_index++ % size]; Istio: state survives config changes.
    let b = Balancers::with_seed(7);
    let list = endpoints(10);
    let none = HeaderMap::new();
    let rr = |list: &Arc<[SocketAddr]>| pick(&b, &LbPolicy::RoundRobin, list, &ctx(&none));
    let first: Vec<SocketAddr> = (0..10).map(|_| rr(&list)).collect();
    let start = list
        .iter()
        .position(|a| *a == first[0])
        .expect("an endpoint");
    let in_order = |from: usize, n: usize| -> Vec<SocketAddr> {
        (from..from + n).map(|i| list[i % 10]).collect()
    };
    assert_eq!(
        first,
        in_order(start, 10),
        "every endpoint once, in list order"
    );
    let partial: Vec<SocketAddr> = (0..3).map(|_| rr(&list)).collect();
    assert_eq!(partial, in_order(start, 3));

    // The next snapshot's list: equal, but a new allocation.
    let next_snapshot: Arc<[SocketAddr]> = list.iter().copied().collect();
    assert!(!Arc::ptr_eq(&list, &next_snapshot));
    let after: Vec<SocketAddr> = (0..10).map(|_| rr(&next_snapshot)).collect();
    assert_eq!(
        after,
        in_order(start + 3, 10),
        "the cursor went on where it was"
    );
}

#[test]
fn round_robin_starts_at_a_random_endpoint_like_envoys_seed() {
    let none = HeaderMap::new();
    let list = endpoints(10);
    let starts: BTreeSet<SocketAddr> = (0..20)
        .map(|seed| {
            pick(
                &Balancers::with_seed(seed),
                &LbPolicy::RoundRobin,
                &list,
                &ctx(&none),
            )
        })
        .collect();
    assert!(
        starts.len() > 3,
        "agents must not all start at the first endpoint: {starts:?}"
    );
}

#[test]
fn random_spreads_evenly() {
    // Envoy RANDOM: random() % size.
    let b = Balancers::with_seed(42);
    let list = endpoints(10);
    let none = HeaderMap::new();
    let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
    for _ in 0..10_000 {
        *counts
            .entry(pick(&b, &LbPolicy::Random, &list, &ctx(&none)))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 10);
    for (addr, n) in counts {
        assert!(
            (700..=1300).contains(&n),
            "{addr} got {n} of 10000, expected ~1000"
        );
    }
}

#[test]
fn least_request_sends_less_to_an_endpoint_holding_many_requests() {
    // Envoy LEAST_REQUEST (P2C): a slow endpoint that never finishes only wins when both random
    // choices land on it (1/25 with 5 endpoints); round robin would send it 1/5.
    let b = Balancers::with_seed(3);
    let list = endpoints(5);
    let slow = list[2];
    let none = HeaderMap::new();
    let mut held = Vec::new();
    let mut to_slow = 0;
    for _ in 0..10_000 {
        let picked = b
            .pick_lb(
                &cluster("reviews"),
                &LbPolicy::LeastRequest,
                &list,
                &ctx(&none),
            )
            .expect("a pick");
        if picked.addr == slow {
            to_slow += 1;
            held.push(picked.active);
        }
        // Other endpoints answer at once: their guard drops here.
    }
    assert_eq!(b.active_requests(&cluster("reviews"), slow), to_slow);
    assert_eq!(b.active_requests(&cluster("reviews"), list[0]), 0);
    assert!(
        to_slow < 1000,
        "slow endpoint got {to_slow} of 10000; round robin: 2000"
    );
    drop(held);
    assert_eq!(
        b.active_requests(&cluster("reviews"), slow),
        0,
        "guards end requests"
    );
}

#[test]
fn least_request_prefers_the_idle_endpoint_of_two() {
    let b = Balancers::with_seed(9);
    let list = endpoints(2);
    let none = HeaderMap::new();
    let busy: Vec<_> = (0..200)
        .filter_map(|_| {
            let p = b.pick_lb(
                &cluster("reviews"),
                &LbPolicy::RoundRobin,
                &list,
                &ctx(&none),
            )?;
            (p.addr == list[0]).then_some(p.active)
        })
        .collect();
    assert_eq!(busy.len(), 100);
    let to_busy = (0..1000)
        .filter(|_| pick(&b, &LbPolicy::LeastRequest, &list, &ctx(&none)) == list[0])
        .count();
    // Only when both independent choices are the busy one: ~1/4.
    assert!(
        (150..=350).contains(&to_busy),
        "busy endpoint got {to_busy} of 1000"
    );
}

#[test]
fn passthrough_goes_to_the_original_destination() {
    let b = Balancers::new();
    let none = HeaderMap::new();
    let picked = b
        .pick_lb(
            &cluster("egress"),
            &LbPolicy::Passthrough,
            &endpoints(0),
            &ctx(&none),
        )
        .expect("passthrough needs no endpoint");
    assert_eq!(picked.addr, DESTINATION);
    assert!(b.is_empty(), "no state for passthrough");
}

#[test]
fn an_empty_endpoint_list_picks_nothing() {
    let b = Balancers::new();
    let none = HeaderMap::new();
    let policies = [
        LbPolicy::RoundRobin,
        LbPolicy::Random,
        LbPolicy::LeastRequest,
        by_header(RING),
        by_header(MAGLEV),
    ];
    for policy in &policies {
        assert!(
            b.pick_lb(&cluster("reviews"), policy, &endpoints(0), &ctx(&none))
                .is_none(),
            "{policy:?}"
        );
    }
}

// ---- consistent hashing ------------------------------------------------------------------------

#[test]
fn consistent_hash_by_header_sends_each_key_to_one_endpoint() {
    for ring in [RING, MAGLEV] {
        let b = Balancers::with_seed(5);
        let list = endpoints(10);
        let policy = by_header(ring);
        let mut seen: HashMap<String, BTreeSet<SocketAddr>> = HashMap::new();
        for i in 0..1000 {
            let user = format!("user-{}", i % 10);
            let h = headers(&[("x-user", &user)]);
            seen.entry(user)
                .or_default()
                .insert(pick(&b, &policy, &list, &ctx(&h)));
        }
        assert_eq!(seen.len(), 10);
        for (user, addrs) in &seen {
            assert_eq!(addrs.len(), 1, "{ring:?}: {user} reached {addrs:?}");
        }
        let used: BTreeSet<_> = seen.values().flatten().collect();
        assert!(used.len() >= 4, "{ring:?}: 10 keys on only {used:?}");
    }
}

#[test]
fn consistent_hash_removing_one_of_ten_endpoints_moves_about_a_tenth_of_keys() {
    for ring in [RING, MAGLEV] {
        let b = Balancers::with_seed(5);
        let all = endpoints(10);
        let removed = all[6];
        let nine: Arc<[SocketAddr]> = all.iter().copied().filter(|a| *a != removed).collect();
        let policy = by_header(ring);
        let (mut moved, mut on_removed) = (0, 0);
        for i in 0..10_000 {
            let h = headers(&[("x-user", &format!("user-{i}"))]);
            let before = pick(&b, &policy, &all, &ctx(&h));
            let after = pick(&b, &policy, &nine, &ctx(&h));
            assert_ne!(after, removed);
            on_removed += u32::from(before == removed);
            moved += u32::from(before != after);
        }
        assert!(
            moved >= on_removed,
            "{ring:?}: every key of the removed endpoint moves"
        );
        assert!(
            (500..=2000).contains(&moved),
            "{ring:?}: {moved} of 10000 keys moved, expected ~1000"
        );
    }
}

#[test]
fn consistent_hash_header_values_hash_in_any_order() {
    // Envoy sorts a header's values before hashing them.
    let b = Balancers::with_seed(5);
    let list = endpoints(10);
    let policy = by_header(RING);
    let mut reached = BTreeSet::new();
    for _ in 0..50 {
        let ab = headers(&[("x-user", "a"), ("x-user", "b")]);
        let ba = headers(&[("x-user", "b"), ("x-user", "a")]);
        reached.insert(pick(&b, &policy, &list, &ctx(&ab)));
        reached.insert(pick(&b, &policy, &list, &ctx(&ba)));
    }
    assert_eq!(reached.len(), 1);
}

#[test]
fn a_missing_hash_key_picks_at_random() {
    // Envoy: "If there is no hash in the context, just choose a random value".
    let b = Balancers::with_seed(11);
    let list = endpoints(10);
    let none = HeaderMap::new();
    for policy in [by_header(RING), by_header(MAGLEV)] {
        let reached: BTreeSet<_> = (0..200)
            .map(|_| pick(&b, &policy, &list, &ctx(&none)))
            .collect();
        assert!(reached.len() >= 8, "{policy:?}: {reached:?}");
    }
}

fn by_cookie(ttl: Option<Duration>) -> LbPolicy {
    LbPolicy::ConsistentHash {
        key: HashKey::Cookie {
            name: "session".to_string(),
            path: "/shop".to_string(),
            ttl,
        },
        ring: RING,
    }
}

#[test]
fn an_absent_cookie_is_generated_and_the_next_request_with_it_sticks() {
    // Envoy router addDownstreamSetCookie: value = hex(xxHash64(remote + local address)), sent as
    // `name="value"; Max-Age=s; Path=p; HttpOnly`; the request hashes the value.
    let b = Balancers::with_seed(2);
    let list = endpoints(10);
    let policy = by_cookie(Some(Duration::from_secs(3600)));
    let none = HeaderMap::new();
    let first = b
        .pick_lb(&cluster("reviews"), &policy, &list, &ctx(&none))
        .expect("a pick");
    let set_cookie = first.set_cookie.expect("a generated cookie");
    let set_cookie = set_cookie.to_str().expect("ascii");
    let value = format!(
        "{:016x}",
        xxhash64(format!("{SOURCE}{DESTINATION}").as_bytes())
    );
    assert_eq!(
        set_cookie,
        format!("session=\"{value}\"; Max-Age=3600; Path=/shop; HttpOnly")
    );

    // The browser sends it back (unquoted or quoted), among other cookies, on any connection.
    for cookie in [
        format!("session={value}"),
        format!("theme=dark; session=\"{value}\""),
    ] {
        let h = headers(&[("cookie", &cookie)]);
        let later = PickContext {
            source: SocketAddr::from(([10, 1, 0, 7], 40999)),
            ..ctx(&h)
        };
        for _ in 0..20 {
            let next = b
                .pick_lb(&cluster("reviews"), &policy, &list, &later)
                .expect("a pick");
            assert_eq!(
                next.addr, first.addr,
                "sticks to the first request's endpoint"
            );
            assert!(
                next.set_cookie.is_none(),
                "no new cookie when it is present"
            );
        }
    }

    // Another connection of the same client gets its own cookie (the port is hashed).
    let other = PickContext {
        source: SocketAddr::from(([10, 1, 0, 7], 40001)),
        ..ctx(&none)
    };
    let other = b
        .pick_lb(&cluster("reviews"), &policy, &list, &other)
        .expect("a pick");
    assert_ne!(
        other.set_cookie.expect("a cookie").to_str().ok(),
        Some(set_cookie)
    );
}

#[test]
fn a_zero_ttl_cookie_is_a_session_cookie_and_no_ttl_generates_none() {
    let b = Balancers::with_seed(2);
    let list = endpoints(3);
    let none = HeaderMap::new();
    let session = b
        .pick_lb(
            &cluster("a"),
            &by_cookie(Some(Duration::ZERO)),
            &list,
            &ctx(&none),
        )
        .and_then(|p| p.set_cookie)
        .expect("Istio: a 0s ttl still generates a cookie");
    let session = session.to_str().expect("ascii");
    assert!(!session.contains("Max-Age"), "{session}");
    assert!(session.ends_with("; Path=/shop; HttpOnly"), "{session}");

    let no_ttl = b
        .pick_lb(&cluster("b"), &by_cookie(None), &list, &ctx(&none))
        .expect("a random pick");
    assert!(no_ttl.set_cookie.is_none());
}

#[test]
fn cookies_parse_as_envoy_parses_them() {
    let h = headers(&[
        ("cookie", "a=1;b"),
        ("cookie", " theme=dark;  session=\"abc\"; session=second"),
    ]);
    assert_eq!(
        cookie_value(&h, "session"),
        Some(b"abc".as_slice()),
        "first, unquoted"
    );
    assert_eq!(cookie_value(&h, "a"), Some(b"1".as_slice()));
    assert_eq!(cookie_value(&h, "b"), None, "a pair without '=' is ignored");
    assert_eq!(cookie_value(&h, "none"), None);
}

#[test]
fn consistent_hash_by_source_ip_ignores_the_port() {
    // Envoy IpHashMethod: xxHash64 of the downstream IP as text.
    let b = Balancers::with_seed(4);
    let list = endpoints(10);
    let policy = LbPolicy::ConsistentHash {
        key: HashKey::SourceIp,
        ring: MAGLEV,
    };
    let mut by_client: HashMap<u8, BTreeSet<SocketAddr>> = HashMap::new();
    for client in 1..=20u8 {
        for port in [1000, 2000, 3000] {
            let c =
                PickContext::connection(SocketAddr::from(([10, 2, 0, client], port)), DESTINATION);
            by_client
                .entry(client)
                .or_default()
                .insert(pick(&b, &policy, &list, &c));
        }
    }
    assert!(by_client.values().all(|a| a.len() == 1), "{by_client:?}");
    let used: BTreeSet<_> = by_client.values().flatten().collect();
    assert!(used.len() >= 5, "20 clients on {used:?}");
}

#[test]
fn consistent_hash_by_query_parameter() {
    // Envoy QueryParameterHashMethod: the first value of the parameter, not decoded.
    assert_eq!(query_value("a=1&user=bob&user=eve", "user"), Some("bob"));
    assert_eq!(query_value("flag&user=bob", "flag"), Some(""));
    assert_eq!(query_value("username=x", "user"), None);

    let b = Balancers::with_seed(6);
    let list = endpoints(10);
    let policy = LbPolicy::ConsistentHash {
        key: HashKey::QueryParameter("user".to_string()),
        ring: RING,
    };
    let none = HeaderMap::new();
    let with = |query| PickContext {
        query: Some(query),
        ..ctx(&none)
    };
    let bob = pick(&b, &policy, &list, &with("user=bob&page=1"));
    for query in ["page=2&user=bob", "user=bob", "user=bob&user=eve"] {
        assert_eq!(pick(&b, &policy, &list, &with(query)), bob, "{query}");
    }
    let queries: Vec<String> = (0..20).map(|i| format!("user=u{i}")).collect();
    let users: BTreeSet<_> = queries
        .iter()
        .map(|q| pick(&b, &policy, &list, &with(q)))
        .collect();
    assert!(users.len() >= 5, "{users:?}");
}

// ---- state across snapshots --------------------------------------------------------------------

fn table_of(b: &Balancers, key: &ClusterKey, addr: SocketAddr) -> Arc<Table> {
    let clusters = b.inner.clusters.load();
    let family = &clusters[key].families[family_index(addr)];
    let hosts = family.current.load_full().expect("hosts");
    hosts.table.load_full().expect("a built table")
}

#[test]
fn the_ring_is_rebuilt_only_when_the_endpoints_or_its_settings_change() {
    let b = Balancers::with_seed(8);
    let key = cluster("reviews");
    let list = endpoints(10);
    let h = headers(&[("x-user", "a")]);
    pick(&b, &by_header(RING), &list, &ctx(&h));
    let built = table_of(&b, &key, list[0]);

    let equal: Arc<[SocketAddr]> = list.iter().copied().collect();
    pick(&b, &by_header(RING), &equal, &ctx(&h));
    assert!(
        Arc::ptr_eq(&built, &table_of(&b, &key, list[0])),
        "equal list: same ring"
    );

    pick(
        &b,
        &by_header(HashRing::RingHash {
            minimum_ring_size: 2048,
        }),
        &equal,
        &ctx(&h),
    );
    let resized = table_of(&b, &key, list[0]);
    assert!(!Arc::ptr_eq(&built, &resized), "new ring size: rebuilt");

    pick(
        &b,
        &by_header(HashRing::RingHash {
            minimum_ring_size: 2048,
        }),
        &endpoints(9),
        &ctx(&h),
    );
    assert!(
        !Arc::ptr_eq(&resized, &table_of(&b, &key, list[0])),
        "new endpoints: rebuilt"
    );
}

#[test]
fn prepare_builds_the_ring_the_data_path_then_uses() {
    let b = Balancers::with_seed(8);
    let key = cluster("reviews");
    let list = endpoints(10);
    b.prepare(&key, &by_header(MAGLEV), &list);
    let prepared = table_of(&b, &key, list[0]);
    let h = headers(&[("x-user", "a")]);
    pick(&b, &by_header(MAGLEV), &list, &ctx(&h));
    assert!(Arc::ptr_eq(&prepared, &table_of(&b, &key, list[0])));
}

#[test]
fn endpoints_for_picks_the_destinations_family_else_the_other() {
    let v4 = endpoints(2);
    let v6: Arc<[SocketAddr]> = [SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 1], 80))].into();
    let dual = PortEndpoints {
        v4: v4.clone(),
        v6: v6.clone(),
    };
    assert!(Arc::ptr_eq(endpoints_for(&dual, DESTINATION), &v4));
    assert!(Arc::ptr_eq(endpoints_for(&dual, v6[0]), &v6));
    let v6_only = PortEndpoints {
        v4: endpoints(0),
        v6: v6.clone(),
    };
    assert!(Arc::ptr_eq(endpoints_for(&v6_only, DESTINATION), &v6));
}

#[test]
fn an_older_snapshots_list_and_the_other_family_are_served_without_rebuilding() {
    let b = Balancers::with_seed(8);
    let key = cluster("reviews");
    let old = endpoints(10);
    let new = endpoints(9);
    let v6: Arc<[SocketAddr]> = (1..=3u16)
        .map(|i| SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, i], 8080)))
        .collect();
    let h = headers(&[("x-user", "a")]);
    pick(&b, &by_header(RING), &old, &ctx(&h));
    pick(&b, &by_header(RING), &new, &ctx(&h));
    pick(&b, &by_header(RING), &v6, &ctx(&h));
    let (new_ring, v6_ring) = (table_of(&b, &key, new[0]), table_of(&b, &key, v6[0]));
    for _ in 0..3 {
        assert!(old.contains(&pick(&b, &by_header(RING), &old, &ctx(&h))));
        assert!(new.contains(&pick(&b, &by_header(RING), &new, &ctx(&h))));
        assert!(v6.contains(&pick(&b, &by_header(RING), &v6, &ctx(&h))));
    }
    assert!(Arc::ptr_eq(&new_ring, &table_of(&b, &key, new[0])));
    assert!(Arc::ptr_eq(&v6_ring, &table_of(&b, &key, v6[0])));
}

#[test]
fn requests_in_flight_stay_counted_when_the_endpoint_set_changes() {
    let b = Balancers::with_seed(1);
    let key = cluster("reviews");
    let list = endpoints(3);
    let none = HeaderMap::new();
    let held: Vec<_> = (0..6)
        .filter_map(|_| b.pick_lb(&key, &LbPolicy::RoundRobin, &list, &ctx(&none)))
        .collect();
    assert_eq!(b.active_requests(&key, list[0]), 2);
    // A new endpoint joins: the others keep their counts.
    let grown = endpoints(4);
    pick(&b, &LbPolicy::RoundRobin, &grown, &ctx(&none));
    assert_eq!(b.active_requests(&key, list[0]), 2);
    drop(held);
    assert_eq!(b.active_requests(&key, list[0]), 0);
}

#[test]
fn retain_drops_the_state_of_clusters_that_are_gone() {
    let b = Balancers::with_seed(1);
    let none = HeaderMap::new();
    let list = endpoints(3);
    for host in ["a", "b", "c"] {
        b.pick_lb(&cluster(host), &LbPolicy::RoundRobin, &list, &ctx(&none));
    }
    let _held = b.pick_lb(&cluster("b"), &LbPolicy::RoundRobin, &list, &ctx(&none));
    assert_eq!(b.len(), 3);
    b.retain(|key| &*key.host != "b");
    assert_eq!(b.len(), 2);
    let in_flight: u64 = list
        .iter()
        .map(|a| b.active_requests(&cluster("b"), *a))
        .sum();
    assert_eq!(in_flight, 0, "its counters are gone with it");
    b.retain(|_| true);
    assert_eq!(b.len(), 2);
    b.retain(|_| false);
    assert!(b.is_empty());
}

#[test]
fn a_clone_shares_the_state() {
    let b = Balancers::with_seed(1);
    let none = HeaderMap::new();
    let held = b.clone().pick_lb(
        &cluster("a"),
        &LbPolicy::RoundRobin,
        &endpoints(1),
        &ctx(&none),
    );
    assert_eq!(b.active_requests(&cluster("a"), endpoints(1)[0]), 1);
    drop(held);
}

/// What a pick costs; printed, never asserted (`cargo test … pick_cost -- --ignored
/// --nocapture`, best with an optimised build).
#[test]
#[ignore = "a measurement"]
fn pick_cost() {
    let b = Balancers::new();
    let key = cluster("reviews.default.svc.cluster.local");
    let list = endpoints(20);
    let h = headers(&[("x-user", "some-user-id-1234")]);
    let policies = [
        ("round robin", LbPolicy::RoundRobin),
        ("random", LbPolicy::Random),
        ("least request", LbPolicy::LeastRequest),
        ("ring hash (header)", by_header(RING)),
        ("maglev (header)", by_header(MAGLEV)),
        (
            "maglev (source ip)",
            LbPolicy::ConsistentHash {
                key: HashKey::SourceIp,
                ring: MAGLEV,
            },
        ),
    ];
    const N: u32 = 1_000_000;
    for (name, policy) in &policies {
        b.pick_lb(&key, policy, &list, &ctx(&h));
        let start = Instant::now();
        for _ in 0..N {
            std::hint::black_box(b.pick_lb(&key, policy, &list, &ctx(&h)));
        }
        let per = start.elapsed() / N;
        println!("{name:>20}: {per:?} per pick (incl. the ActiveRequest guard)");
    }
}
