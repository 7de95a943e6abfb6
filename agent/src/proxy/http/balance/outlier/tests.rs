//! Outlier detection case by case, each test naming the Istio or Envoy rule it checks. Time is
//! a manual clock: no sleeps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::super::{Balancers, ManualClock, Outcome, PickContext, Picked};
use crate::config::istio::destination_rule::OutlierDetection;
use crate::routing::{ClusterKey, HashKey, HashRing, LbPolicy, TrafficPolicy};

fn cluster() -> ClusterKey {
    ClusterKey {
        host: Arc::from("reviews.default.svc.cluster.local"),
        subset: None,
        port: 8080,
    }
}

fn endpoints(n: u8) -> Arc<[SocketAddr]> {
    (1..=n)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect()
}

const SOURCE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

fn no_headers() -> &'static HeaderMap {
    static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    EMPTY.get_or_init(HeaderMap::new)
}

fn ctx(headers: &HeaderMap) -> PickContext<'_> {
    PickContext {
        headers: Some(headers),
        query: None,
        source: SOURCE,
        destination: SOURCE,
    }
}

/// Istio's defaults, with every host ejectable (maxEjectionPercent 100) unless a test says.
fn detection() -> OutlierDetection {
    OutlierDetection {
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    }
}

fn policy(lb: LbPolicy, o: OutlierDetection) -> TrafficPolicy {
    TrafficPolicy {
        lb,
        connection_pool: None,
        outlier_detection: Some(o),
    }
}

struct World {
    b: Balancers,
    clock: ManualClock,
    list: Arc<[SocketAddr]>,
    policy: TrafficPolicy,
}

impl World {
    fn new(n: u8, lb: LbPolicy, o: OutlierDetection) -> World {
        let (b, clock) = Balancers::with_manual_clock(7);
        World {
            b,
            clock,
            list: endpoints(n),
            policy: policy(lb, o),
        }
    }

    fn pick(&self) -> Option<Picked> {
        self.b
            .pick(&cluster(), &self.policy, &self.list, &ctx(no_headers()))
    }

    /// Picks until `addr` is picked (round robin reaches it within the list's length).
    fn pick_of(&self, addr: SocketAddr) -> Picked {
        for _ in 0..(self.list.len() * 64) {
            let p = self.pick().expect("a pick");
            if p.addr == addr {
                return p;
            }
        }
        panic!("{addr} never picked");
    }

    /// `n` reports of `outcome` on `addr`.
    fn report(&self, addr: SocketAddr, outcome: Outcome, n: usize) {
        for _ in 0..n {
            self.pick_of(addr).report(outcome);
        }
    }

    fn ejected(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .b
            .ejections()
            .iter()
            .flat_map(|c| c.ejected.iter().map(|e| e.address))
            .collect();
        out.sort();
        out
    }

    fn remaining(&self, addr: SocketAddr) -> Option<Duration> {
        self.b
            .ejections()
            .iter()
            .flat_map(|c| c.ejected.clone())
            .find(|e| e.address == addr)
            .map(|e| Duration::from_millis(e.remaining_ms))
    }

    fn picks(&self, n: usize) -> HashMap<SocketAddr, usize> {
        let mut out = HashMap::new();
        for _ in 0..n {
            *out.entry(self.pick().expect("a pick").addr).or_default() += 1;
        }
        out
    }
}

#[test]
fn five_consecutive_5xx_eject_by_istio_default() {
    // Istio: consecutive5xxErrors defaults to 5; Envoy ejects when the count reaches it.
    let w = World::new(3, LbPolicy::RoundRobin, detection());
    let bad = w.list[1];
    w.report(bad, Outcome::Status(500), 4);
    assert!(w.ejected().is_empty(), "4 errors do not eject");
    w.report(bad, Outcome::Status(500), 1);
    assert_eq!(w.ejected(), vec![bad]);
    let c = &w.b.ejections()[0];
    assert_eq!(c.ejections_total.consecutive_5xx, 1);
    assert_eq!(c.ejections_active, 1);
}

