//! L7 benchmark: HTTP requests with 1 KiB responses from a client pod on one node to server pods
//! on another, driven by h2load (HTTP/1.1 keep-alive, then HTTP/2), in one run, for (a) direct pod
//! to pod, (b) ambit L4 over HBONE (a `tcp-web` port), (c) ambit L7 over HBONE (an `http` port
//! routed at the client's node by a VirtualService with a header match and a weighted split of
//! two DestinationRule subsets), and (d) HAProxy in the agents' two positions (HTTP routing on the
//! client's node, mutual TLS to the server's node) as the peer reference. Reports requests/s at 64
//! connections, latency added at a fixed 1,000 requests/s, the proxies' CPU per 1,000 requests
//! and their RSS, against issue 11's targets. Method, numbers and caveats: benches/README.md.
//! Run with `cargo bench -p ambit-agent --bench l7`.
#![deny(unsafe_code)]

#[path = "l7/cluster.rs"]
mod cluster;
#[path = "common/mod.rs"]
mod common;
#[path = "l7/haproxy.rs"]
mod haproxy;
#[path = "l7/measure.rs"]
mod measure;
#[path = "l7/report.rs"]
mod report;
#[path = "l7/variants.rs"]
mod variants;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, Pod, World};
use common::agents::{self, AMBIT_BIN};
use common::machine::{env_or, first_line, print_machine, raise_fd_limit, require_root};
// Shared with the hbone bench; the modules below name them `crate::h2load`, `crate::server`.
use common::http_server as server;
use common::{h2load, tools};
use h2load::Load;
use measure::{Bench, PathSetup, Sample, Way};
use report::{PathResults, ProtoResults, Shape};
use serde_json::json;

/// The client node's HAProxy listens here.
const HAPROXY_PORT: u16 = 18080;
/// The header of the VirtualService's first route, and the value h2load sends (no match: the
/// weighted route serves the measured requests, after the match was evaluated).
const ROUTE_HEADER: &str = "end-user";
const ROUTE_VALUE: &str = "jason";
const BENCH_VALUE: &str = "bench";

pub struct Config {
    runs: usize,
    seconds: f64,
    conns: usize,
    rate: u64,
    rate_conns: usize,
    rate_seconds: f64,
    skip_seconds: f64,
    warmup_requests: u64,
    paths: String,
    protocols: String,
    agent_args: String,
    h2load_threads: usize,
    haproxy_alpn: String,
    weights: [u32; 2],
    share_tolerance: f64,
    /// Tracing on, at this sampling percentage, to a live Zipkin collector (the mesh config of
    /// Istio's install guides); None: tracing off.
    tracing: Option<f64>,
    /// The mesh config's `accessLogFile`: every request logged at both ends (TEXT).
    access_log: bool,
    /// Observability variants compared live on path (c) instead of the paths' comparison
    /// (`variants.rs`).
    variants: Vec<variants::Variant>,
}

