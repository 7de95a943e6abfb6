//! Outlier detection (a DestinationRule's `outlierDetection`) as Envoy's detector does it for an
//! Istio sidecar (`source/common/upstream/outlier_detection_impl.cc`): per endpoint, counters of
//! consecutive 5xx, gateway errors and local-origin failures fed by [`Outcome`] reports; an
//! endpoint whose counter reaches its threshold is ejected (within `maxEjectionPercent`) for
//! `baseEjectionTime` × its ejection multiplier, and the balancers skip it until it returns.
//!
//! Istio → Envoy (`applyOutlierDetection` in istio/istio's `cluster_traffic_policy.go`), as
//! [`Settings::from_istio`] resolves it:
//! - `consecutive5xxErrors`: Envoy's `consecutive_5xx`, default 5; 0 disables it.
//! - `consecutiveGatewayErrors`: `consecutive_gateway_failure`, enforced only when set above 0
//!   (Envoy's `enforcing_consecutive_gateway_failure` defaults to 0: off when unset).
//! - deprecated `consecutiveErrors` (older Istio; istio/api#617): gateway errors only, that many,
//!   and consecutive 5xx not enforced unless `consecutive5xxErrors` is set.
//! - `consecutiveLocalOriginFailures`: only with `splitExternalLocalOriginErrors`; Envoy's
//!   default 5 when unset or 0 (Istio then leaves Envoy's default).
//! - `maxEjectionPercent`: default 10 (Envoy's; Istio sets it only above 0).
//! - `minHealthPercent`: Envoy's `healthy_panic_threshold`, which Istio always sets, 0 included
//!   (so panic mode is off by default).
//! - `max_ejection_time`: Istio does not set it: Envoy's default, max(300s, baseEjectionTime).
//!
//! Time: the interval sweep is evaluated lazily on pick, report and read instead of by a timer,
//! with the same observable result. Envoy's timer ticks every `interval` from the detector's
//! creation (here: the cluster's first pick); an ejected host returns at the first tick at or
//! after its ejection time has passed, so the end of an ejection is that tick, computed when it
//! starts (`interval` and the ejection time in force at the ejection apply to it).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::istio::destination_rule::OutlierDetection;

/// What became of one request (or connection) to the picked endpoint, as the request path
/// reports it ([`super::Picked::report`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status (external origin).
    Status(u16),
    /// The connection could not be made (local origin).
    ConnectFailed,
    /// Connecting or the response timed out (local origin).
    Timeout,
    /// The upstream reset the connection or stream before a response (local origin).
    Reset,
    /// The connection was made (local origin success).
    Connected,
}

/// The detectors, as Envoy names their ejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Detector {
    Consecutive5xx = 0,
    ConsecutiveGateway = 1,
    ConsecutiveLocalOrigin = 2,
}

impl Detector {
    pub(super) const ALL: [Detector; 3] = [
        Detector::Consecutive5xx,
        Detector::ConsecutiveGateway,
        Detector::ConsecutiveLocalOrigin,
    ];

    /// The `detector` label of `ambit_outlier_ejections_total`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Detector::Consecutive5xx => "consecutive_5xx",
            Detector::ConsecutiveGateway => "consecutive_gateway",
            Detector::ConsecutiveLocalOrigin => "consecutive_local_origin",
        }
    }
}

/// Envoy's `DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURE`.
const DEFAULT_LOCAL_ORIGIN_FAILURES: u32 = 5;
/// Envoy's `DEFAULT_MAX_EJECTION_TIME_MS`.
const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// The outlier settings in force for one cluster, resolved from Istio's as Envoy gets them.
/// A threshold of 0 is a detector that never ejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Settings {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local_origin: u32,
    split: bool,
    /// Nanoseconds, at least 1.
    interval: u64,
    base_ejection: u64,
    max_ejection: u64,
    max_ejection_percent: u64,
    min_health_percent: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl Settings {
    pub(super) fn from_istio(o: &OutlierDetection) -> Settings {
        // Istio: the deprecated consecutiveErrors "only listen[s] to gateway errors" and stops
        // enforcing consecutive 5xx; the newer fields, when set, take over.
        let deprecated = u32::try_from(o.consecutive_errors).unwrap_or(0);
        let consecutive_5xx = match (o.consecutive_5xx_errors, deprecated) {
            (Some(n), _) => n,
            (None, 0) => o.consecutive_5xx_errors(),
            (None, _) => 0,
        };
        let consecutive_gateway = o.consecutive_gateway_errors.unwrap_or(deprecated);
        let consecutive_local_origin = match o.consecutive_local_origin_failures {
            Some(n) if n > 0 => n,
            _ => DEFAULT_LOCAL_ORIGIN_FAILURES,
        };
        let base = o.base_ejection_time();
        Settings {
            consecutive_5xx,
            consecutive_gateway,
            consecutive_local_origin,
            split: o.split_external_local_origin_errors,
            interval: nanos(o.interval()),
            base_ejection: nanos(base),
            max_ejection: nanos(DEFAULT_MAX_EJECTION_TIME.max(base)),
            max_ejection_percent: u64::try_from(o.max_ejection_percent().clamp(0, 100))
                .unwrap_or(10),
            min_health_percent: u64::try_from(o.min_health_percent.clamp(0, 100)).unwrap_or(0),
        }
    }

    /// Envoy `isHostSetInPanic`: `100 * healthy / total < healthy_panic_threshold` (Istio's
    /// minHealthPercent): then the balancer uses every host, ejected or not.
    pub(super) fn panic(&self, healthy: usize, total: usize) -> bool {
        (healthy as u64) * 100 < self.min_health_percent * total as u64
    }
}