#[test]
fn a_success_resets_the_5xx_count() {
    // Envoy `putHttpResponseCode`: a status below 500 resets the consecutive counts.
    let w = World::new(3, LbPolicy::RoundRobin, detection());
    let bad = w.list[0];
    w.report(bad, Outcome::Status(503), 4);
    w.report(bad, Outcome::Status(200), 1);
    w.report(bad, Outcome::Status(503), 4);
    assert!(w.ejected().is_empty(), "never 5 in a row");
    w.report(bad, Outcome::Status(503), 1);
    assert_eq!(w.ejected(), vec![bad]);
}

#[test]
fn the_gateway_counter_ignores_500_and_counts_502_503_504() {
    // Istio consecutiveGatewayErrors: 502, 503 and 504 only (Envoy `isGatewayError`); a 500
    // breaks the streak. consecutive5xxErrors 0 disables the 5xx detector.
    let o = OutlierDetection {
        consecutive_gateway_errors: Some(3),
        consecutive_5xx_errors: Some(0),
        ..detection()
    };
    let w = World::new(3, LbPolicy::RoundRobin, o);
    let bad = w.list[2];
    w.report(bad, Outcome::Status(500), 20);
    assert!(w.ejected().is_empty(), "500 is not a gateway error");
    w.report(bad, Outcome::Status(502), 1);
    w.report(bad, Outcome::Status(504), 1);
    w.report(bad, Outcome::Status(500), 1);
    w.report(bad, Outcome::Status(503), 2);
    assert!(w.ejected().is_empty(), "the 500 broke the streak");
    w.report(bad, Outcome::Status(502), 1);
    assert_eq!(w.ejected(), vec![bad]);
    let c = &w.b.ejections()[0];
    assert_eq!(c.ejections_total.consecutive_gateway, 1);
    assert_eq!(c.ejections_total.consecutive_5xx, 0);
}

#[test]
fn local_origin_failures_are_gateway_errors_without_split() {
    // Envoy `resultToHttpCode`: connect failure and reset count as 503, timeout as 504, for
    // both counters; a successful connect is not counted (nor resets).
    let o = OutlierDetection {
        consecutive_gateway_errors: Some(3),
        consecutive_5xx_errors: Some(0),
        ..detection()
    };
    let w = World::new(3, LbPolicy::RoundRobin, o);
    let bad = w.list[0];
    w.report(bad, Outcome::ConnectFailed, 1);
    w.report(bad, Outcome::Connected, 1);
    w.report(bad, Outcome::Timeout, 1);
    assert!(w.ejected().is_empty());
    w.report(bad, Outcome::Reset, 1);
    assert_eq!(w.ejected(), vec![bad]);

    // And toward consecutive 5xx (Istio's default 5).
    let w = World::new(3, LbPolicy::RoundRobin, detection());
    w.report(w.list[1], Outcome::ConnectFailed, 5);
    assert_eq!(w.ejected(), vec![w.list[1]]);
}

#[test]
fn local_origin_failures_count_apart_with_split() {
    // Istio splitExternalLocalOriginErrors: local-origin failures count only toward
    // consecutiveLocalOriginFailures; a successful connect resets it.
    let o = OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failures: Some(2),
        ..detection()
    };
    let w = World::new(3, LbPolicy::RoundRobin, o);
    let bad = w.list[0];
    w.report(bad, Outcome::ConnectFailed, 1);
    w.report(bad, Outcome::Connected, 1);
    w.report(bad, Outcome::Timeout, 1);
    assert!(w.ejected().is_empty(), "the connect reset the count");
    // External 5xx do not feed the local-origin counter (nor reset it).
    w.report(bad, Outcome::Status(503), 4);
    assert!(w.ejected().is_empty());
    w.report(bad, Outcome::Reset, 1);
    assert_eq!(w.ejected(), vec![bad]);
    let c = &w.b.ejections()[0];
    assert_eq!(c.ejections_total.consecutive_local_origin, 1);

    // Local-origin failures do not count as 5xx when split; Envoy's default threshold is 5.
    let o = OutlierDetection {
        split_external_local_origin_errors: true,
        ..detection()
    };
    let w = World::new(3, LbPolicy::RoundRobin, o);
    w.report(w.list[1], Outcome::ConnectFailed, 4);
    assert!(w.ejected().is_empty());
    w.report(w.list[1], Outcome::ConnectFailed, 1);
    assert_eq!(w.ejected(), vec![w.list[1]]);
    assert_eq!(w.b.ejections()[0].ejections_total.consecutive_5xx, 0);
}

