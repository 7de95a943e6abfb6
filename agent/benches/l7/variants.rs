//! What observability costs per request, measured in one run against the same agents: path (c)
//! under each variant of the mesh config (tracing off, tracing at 0 %, 1 % and 100 % to a live
//! collector, access logs at both ends), switched live between measurements (the agents watch
//! their config directory) and taken in rotated order each round, so every variant's ratio is
//! against "off" measured minutes apart on the same processes, not against another run.
//! `AMBIT_BENCH_OBSERVE_VARIANTS=off,t0,t1,t100,log` (any subset; `off` is the baseline).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::stats::median;
use crate::h2load::Load;
use crate::measure::{Bench, Sample, Way};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    Off,
    /// Tracing on (`enableTracing`, a Zipkin collector) at this sampling percentage.
    Tracing(f64),
    /// `accessLogFile` at both ends, TEXT.
    AccessLog,
    /// Tracing off, but the client sends the five headers a traced hop carries (B3 and W3C,
    /// the same sizes): what the bytes alone cost, apart from the code that writes them.
    Headers,
}

impl Variant {
    pub fn parse_list(s: &str) -> Result<Vec<Variant>, String> {
        s.split(',')
            .map(|v| match v.trim() {
                "off" => Ok(Variant::Off),
                "log" => Ok(Variant::AccessLog),
                "hdr" => Ok(Variant::Headers),
                t if t.starts_with('t') => t[1..]
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .map(Variant::Tracing)
                    .ok_or_else(|| format!("bad variant {t:?}: t<percent 0..100>")),
                other => Err(format!(
                    "bad variant {other:?}: off, t<percent>, log or hdr"
                )),
            })
            .collect()
    }

    fn name(self) -> String {
        match self {
            Variant::Off => "off".into(),
            Variant::Tracing(p) => format!("tracing {p} %"),
            Variant::AccessLog => "access log".into(),
            Variant::Headers => "trace-size headers".into(),
        }
    }

    /// The issue 13 bound on the added CPU per request, when it has one.
    fn bound(self) -> Option<f64> {
        match self {
            Variant::Tracing(1.0) => Some(0.03),
            Variant::Tracing(100.0) => Some(0.20),
            _ => None,
        }
    }

    /// The mesh config file (and Telemetry) of this variant.
    pub fn mesh_yaml(self, collector: SocketAddr, access_log: &Path) -> String {
        let mut mesh = String::new();
        let mut telemetry = String::new();
        match self {
            Variant::Off | Variant::Headers => mesh.push_str("    enableTracing: false\n"),
            Variant::Tracing(p) => {
                mesh.push_str(&format!(
                    "    enableTracing: true\n    defaultConfig:\n      tracing:\n        sampling: {p}\n        zipkin:\n          address: {collector}\n"
                ));
                // The rate as a Telemetry sets it: the mesh config reads `sampling: 0` as unset.
                telemetry = format!(
                    "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\nspec:\n  tracing:\n  - randomSamplingPercentage: {p}\n"
                );
            }
            Variant::AccessLog => {
                mesh.push_str("    enableTracing: false\n");
                mesh.push_str(&format!("    accessLogFile: {}\n", access_log.display()));
            }
        }
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n{mesh}{telemetry}"
        )
    }
}

/// The headers of a traced hop, with ids of their real lengths (`Variant::Headers`).
const TRACE_SIZED: [&str; 5] = [
    "x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124",
    "x-b3-spanid: a2fb4a1d1a96d312",
    "x-b3-parentspanid: 0020000000000001",
    "x-b3-sampled: 0",
    "traceparent: 00-463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-00",
];

