//! Samples, medians, and the printed tables (results, ratios, targets).

use std::fmt::Write as _;

use crate::common::stats::median;

/// One connection-rate run of one path.
#[derive(Debug, Clone)]
pub struct ConnSample {
    pub rate: f64,
    /// Connect → 1 byte echoed, per connection.
    pub p50_us: f64,
    pub p99_us: f64,
    /// HBONE (TLS) connections the client's node opened per app connection (HBONE paths).
    pub hbone_conns_per_conn: Option<f64>,
    /// CPU µs per connection of the client-node and server-node agents (HBONE paths).
    pub agent_cpu_us: Option<(f64, f64)>,
    /// CPUs other processes kept busy meanwhile (noise indicator).
    pub others_cpu: f64,
    /// Failed connections, or counters that show the connections did not take the intended path.
    pub problem: Option<String>,
}

/// One throughput run of one path.
#[derive(Debug, Clone)]
pub struct TputSample {
    /// 10^9 bytes per second.
    pub gbps: f64,
    /// CPU seconds per GiB of the client-node and server-node agents (HBONE paths).
    pub agent_cpu_s_per_gib: Option<(f64, f64)>,
    pub others_cpu: f64,
    pub problem: Option<String>,
}

/// One latency run of one path: 1-byte round trips on one connection.
#[derive(Debug, Clone)]
pub struct LatSample {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub others_cpu: f64,
    pub problem: Option<String>,
}

#[derive(Debug)]
pub struct PathResults {
    pub label: &'static str,
    pub conn: Vec<ConnSample>,
    pub tput: Vec<TputSample>,
    pub lat: Vec<LatSample>,
}

impl PathResults {
    pub fn new(label: &'static str) -> Self {
        PathResults {
            label,
            conn: Vec::new(),
            tput: Vec::new(),
            lat: Vec::new(),
        }
    }

    fn problems(&self) -> Vec<&str> {
        let c = self.conn.iter().filter_map(|s| s.problem.as_deref());
        let t = self.tput.iter().filter_map(|s| s.problem.as_deref());
        let l = self.lat.iter().filter_map(|s| s.problem.as_deref());
        c.chain(t).chain(l).collect()
    }
}

fn med<T>(v: &[T], f: impl Fn(&T) -> f64) -> Option<f64> {
    median(v.iter().map(f))
}

fn fmt_opt(v: Option<f64>, prec: usize, width: usize) -> String {
    match v {
        Some(x) => format!("{x:>width$.prec$}"),
        None => format!("{:>width$}", "-"),
    }
}

