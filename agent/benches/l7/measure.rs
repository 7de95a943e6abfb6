//! One h2load run on one path, with what the bench reads around it: the CPU and RSS of the
//! path's two proxies (the agents, or the HAProxy instances), and the checks that every request
//! took the path it claims: the agents' status counters and `/metrics`, and which server pod got
//! each request, from whom and in which HTTP version.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit::harness::{LocalAgent, Pod};

use crate::common::agents::{self, metric_sum, Counters};
use crate::common::cpu::{children_cpu_seconds, Meter};
use crate::common::stats::percentile;
use crate::h2load::{self, Load};
use crate::haproxy::Haproxy;
use crate::server::{Seen, Servers};

/// The four ways from the client pod to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// (a) No proxy: pods outside the mesh, client → app.
    Direct,
    /// (b) ambit L4: the `tcp-web` port, HBONE between the agents.
    L4,
    /// (c) ambit L7: the `http` port, routed per request at the client's node, HBONE.
    L7,
    /// (d) HAProxy: client side routes, mutual TLS, server side forwards.
    Haproxy,
    /// (e) ambit L7 as (c), on a port whose route also has a timeout, retries and outlier
    /// detection (configured, never triggered): what they cost per request.
    L7Resilient,
}

/// One path: who sends, where to, and what the server pods must see.
pub struct PathSetup {
    pub way: Way,
    pub label: &'static str,
    pub client: Pod,
    pub uri: String,
    /// Indices (in `Servers`' order) of the pods that may get this path's requests: one, or the
    /// subsets v1 and v2.
    pub targets: Vec<usize>,
    /// The peer address the app of each target sees on this path.
    pub peers: Vec<IpAddr>,
}

impl PathSetup {
    /// The HTTP version the app must see for a client speaking `h2`: what the client speaks,
    /// unless a proxy terminates HTTP (an `http` port goes upstream as HTTP/1.1, Istio's rule for
    /// ports not declared HTTP/2; HAProxy's backends speak HTTP/1.1).
    fn app_sees_h2(&self, h2: bool) -> bool {
        match self.way {
            Way::Direct | Way::L4 => h2,
            Way::L7 | Way::L7Resilient | Way::Haproxy => false,
        }
    }
}

/// Everything a measurement reads and checks.
pub struct Bench {
    pub h2load: PathBuf,
    pub log_dir: PathBuf,
    pub paths: Vec<PathSetup>,
    /// The agents of the client's node and of the server's node.
    pub agents: [LocalAgent; 2],
    pub haproxy: Haproxy,
    pub servers: Servers,
    /// The subset split of (c) and (d), as the share of v2, and how far a run may stray from it.
    pub v2_share: f64,
    pub share_tolerance: f64,
    /// The agents serve HTTP at the destination too (`--destination-l7`, on by default): the
    /// server's node then counts every request (`reporter="destination"`).
    pub destination_l7: bool,
    /// The client's node relays HTTP/1.1 requests as bytes when their route allows
    /// (`--source-relay`, on by default): (c)'s HTTP/1.1 requests all go that way.
    pub source_relay: bool,
}

/// One run of one path.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub requests: u64,
    /// h2load's figure: requests over its "finished in" time.
    pub req_per_s: f64,
    pub elapsed_s: f64,
    /// CPU seconds of the path's proxies (client node, server node) during the run.
    pub proxy_cpu_s: Option<(f64, f64)>,
    /// Their largest RSS sampled during the run, in bytes.
    pub proxy_rss: Option<(u64, u64)>,
    /// Per request, µs to the end of the response (runs with a log, after the skipped start).
    pub latencies_us: Vec<u32>,
    /// Share of the requests subset v2 got (paths with subsets).
    pub v2_share: Option<f64>,
    /// CPUs other processes kept busy (noise indicator).
    pub others_cpu: f64,
    pub problem: Option<String>,
}

impl Sample {
    /// Both proxies' CPU seconds per 1,000 requests.
    pub fn cpu_per_1k(&self) -> Option<(f64, f64)> {
        let k = self.requests as f64 / 1e3;
        self.proxy_cpu_s.map(|(c, s)| (c / k, s / k))
    }

    pub fn latency_us(&self, p: f64) -> Option<f64> {
        (!self.latencies_us.is_empty()).then(|| {
            let mut v = self.latencies_us.clone();
            v.sort_unstable();
            f64::from(percentile(&v, p))
        })
    }
}