#[test]
fn a_threshold_of_zero_disables_the_detector() {
    // Istio: "can be disabled by setting the value to 0"; the gateway detector is off when
    // unset (Envoy's enforcing_consecutive_gateway_failure defaults to 0).
    let o = OutlierDetection {
        consecutive_5xx_errors: Some(0),
        ..detection()
    };
    let w = World::new(2, LbPolicy::RoundRobin, o);
    w.report(w.list[0], Outcome::Status(503), 50);
    w.report(w.list[0], Outcome::ConnectFailed, 50);
    assert!(w.ejected().is_empty());
    assert!(w.b.ejections().is_empty(), "nothing to show");
}

#[test]
fn deprecated_consecutive_errors_count_gateway_errors_only() {
    // Istio (istio/api#617): consecutiveErrors "only listen[s] to gateway errors".
    let o = OutlierDetection {
        consecutive_errors: 2,
        ..detection()
    };
    let w = World::new(2, LbPolicy::RoundRobin, o);
    w.report(w.list[0], Outcome::Status(500), 10);
    assert!(w.ejected().is_empty(), "5xx not enforced");
    w.report(w.list[0], Outcome::Status(503), 2);
    assert_eq!(w.ejected(), vec![w.list[0]]);
}

#[test]
fn ejection_time_is_base_times_ejections() {
    // Envoy: ejected for base_ejection_time × the multiplier, which each ejection raises; a
    // host returns at the first interval tick after its time.
    let o = OutlierDetection {
        base_ejection_time: Some(Duration::from_secs(30)),
        interval: Some(Duration::from_secs(10)),
        ..detection()
    };
    let w = World::new(3, LbPolicy::RoundRobin, o);
    let bad = w.list[1];
    w.report(bad, Outcome::Status(500), 5);
    assert_eq!(w.remaining(bad), Some(Duration::from_secs(30)));
    w.clock.advance(Duration::from_secs(29));
    assert_eq!(w.ejected(), vec![bad]);
    w.clock.advance(Duration::from_secs(1));
    assert!(w.ejected().is_empty(), "back after 30s");

    // Ejected again at once: twice as long.
    w.report(bad, Outcome::Status(500), 5);
    assert_eq!(w.remaining(bad), Some(Duration::from_secs(60)));
    w.clock.advance(Duration::from_secs(59));
    assert_eq!(w.ejected(), vec![bad]);
    w.clock.advance(Duration::from_secs(1));
    assert!(w.ejected().is_empty(), "back after 60s");
    let e = w.b.ejections();
    assert_eq!(e[0].ejections_total.consecutive_5xx, 2);
}

#[test]
fn the_multiplier_decreases_once_per_interval_in_service() {
    // Envoy `onIntervalTimer`: a host back in service for an interval has its multiplier
    // lowered by one per tick; the cap is max_ejection_time (default 300s).
    let o = OutlierDetection {
        base_ejection_time: Some(Duration::from_secs(100)),
        interval: Some(Duration::from_secs(10)),
        ..detection()
    };
    let w = World::new(3, LbPolicy::RoundRobin, o);
    let bad = w.list[0];
    for expected in [100, 200, 300, 300] {
        w.report(bad, Outcome::Status(500), 5);
        assert_eq!(w.remaining(bad), Some(Duration::from_secs(expected)));
        w.clock.advance(Duration::from_secs(expected));
    }
    // Multiplier 4 (capped time 300s); 3 ticks in service bring it to 1: the next is 200s.
    w.clock.advance(Duration::from_secs(30));
    w.report(bad, Outcome::Status(500), 5);
    assert_eq!(w.remaining(bad), Some(Duration::from_secs(200)));
}