fn runs(v: impl Iterator<Item = f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Indices of the paths, as in the bench: (a) direct, (b) warm, (c) cold.
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

pub fn print(results: &[PathResults], conns: usize, concurrency: usize, mib: u64, pings: usize) {
    println!();
    println!(
        "Connection rate: {conns} connections per run, {concurrency} in flight (connect, 1 byte out, \
         1 byte echoed, close)"
    );
    println!(
        "{:<44} {:>7}  {:<20} {:>7} {:>7} {:>11}  {:>22}",
        "path", "conn/s", "runs (conn/s)", "p50 µs", "p99 µs", "TLS conn/", "agent CPU µs/conn"
    );
    println!(
        "{:<44} {:>7}  {:<20} {:>7} {:>7} {:>11}  {:>22}",
        "", "", "", "", "", "app conn", "client node+server node"
    );
    for r in results {
        let cpu = |i: usize| {
            med(&r.conn, |s| {
                s.agent_cpu_us.map_or(f64::NAN, |c| [c.0, c.1][i])
            })
        };
        let cpu_text = match (cpu(0), cpu(1)) {
            (Some(c), Some(s)) if !c.is_nan() => format!("{c:.0} + {s:.0} = {:.0}", c + s),
            _ => "-".into(),
        };
        let tls =
            med(&r.conn, |s| s.hbone_conns_per_conn.unwrap_or(f64::NAN)).filter(|v| !v.is_nan());
        println!(
            "{:<44} {}  {:<20} {} {} {}  {:>22}",
            r.label,
            fmt_opt(med(&r.conn, |s| s.rate), 0, 7),
            runs(r.conn.iter().map(|s| s.rate), 0),
            fmt_opt(med(&r.conn, |s| s.p50_us), 0, 7),
            fmt_opt(med(&r.conn, |s| s.p99_us), 0, 7),
            fmt_opt(tls, 3, 11),
            cpu_text
        );
    }

    println!();
    println!("Single-stream throughput: {mib} MiB one way per run (GB/s = 10^9 bytes/s)");
    println!(
        "{:<44} {:>7}  {:<20} {:>22}",
        "path", "GB/s", "runs (GB/s)", "agent CPU s/GiB"
    );
    println!(
        "{:<44} {:>7}  {:<20} {:>22}",
        "", "", "", "client node+server node"
    );
    for r in results {
        let cpu = |i: usize| {
            med(&r.tput, |s| {
                s.agent_cpu_s_per_gib.map_or(f64::NAN, |c| [c.0, c.1][i])
            })
        };
        let cpu_text = match (cpu(0), cpu(1)) {
            (Some(c), Some(s)) if !c.is_nan() => format!("{c:.2} + {s:.2} = {:.2}", c + s),
            _ => "-".into(),
        };
        println!(
            "{:<44} {}  {:<20} {:>22}",
            r.label,
            fmt_opt(med(&r.tput, |s| s.gbps), 2, 7),
            runs(r.tput.iter().map(|s| s.gbps), 2),
            cpu_text
        );
    }

    println!();
    println!(
        "Request latency: 1-byte echo on one long-lived connection, {pings} round trips per run"
    );
    println!(
        "{:<44} {:>7} {:>7} {:>8}  {:<20}",
        "path", "p50 µs", "p99 µs", "p99.9 µs", "runs (p99 µs)"
    );
    for r in results.iter().filter(|r| !r.lat.is_empty()) {
        println!(
            "{:<44} {} {} {}  {:<20}",
            r.label,
            fmt_opt(med(&r.lat, |s| s.p50_us), 1, 7),
            fmt_opt(med(&r.lat, |s| s.p99_us), 1, 7),
            fmt_opt(med(&r.lat, |s| s.p999_us), 1, 8),
            runs(r.lat.iter().map(|s| s.p99_us), 1),
        );
    }

    println!();
    println!("Ratios (same run): of the medians, and the median of the per-run ratios");
    println!(
        "{:<10} {:>8} {:>9} {:>8} {:>9}",
        "ratio", "GB/s", "per-run", "conn/s", "per-run"
    );
    for r in ratios(results) {
        println!(
            "{:<10} {} {} {} {}",
            r.name,
            fmt_opt(r.gbps, 3, 8),
            fmt_opt(r.gbps_per_run, 3, 9),
            fmt_opt(r.conn, 3, 8),
            fmt_opt(r.conn_per_run, 3, 9),
        );
    }
    let added = added_latency(results);
    println!(
        "added latency (b) - (a): p50 {} µs (per-run median {}), p99 {} µs (per-run median {})",
        fmt_opt(added.p50, 1, 0),
        fmt_opt(added.p50_per_run, 1, 0),
        fmt_opt(added.p99, 1, 0),
        fmt_opt(added.p99_per_run, 1, 0)
    );
    println!(
        "agent CPU per GiB transferred, (b) warm: {} s (both agents, user + sys)",
        fmt_opt(warm_agent_cpu_per_gib(results), 2, 0)
    );

    println!();
    println!("Targets (on the medians)");
    let [tput, p99] = targets(results);
    println!(
        "  (b) throughput >= 0.5 x (a):  {}",
        verdict(&tput, |r| format!("{r:.3}x"))
    );
    println!(
        "  added p99 latency < 150 µs:   {}",
        verdict(&p99, |d| format!("{d:.1} µs"))
    );

    let (others_median, others_max) = noise(results);
    println!();
    println!(
        "Noise: other processes kept {} CPUs busy during the median measurement (max {:.2}).",
        fmt_opt(others_median, 2, 0),
        others_max
    );
    let mut problems = String::new();
    for (label, p) in all_problems(results) {
        let _ = writeln!(problems, "  INVALID {label}: {p}");
    }
    if problems.is_empty() {
        println!(
            "Path checks: every measured connection took its intended path (agent counters \
             matched), no errors."
        );
    } else {
        print!("Path checks FAILED:\n{problems}");
    }
}

/// One row of the ratio table: of the medians, and the median of the per-run ratios.
pub struct Ratio {
    pub name: &'static str,
    pub gbps: Option<f64>,
    pub gbps_per_run: Option<f64>,
    pub conn: Option<f64>,
    pub conn_per_run: Option<f64>,
}

fn ratio(n: Option<f64>, d: Option<f64>) -> Option<f64> {
    n.zip(d).map(|(n, d)| n / d)
}

/// The ratios between paths the table prints.
pub fn ratios(results: &[PathResults]) -> Vec<Ratio> {
    let per_run = |n: &[f64], d: &[f64]| median(n.iter().zip(d).map(|(n, d)| n / d));
    let tput: Vec<Vec<f64>> = results
        .iter()
        .map(|r| r.tput.iter().map(|s| s.gbps).collect())
        .collect();
    let conn: Vec<Vec<f64>> = results
        .iter()
        .map(|r| r.conn.iter().map(|s| s.rate).collect())
        .collect();
    let m = |v: &[f64]| median(v.iter().copied());
    [("(b)/(a)", B, A), ("(c)/(b)", C, B), ("(c)/(a)", C, A)]
        .into_iter()
        .map(|(name, n, d)| Ratio {
            name,
            gbps: ratio(m(&tput[n]), m(&tput[d])),
            gbps_per_run: per_run(&tput[n], &tput[d]),
            conn: ratio(m(&conn[n]), m(&conn[d])),
            conn_per_run: per_run(&conn[n], &conn[d]),
        })
        .collect()
}

/// The latency (b) adds to (a): difference of the medians, and median of the per-run differences.
pub struct Added {
    pub p50: Option<f64>,
    pub p50_per_run: Option<f64>,
    pub p99: Option<f64>,
    pub p99_per_run: Option<f64>,
}

pub fn added_latency(results: &[PathResults]) -> Added {
    let lat_a = &results[A].lat;
    let lat_b = &results[B].lat;
    let added = |f: fn(&LatSample) -> f64| {
        (
            med(lat_b, f).zip(med(lat_a, f)).map(|(b, a)| b - a),
            median(lat_b.iter().zip(lat_a).map(|(b, a)| f(b) - f(a))),
        )
    };
    let (p50, p50_per_run) = added(|s| s.p50_us);
    let (p99, p99_per_run) = added(|s| s.p99_us);
    Added {
        p50,
        p50_per_run,
        p99,
        p99_per_run,
    }
}

/// Both agents' CPU seconds per GiB on the warm path (b).
pub fn warm_agent_cpu_per_gib(results: &[PathResults]) -> Option<f64> {
    med(&results[B].tput, |s| {
        s.agent_cpu_s_per_gib.map_or(f64::NAN, |c| c.0 + c.1)
    })
}

/// A target: `value` at least `limit` (`at_least`), or below it.
pub struct Target {
    pub name: &'static str,
    pub value: Option<f64>,
    pub limit: f64,
    pub at_least: bool,
}

impl Target {
    /// Met or not; `None` when not measured.
    pub fn pass(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_least {
                v >= self.limit
            } else {
                v < self.limit
            }
        })
    }
}