impl Config {
    fn from_env() -> Config {
        let cfg = Config {
            runs: env_or("AMBIT_BENCH_RUNS", 3),
            seconds: env_or("AMBIT_BENCH_SECONDS", 5.0),
            conns: env_or("AMBIT_BENCH_CONNS", 64),
            rate: env_or("AMBIT_BENCH_RATE", 1000),
            rate_conns: env_or("AMBIT_BENCH_RATE_CONNS", 10),
            rate_seconds: env_or("AMBIT_BENCH_RATE_SECONDS", 10.0),
            skip_seconds: env_or("AMBIT_BENCH_SKIP_SECONDS", 0.5),
            warmup_requests: env_or("AMBIT_BENCH_WARMUP_REQUESTS", 5_000),
            paths: env_or("AMBIT_BENCH_PATHS", "abcde".to_string()),
            protocols: env_or("AMBIT_BENCH_PROTOCOLS", "h1,h2".to_string()),
            // The agent's own default poll interval (the harness would poll every 50 ms).
            agent_args: env_or("AMBIT_BENCH_AGENT_ARGS", "--poll-ms 200".to_string()),
            h2load_threads: env_or("AMBIT_BENCH_H2LOAD_THREADS", 1),
            haproxy_alpn: env_or("AMBIT_BENCH_HAPROXY_ALPN", "http/1.1".to_string()),
            weights: [
                env_or("AMBIT_BENCH_WEIGHT_V1", 80),
                env_or("AMBIT_BENCH_WEIGHT_V2", 20),
            ],
            share_tolerance: env_or("AMBIT_BENCH_SHARE_TOLERANCE", 0.03),
            tracing: std::env::var("AMBIT_BENCH_TRACING")
                .ok()
                .and_then(|v| v.parse().ok()),
            access_log: env_or("AMBIT_BENCH_ACCESS_LOG", 0) == 1,
            variants: match std::env::var("AMBIT_BENCH_OBSERVE_VARIANTS") {
                Ok(v) if !v.is_empty() => variants::Variant::parse_list(&v).unwrap_or_else(|e| {
                    eprintln!("AMBIT_BENCH_OBSERVE_VARIANTS: {e}");
                    std::process::exit(64)
                }),
                _ => Vec::new(),
            },
        };
        let bad = !(1..=50).contains(&cfg.runs)
            || cfg.seconds <= 0.0
            || cfg.conns == 0
            || cfg.rate_conns == 0
            || cfg.rate == 0
            || !cfg.rate.is_multiple_of(cfg.rate_conns as u64)
            || cfg.rate_seconds <= 0.0
            || cfg.skip_seconds < 0.0
            || cfg.warmup_requests == 0
            || cfg.paths.is_empty()
            || !cfg.paths.chars().all(|c| "abcde".contains(c))
            || cfg.protocols.split(',').any(|p| p != "h1" && p != "h2")
            || !["http/1.1", "h2"].contains(&cfg.haproxy_alpn.as_str())
            || cfg.weights.iter().sum::<u32>() == 0;
        if bad {
            eprintln!(
                "AMBIT_BENCH_RUNS must be 1..=50; SECONDS, CONNS, RATE, RATE_CONNS, RATE_SECONDS, \
                 WARMUP_REQUESTS > 0 with RATE a multiple of RATE_CONNS; PATHS letters of abcde; \
                 PROTOCOLS h1 and/or h2 (comma-separated); HAPROXY_ALPN http/1.1 or h2"
            );
            std::process::exit(64);
        }
        cfg
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "runs": self.runs,
            "seconds": self.seconds,
            "conns": self.conns,
            "rate": self.rate,
            "rate_conns": self.rate_conns,
            "rate_seconds": self.rate_seconds,
            "skip_seconds": self.skip_seconds,
            "warmup_requests": self.warmup_requests,
            "paths": self.paths,
            "protocols": self.protocols,
            "agent_args": self.agent_args,
            "tracing_percent": self.tracing,
            "access_log": self.access_log,
            "observe_variants": format!("{:?}", self.variants),
            "h2load_threads": self.h2load_threads,
            "haproxy_alpn": self.haproxy_alpn,
            "weights": self.weights,
        })
    }

    /// Requests of a rate run: the timed seconds plus the skipped start.
    fn rate_requests(&self, seconds: f64) -> u64 {
        let n = (self.rate as f64 * seconds).ceil() as u64;
        n.div_ceil(self.rate_conns as u64) * self.rate_conns as u64
    }
}

fn header(cfg: &Config, h2load: &std::path::Path, haproxy: &std::path::Path) {
    let overrides: String = std::env::vars()
        .filter(|(k, _)| k.starts_with("AMBIT_BENCH_"))
        .map(|(k, v)| format!("{k}={v:?} "))
        .collect();
    println!("ambit L7 benchmark");
    println!("command:  {overrides}cargo bench -p ambit-agent --bench l7");
    println!("agent:    {AMBIT_BIN} {}", cfg.agent_args);
    println!(
        "observe:  tracing {}, access log {}",
        cfg.tracing
            .map_or("off".to_string(), |p| format!("{p} % to a live collector")),
        if cfg.access_log {
            "on (both ends)"
        } else {
            "off"
        }
    );
    println!(
        "tools:    {} ({}); {} ({})",
        h2load.display(),
        tools::version(&h2load.to_path_buf(), "--version"),
        haproxy.display(),
        tools::version(&haproxy.to_path_buf(), "-v")
    );
    print_machine();
    println!(
        "config:   paths {}, protocols {}; {} runs after a warm-up round; throughput: {} \
         connections, about {} s per run; latency: {} req/s on {} connections, {} s + {} s \
         skipped per run; paths in rotated order; HAProxy {} threads per instance, {} between \
         them; VirtualService split v1/v2 {}/{}",
        cfg.paths,
        cfg.protocols,
        cfg.runs,
        cfg.conns,
        cfg.seconds,
        cfg.rate,
        cfg.rate_conns,
        cfg.rate_seconds,
        cfg.skip_seconds,
        2,
        cfg.haproxy_alpn,
        cfg.weights[0],
        cfg.weights[1]
    );
}