/// The clock ejections are timed by: nanoseconds since the balancers were made (never 0), from
/// the monotonic clock or, in tests, moved by hand.
#[derive(Debug, Clone)]
pub(super) struct Clock {
    base: Instant,
    manual: Option<Arc<AtomicU64>>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            base: Instant::now(),
            manual: None,
        }
    }
}

impl Clock {
    pub(super) fn manual() -> (Clock, ManualClock) {
        let time = Arc::new(AtomicU64::new(1));
        let clock = Clock {
            base: Instant::now(),
            manual: Some(time.clone()),
        };
        (clock, ManualClock(time))
    }

    pub(super) fn now(&self) -> u64 {
        match &self.manual {
            Some(time) => time.load(Ordering::Relaxed),
            None => nanos(self.base.elapsed()).saturating_add(1),
        }
    }
}

/// The hand of a test clock ([`super::Balancers::with_manual_clock`]).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(nanos(by), Ordering::Relaxed);
    }
}

/// One endpoint's outlier state (Envoy's `DetectorHostMonitorImpl`), kept with the endpoint
/// across snapshots.
#[derive(Debug, Default)]
pub(super) struct HostMonitor {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local_origin: AtomicU32,
    /// When the ejection ends (clock nanoseconds, on an interval tick); 0: not ejected.
    until: AtomicU64,
    /// Envoy's `ejectTimeBackoff`: the multiplier of the base ejection time.
    backoff: AtomicU32,
    /// Envoy's `num_ejections`.
    ejections: AtomicU32,
    /// When the last ejection ended; 0: never ejected.
    unejected_at: AtomicU64,
}

impl HostMonitor {
    /// Counts `outcome`; returns the detectors whose threshold it reached, gateway first (the
    /// order Envoy checks them in).
    pub(super) fn count(&self, s: &Settings, outcome: Outcome) -> [Option<Detector>; 2] {
        if s.split {
            // Envoy `putResultWithLocalExternalSplit`: local-origin events feed their own
            // counter only; a successful connect resets it.
            return match outcome {
                Outcome::Status(code) => self.http_status(s, code),
                Outcome::Connected => {
                    reset(&self.consecutive_local_origin);
                    [None, None]
                }
                Outcome::ConnectFailed | Outcome::Timeout | Outcome::Reset => [
                    bump(
                        &self.consecutive_local_origin,
                        s.consecutive_local_origin,
                        Detector::ConsecutiveLocalOrigin,
                    ),
                    None,
                ],
            };
        }
        // Envoy `putResultNoLocalExternalSplit` / `resultToHttpCode`: a failed connect or a reset
        // counts as 503, a timeout as 504; a successful connect is not counted (the response
        // that follows is).
        match outcome {
            Outcome::Status(code) => self.http_status(s, code),
            Outcome::ConnectFailed | Outcome::Reset => self.http_status(s, 503),
            Outcome::Timeout => self.http_status(s, 504),
            Outcome::Connected => [None, None],
        }
    }

