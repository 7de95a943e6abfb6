//! One measurement on one path: the client run in the client pod, the agents' CPU around it, and
//! the checks that the connections really took that path (the agents' status counters).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambit::harness::{LocalAgent, Pod};

use crate::common::agents::{self, Counters};
use crate::common::cpu::{children_cpu_seconds, Meter};
use crate::common::h2load::{self, TimedLoad};
use crate::common::stats::percentile;
use crate::samples::{AgentCpu, ConnSample, HttpSample, LatSample, Meta, Route, TputSample};
use crate::workload::{self, Kind};
use crate::{Config, CHUNK};

/// Server ports: one per (round, kind) in each server pod.
pub const FIRST_PORT: u16 = 20000;
/// The HTTP server's port in every server pod.
pub const HTTP_PORT: u16 = 18080;

/// What a path is measured with (the cold pool differs from the warm one per connection only).
#[derive(Debug, Clone, Copy)]
pub struct Measures {
    pub tput_par: bool,
    pub http: bool,
    pub lat: bool,
}

/// One client/server pair and how its connections travel.
pub struct PathSetup {
    pub letter: char,
    pub label: &'static str,
    pub client: Pod,
    pub server_ip: Ipv4Addr,
    /// Indices into `Bench::agents` of the agents on the client's and the server's node, which
    /// carry this path; the same index twice on the same-node path; `None` for the direct paths
    /// (no agent may see them).
    pub agents: Option<(usize, usize)>,
    pub measures: Measures,
}

impl PathSetup {
    pub fn one_agent(&self) -> bool {
        self.agents.is_some_and(|(c, s)| c == s)
    }
}

pub struct Bench {
    pub cfg: Config,
    pub paths: Vec<PathSetup>,
    /// n1, n2 (warm pool), n3, n4 (cold pool), n5 (same node).
    pub agents: Vec<LocalAgent>,
    /// h2load, when HTTP is measured.
    pub h2load: Option<PathBuf>,
}

/// What happened around one client run.
struct Measured<T> {
    out: T,
    /// CPU seconds of the path's agents (`None` on the direct paths).
    agent_cpu: Option<AgentCpu>,
    /// Counter deltas of the path's client-node agent (and, on one agent, its server side).
    client_agent: Counters,
    meta: Meta,
}

/// What a run makes the agents count: `conns` connections; from h2load (`http`), which closes
/// its connections with a request in flight when its time is up, at most one reset relay per
/// connection and end too.
#[derive(Clone, Copy)]
struct Expect {
    conns: u64,
    http: bool,
}

impl Expect {
    fn conns(n: usize) -> Expect {
        Expect {
            conns: n as u64,
            http: false,
        }
    }
}

/// `istio_requests_total` of an agent: the requests it served at L7 (either name the agent may
/// export it under).
fn requests_served(agent: &LocalAgent) -> f64 {
    let (_, text) = agent.http_get("/metrics");
    agents::metric_sum(&text, "istio_requests_total")
        + agents::metric_sum(&text, "istio_requests_total_total")
}

pub fn server_port(round: usize, kind: Kind) -> u16 {
    FIRST_PORT + (round * Kind::ALL.len() + kind.index()) as u16
}

impl Bench {
    fn agent_refs(&self) -> Vec<&LocalAgent> {
        self.agents.iter().collect()
    }

    fn dst(&self, path: usize, round: usize, kind: Kind) -> SocketAddr {
        SocketAddr::from((self.paths[path].server_ip, server_port(round, kind)))
    }