/// Writes `yaml` as `mesh.yaml` of both agents (atomically: a hidden file renamed over it) and
/// waits until both have taken a snapshot after it (nothing to wait for when it is unchanged).
fn apply(bench: &Bench, yaml: &str) {
    for a in &bench.agents {
        let dir = a.config_dir();
        if std::fs::read_to_string(dir.join("mesh.yaml")).is_ok_and(|t| t == yaml) {
            continue;
        }
        let before = a.fresh_status()["generation"].as_u64().unwrap_or(0);
        let tmp = dir.join(".mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write mesh.yaml");
        std::fs::rename(&tmp, dir.join("mesh.yaml")).expect("rename mesh.yaml");
        a.wait_for("the new mesh config", Duration::from_secs(30), |s| {
            s["generation"].as_u64().unwrap_or(0) > before
        });
    }
}

pub struct Settings {
    pub runs: usize,
    pub conns: usize,
    pub seconds: f64,
    pub warmup_requests: u64,
    pub rate_load: Box<dyn Fn(bool, bool) -> Load>,
    pub rate_skip: f64,
    pub header: String,
}

struct VariantResults {
    variant: Variant,
    tput: Vec<Sample>,
    rate: Vec<Sample>,
}

fn both(cpu: Option<(f64, f64)>) -> Option<f64> {
    cpu.map(|(c, s)| c + s)
}

/// Runs every variant on path (c), `runs` rounds after a warm-up, and prints the comparison.
pub fn run(
    bench: &Bench,
    variants: &[Variant],
    protocols: &[bool],
    s: &Settings,
    collector: SocketAddr,
    access_log: &Path,
) -> Value {
    let c = bench
        .paths
        .iter()
        .position(|p| p.way == Way::L7)
        .expect("the variants run on path (c): keep c in AMBIT_BENCH_PATHS");
    let mut out = Vec::new();
    for &h2 in protocols {
        let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
        let mut results: Vec<VariantResults> = variants
            .iter()
            .map(|&variant| VariantResults {
                variant,
                tput: Vec::new(),
                rate: Vec::new(),
            })
            .collect();
        let mut requests = s.warmup_requests;
        for round in 0..=s.runs {
            let n = results.len();
            for k in 0..n {
                let r = &mut results[(k + round) % n];
                apply(bench, &r.variant.mesh_yaml(collector, access_log));
                let mut headers = vec![s.header.clone()];
                if r.variant == Variant::Headers {
                    headers.extend(TRACE_SIZED.iter().map(|h| h.to_string()));
                }
                let load = Load {
                    uri: bench.paths[c].uri.clone(),
                    conns: s.conns,
                    requests,
                    h2,
                    rps_per_conn: None,
                    headers: headers.clone(),
                    threads: 1,
                };
                let timeout = Duration::from_secs_f64((s.seconds * 20.0).max(120.0));
                let t = bench.run(c, &load, false, 0.0, bench.v2_share, timeout);
                let mut rate = (s.rate_load)(h2, round == 0);
                rate.headers = headers;
                let timeout = Duration::from_secs(300);
                let l = bench.run(c, &rate, true, s.rate_skip, bench.v2_share, timeout);
                eprintln!(
                    "{} {proto} {:<16} {:>8.0} req/s  CPU s/1k req {}  at-rate vCPU {}  p99 {} µs{}",
                    if round == 0 {
                        "warm-up".to_string()
                    } else {
                        format!("run {round}/{}", s.runs)
                    },
                    r.variant.name(),
                    t.req_per_s,
                    both(t.cpu_per_1k()).map_or("-".into(), |v| format!("{v:.4}")),
                    both(l.cpu_per_1k()).map_or("-".into(), |v| format!("{v:.3}")),
                    l.latency_us(99.0).map_or("-".into(), |v| format!("{v:.0}")),
                    [&t.problem, &l.problem]
                        .iter()
                        .filter_map(|p| p.as_deref())
                        .map(|p| format!("\n  ! {p}"))
                        .collect::<String>()
                );
                if round == 0 {
                    if k == 0 {
                        let n = (t.req_per_s * s.seconds) as u64;
                        let conns = s.conns as u64;
                        requests = n.clamp(conns * 20, 5_000_000).div_ceil(conns) * conns;
                    }
                } else {
                    r.tput.push(t);
                    r.rate.push(l);
                }
            }
        }
        out.push(report(proto, &results));
    }
    // Back to the baseline, so whatever runs next sees the agents as they started.
    apply(bench, &Variant::Off.mesh_yaml(collector, access_log));
    json!(out)
}

