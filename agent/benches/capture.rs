//! Capture benchmark: connection setup rate and single-stream throughput between a client pod and a
//! server pod on one node, in one run, for (a) direct, (b) an explicit in-pod relay, (c) iptables
//! REDIRECT into that relay, (d) ambit's eBPF capture into its outbound stage, and on request
//! (e) the same with ambit's sk_msg fast path. Method, numbers and caveats: benches/README.md.
//! Run with `cargo bench -p ambit-agent --bench capture`.
#![deny(unsafe_code)]

#[path = "common/mod.rs"]
mod common;
#[path = "capture/diag.rs"]
mod diag;
#[path = "capture/json.rs"]
mod json;
#[path = "capture/measure.rs"]
mod measure;
#[path = "capture/paths.rs"]
mod paths;
#[path = "capture/report.rs"]
mod report;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU16;
use std::sync::Arc;

use ambit::harness::{Pod, World};
use common::machine::{env_or, first_line, print_machine, raise_fd_limit, require_root};
use common::workload;
use measure::{Bench, ConnPart};
use paths::{Ambit, BenchRelay, Dst, FixedDst, Iptables};
use report::PathResults;
use workload::Kind;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const E: usize = 4;
const PATHS: usize = 5;
const LETTERS: [char; PATHS] = ['a', 'b', 'c', 'd', 'e'];
const LABELS: [&str; PATHS] = [
    "(a) direct pod-to-pod, no proxy",
    "(b) explicit in-pod relay, no capture",
    "(c) iptables REDIRECT -> same relay",
    "(d) eBPF connect4 -> ambit outbound",
    "(e) eBPF capture + sk_msg -> ambit",
];
/// As the agent's default (`--workers 2`).
const DATA_PLANE_THREADS: usize = 2;
/// Server ports: one per (round, path, kind), above the client pods' ephemeral range.
const FIRST_PORT: u16 = 61000;
const MAX_RUNS: usize = 100;
/// Client write size and server read size for the throughput test (the relay's large buffer).
const CHUNK: usize = 256 * 1024;
/// The bench relays' port in the client pods of (b) and (c): ambit's outbound port, so (b), (c),
/// (d) and (e) have the same loopback 4-tuple space (127.0.0.1 -> 127.0.0.1:15001).
const RELAY_PORT: u16 = 15001;
/// The client pods' ephemeral ports (default 32768-60999), the same in all of them. The loopback
/// hop of the proxied paths always goes to 127.0.0.1:15001, and connect() walks the range in small
/// random steps, so it meets its own TIME_WAIT sockets (reused on loopback by tcp_tw_reuse=2,
/// counted as "TW reused"); a wider range makes that rarer. Ends below the server ports.
const PORT_RANGE: (u16, u16) = (10000, FIRST_PORT - 1);

pub struct Config {
    pub conns: usize,
    pub concurrency: usize,
    mib: u64,
    runs: usize,
    warmup_conns: usize,
    warmup_mib: u64,
    slices: usize,
    /// Letters of the paths to measure.
    paths: String,
}

impl Config {
    fn from_env() -> Config {
        let cfg = Config {
            conns: env_or("AMBIT_BENCH_CONNS", 10_000),
            concurrency: env_or("AMBIT_BENCH_CONCURRENCY", 16),
            mib: env_or("AMBIT_BENCH_MIB", 1024),
            runs: env_or("AMBIT_BENCH_RUNS", 5),
            warmup_conns: env_or("AMBIT_BENCH_WARMUP_CONNS", 1_000),
            warmup_mib: env_or("AMBIT_BENCH_WARMUP_MIB", 128),
            slices: env_or("AMBIT_BENCH_SLICES", 5),
            paths: env_or("AMBIT_BENCH_PATHS", "abcd".to_string()),
        };
        let paths_ok = !cfg.paths.is_empty() && cfg.paths.chars().all(|c| LETTERS.contains(&c));
        if !(1..=MAX_RUNS).contains(&cfg.runs) || cfg.conns == 0 || cfg.mib == 0 || !paths_ok {
            eprintln!(
                "AMBIT_BENCH_RUNS must be 1..={MAX_RUNS}, CONNS and MIB > 0, PATHS letters a-e"
            );
            std::process::exit(64);
        }
        cfg
    }

