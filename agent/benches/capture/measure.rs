//! One measurement on one path: the client run in the client pod, CPU accounting around it, and
//! the checks that the connections really took that path.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ambit::harness::Pod;

use crate::common::counters::counters;
use crate::common::cpu::Meter;
use crate::common::stats::percentile;
use crate::paths::{Ambit, BenchRelay, FixedDst};
use crate::report::{ConnSample, TputSample};
use crate::workload::{self, Kind};
use crate::{client_dst, server_port, Config, B, C, CHUNK, D, E};
/// TcpExt counters read around each slice (`nstat` names).
const TCP_EXT: [&str; 2] = ["TCPSynRetrans", "TWRecycled"];

/// Everything the measurements need, built by main.
pub struct Bench {
    pub cfg: Config,
    pub server_ip: Ipv4Addr,
    /// One client pod per path, indexed by path.
    pub clients: Vec<Pod>,
    pub relay_b: BenchRelay,
    /// Where (b)'s relay forwards to in the current run.
    pub fixed_b: Arc<FixedDst>,
    pub relay_c: BenchRelay,
    /// (d): ambit without the fast path.
    pub ambit: Ambit,
    /// (e): a second ambit capture with the sk_msg fast path, when (e) is selected.
    pub ambit_e: Option<Ambit>,
}

counters! {
    /// Counters that prove which way the connections went.
    pub struct Counters {
        relay_b,
        relay_c,
        ambit_accepted,
        ebpf_captured,
        ambit_e_accepted,
        ebpf_e_captured,
        fast_path_sockets,
        failed,
    }
}

impl Counters {
    /// The deltas `n` connections on `path` must produce.
    fn expected(path: usize, n: u64) -> Counters {
        let mut c = Counters::default();
        match path {
            B => c.relay_b = n,
            C => c.relay_c = n,
            D => (c.ambit_accepted, c.ebpf_captured) = (n, n),
            // Both ends of each loopback hop join the fast-path sockmap.
            E => (c.ambit_e_accepted, c.ebpf_e_captured, c.fast_path_sockets) = (n, n, 2 * n),
            _ => {}
        }
        c
    }
}

/// What one slice of a connection-rate run measured; a run's slices add up to one sample.
#[derive(Default)]
pub struct ConnPart {
    n: usize,
    ok: usize,
    elapsed: f64,
    latencies_us: Vec<u32>,
    cpu: f64,
    others_cpu_seconds: f64,
    syn_retrans: u64,
    tw_recycled: u64,
    pub problem: Option<String>,
}

impl ConnPart {
    pub fn add(&mut self, p: ConnPart) {
        self.n += p.n;
        self.ok += p.ok;
        self.elapsed += p.elapsed;
        self.latencies_us.extend(p.latencies_us);
        self.cpu += p.cpu;
        self.others_cpu_seconds += p.others_cpu_seconds;
        self.syn_retrans += p.syn_retrans;
        self.tw_recycled += p.tw_recycled;
        if self.problem.is_none() {
            self.problem = p.problem;
        }
    }

    pub fn sample(mut self) -> ConnSample {
        self.latencies_us.sort_unstable();
        ConnSample {
            rate: self.ok as f64 / self.elapsed,
            cpu_us_per_conn: self.cpu * 1e6 / self.n as f64,
            p50_us: percentile(&self.latencies_us, 50.0),
            p99_us: percentile(&self.latencies_us, 99.0),
            syn_retrans: self.syn_retrans,
            tw_recycled: self.tw_recycled,
            others_cpu: self.others_cpu_seconds / self.elapsed,
            problem: self.problem,
        }
    }
}

impl Bench {
    /// Points (b)'s relay at this run's server port; returns what the client dials.
    fn aim(&self, round: usize, path: usize, kind: Kind) -> SocketAddr {
        self.fixed_b
            .port
            .store(server_port(round, B, kind), Relaxed);
        client_dst(self.server_ip, round, path, kind)
    }