    /// Runs `run` (the client, in the bench or as a child process) with the accounting and the
    /// path check around it; `expect` says what the run should make the agents see.
    fn measure<T>(&self, path: usize, run: impl FnOnce() -> T, expect: Expect) -> Measured<T> {
        let agents = self.agent_refs();
        let before = agents::counters(&agents);
        let cpu0 = agents::cpu(&agents);
        let children0 = children_cpu_seconds();
        let meter = Meter::start();
        let out = run();
        let spent = meter.finish();
        let cpu1 = agents::cpu(&agents);
        let children = children_cpu_seconds() - children0;
        // Agents finish their relays (and count resets) a moment after the client has its answer.
        std::thread::sleep(Duration::from_millis(20));
        let after = agents::counters(&agents);
        let got: Vec<Counters> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.delta(*b))
            .collect();
        let cpu: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).collect();
        let agents_total: f64 = cpu.iter().sum();
        let which = self.paths[path].agents;
        let (route, problem) = self.check(path, expect, &got);
        Measured {
            out,
            agent_cpu: which.map(|(c, s)| AgentCpu {
                client: cpu[c],
                server: (c != s).then(|| cpu[s]),
            }),
            client_agent: which.map_or_else(Counters::default, |(c, _)| got[c]),
            meta: Meta {
                others_cpu: spent.others_cpu(agents_total + children),
                route,
                problem,
            },
        }
    }

    /// Every agent's counters must have moved exactly as the run makes them move on `path`:
    /// returns which way the connections went, and what did not match.
    fn check(&self, path: usize, expect: Expect, got: &[Counters]) -> (Route, Option<String>) {
        let n = expect.conns;
        let mut want = vec![Counters::default(); got.len()];
        let mut route = Route::Direct;
        if let Some((c, s)) = self.paths[path].agents {
            let one = c == s;
            // The same-node path goes through HBONE on one node, or (with the agent's same-node
            // shortcut) from the outbound to the inbound side inside the agent: no pool stream.
            route = if one && got[c].pool_streams_opened == 0 && got[c].outbound_accepted > 0 {
                Route::Local
            } else {
                Route::Hbone
            };
            if route == Route::Local {
                // What the shortcut counts besides the outbound connection is the agent's own
                // business; it must open no HBONE stream or TLS connection, plaintext nothing,
                // and fail nothing.
                want[c] = Counters {
                    outbound_accepted: n,
                    outbound_hbone: got[c].outbound_hbone,
                    hbone_inbound_streams: got[c].hbone_inbound_streams,
                    inbound_accepted: got[c].inbound_accepted,
                    outbound_http: got[c].outbound_http,
                    ..Counters::default()
                };
            } else {
                // How many streams rode on new or pooled connections is what the warm and cold
                // paths differ in; it is reported, not checked here. The server's node must
                // accept exactly the TLS connections the client's node opened.
                let client = Counters {
                    outbound_accepted: n,
                    outbound_hbone: n,
                    pool_streams_opened: n,
                    pool_connections_opened: got[c].pool_connections_opened,
                    pool_streams_reused: got[c].pool_streams_reused,
                    ..Counters::default()
                };
                let server = Counters {
                    hbone_inbound_streams: n,
                    hbone_inbound_accepted: got[c].pool_connections_opened,
                    ..Counters::default()
                };
                if one {
                    want[c] = client.plus(server);
                } else {
                    want[c] = client;
                    want[s] = server;
                }
            }
            if expect.http {
                // h2load's resets at its end: only resets, at most one per connection and end.
                let sides: &[(usize, u64)] = if one { &[(c, 2)] } else { &[(c, 1), (s, 1)] };
                for &(i, ends) in sides {
                    let g = got[i];
                    if g.failures == g.relays_reset && g.relays_reset <= ends * n {
                        want[i].failures = g.failures;
                        want[i].relays_reset = g.relays_reset;
                    }
                }
            }
        }
        let bad: Vec<String> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (g, w))| g != w)
            .map(|(i, (g, w))| format!("agent n{}: expected {w:?}, got {g:?}", i + 1))
            .collect();
        let problem = (!bad.is_empty()).then(|| format!("path counters: {}", bad.join("; ")));
        (route, problem)
    }

    /// `n` short connections (connect, 1 byte echoed, close), `concurrency` in flight, on `path`.
    pub fn conn_run(&self, round: usize, path: usize, n: usize, concurrency: usize) -> ConnSample {
        let dst = self.dst(path, round, Kind::Echo);
        let client = &self.paths[path].client;
        let m = self.measure(
            path,
            || client.run_async(move || workload::conn_rate(dst, n, concurrency)),
            Expect::conns(n),
        );
        let mut run = m.out;
        let mut meta = m.meta;
        meta.problem = run.problem(n).or(meta.problem);
        run.latencies_us.sort_unstable();
        let per_conn = |s: f64| s * 1e6 / n as f64;
        ConnSample {
            rate: run.ok as f64 / run.elapsed.as_secs_f64(),
            p50_us: percentile(&run.latencies_us, 50.0) as f64,
            p99_us: percentile(&run.latencies_us, 99.0) as f64,
            hbone_conns_per_conn: m
                .agent_cpu
                .map(|_| m.client_agent.pool_connections_opened as f64 / n as f64),
            agent_cpu_us: m.agent_cpu.map(|c| per_unit(c, per_conn)),
            meta,
        }
    }

    /// `mib` MiB one way on `streams` connections at once on `path`.
    pub fn tput_run(&self, round: usize, path: usize, mib: u64, streams: usize) -> TputSample {
        let dst = self.dst(path, round, Kind::Sink);
        let bytes = mib * 1024 * 1024;
        let client = &self.paths[path].client;
        let m = self.measure(
            path,
            || client.run_async(move || workload::throughput_streams(dst, bytes, streams, CHUNK)),
            Expect::conns(streams),
        );
        let mut meta = m.meta;
        let gbps = match m.out {
            Ok(elapsed) => bytes as f64 / elapsed.as_secs_f64() / 1e9,
            Err(e) => {
                meta.problem = Some(format!("transfer failed: {e}"));
                0.0
            }
        };
        let gb = bytes as f64 / 1e9;
        TputSample {
            gbps,
            agent_cpu_s_per_gb: m.agent_cpu.map(|c| per_unit(c, |s| s / gb)),
            meta,
        }
    }

    /// HTTP/1.1 keep-alive requests on `conns` connections for `seconds` (after `warmup_s`) from
    /// h2load in the client pod to the server pod's HTTP server.
    pub fn http_run(&self, path: usize, conns: usize, seconds: f64, warmup_s: f64) -> HttpSample {
        let p = &self.paths[path];
        let bin = self
            .h2load
            .as_deref()
            .expect("h2load is found when HTTP is measured");
        let load = TimedLoad {
            uri: format!("http://{}/", SocketAddr::from((p.server_ip, HTTP_PORT))),
            conns,
            seconds,
            warmup_s,
            h2: false,
            threads: self.cfg.h2load_threads,
        };
        let timeout = Duration::from_secs_f64((seconds + warmup_s) * 5.0 + 30.0);
        let server = p.agents.map(|(_, s)| &self.agents[s]);
        let served0 = server.map(requests_served);
        let m = self.measure(
            path,
            || h2load::run_timed(bin, &p.client, &load, timeout),
            Expect {
                conns: conns as u64,
                http: true,
            },
        );
        let served = server.map(requests_served).zip(served0).map(|(a, b)| a - b);
        let mut meta = m.meta;
        let (req_per_s, requests) = match &m.out {
            Ok(o) => {
                if let Some(p) = o.timed_problem(&load) {
                    meta.problem.get_or_insert(p);
                }
                (o.req_per_s, o.done)
            }
            Err(e) => {
                meta.problem = Some(e.clone());
                (0.0, 0)
            }
        };
        let per_req = |s: f64| s * 1e6 / requests.max(1) as f64;
        HttpSample {
            req_per_s,
            requests,
            agent_cpu_us: m.agent_cpu.map(|c| per_unit(c, per_req)),
            dest_l7: served.map(|n| n > 0.0),
            meta,
        }
    }

    /// One slice of a latency run: `pings` timed round trips of `size` bytes (after `warmup`
    /// untimed ones) on a new connection on `path`.
    pub fn lat_slice(
        &self,
        round: usize,
        path: usize,
        warmup: usize,
        pings: usize,
        size: usize,
    ) -> LatPart {
        let dst = self.dst(path, round, Kind::PingPong);
        let client = &self.paths[path].client;
        let m = self.measure(
            path,
            || {
                client
                    .run_async(move || workload::ping_pong_latency_sized(dst, warmup, pings, size))
            },
            Expect::conns(1),
        );
        let mut meta = m.meta;
        let ns = m.out.unwrap_or_else(|e| {
            meta.problem = Some(format!("ping-pong failed: {e}"));
            Vec::new()
        });
        LatPart {
            ns,
            others_cpu_sum: meta.others_cpu,
            slices: 1,
            route: Some(meta.route),
            problem: meta.problem,
        }
    }
}