fn main() {
    let cfg = Config::from_env();
    require_root("network namespaces, cgroups, eBPF");
    let h2load_bin = tools::ensure("h2load", "nghttp2-client");
    let haproxy_bin = tools::ensure("haproxy", "haproxy");
    header(&cfg, &h2load_bin, &haproxy_bin);
    raise_fd_limit();
    let started = Instant::now();

    // Torn down in reverse order on return or panic: servers, HAProxy and agents (killed), then
    // the world (netns, cgroups, bpffs dir, CA, state dir).
    let world = World::new("bench-l7");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let pod = |name: &str, node, ns: &str, labels: &[(&str, &str)]| -> Pod {
        labels
            .iter()
            .fold(world.pod(name).node(node).namespace(ns), |b, (k, v)| {
                b.label(k, v)
            })
            .spawn()
    };
    // `mesh` is ambient (enrolled: (b), (c)); `plain` is not ((a), (d)).
    let client_mesh = pod("client-mesh", &n1, "mesh", &[]);
    let client_plain = pod("client-plain", &n1, "plain", &[]);
    let web = [
        pod("web-v1", &n2, "mesh", &[("app", "web"), ("version", "v1")]),
        pod("web-v2", &n2, "mesh", &[("app", "web"), ("version", "v2")]),
    ];
    let plain = [
        pod(
            "plain-v1",
            &n2,
            "plain",
            &[("app", "plain"), ("version", "v1")],
        ),
        pod(
            "plain-v2",
            &n2,
            "plain",
            &[("app", "plain"), ("version", "v2")],
        ),
    ];
    let split = cluster::Split {
        header: (ROUTE_HEADER.into(), ROUTE_VALUE.into()),
        weights: cfg.weights,
    };
    let yaml = ClusterYaml::new().ambient("mesh").plain("plain").pods(
        [&client_mesh, &client_plain]
            .into_iter()
            .chain(&web)
            .chain(&plain),
    );
    let mesh = cluster::mesh_yaml([&web[0], &web[1]], &split);
    // The collector tracing sends to: a server of its own (any 2xx is Zipkin's success), apart
    // from the servers whose counts the paths check.
    let collector = pod("collector", &n1, "plain", &[("app", "jaeger")]);
    let _collector = (cfg.tracing.is_some() || !cfg.variants.is_empty())
        .then(|| server::Servers::start(&[&collector], &[cluster::APP_PORT]));
    let collector_addr = SocketAddr::from((collector.ip4(), cluster::APP_PORT));
    let access_log = world.state_dir().join("access.log");
    let mut observe = String::new();
    if let Some(percent) = cfg.tracing {
        observe.push_str(&format!(
            "    enableTracing: true\n    defaultConfig:\n      tracing:\n        sampling: {percent}\n        zipkin:\n          address: {}:{}\n",
            collector.ip4(),
            cluster::APP_PORT
        ));
    }
    if cfg.access_log {
        observe.push_str(&format!("    accessLogFile: {}\n", access_log.display()));
    }
    let mut mesh_config = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n{observe}"
    );
    if let Some(percent) = cfg.tracing {
        // The rate as a Telemetry sets it: the mesh config reads `sampling: 0` as unset (1 %).
        mesh_config.push_str(&format!(
            "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\nspec:\n  tracing:\n  - randomSamplingPercentage: {percent}\n"
        ));
    }
    let mut files = vec![("web.yaml", mesh.as_str())];
    if !cfg.variants.is_empty() {
        mesh_config = variants::Variant::Off.mesh_yaml(collector_addr, &access_log);
    }
    if !observe.is_empty() || !cfg.variants.is_empty() {
        files.push(("mesh.yaml", mesh_config.as_str()));
    }
    let agents = [
        agents::start(&world, &n1, &cfg.agent_args, &yaml, &files),
        agents::start(&world, &n2, &cfg.agent_args, &yaml, &files),
    ];
    agents[0].wait_enrolled(&[&client_mesh]);
    agents[1].wait_enrolled(&[&web[0], &web[1]]);

    // Server pods in `Servers` order: web-v1, web-v2, plain-v1, plain-v2.
    let servers = server::Servers::start(
        &[&web[0], &web[1], &plain[0], &plain[1]],
        &[cluster::APP_PORT, cluster::APP_TCP_PORT],
    );
    let app = |p: &Pod| SocketAddr::from((p.ip4(), cluster::APP_PORT));
    let haproxy = haproxy::start(&haproxy::Setup {
        bin: &haproxy_bin,
        dir: world.state_dir().join("haproxy"),
        client_node: &n1,
        server_node: &n2,
        listen_port: HAPROXY_PORT,
        backends: [app(&plain[0]), app(&plain[1])],
        split: &split,
        threads: 2,
        alpn: &cfg.haproxy_alpn,
    });
    // The server node's agent connects to the app from the client's address (transparent
    // upstream, issue 14), as Istio's data plane does.
    let inbound: Vec<IpAddr> = vec![client_mesh.ip4().into(); web.len()];
    let all_paths = [
        PathSetup {
            way: Way::Direct,
            label: "(a) direct pod-to-pod",
            client: client_plain.clone(),
            uri: format!("http://{}/", app(&plain[0])),
            targets: vec![2],
            peers: vec![client_plain.ip4().into()],
        },
        PathSetup {
            way: Way::L4,
            label: "(b) ambit L4 over HBONE (tcp-web)",
            client: client_mesh.clone(),
            uri: format!("http://{}:{}/", cluster::VIP, cluster::TCP_PORT),
            targets: vec![0, 1],
            peers: inbound.clone(),
        },
        PathSetup {
            way: Way::L7,
            label: "(c) ambit L7 over HBONE (http, VS+DR)",
            client: client_mesh.clone(),
            uri: format!("http://{}:{}/", cluster::VIP, cluster::HTTP_PORT),
            targets: vec![0, 1],
            peers: inbound.clone(),
        },
        PathSetup {
            way: Way::Haproxy,
            label: "(d) HAProxy client+server, mTLS",
            client: client_plain.clone(),
            uri: format!("http://{}/", haproxy.addr),
            targets: vec![2, 3],
            // The server node reaches its pods from its bridge address.
            peers: vec![n2.gateway4().into(); 2],
        },
        PathSetup {
            way: Way::L7Resilient,
            label: "(e) as (c), + timeout, retries, outlier det.",
            client: client_mesh.clone(),
            uri: format!("http://{}:{}/", cluster::VIP, cluster::RESILIENT_PORT),
            targets: vec![0, 1],
            peers: inbound.clone(),
        },
    ];
    let paths: Vec<PathSetup> = all_paths
        .into_iter()
        .zip("abcde".chars())
        .filter(|(_, l)| cfg.paths.contains(*l))
        .map(|(p, _)| p)
        .collect();

    println!();
    println!(
        "setup (world {}, 2 nodes, {:.1} s):",
        world.prefix(),
        started.elapsed().as_secs_f64()
    );
    for p in &paths {
        println!(
            "  {}: {} {} ({}, ns {}) -> {}",
            p.label,
            p.client.name(),
            p.client.ip4(),
            p.client.node_name(),
            p.client.namespace(),
            p.uri
        );
    }
    let pid = |a: &LocalAgent| a.pid().unwrap_or(0);
    let (hc, hs) = haproxy.pids();
    println!(
        "  pids: agents n1 {}, n2 {}; HAProxy n1 {hc}, n2 {hs}",
        pid(&agents[0]),
        pid(&agents[1])
    );
    let idle = idle_cost(&[pid(&agents[0]), pid(&agents[1]), hc, hs]);
    println!("  with no traffic (agents n1, n2, HAProxy n1, n2): {idle}");

    let bench = Bench {
        h2load: h2load_bin,
        log_dir: world.state_dir(),
        paths,
        agents,
        haproxy,
        servers,
        v2_share: split.v2_share(),
        share_tolerance: cfg.share_tolerance,
        destination_l7: !cfg.agent_args.contains("--destination-l7=off"),
        source_relay: !cfg.agent_args.contains("--source-relay=false"),
    };
    header_route_check(&bench);

    let protocols: Vec<bool> = cfg.protocols.split(',').map(|p| p == "h2").collect();
    if !cfg.variants.is_empty() {
        let (rate, rate_conns) = (cfg.rate, cfg.rate_conns);
        let (rate_s, skip_s) = (cfg.rate_seconds, cfg.skip_seconds);
        let requests = move |seconds: f64| {
            let n = (rate as f64 * seconds).ceil() as u64;
            n.div_ceil(rate_conns as u64) * rate_conns as u64
        };
        let uri = bench
            .paths
            .iter()
            .find(|p| p.way == Way::L7)
            .map(|p| p.uri.clone());
        let settings = variants::Settings {
            runs: cfg.runs,
            conns: cfg.conns,
            seconds: cfg.seconds,
            warmup_requests: cfg.warmup_requests,
            rate_load: Box::new(move |h2, warmup| Load {
                uri: uri.clone().unwrap_or_default(),
                conns: rate_conns,
                requests: requests(if warmup { 1.0 } else { rate_s + skip_s }),
                h2,
                rps_per_conn: Some(rate / rate_conns as u64),
                headers: vec![format!("{ROUTE_HEADER}: {BENCH_VALUE}")],
                threads: 1,
            }),
            rate_skip: skip_s,
            header: format!("{ROUTE_HEADER}: {BENCH_VALUE}"),
        };
        let out = variants::run(
            &bench,
            &cfg.variants,
            &protocols,
            &settings,
            collector_addr,
            &access_log,
        );
        println!();
        println!("load avg: {} (end)", first_line("/proc/loadavg"));
        println!("total time: {:.0} s", started.elapsed().as_secs_f64());
        let mut json = common::json::header("l7-observe");
        common::json::merge(
            &mut json,
            serde_json::json!({"config": cfg.json(), "variants": out}),
        );
        common::json::write_if_asked(&json);
        return;
    }
    let mut results: Vec<ProtoResults> = protocols
        .iter()
        .map(|&h2| ProtoResults {
            name: if h2 {
                "HTTP/2 (h2c prior knowledge)"
            } else {
                "HTTP/1.1 keep-alive"
            },
            short: if h2 { "HTTP/2" } else { "HTTP/1.1" },
            h2,
            paths: bench
                .paths
                .iter()
                .map(|p| PathResults {
                    way: p.way,
                    label: p.label,
                    tput: Vec::new(),
                    rate: Vec::new(),
                })
                .collect(),
        })
        .collect();
    // Requests per throughput run, per protocol and path: what the warm-up did in `seconds`.
    let mut tput_requests = vec![vec![cfg.warmup_requests; bench.paths.len()]; protocols.len()];
    for round in 0..=cfg.runs {
        let warmup = round == 0;
        let name = if warmup {
            "warm-up".to_string()
        } else {
            format!("run {round}/{}", cfg.runs)
        };
        for (pi, proto) in results.iter_mut().enumerate() {
            let n = bench.paths.len();
            let order: Vec<usize> = (0..n).map(|i| (i + round) % n).collect();
            for &i in &order {
                let requests = tput_requests[pi][i];
                let load = Load {
                    uri: bench.paths[i].uri.clone(),
                    conns: cfg.conns,
                    requests,
                    h2: proto.h2,
                    rps_per_conn: None,
                    headers: vec![format!("{ROUTE_HEADER}: {BENCH_VALUE}")],
                    threads: cfg.h2load_threads,
                };
                let timeout = Duration::from_secs_f64((cfg.seconds * 20.0).max(120.0));
                let s = bench.run(i, &load, false, 0.0, bench.v2_share, timeout);
                eprintln!(
                    "{name}: {} {:<40} {:>8.0} req/s  {:>7} requests  proxy CPU s/1k req {}  \
                     RSS MB {}  others {:.2} CPU{}",
                    proto.name,
                    bench.paths[i].label,
                    s.req_per_s,
                    requests,
                    s.cpu_per_1k()
                        .map_or("-".into(), |(c, s)| format!("{c:.3} + {s:.3}")),
                    s.proxy_rss.map_or("-".into(), |(c, s)| format!(
                        "{:.1} + {:.1}",
                        c as f64 / 1e6,
                        s as f64 / 1e6
                    )),
                    s.others_cpu,
                    problem(&s)
                );
                if warmup {
                    let n = (s.req_per_s * cfg.seconds) as u64;
                    let c = cfg.conns as u64;
                    tput_requests[pi][i] = n.clamp(c * 20, 5_000_000).div_ceil(c) * c;
                } else {
                    proto.paths[i].tput.push(s);
                }
            }
            for &i in &order {
                let seconds = if warmup {
                    1.0
                } else {
                    cfg.rate_seconds + cfg.skip_seconds
                };
                let load = Load {
                    uri: bench.paths[i].uri.clone(),
                    conns: cfg.rate_conns,
                    requests: cfg.rate_requests(seconds),
                    h2: proto.h2,
                    rps_per_conn: Some(cfg.rate / cfg.rate_conns as u64),
                    headers: vec![format!("{ROUTE_HEADER}: {BENCH_VALUE}")],
                    threads: 1,
                };
                let timeout = Duration::from_secs_f64(seconds * 5.0 + 60.0);
                let s = bench.run(i, &load, true, cfg.skip_seconds, bench.v2_share, timeout);
                eprintln!(
                    "{name}: {} {:<40} at {:>5.0} req/s  p50 {:>6} µs  p99 {:>6} µs  proxy vCPU \
                     {}  others {:.2} CPU{}",
                    proto.name,
                    bench.paths[i].label,
                    s.requests as f64 / s.elapsed_s.max(1e-9),
                    s.latency_us(50.0).map_or("-".into(), |v| format!("{v:.0}")),
                    s.latency_us(99.0).map_or("-".into(), |v| format!("{v:.0}")),
                    s.cpu_per_1k()
                        .map_or("-".into(), |(c, s)| format!("{c:.3} + {s:.3}")),
                    s.others_cpu,
                    problem(&s)
                );
                if !warmup {
                    proto.paths[i].rate.push(s);
                }
            }
        }
    }

    report::print(
        &results,
        &Shape {
            conns: cfg.conns,
            rate: cfg.rate,
            rate_conns: cfg.rate_conns,
            rate_seconds: cfg.rate_seconds,
            skip_seconds: cfg.skip_seconds,
        },
    );
    println!();
    println!("load avg: {} (end)", first_line("/proc/loadavg"));
    println!("total time: {:.0} s", started.elapsed().as_secs_f64());
    common::json::write_if_asked(&report::json(&results, cfg.json(), AMBIT_BIN));
}