    fn counters(&self) -> Counters {
        let e = self.ambit_e.as_ref();
        Counters {
            relay_b: self.relay_b.stats.accepted.load(Relaxed),
            relay_c: self.relay_c.stats.accepted.load(Relaxed),
            ambit_accepted: self.ambit.outbound_accepted(),
            ebpf_captured: self.ambit.kernel_stats().out_captured,
            ambit_e_accepted: e.map_or(0, Ambit::outbound_accepted),
            ebpf_e_captured: e.map_or(0, |a| a.kernel_stats().out_captured),
            fast_path_sockets: e.map_or(0, |a| a.kernel_stats().fast_path_sockets),
            failed: self.relay_b.stats.failed.load(Relaxed)
                + self.relay_c.stats.failed.load(Relaxed)
                + self.ambit.outbound_failed()
                + e.map_or(0, Ambit::outbound_failed),
        }
    }

    fn check(&self, path: usize, n: u64, before: Counters) -> Option<String> {
        // Relays finish (and count failures) a moment after the client has its answer.
        std::thread::sleep(Duration::from_millis(50));
        let got = self.counters().delta(before);
        let want = Counters::expected(path, n);
        (got != want).then(|| format!("path counters: expected {want:?}, got {got:?}"))
    }

    /// One slice of a connection-rate run: `n` connections on `path`.
    pub fn conn_slice(&self, round: usize, path: usize, n: usize) -> ConnPart {
        let dst = self.aim(round, path, Kind::Echo);
        let concurrency = self.cfg.concurrency;
        let before = self.counters();
        let ext0 = tcp_ext(&self.clients[path], TCP_EXT);
        let meter = Meter::start();
        let run = self.clients[path].run_async(move || workload::conn_rate(dst, n, concurrency));
        let spent = meter.finish();
        let (cpu, others_cpu) = (spent.ours, spent.others_cpu(0.0));
        let ext1 = tcp_ext(&self.clients[path], TCP_EXT);
        let problem = run.problem(n).or(self.check(path, n as u64, before));
        ConnPart {
            n,
            ok: run.ok,
            elapsed: run.elapsed.as_secs_f64(),
            latencies_us: run.latencies_us,
            cpu,
            others_cpu_seconds: others_cpu * run.elapsed.as_secs_f64(),
            syn_retrans: ext1[0] - ext0[0],
            tw_recycled: ext1[1] - ext0[1],
            problem,
        }
    }

    /// One throughput run: `mib` MiB one way on `path`.
    pub fn tput_run(&self, round: usize, path: usize, mib: u64) -> TputSample {
        let dst = self.aim(round, path, Kind::Sink);
        let bytes = mib * 1024 * 1024;
        let before = self.counters();
        let meter = Meter::start();
        let r = self.clients[path].run_async(move || workload::throughput(dst, bytes, CHUNK));
        let spent = meter.finish();
        let (cpu, others_cpu) = (spent.ours, spent.others_cpu(0.0));
        let mut problem = self.check(path, 1, before);
        let gbps = match r {
            Ok(elapsed) => bytes as f64 / elapsed.as_secs_f64() / 1e9,
            Err(e) => {
                problem = Some(format!("transfer failed: {e}"));
                0.0
            }
        };
        TputSample {
            gbps,
            cpu_s_per_gib: cpu / (bytes as f64 / (1u64 << 30) as f64),
            others_cpu,
            problem,
        }
    }
}

/// TcpExt counters of the pod's netns so far. The client's connects and the relays' upstream
/// connects all happen there, so a lost SYN (`TCPSynRetrans`) or a TIME_WAIT 4-tuple taken over by
/// a new connect (`TWRecycled`, net.ipv4.tcp_tw_reuse) shows up here.
fn tcp_ext<const N: usize>(pod: &Pod, names: [&'static str; N]) -> [u64; N] {
    pod.run(move || {
        let mut out = [0u64; N];
        let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [header, values] = pair else { continue };
            if !header.starts_with("TcpExt:") {
                continue;
            }
            let values: Vec<&str> = values.split_whitespace().collect();
            for (i, field) in header.split_whitespace().enumerate() {
                if let Some(k) = names.iter().position(|n| *n == field) {
                    out[k] = values.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            }
        }
        out
    })
}