fn per_unit(c: AgentCpu, f: impl Fn(f64) -> f64) -> AgentCpu {
    AgentCpu {
        client: f(c.client),
        server: c.server.map(&f),
    }
}

/// Round trips of some slices of a latency run; a run's slices add up to one sample.
#[derive(Default)]
pub struct LatPart {
    ns: Vec<u32>,
    others_cpu_sum: f64,
    slices: usize,
    route: Option<Route>,
    problem: Option<String>,
}

impl LatPart {
    pub fn add(&mut self, p: LatPart) {
        self.ns.extend(p.ns);
        self.others_cpu_sum += p.others_cpu_sum;
        self.slices += p.slices;
        match (self.route, p.route) {
            (None, r) => self.route = r,
            (Some(a), Some(b)) if a != b => {
                self.problem.get_or_insert_with(|| {
                    format!(
                        "latency slices went different ways: {}, {}",
                        a.name(),
                        b.name()
                    )
                });
            }
            _ => {}
        }
        if self.problem.is_none() {
            self.problem = p.problem;
        }
    }

    pub fn sample(mut self) -> LatSample {
        self.ns.sort_unstable();
        let us = |p: f64| percentile(&self.ns, p) as f64 / 1e3;
        LatSample {
            p50_us: us(50.0),
            p99_us: us(99.0),
            p999_us: us(99.9),
            meta: Meta {
                others_cpu: self.others_cpu_sum / self.slices.max(1) as f64,
                route: self.route.unwrap_or(Route::Direct),
                problem: self.problem.clone(),
            },
        }
    }
}