    /// Envoy `putHttpResponseCode`: a 5xx (500-599) counts toward consecutive 5xx; 502, 503 and
    /// 504 also toward consecutive gateway errors, which any other status resets (500 too: the
    /// gateway errors are no longer consecutive); a status below 500 resets both.
    fn http_status(&self, s: &Settings, code: u16) -> [Option<Detector>; 2] {
        if !(500..600).contains(&code) {
            reset(&self.consecutive_5xx);
            reset(&self.consecutive_gateway);
            return [None, None];
        }
        let gateway = if matches!(code, 502..=504) {
            bump(
                &self.consecutive_gateway,
                s.consecutive_gateway,
                Detector::ConsecutiveGateway,
            )
        } else {
            reset(&self.consecutive_gateway);
            None
        };
        let five = bump(
            &self.consecutive_5xx,
            s.consecutive_5xx,
            Detector::Consecutive5xx,
        );
        [gateway, five]
    }

    fn counter(&self, detector: Detector) -> &AtomicU32 {
        match detector {
            Detector::Consecutive5xx => &self.consecutive_5xx,
            Detector::ConsecutiveGateway => &self.consecutive_gateway,
            Detector::ConsecutiveLocalOrigin => &self.consecutive_local_origin,
        }
    }

    /// Whether the endpoint is ejected at `now`; an ejection that has ended is closed here
    /// (once, whoever sees it first), as Envoy's interval tick does.
    pub(super) fn ejected(&self, family: &FamilyOutlier, now: u64) -> bool {
        let until = self.until.load(Ordering::Acquire);
        if until == 0 {
            return false;
        }
        if now < until {
            return true;
        }
        self.close(family, until);
        false
    }