    fn selected(&self, path: usize) -> bool {
        self.paths.contains(LETTERS[path])
    }
}

/// The server port of one (round, path, kind); round 0 is the warm-up, round `runs + 1` the
/// diagnostics. Every run of every path gets fresh 4-tuples at the server (README: TIME_WAIT).
fn server_port(round: usize, path: usize, kind: Kind) -> u16 {
    let k = match kind {
        Kind::Echo => 0,
        Kind::Sink => 1,
        Kind::PingPong => unreachable!("the capture bench serves no ping-pong ports"),
    };
    FIRST_PORT + (round * 2 * PATHS + path * 2 + k) as u16
}

/// What the client dials on `path`: (b) dials the relay explicitly, the others the server's real
/// address.
fn client_dst(server: Ipv4Addr, round: usize, path: usize, kind: Kind) -> SocketAddr {
    if path == B {
        SocketAddr::from((Ipv4Addr::LOCALHOST, RELAY_PORT))
    } else {
        SocketAddr::from((server, server_port(round, path, kind)))
    }
}

fn header(cfg: &Config) {
    let argv: Vec<String> = std::env::args().collect();
    let overrides: String = std::env::vars()
        .filter(|(k, _)| k.starts_with("AMBIT_BENCH_"))
        .map(|(k, v)| format!("{k}={v} "))
        .collect();
    println!("ambit capture benchmark");
    println!("command:  {overrides}cargo bench -p ambit-agent --bench capture");
    println!("argv:     {}", argv.join(" "));
    print_machine();
    println!(
        "config:   paths {}; {} conns/run in {} slices, {} in flight; {} MiB/throughput run; {} runs; \
         paths interleaved, order rotated; warm-up {} conns + {} MiB per path (not reported)",
        cfg.paths,
        cfg.conns,
        cfg.slices,
        cfg.concurrency,
        cfg.mib,
        cfg.runs,
        cfg.warmup_conns,
        cfg.warmup_mib
    );
}

/// iptables rules for (c), in client-c's netns only: the relay's own (marked) upstream connects
/// pass, connects to the server's (c) ports go to the relay.
fn redirect_rules(server_ip: Ipv4Addr, rounds: usize) -> Vec<Vec<String>> {
    // Through the diagnostics round. Only client-c uses this netns, so the other paths' port
    // numbers inside the range never match.
    let ports = format!(
        "{}:{}",
        server_port(0, C, Kind::Echo),
        server_port(rounds, C, Kind::Sink)
    );
    let rules: [&[&str]; 2] = [
        // ambit's mark (SO_MARK 0x539), set by NetnsWorker::upstream_socket.
        &[
            "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x539", "-j", "RETURN",
        ],
        &[
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &format!("{server_ip}/32"),
            "--dport",
            &ports,
            "-j",
            "REDIRECT",
            "--to-ports",
            &RELAY_PORT.to_string(),
        ],
    ];
    rules
        .iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect()
}