pub fn targets(results: &[PathResults]) -> [Target; 2] {
    let tput = |r: &PathResults| median(r.tput.iter().map(|s| s.gbps));
    [
        Target {
            name: "(b) throughput >= 0.5 x (a)",
            value: ratio(tput(&results[B]), tput(&results[A])),
            limit: 0.5,
            at_least: true,
        },
        Target {
            name: "added p99 latency < 150 µs",
            value: added_latency(results).p99,
            limit: 150.0,
            at_least: false,
        },
    ]
}

/// CPUs other processes kept busy: the median over every measurement, and the maximum.
pub fn noise(results: &[PathResults]) -> (Option<f64>, f64) {
    let others: Vec<f64> = results
        .iter()
        .flat_map(|r| {
            r.conn
                .iter()
                .map(|s| s.others_cpu)
                .chain(r.tput.iter().map(|s| s.others_cpu))
                .chain(r.lat.iter().map(|s| s.others_cpu))
        })
        .collect();
    (
        median(others.iter().copied()),
        others.iter().copied().fold(0.0, f64::max),
    )
}

/// Every path's problems, as the `INVALID` lines name them.
pub fn all_problems(results: &[PathResults]) -> Vec<(&'static str, &str)> {
    results
        .iter()
        .flat_map(|r| r.problems().into_iter().map(|p| (r.label, p)))
        .collect()
}

fn verdict(t: &Target, show: impl Fn(f64) -> String) -> String {
    match (t.value, t.pass()) {
        (Some(v), Some(true)) => format!("PASS ({})", show(v)),
        (Some(v), _) => format!("MISS ({})", show(v)),
        _ => "not measured".into(),
    }
}