fn report(proto: &str, results: &[VariantResults]) -> Value {
    let med = |v: &[Sample], f: &dyn Fn(&Sample) -> Option<f64>| median(v.iter().filter_map(f));
    let tput_cpu = |r: &VariantResults| med(&r.tput, &|s| both(s.cpu_per_1k()));
    let rate_cpu = |r: &VariantResults| med(&r.rate, &|s| both(s.cpu_per_1k()));
    let p99 = |r: &VariantResults| med(&r.rate, &|s| s.latency_us(99.0));
    let base = results.iter().find(|r| r.variant == Variant::Off);
    let (base_tput, base_rate) = (base.and_then(tput_cpu), base.and_then(rate_cpu));
    // Each run's ratio to `off` of the same run, then their median: a slow stretch of the machine
    // moves both sides of a ratio, where it moves only one median.
    let per_run = |mine: &[Sample], offs: &[Sample]| {
        median(
            mine.iter()
                .zip(offs)
                .filter_map(|(m, o)| Some(both(m.cpu_per_1k())? / both(o.cpu_per_1k())?)),
        )
    };
    let tput_runs = |r: &VariantResults| base.and_then(|b| per_run(&r.tput, &b.tput));
    let rate_runs = |r: &VariantResults| base.and_then(|b| per_run(&r.rate, &b.rate));
    println!();
    println!(
        "{proto}, path (c), variants switched live on the same agents (medians of {} runs)",
        results.first().map_or(0, |r| r.tput.len())
    );
    println!(
        "variant            CPU s/1k req @64 conns   vs off  per run   vCPU @1000 req/s   vs off  per run   p99 µs"
    );
    let ratio = |v: Option<f64>, b: Option<f64>| v.zip(b).map(|(v, b)| v / b);
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
    let mut rows = Vec::new();
    for r in results {
        let (t, l) = (tput_cpu(r), rate_cpu(r));
        let (rt, rl) = (ratio(t, base_tput), ratio(l, base_rate));
        println!(
            "{:<18} {:>24}   {:>6}  {:>7}   {:>16}   {:>6}  {:>7}   {:>6}",
            r.variant.name(),
            fmt(t, 4),
            fmt(rt, 3),
            fmt(tput_runs(r), 3),
            fmt(l, 3),
            fmt(rl, 3),
            fmt(rate_runs(r), 3),
            fmt(p99(r), 0)
        );
        let verdict = r.variant.bound().map(|b| {
            let pass = rt.is_some_and(|x| x <= 1.0 + b) && rl.is_some_and(|x| x <= 1.0 + b);
            (b, pass)
        });
        rows.push(json!({
            "variant": r.variant.name(),
            "cpu_s_per_1k": t, "vs_off": rt, "vs_off_per_run": tput_runs(r),
            "rate_cpu_s_per_1k": l, "rate_vs_off": rl, "rate_vs_off_per_run": rate_runs(r),
            "p99_us": p99(r),
            "bound": verdict.map(|(b, _)| b), "pass": verdict.map(|(_, p)| p),
        }));
    }
    for r in results {
        if let (Some(b), Some(x)) = (r.variant.bound(), ratio(tput_cpu(r), base_tput)) {
            let xl = ratio(rate_cpu(r), base_rate).unwrap_or(f64::NAN);
            println!(
                "  target (issue 13): {} adds <= {:.0} % CPU per request: {} (+{:.1} % at 64 \
                 connections, +{:.1} % at 1000 req/s)",
                r.variant.name(),
                b * 100.0,
                if x <= 1.0 + b && xl <= 1.0 + b {
                    "PASS"
                } else {
                    "MISS"
                },
                (x - 1.0) * 100.0,
                (xl - 1.0) * 100.0
            );
        }
    }
    json!({ "protocol": proto, "variants": rows })
}
