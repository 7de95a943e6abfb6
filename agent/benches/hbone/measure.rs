//! One measurement on one path: the client run in the client pod, the agents' CPU around it, and
//! the checks that the connections really took that path (the agents' status counters).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit::harness::{LocalAgent, Pod};

use crate::common::agents::{self, Counters};
use crate::common::cpu::Meter;
use crate::common::stats::percentile;
use crate::report::{ConnSample, LatSample, TputSample};
use crate::workload::{self, Kind};
use crate::{Config, CHUNK};
/// Server ports: one per (round, kind) in each server pod.
pub const FIRST_PORT: u16 = 20000;

/// One client/server pair and how its connections travel.
pub struct PathSetup {
    pub client: Pod,
    pub server_ip: Ipv4Addr,
    /// Indices into `Bench::agents` of the agents on the client's and the server's node, which
    /// carry this path over HBONE; `None` for the direct path (no agent may see it).
    pub hbone: Option<(usize, usize)>,
}

pub struct Bench {
    pub cfg: Config,
    pub paths: Vec<PathSetup>,
    /// n1, n2 (warm pool), n3, n4 (cold pool).
    pub agents: Vec<LocalAgent>,
}

/// What happened around one client run.
struct Measured<T> {
    out: T,
    /// CPU seconds of the path's client-node and server-node agents (0 on the direct path).
    agent_cpu: (f64, f64),
    /// CPUs that other processes kept busy on average (noise indicator).
    others_cpu: f64,
    /// Counter deltas of the path's client-node agent.
    client_agent: Counters,
    problem: Option<String>,
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

    /// Runs `f` in the path's client pod with the accounting and the path check around it; `n` is
    /// the number of app connections `f` makes.
    fn measure<F, Fut, T>(&self, path: usize, n: u64, f: F) -> Measured<T>
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = T>,
        T: Send,
    {
        let agents = self.agent_refs();
        let before = agents::counters(&agents);
        let cpu0 = agents::cpu(&agents);
        let meter = Meter::start();
        let out = self.paths[path].client.run_async(f);
        let spent = meter.finish();
        let cpu1 = agents::cpu(&agents);
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
        let hbone = self.paths[path].hbone;
        Measured {
            out,
            agent_cpu: hbone.map_or((0.0, 0.0), |(c, s)| (cpu[c], cpu[s])),
            others_cpu: spent.others_cpu(agents_total),
            client_agent: hbone.map_or_else(Counters::default, |(c, _)| got[c]),
            problem: self.check(path, n, &got),
        }
    }

    /// Every agent's counters must have moved exactly as `n` connections on `path` make them move.
    fn check(&self, path: usize, n: u64, got: &[Counters]) -> Option<String> {
        let mut want = vec![Counters::default(); got.len()];
        if let Some((c, s)) = self.paths[path].hbone {
            // How many streams rode on new or pooled connections is what the warm and cold paths
            // differ in; it is reported, not checked here. The server's node must accept exactly
            // the TLS connections the client's node opened.
            want[c] = Counters {
                outbound_accepted: n,
                outbound_hbone: n,
                pool_streams_opened: n,
                pool_connections_opened: got[c].pool_connections_opened,
                pool_streams_reused: got[c].pool_streams_reused,
                ..Counters::default()
            };
            want[s] = Counters {
                hbone_inbound_streams: n,
                hbone_inbound_accepted: got[c].pool_connections_opened,
                ..Counters::default()
            };
        }
        let bad: Vec<String> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (g, w))| g != w)
            .map(|(i, (g, w))| format!("agent n{}: expected {w:?}, got {g:?}", i + 1))
            .collect();
        (!bad.is_empty()).then(|| format!("path counters: {}", bad.join("; ")))
    }

    /// `n` short connections (connect, 1 byte echoed, close) on `path`.
    pub fn conn_run(&self, round: usize, path: usize, n: usize) -> ConnSample {
        let dst = self.dst(path, round, Kind::Echo);
        let concurrency = self.cfg.concurrency;
        let m = self.measure(path, n as u64, move || {
            workload::conn_rate(dst, n, concurrency)
        });
        let mut run = m.out;
        let problem = run.problem(n).or(m.problem);
        run.latencies_us.sort_unstable();
        let hbone = self.paths[path].hbone.is_some();
        let per_conn = |s: f64| s * 1e6 / n as f64;
        ConnSample {
            rate: run.ok as f64 / run.elapsed.as_secs_f64(),
            p50_us: percentile(&run.latencies_us, 50.0) as f64,
            p99_us: percentile(&run.latencies_us, 99.0) as f64,
            hbone_conns_per_conn: hbone
                .then(|| m.client_agent.pool_connections_opened as f64 / n as f64),
            agent_cpu_us: hbone.then(|| (per_conn(m.agent_cpu.0), per_conn(m.agent_cpu.1))),
            others_cpu: m.others_cpu,
            problem,
        }
    }

    /// `mib` MiB one way on one connection on `path`.
    pub fn tput_run(&self, round: usize, path: usize, mib: u64) -> TputSample {
        let dst = self.dst(path, round, Kind::Sink);
        let bytes = mib * 1024 * 1024;
        let m = self.measure(path, 1, move || workload::throughput(dst, bytes, CHUNK));
        let mut problem = m.problem;
        let gbps = match m.out {
            Ok(elapsed) => bytes as f64 / elapsed.as_secs_f64() / 1e9,
            Err(e) => {
                problem = Some(format!("transfer failed: {e}"));
                0.0
            }
        };
        let gib = bytes as f64 / (1u64 << 30) as f64;
        TputSample {
            gbps,
            agent_cpu_s_per_gib: self.paths[path]
                .hbone
                .map(|_| (m.agent_cpu.0 / gib, m.agent_cpu.1 / gib)),
            others_cpu: m.others_cpu,
            problem,
        }
    }

    /// One slice of a latency run: `pings` timed 1-byte round trips (after `warmup` untimed ones)
    /// on a new connection on `path`.
    pub fn lat_slice(&self, round: usize, path: usize, warmup: usize, pings: usize) -> LatPart {
        let dst = self.dst(path, round, Kind::PingPong);
        let m = self.measure(path, 1, move || {
            workload::ping_pong_latency(dst, warmup, pings)
        });
        let mut problem = m.problem;
        let ns = m.out.unwrap_or_else(|e| {
            problem = Some(format!("ping-pong failed: {e}"));
            Vec::new()
        });
        LatPart {
            ns,
            others_cpu_sum: m.others_cpu,
            slices: 1,
            problem,
        }
    }
}

/// Round trips of some slices of a latency run; a run's slices add up to one sample.
#[derive(Default)]
pub struct LatPart {
    ns: Vec<u32>,
    others_cpu_sum: f64,
    slices: usize,
    problem: Option<String>,
}

impl LatPart {
    pub fn add(&mut self, p: LatPart) {
        self.ns.extend(p.ns);
        self.others_cpu_sum += p.others_cpu_sum;
        self.slices += p.slices;
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
            others_cpu: self.others_cpu_sum / self.slices.max(1) as f64,
            problem: self.problem.clone(),
        }
    }
}