/// Sums of the agent metrics the checks use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Metrics {
    requests: f64,
    tcp_opened: f64,
}

/// Metric names as Istio names them.
const REQUESTS: &str = "istio_requests_total";
const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
/// The name the agent exported at the time of writing: prometheus-client's text encoder appends
/// `_total` to a counter family that already ends in it. Counted too, and reported.
pub const REQUESTS_DOUBLED: &str = "istio_requests_total_total";

impl Metrics {
    /// The sums, and the scrape's lines of those counters (for a failed check's message).
    fn scrape(agent: &LocalAgent) -> (Metrics, String) {
        let (_, text) = agent.http_get("/metrics");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests") || l.starts_with("istio_tcp_connections"))
            .collect();
        let m = Metrics {
            requests: metric_sum(&text, REQUESTS) + metric_sum(&text, REQUESTS_DOUBLED),
            tcp_opened: metric_sum(&text, TCP_OPENED),
        };
        if text.contains(REQUESTS_DOUBLED) {
            DOUBLED_NAME_SEEN.store(true, Ordering::Relaxed);
        }
        (m, lines.join("\n"))
    }

    fn delta(self, before: Metrics) -> Metrics {
        Metrics {
            requests: self.requests - before.requests,
            tcp_opened: self.tcp_opened - before.tcp_opened,
        }
    }
}

/// Whether an agent exported the request counter as [`REQUESTS_DOUBLED`].
pub static DOUBLED_NAME_SEEN: AtomicBool = AtomicBool::new(false);

/// The agents' view before or after a run.
struct View {
    counters: Vec<Counters>,
    metrics: [Metrics; 2],
    metric_lines: [String; 2],
    served: HashMap<Seen, u64>,
}