    /// Envoy `unejectHost`: the counters start again from 0 so that a few errors do not eject
    /// the host again at once.
    fn close(&self, family: &FamilyOutlier, until: u64) {
        if self
            .until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            reset(&self.consecutive_5xx);
            reset(&self.consecutive_gateway);
            reset(&self.consecutive_local_origin);
            self.unejected_at.store(until, Ordering::Relaxed);
            family.ejected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Ends an ejection whatever its time (the endpoint left the endpoint list).
    pub(super) fn forget(&self, family: &FamilyOutlier) {
        let until = self.until.load(Ordering::Acquire);
        if until != 0 {
            self.close(family, until);
        }
    }

    /// The ejections so far and, when ejected, the time left.
    pub(super) fn ejection(&self, now: u64) -> (u32, Option<Duration>) {
        let until = self.until.load(Ordering::Acquire);
        let left = (until > now).then(|| Duration::from_nanos(until - now));
        (self.ejections.load(Ordering::Relaxed), left)
    }
}

/// Envoy: `if (++counter == threshold)`: the detector fires once, when the count reaches it
/// exactly (a threshold of 0 never fires).
fn bump(counter: &AtomicU32, threshold: u32, detector: Detector) -> Option<Detector> {
    let n = counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    (threshold != 0 && n == threshold).then_some(detector)
}

/// Resets without writing when already 0, so that the common success keeps the line shared.
fn reset(counter: &AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

/// A family's (a cluster's endpoints of one address family) outlier state.
#[derive(Debug, Default)]
pub(super) struct FamilyOutlier {
    /// The endpoints of the current and previous lists that are ejected: 0 keeps picks on the
    /// path they take without outlier detection.
    pub(super) ejected: AtomicUsize,
    /// Serialises ejections and list changes, so the count and the lists agree.
    pub(super) lock: Mutex<()>,
}

/// A cluster's detector: the tick origin and the counters of ejections enforced.
#[derive(Debug)]
pub(super) struct ClusterOutlier {
    pub(super) clock: Clock,
    /// When the interval ticks start (Envoy arms its timer when the detector is made).
    epoch: u64,
    /// Envoy `ejections_enforced_*`, by [`Detector`].
    pub(super) enforced: [AtomicU64; 3],
}

impl ClusterOutlier {
    pub(super) fn new(clock: Clock) -> ClusterOutlier {
        let epoch = clock.now();
        ClusterOutlier {
            clock,
            epoch,
            enforced: Default::default(),
        }
    }

    /// Ejects `host` (one of `hosts`, the list it is balanced in) for `detector` if Envoy's
    /// `ejectHost` would, then resets that detector's counter (Envoy resets it whether or not
    /// the ejection was allowed, but not when the host was already ejected).
    pub(super) fn eject(
        &self,
        family: &FamilyOutlier,
        hosts: &[&HostMonitor],
        host: &HostMonitor,
        detector: Detector,
        s: &Settings,
    ) {
        let _lock = super::lock(&family.lock);
        let now = self.clock.now();
        if host.ejected(family, now) {
            return;
        }
        let active = hosts.iter().filter(|h| h.ejected(family, now)).count() as u64;
        // Envoy: `100 * (ejections_active + 1) / hosts <= max_ejection_percent`; Istio does not
        // set `always_eject_one_host`, so with the default 10% a cluster of fewer than ten hosts
        // ejects none.
        if (active + 1) * 100 <= s.max_ejection_percent * hosts.len() as u64 {
            self.start(family, host, s, now);
            self.enforced[detector as usize].fetch_add(1, Ordering::Relaxed);
        }
        reset(host.counter(detector));
    }

    fn start(&self, family: &FamilyOutlier, host: &HostMonitor, s: &Settings, now: u64) {
        // Envoy's interval tick decrements the multiplier of a host that stayed in for a whole
        // interval: once per tick at least `interval` after its return, up to now.
        let mut backoff = host.backoff.load(Ordering::Relaxed);
        let back = host.unejected_at.load(Ordering::Relaxed);
        if back != 0 && now > back {
            let ticks = (now - back) / s.interval;
            backoff = backoff.saturating_sub(u32::try_from(ticks).unwrap_or(u32::MAX));
        }
        // Envoy `ejectHost`: the multiplier grows while base × it stays below max + base; the
        // time is min(base × multiplier, max_ejection_time).
        if u64::from(backoff).saturating_mul(s.base_ejection)
            < s.max_ejection.saturating_add(s.base_ejection)
        {
            backoff += 1;
        }
        host.backoff.store(backoff, Ordering::Relaxed);
        let time = u64::from(backoff)
            .saturating_mul(s.base_ejection)
            .min(s.max_ejection);
        // The host returns at the first interval tick at or after its time.
        let due = now.saturating_add(time);
        let ticks = (due - self.epoch).div_ceil(s.interval);
        let until = self
            .epoch
            .saturating_add(ticks.saturating_mul(s.interval))
            .max(now + 1);
        host.ejections.fetch_add(1, Ordering::Relaxed);
        family.ejected.fetch_add(1, Ordering::AcqRel);
        host.until.store(until, Ordering::Release);
    }
}

/// One cluster's outlier state as the admin side shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterEjections {
    /// Istio's cluster name (`outbound|port|subset|host`).
    pub cluster: String,
    /// Envoy `ejections_active`.
    pub ejections_active: u64,
    /// Envoy `ejections_enforced_*`, by detector.
    pub ejections_total: EjectionsTotal,
    pub ejected: Vec<Ejected>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EjectionsTotal {
    pub consecutive_5xx: u64,
    pub consecutive_gateway: u64,
    pub consecutive_local_origin: u64,
}

/// An ejected endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ejected {
    pub address: std::net::SocketAddr,
    /// Envoy `num_ejections`: how many times it was ejected.
    pub ejections: u32,
    /// Until it returns (the interval tick that ends the ejection).
    pub remaining_ms: u64,
}

impl EjectionsTotal {
    pub(super) fn read(enforced: &[AtomicU64; 3]) -> EjectionsTotal {
        let get = |d: Detector| enforced[d as usize].load(Ordering::Relaxed);
        EjectionsTotal {
            consecutive_5xx: get(Detector::Consecutive5xx),
            consecutive_gateway: get(Detector::ConsecutiveGateway),
            consecutive_local_origin: get(Detector::ConsecutiveLocalOrigin),
        }
    }

    pub(super) fn get(&self, d: Detector) -> u64 {
        match d {
            Detector::Consecutive5xx => self.consecutive_5xx,
            Detector::ConsecutiveGateway => self.consecutive_gateway,
            Detector::ConsecutiveLocalOrigin => self.consecutive_local_origin,
        }
    }
}

impl HostMonitor {
    /// Whether an ejection is open (as last closed by [`HostMonitor::ejected`]); for the pick's
    /// walk after it has closed the ended ones.
    pub(super) fn marked(&self) -> bool {
        self.until.load(Ordering::Relaxed) != 0
    }
}

impl super::ClusterState {
    /// `Some(Some(n))`: pick among the `n` of `hosts` not ejected; `Some(None)`: among them all
    /// (none ejected, or Envoy's panic mode: fewer healthy than minHealthPercent); `None`: no
    /// host, every one is ejected and panic mode is off (Envoy finds no healthy host).
    pub(super) fn healthy(
        &self,
        family: &super::Family,
        hosts: &super::Hosts,
        s: &Settings,
    ) -> Option<Option<usize>> {
        let now = self.outlier.clock.now();
        let count = hosts.endpoints.len();
        let healthy = hosts
            .endpoints
            .iter()
            .filter(|e| !e.outlier.ejected(&family.outlier, now))
            .count();
        if healthy == count || s.panic(healthy, count) {
            return Some(None);
        }
        // Istio's default minHealthPercent 0 disables panic mode: with every host ejected,
        // Envoy's balancer has no host (503 "no healthy upstream").
        if healthy == 0 {
            return None;
        }
        Some(Some(healthy))
    }