fn problem(s: &Sample) -> String {
    s.problem
        .as_deref()
        .map(|p| format!("\n  ! {p}"))
        .unwrap_or_default()
}

/// CPU (% of one CPU) and RSS of each process over 2 s with no traffic.
fn idle_cost(pids: &[u32]) -> String {
    let cpu0: Vec<f64> = pids.iter().map(|p| agents::cpu_seconds(*p)).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let wall = t.elapsed().as_secs_f64();
    pids.iter()
        .zip(cpu0)
        .map(|(p, c0)| {
            format!(
                "{:.1}% CPU {:.1} MB",
                (agents::cpu_seconds(*p) - c0) * 100.0 / wall,
                agents::rss_bytes(*p) as f64 / 1e6
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The VirtualService's first route (and HAProxy's `use_backend`), checked once: every request
/// with the header goes to subset v2. Panics (the route is wrong, nothing to measure) otherwise.
fn header_route_check(bench: &Bench) {
    for (i, p) in bench.paths.iter().enumerate() {
        if !matches!(p.way, Way::L7 | Way::L7Resilient | Way::Haproxy) {
            continue;
        }
        let load = Load {
            uri: p.uri.clone(),
            conns: 1,
            requests: 200,
            h2: false,
            rps_per_conn: None,
            headers: vec![format!("{ROUTE_HEADER}: {ROUTE_VALUE}")],
            threads: 1,
        };
        let s = bench.run(i, &load, false, 0.0, 1.0, Duration::from_secs(60));
        if let Some(problem) = &s.problem {
            panic!(
                "{}: the header route ({ROUTE_HEADER}: {ROUTE_VALUE} -> v2) failed: {problem}",
                p.label
            );
        }
        println!(
            "  header route check, {}: 200 of 200 requests with `{ROUTE_HEADER}: {ROUTE_VALUE}` \
             reached subset v2",
            p.label
        );
    }
}