/// The largest RSS of some processes, sampled every 100 ms on a thread until dropped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = vec![0u64; pids.len()];
            loop {
                for (m, pid) in max.iter_mut().zip(&pids) {
                    *m = (*m).max(agents::rss_bytes(*pid));
                }
                if flag.load(Ordering::Relaxed) {
                    return max;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Bench {
    fn view(&self) -> View {
        let refs: Vec<&LocalAgent> = self.agents.iter().collect();
        let (m1, l1) = Metrics::scrape(&self.agents[0]);
        let (m2, l2) = Metrics::scrape(&self.agents[1]);
        View {
            counters: agents::counters(&refs),
            metrics: [m1, m2],
            metric_lines: [l1, l2],
            served: self.servers.counts(),
        }
    }

    /// The four proxy processes: agents n1, n2, HAProxy client side, server side.
    fn proxy_pids(&self) -> [u32; 4] {
        let (hc, hs) = self.haproxy.pids();
        [
            self.agents[0].pid().expect("agent n1 runs"),
            self.agents[1].pid().expect("agent n2 runs"),
            hc,
            hs,
        ]
    }

    /// The pids of `path`'s two proxies, if it has any.
    fn path_proxies(&self, path: &PathSetup) -> Option<(u32, u32)> {
        let p = self.proxy_pids();
        match path.way {
            Way::Direct => None,
            Way::L4 | Way::L7 | Way::L7Resilient => Some((p[0], p[1])),
            Way::Haproxy => Some((p[2], p[3])),
        }
    }

    /// Runs `load` on path `index`. `log` asks h2load for every request's time; the requests
    /// started in the first `skip_s` seconds are left out of the latencies. `v2_share` is the
    /// share of subset v2 the route must give (paths with subsets).
    pub fn run(
        &self,
        index: usize,
        load: &Load,
        log: bool,
        skip_s: f64,
        v2_share: f64,
        timeout: Duration,
    ) -> Sample {
        let path = &self.paths[index];
        let before = self.view();
        let pids = self.proxy_pids();
        let cpu0: Vec<f64> = pids.iter().map(|p| agents::cpu_seconds(*p)).collect();
        let children0 = children_cpu_seconds();
        let mine = self.path_proxies(path);
        let rss = mine.map(|(c, s)| RssSampler::start(vec![c, s]));
        let meter = Meter::start();
        let log_file = log.then(|| h2load::log_path(&self.log_dir));
        let ran = h2load::run(
            &self.h2load,
            &path.client,
            load,
            log_file.as_deref(),
            timeout,
        );
        let spent = meter.finish();
        let cpu1: Vec<f64> = pids.iter().map(|p| agents::cpu_seconds(*p)).collect();
        let rss = rss.map(RssSampler::finish);
        let cpu: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).collect();
        let h2load_cpu = children_cpu_seconds() - children0;
        // Agents finish their bookkeeping a moment after the last response.
        std::thread::sleep(Duration::from_millis(50));
        let after = self.view();

        let mut sample = Sample {
            requests: load.requests,
            proxy_cpu_s: mine.map(|_| match path.way {
                Way::Haproxy => (cpu[2], cpu[3]),
                _ => (cpu[0], cpu[1]),
            }),
            proxy_rss: rss.map(|v| (v[0], v[1])),
            others_cpu: spent.others_cpu(cpu.iter().sum::<f64>() + h2load_cpu),
            ..Sample::default()
        };
        let mut problems = Vec::new();
        match ran {
            Ok(out) => {
                sample.req_per_s = out.req_per_s;
                sample.elapsed_s = out.elapsed_s;
                problems.extend(out.problem(load));
                if log {
                    let first = out.requests.iter().map(|r| r.0).min().unwrap_or(0);
                    let skip_us = (skip_s * 1e6) as u64;
                    if out.requests.len() as u64 != load.requests
                        || out.requests.iter().any(|r| r.1 != 200)
                    {
                        problems.push(format!(
                            "h2load log: {} rows, {} not 200, for {} requests",
                            out.requests.len(),
                            out.requests.iter().filter(|r| r.1 != 200).count(),
                            load.requests
                        ));
                    }
                    sample.latencies_us = out
                        .requests
                        .iter()
                        .filter(|r| r.0 >= first + skip_us)
                        .map(|r| r.2)
                        .collect();
                }
            }
            Err(e) => problems.push(e),
        }
        problems.extend(self.check_agents(path, load, &before, &after));
        let (share, served_problem) = self.check_served(path, load, &before, &after, v2_share);
        sample.v2_share = share;
        problems.extend(served_problem);
        if !problems.is_empty() {
            let logs = match path.way {
                Way::Direct => String::new(),
                Way::Haproxy => self.haproxy.log_tail(),
                Way::L4 | Way::L7 | Way::L7Resilient => {
                    format!(
                        "{}\n{}",
                        self.agents[0].log_tail(),
                        self.agents[1].log_tail()
                    )
                }
            };
            sample.problem = Some(format!("{}\n{logs}", problems.join("\n    ")));
        }
        sample
    }

    /// The agents' counters and metrics must have moved exactly as this path's requests make
    /// them move, and no failure counter anywhere.
    fn check_agents(
        &self,
        path: &PathSetup,
        load: &Load,
        before: &View,
        after: &View,
    ) -> Vec<String> {
        let got: Vec<Counters> = after
            .counters
            .iter()
            .zip(&before.counters)
            .map(|(a, b)| a.delta(*b))
            .collect();
        let metrics = [0, 1].map(|i| after.metrics[i].delta(before.metrics[i]));
        let (c, n) = (load.conns as u64, load.requests);
        let mut want = [Counters::default(), Counters::default()];
        let mut want_metrics = [Metrics::default(), Metrics::default()];
        match path.way {
            Way::Direct | Way::Haproxy => {}
            Way::L4 => {
                // Each app connection becomes one HBONE stream; whether it rode a new or a pooled
                // TLS connection is not this bench's question.
                want[0] = Counters {
                    outbound_accepted: c,
                    outbound_hbone: c,
                    pool_streams_opened: c,
                    pool_connections_opened: got[0].pool_connections_opened,
                    pool_streams_reused: got[0].pool_streams_reused,
                    ..Counters::default()
                };
                want[1] = Counters {
                    hbone_inbound_streams: c,
                    hbone_inbound_accepted: got[0].pool_connections_opened,
                    inbound_accepted: got[1].inbound_accepted,
                    ..Counters::default()
                };
                let opened = Metrics {
                    requests: 0.0,
                    tcp_opened: c as f64,
                };
                want_metrics = [opened, opened];
            }
            Way::L7 | Way::L7Resilient => {
                // Every request is routed at the client's node; upstream HTTP connections (HBONE
                // streams) are pooled there, so their number is whatever the pool needed.
                let streams = got[0].pool_streams_opened;
                // (e)'s route (a timeout, retries with a per-try timeout) is relayed as (c)'s;
                // HTTP/2 from the app too (h2load's requests have no body, the port is `http`, so
                // the upstream is HTTP/1.1: `passthrough::source::stream`).
                let relayed = self.source_relay;
                want[0] = Counters {
                    outbound_accepted: c,
                    outbound_http: c,
                    http_requests: n,
                    http_outbound_relayed: if relayed { n } else { 0 },
                    outbound_hbone: got[0].outbound_hbone,
                    pool_streams_opened: streams,
                    pool_connections_opened: got[0].pool_connections_opened,
                    pool_streams_reused: got[0].pool_streams_reused,
                    ..Counters::default()
                };
                want[1] = Counters {
                    hbone_inbound_streams: streams,
                    hbone_inbound_accepted: got[0].pool_connections_opened,
                    inbound_accepted: got[1].inbound_accepted,
                    ..Counters::default()
                };
                want_metrics = [
                    Metrics {
                        requests: n as f64,
                        tcp_opened: metrics[0].tcp_opened,
                    },
                    Metrics {
                        requests: if self.destination_l7 { n as f64 } else { 0.0 },
                        tcp_opened: streams as f64,
                    },
                ];
            }
        }
        let mut bad = Vec::new();
        for (i, ((g, w), (gm, wm))) in got
            .iter()
            .zip(&want)
            .zip(metrics.iter().zip(&want_metrics))
            .enumerate()
        {
            if g != w {
                bad.push(format!(
                    "agent n{} status counters: expected {w:?}, got {g:?}",
                    i + 1
                ));
            }
            if gm != wm {
                bad.push(format!(
                    "agent n{} /metrics ({REQUESTS}, {TCP_OPENED} summed): expected {wm:?}, got \
                     {gm:?}; after the run:\n{}",
                    i + 1,
                    after.metric_lines[i]
                ));
            }
        }
        bad
    }

    /// Every request must have reached one of the path's pods, from the path's peer, in the
    /// version the path implies; with subsets, v2's share must be near `v2_share`.
    fn check_served(
        &self,
        path: &PathSetup,
        load: &Load,
        before: &View,
        after: &View,
        v2_share: f64,
    ) -> (Option<f64>, Option<String>) {
        let moved: Vec<(Seen, u64)> = after
            .served
            .iter()
            .map(|(k, v)| (*k, v - before.served.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let total: u64 = moved.iter().map(|(_, v)| v).sum();
        let h2 = path.app_sees_h2(load.h2);
        let expected = |k: &Seen| {
            let t = path.targets.iter().position(|t| *t == k.pod);
            t.is_some_and(|t| path.peers[t] == k.peer) && k.h2 == h2
        };
        let stray: Vec<String> = moved
            .iter()
            .filter(|(k, _)| !expected(k))
            .map(|(k, v)| format!("{v} at {k:?}"))
            .collect();
        let mut problems = Vec::new();
        if total != load.requests || !stray.is_empty() {
            problems.push(format!(
                "server pods got {total} requests of {} (want all at pods {:?} from {:?} as {}); \
                 unexpected: [{}]",
                load.requests,
                path.targets,
                path.peers,
                if h2 { "HTTP/2" } else { "HTTP/1.1" },
                stray.join(", ")
            ));
        }
        // L4 spreads connections, not requests, over both pods: no split to check there.
        let routed = matches!(path.way, Way::L7 | Way::L7Resilient | Way::Haproxy);
        let share = (routed && total > 0).then(|| {
            let v2: u64 = moved
                .iter()
                .filter(|(k, _)| k.pod == path.targets[1])
                .map(|(_, v)| v)
                .sum();
            v2 as f64 / total as f64
        });
        if let Some(s) = share {
            if (s - v2_share).abs() > self.share_tolerance {
                problems.push(format!(
                    "subset v2 got {:.1} % of the requests, the route says {:.1} % (± {:.1})",
                    s * 100.0,
                    v2_share * 100.0,
                    self.share_tolerance * 100.0
                ));
            }
        }
        (
            share,
            (!problems.is_empty()).then(|| problems.join("\n    ")),
        )
    }
}