    /// A detector fired for `endpoint`: eject it within the list of its family it is in (none
    /// when it has left both lists).
    pub(super) fn eject(
        &self,
        family: usize,
        endpoint: &Arc<super::Endpoint>,
        detector: Detector,
        s: &Settings,
    ) {
        let family = &self.families[family];
        let (current, previous) = (family.current.load(), family.previous.load());
        let Some(hosts) = [current.as_deref(), previous.as_deref()]
            .into_iter()
            .flatten()
            .find(|h| h.endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint)))
        else {
            return;
        };
        let monitors: Vec<&HostMonitor> = hosts.endpoints.iter().map(|e| &e.outlier).collect();
        self.outlier
            .eject(&family.outlier, &monitors, &endpoint.outlier, detector, s);
    }

    /// The ejected endpoints of both families, and the cluster's counters; None when outlier
    /// detection never ejected one.
    fn ejections(&self, key: &crate::routing::ClusterKey) -> Option<ClusterEjections> {
        let total = EjectionsTotal::read(&self.outlier.enforced);
        let active: usize = self
            .families
            .iter()
            .map(|f| f.outlier.ejected.load(Ordering::Acquire))
            .sum();
        if active == 0 && Detector::ALL.iter().all(|d| total.get(*d) == 0) {
            return None;
        }
        let now = self.outlier.clock.now();
        let mut ejected = Vec::new();
        for family in &self.families {
            let (current, previous) = (family.current.load(), family.previous.load());
            let mut seen: Vec<&Arc<super::Endpoint>> = Vec::new();
            for hosts in [current.as_deref(), previous.as_deref()]
                .into_iter()
                .flatten()
            {
                for (addr, e) in hosts.list.iter().zip(hosts.endpoints.iter()) {
                    if seen.iter().any(|s| Arc::ptr_eq(s, e)) {
                        continue;
                    }
                    seen.push(e);
                    if !e.outlier.ejected(&family.outlier, now) {
                        continue;
                    }
                    let (ejections, left) = e.outlier.ejection(now);
                    ejected.push(Ejected {
                        address: *addr,
                        ejections,
                        remaining_ms: left
                            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    });
                }
            }
        }
        Some(ClusterEjections {
            cluster: key.to_string(),
            ejections_active: ejected.len() as u64,
            ejections_total: total,
            ejected,
        })
    }
}

impl super::Balancers {
    /// Per cluster whose outlier detection ejected an endpoint: the endpoints ejected now, with
    /// their ejection count and time left, and the counters (for the status file and
    /// `/metrics`). Ended ejections are closed as they are read.
    pub fn ejections(&self) -> Vec<ClusterEjections> {
        let clusters = self.inner.clusters.load();
        let mut out: Vec<ClusterEjections> = clusters
            .iter()
            .filter_map(|(key, state)| state.ejections(key))
            .collect();
        out.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        out
    }

    /// Registers `ambit_outlier_ejections_total{cluster,detector}` (Envoy's
    /// `outlier_detection.ejections_enforced_*`) and `ambit_outlier_ejections_active{cluster}`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(EjectionCollector(self.clone())));
    }
}

#[derive(Debug)]
struct EjectionCollector(super::Balancers);

impl prometheus_client::collector::Collector for EjectionCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;

        let clusters = self.0.ejections();
        let mut family = encoder.encode_descriptor(
            "ambit_outlier_ejections",
            "Endpoints ejected by outlier detection since start, by cluster and detector",
            None,
            MetricType::Counter,
        )?;
        for c in &clusters {
            for d in Detector::ALL {
                let labels = [("cluster", c.cluster.as_str()), ("detector", d.label())];
                ConstCounter::new(c.ejections_total.get(d))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "ambit_outlier_ejections_active",
            "Endpoints ejected by outlier detection now, by cluster",
            None,
            MetricType::Gauge,
        )?;
        for c in &clusters {
            let labels = [("cluster", c.cluster.as_str())];
            let active = i64::try_from(c.ejections_active).unwrap_or(i64::MAX);
            ConstGauge::new(active).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