#[test]
fn a_host_returns_at_the_first_interval_tick_after_its_time() {
    // Envoy checks for un-ejection on its interval timer (every 10s from the detector's start):
    // ejected at t=5s for 30s, the host is back at the tick t=40s, not at t=35s.
    let o = OutlierDetection {
        base_ejection_time: Some(Duration::from_secs(30)),
        interval: Some(Duration::from_secs(10)),
        ..detection()
    };
    let w = World::new(3, LbPolicy::RoundRobin, o);
    let bad = w.list[2];
    w.pick();
    w.clock.advance(Duration::from_secs(5));
    w.report(bad, Outcome::Status(500), 5);
    assert_eq!(w.remaining(bad), Some(Duration::from_secs(35)));
    w.clock.advance(Duration::from_secs(34));
    assert!(
        !w.picks(30).contains_key(&bad),
        "still out between its time and the tick"
    );
    w.clock.advance(Duration::from_secs(1));
    assert!(w.picks(30).contains_key(&bad), "back at the tick");
    // Its counters start again: 4 more errors do not eject it.
    w.report(bad, Outcome::Status(500), 4);
    assert!(w.ejected().is_empty());
}

#[test]
fn max_ejection_percent_caps_ejections() {
    // Envoy `ejectHost`: only if 100 × (ejected + 1) / hosts <= maxEjectionPercent; Istio leaves
    // `always_eject_one_host` unset, so the default 10% ejects none of three hosts.
    for (percent, expected) in [(0, 0), (50, 1), (66, 1), (67, 2), (100, 3)] {
        let o = OutlierDetection {
            max_ejection_percent: percent,
            min_health_percent: 0,
            ..OutlierDetection::default()
        };
        let w = World::new(3, LbPolicy::RoundRobin, o);
        for &addr in w.list.iter() {
            if w.ejected().len() < 3 && !w.ejected().contains(&addr) {
                w.report(addr, Outcome::Status(500), 5);
            }
        }
        assert_eq!(w.ejected().len(), expected, "maxEjectionPercent {percent}");
    }
}

#[test]
fn a_refused_ejection_resets_the_count() {
    // Envoy resets the detector's counter after `ejectHost`, allowed or not: the next ejection
    // needs a full streak again.
    let o = OutlierDetection {
        max_ejection_percent: 50,
        ..OutlierDetection::default()
    };
    let w = World::new(2, LbPolicy::RoundRobin, o);
    w.report(w.list[0], Outcome::Status(500), 5);
    w.report(w.list[1], Outcome::Status(500), 5);
    assert_eq!(
        w.ejected(),
        vec![w.list[0]],
        "the second is refused (2/2 > 50%)"
    );
    w.clock.advance(Duration::from_secs(40));
    assert!(w.ejected().is_empty());
    w.report(w.list[1], Outcome::Status(500), 4);
    assert!(w.ejected().is_empty(), "its count started again");
    w.report(w.list[1], Outcome::Status(500), 1);
    assert_eq!(w.ejected(), vec![w.list[1]]);
}

#[test]
fn min_health_percent_panic_balances_over_all() {
    // Istio minHealthPercent (Envoy's panic threshold): below it, every host is balanced.
    let o = OutlierDetection {
        min_health_percent: 50,
        ..detection()
    };
    let w = World::new(4, LbPolicy::RoundRobin, o);
    w.report(w.list[0], Outcome::Status(500), 5);
    let seen = w.picks(400);
    assert!(!seen.contains_key(&w.list[0]), "75% healthy: not in panic");
    w.report(w.list[1], Outcome::Status(500), 5);
    let seen = w.picks(400);
    assert!(
        !seen.contains_key(&w.list[1]),
        "50% healthy is not below 50%"
    );
    w.report(w.list[2], Outcome::Status(500), 5);
    let seen = w.picks(400);
    assert_eq!(seen.len(), 4, "25% healthy: panic, all hosts {seen:?}");
}