fn main() {
    let cfg = Config::from_env();
    header(&cfg);
    require_root("network namespaces, cgroups, eBPF, iptables");
    raise_fd_limit();

    // Everything below is torn down in reverse order on return or panic: ambit (unenrol, unpin),
    // iptables rules, relays, runtime, server, then the world (netns, cgroups, bpffs dir).
    let world = World::new("bench-capture");
    let n1 = world.node("n1");
    let server = world.pod("server").node(&n1).namespace("bench").spawn();
    let clients: Vec<Pod> = LETTERS
        .iter()
        .map(|l| {
            let name = format!("client-{l}");
            world.pod(&name).node(&n1).namespace("bench").spawn()
        })
        .collect();
    let (low, high) = PORT_RANGE;
    for c in &clients {
        let range = format!("{low} {high}");
        c.run(move || std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", range))
            .unwrap_or_else(|e| panic!("ip_local_port_range in {}: {e}", c.name()));
    }
    let server_ip = server.ip4();
    let rounds = cfg.runs + 1;
    let mut listen = Vec::new();
    // One more round of ports for the diagnostics after the timed runs.
    for round in 0..=rounds {
        for path in 0..PATHS {
            for kind in [Kind::Echo, Kind::Sink] {
                let port = server_port(round, path, kind);
                listen.push((SocketAddr::from((server_ip, port)), kind));
            }
        }
    }
    let _server_app = workload::Server::start(server.netns_path(), listen, CHUNK);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(DATA_PLANE_THREADS)
        .thread_name("ambit-data")
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("data-plane runtime: {e}"));

    let fixed_b = Arc::new(FixedDst {
        ip: server_ip,
        port: AtomicU16::new(0),
    });
    let relay_b = BenchRelay::start(
        rt.handle(),
        &clients[B],
        RELAY_PORT,
        Dst::Fixed(fixed_b.clone()),
    );
    let relay_c = BenchRelay::start(rt.handle(), &clients[C], RELAY_PORT, Dst::OriginalDst);
    let iptables = Iptables::install(clients[C].netns_path(), &redirect_rules(server_ip, rounds));

    let cgroup = ambit::harness::cgroup_root().unwrap_or_else(|e| panic!("cgroup v2: {e}"));
    let bpffs = world.bpffs_dir();
    let ambit = Ambit::start(
        bpffs.join(n1.name()),
        cgroup.clone(),
        false,
        rt.handle(),
        &clients[D],
    );
    // A second capture only when (e) runs: its programs would otherwise sit on every path too.
    let ambit_e = cfg.selected(E).then(|| {
        let root = bpffs.join(format!("{}-fast-path", n1.name()));
        Ambit::start(root, cgroup, true, rt.handle(), &clients[E])
    });

    println!();
    println!("setup (world {}, node n1):", world.prefix());
    println!("  server pod {server_ip}: tokio current-thread; echo and sink ports {FIRST_PORT}+");
    for (c, label) in clients.iter().zip(LABELS) {
        println!("  {} {} -> {label}", c.name(), c.ip4());
    }
    println!("  client pods: net.ipv4.ip_local_port_range = {low} {high}");
    println!(
        "  (b) explicit relay and (c) REDIRECT relay on 127.0.0.1:{RELAY_PORT} in their pods, \
         ambit's outbound stage on 127.0.0.1:15001 in client-d (and client-e)"
    );
    println!(
        "  relays and ambit's outbound stages: one tokio runtime, {DATA_PLANE_THREADS} worker threads"
    );
    match &iptables {
        Ok(ipt) => {
            println!(
                "  (c) {} [{}] rules in {}:",
                ipt.bin,
                ipt.version,
                clients[C].netns_name()
            );
            for line in ipt.list().lines() {
                println!("      {line}");
            }
        }
        Err(e) => println!("  (c) NOT RUN: {e}"),
    }
    for a in std::iter::once(&ambit).chain(&ambit_e) {
        println!(
            "  ambit capture attached at cgroup {}, pins under {}",
            a.cgroup.display(),
            a.pin_dir.display()
        );
    }

    let bench = Bench {
        cfg,
        server_ip,
        clients,
        relay_b,
        fixed_b,
        relay_c,
        ambit,
        ambit_e,
    };
    let ours = diag::all_our_programs(&bench);
    println!(
        "  other cgroup BPF links on this machine (other agents' programs, also run on every connect \
         here): {}",
        diag::foreign_cgroup_links(&ours)
    );
    let mut results: Vec<PathResults> = LABELS.iter().map(|l| PathResults::new(l)).collect();
    for (path, r) in results.iter_mut().enumerate() {
        if !bench.cfg.selected(path) {
            r.skipped = Some(if path == E {
                "not run by default; AMBIT_BENCH_PATHS=abcde adds it".into()
            } else {
                "not selected (AMBIT_BENCH_PATHS)".into()
            });
        }
    }
    if let (Err(e), None) = (&iptables, &results[C].skipped) {
        results[C].skipped = Some(format!("not run: {e}"));
    }
    let skipped: Vec<bool> = results.iter().map(|r| r.skipped.is_some()).collect();
    let live = |p: &usize| !skipped[*p];

    for round in 0..rounds {
        let warmup = round == 0;
        let (n, mib) = if warmup {
            (bench.cfg.warmup_conns, bench.cfg.warmup_mib)
        } else {
            (bench.cfg.conns, bench.cfg.mib)
        };
        let name = if warmup {
            "warm-up".to_string()
        } else {
            format!("run {round}/{}", bench.cfg.runs)
        };
        // Connection rate in slices, paths alternating, so a burst of load from elsewhere on the
        // machine lands on all paths rather than on one.
        let slices = bench.cfg.slices.min(n).max(1);
        let mut parts: Vec<ConnPart> = (0..PATHS).map(|_| ConnPart::default()).collect();
        for slice in 0..slices {
            let n_slice = n / slices + usize::from(slice < n % slices);
            for path in (0..PATHS).map(|i| (i + round + slice) % PATHS).filter(live) {
                parts[path].add(bench.conn_slice(round, path, n_slice));
            }
        }
        for (path, part) in parts.into_iter().enumerate().filter(|(p, _)| live(p)) {
            let s = part.sample();
            eprintln!(
                "{name}: {:<38} {:>7.0} conn/s  p50 {:>5} µs  p99 {:>6} µs  SYN rtx {}  TW reused {}  \
                 others {:.2} CPU{}",
                LABELS[path],
                s.rate,
                s.p50_us,
                s.p99_us,
                s.syn_retrans,
                s.tw_recycled,
                s.others_cpu,
                s.problem.as_deref().map(|p| format!("  ! {p}")).unwrap_or_default()
            );
            if !warmup {
                results[path].conn.push(s);
            }
        }
        for path in (0..PATHS).map(|i| (i + round) % PATHS).filter(live) {
            let s = bench.tput_run(round, path, mib);
            eprintln!(
                "{name}: {:<38} {:>7.2} GB/s  others {:.2} CPU{}",
                LABELS[path],
                s.gbps,
                s.others_cpu,
                s.problem
                    .as_deref()
                    .map(|p| format!("  ! {p}"))
                    .unwrap_or_default()
            );
            if !warmup {
                results[path].tput.push(s);
            }
        }
    }

    report::print(&results, bench.cfg.conns, bench.cfg.mib);
    let diagnostics = diag::run(&bench, rounds, &skipped);
    let mut ebpf = serde_json::Map::new();
    for (label, a) in [("(d)", Some(&bench.ambit)), ("(e)", bench.ambit_e.as_ref())] {
        let Some(a) = a else { continue };
        let k = a.kernel_stats();
        ebpf.insert(
            label.to_string(),
            serde_json::json!({ "counters": &k, "map_entries": a.map_sizes() }),
        );
        println!(
            "{label} eBPF counters: out_captured {}, out_skipped_mark {}, orig_dst_recorded {}, \
             orig_dst_missing {}, fast_path_sockets {}, fast_path_redirects {}",
            k.out_captured,
            k.out_skipped_mark,
            k.orig_dst_recorded,
            k.orig_dst_missing,
            k.fast_path_sockets,
            k.fast_path_redirects
        );
        println!("{label} eBPF map entries at the end: {:?}", a.map_sizes());
    }
    println!(
        "other cgroup BPF links at the end: {}",
        diag::foreign_cgroup_links(&ours)
    );
    println!("load avg: {} (end)", first_line("/proc/loadavg"));
    common::json::write_if_asked(&json::results(
        &bench.cfg,
        &results,
        diagnostics,
        ebpf.into(),
    ));
}