#[test]
fn every_host_ejected_without_panic_picks_none() {
    // Istio's default minHealthPercent 0 turns Envoy's panic mode off: with every host ejected
    // there is no healthy host (503 "no healthy upstream"); with a threshold, all are used.
    let w = World::new(2, LbPolicy::RoundRobin, detection());
    w.report(w.list[0], Outcome::Status(500), 5);
    w.report(w.list[1], Outcome::Status(500), 5);
    assert!(w.pick().is_none());
    let o = OutlierDetection {
        min_health_percent: 1,
        ..detection()
    };
    let w = World::new(2, LbPolicy::RoundRobin, o);
    w.report(w.list[0], Outcome::Status(500), 5);
    w.report(w.list[1], Outcome::Status(500), 5);
    assert_eq!(w.picks(100).len(), 2, "panic: both");
}

#[test]
fn round_robin_never_returns_an_ejected_host() {
    let w = World::new(5, LbPolicy::RoundRobin, detection());
    let bad = w.list[3];
    w.report(bad, Outcome::Status(500), 5);
    let seen = w.picks(1000);
    assert!(!seen.contains_key(&bad), "{seen:?}");
    // The others share the load evenly (Envoy: round robin over the healthy hosts).
    assert!(seen.values().all(|&n| n == 250), "{seen:?}");
}

#[test]
fn random_and_least_request_skip_an_ejected_host() {
    for lb in [LbPolicy::Random, LbPolicy::LeastRequest] {
        let w = World::new(5, lb.clone(), detection());
        let bad = w.list[0];
        w.report(bad, Outcome::Status(500), 5);
        let seen = w.picks(1000);
        assert!(!seen.contains_key(&bad), "{lb:?}: {seen:?}");
        assert_eq!(seen.len(), 4, "{lb:?}: {seen:?}");
    }
}

fn by_header(ring: HashRing) -> LbPolicy {
    LbPolicy::ConsistentHash {
        key: HashKey::Header(HeaderName::from_static("x-user")),
        ring,
    }
}

#[test]
fn consistent_hash_moves_only_the_ejected_hosts_keys() {
    // Envoy excludes unhealthy hosts from the hash: here the walk goes on to the next healthy
    // host on the ring or table, so the ejected host's keys move and no other key does.
    for ring in [
        HashRing::RingHash {
            minimum_ring_size: 1024,
        },
        HashRing::Maglev { table_size: 65537 },
    ] {
        let w = World::new(6, by_header(ring), detection());
        let key_pick = |k: usize| {
            let mut h = HeaderMap::new();
            h.insert("x-user", HeaderValue::from(k));
            w.b.pick(&cluster(), &w.policy, &w.list, &ctx(&h))
                .expect("a pick")
                .addr
        };
        let before: Vec<SocketAddr> = (0..600).map(key_pick).collect();
        let bad = before[0];
        w.report(bad, Outcome::Status(500), 5);
        // (Reports pick without the header: a random hash, until it lands on `bad`.)
        assert_eq!(w.ejected(), vec![bad], "{ring:?}");
        let after: Vec<SocketAddr> = (0..600).map(key_pick).collect();
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if *b == bad {
                assert_ne!(a, &bad, "{ring:?}");
                moved += 1;
            } else {
                assert_eq!(a, b, "{ring:?}: a healthy host's key moved");
            }
        }
        assert!(moved > 0);
        let targets: std::collections::HashSet<_> = before
            .iter()
            .zip(&after)
            .filter(|(b, _)| **b == bad)
            .map(|(_, a)| *a)
            .collect();
        assert!(
            targets.len() > 1,
            "{ring:?}: moved keys spread: {targets:?}"
        );
    }
}

#[test]
fn ejection_state_survives_an_equal_endpoint_list() {
    // Istio: state survives config changes that keep the endpoint; a new snapshot's equal list
    // (another Arc) keeps the ejection and the counts.
    let mut w = World::new(3, LbPolicy::RoundRobin, detection());
    let bad = w.list[0];
    w.report(bad, Outcome::Status(500), 5);
    w.report(w.list[1], Outcome::Status(500), 4);
    w.list = endpoints(3);
    assert!(!w.picks(300).contains_key(&bad), "still ejected");
    w.report(w.list[1], Outcome::Status(500), 1);
    assert_eq!(w.ejected(), vec![w.list[0], w.list[1]], "count kept");
    // A list that keeps the endpoint among new ones keeps it too.
    w.list = endpoints(4);
    assert!(!w.picks(400).contains_key(&bad));
    // A list without it ends its ejection: the family has nothing ejected of its own.
    w.list = (2..=4)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect();
    w.pick();
    w.list = (3..=4)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect();
    w.pick();
    assert_eq!(
        w.ejected(),
        vec![SocketAddr::from(([10, 0, 0, 2], 8080))],
        "in the previous list"
    );
    w.list = (4..=4)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect();
    w.pick();
    assert!(w.ejected().is_empty());
    assert_eq!(w.b.ejections()[0].ejections_active, 0);
}

#[test]
fn outlier_settings_apply_to_the_next_report() {
    // A config change applies at once: a lower threshold ejects on the next error.
    let mut w = World::new(3, LbPolicy::RoundRobin, detection());
    let bad = w.list[0];
    w.report(bad, Outcome::Status(500), 3);
    w.policy = policy(
        LbPolicy::RoundRobin,
        OutlierDetection {
            consecutive_5xx_errors: Some(4),
            ..detection()
        },
    );
    w.report(bad, Outcome::Status(500), 1);
    assert_eq!(w.ejected(), vec![bad]);
}

#[test]
fn nothing_is_tracked_without_outlier_detection() {
    let (b, _clock) = Balancers::with_manual_clock(1);
    let list = endpoints(2);
    let plain = TrafficPolicy {
        lb: LbPolicy::RoundRobin,
        ..TrafficPolicy::default()
    };
    for _ in 0..100 {
        let p = b
            .pick(&cluster(), &plain, &list, &ctx(no_headers()))
            .expect("a pick");
        p.report(Outcome::Status(500));
        p.report(Outcome::ConnectFailed);
    }
    assert!(b.ejections().is_empty());
    assert_eq!(b.pick_lb_count(&list, &plain), 2, "both still picked");
    // A passthrough pick's report does nothing either.
    let pass = TrafficPolicy {
        lb: LbPolicy::Passthrough,
        outlier_detection: Some(detection()),
        ..TrafficPolicy::default()
    };
    let p = b
        .pick(&cluster(), &pass, &list, &ctx(no_headers()))
        .expect("a pick");
    p.report(Outcome::Status(500));
    // Removing outlierDetection ignores past ejections (Envoy rebuilds the cluster).
    let w = World::new(2, LbPolicy::RoundRobin, detection());
    w.report(w.list[0], Outcome::Status(500), 5);
    assert_eq!(w.b.pick_lb_count(&w.list, &plain), 2);
}

impl Balancers {
    /// How many endpoints of `list` 100 picks by `policy` reach.
    fn pick_lb_count(&self, list: &Arc<[SocketAddr]>, policy: &TrafficPolicy) -> usize {
        let seen: std::collections::HashSet<_> = (0..100)
            .map(|_| {
                self.pick(&cluster(), policy, list, &ctx(no_headers()))
                    .expect("a pick")
                    .addr
            })
            .collect();
        seen.len()
    }
}

#[test]
fn ejections_are_in_the_metrics() {
    let w = World::new(3, LbPolicy::RoundRobin, detection());
    w.report(w.list[0], Outcome::Status(500), 5);
    let mut registry = prometheus_client::registry::Registry::default();
    w.b.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let name = "outbound|8080||reviews.default.svc.cluster.local";
    assert!(
        text.contains(&format!(
            "ambit_outlier_ejections_total{{cluster=\"{name}\",detector=\"consecutive_5xx\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "ambit_outlier_ejections_active{{cluster=\"{name}\"}} 1"
        )),
        "{text}"
    );
    let json = serde_json::to_string(&w.b.ejections()).expect("json");
    assert!(json.contains("\"remaining_ms\":30000"), "{json}");
}
