//! Samples, medians, and the printed tables (results, ratios, targets).

use crate::common::stats::median;

/// One connection-rate run of one path.
#[derive(Debug, Clone)]
pub struct ConnSample {
    pub rate: f64,
    /// Process CPU time (user + sys, all threads: client, relay, server) per connection.
    pub cpu_us_per_conn: f64,
    pub p50_us: u32,
    pub p99_us: u32,
    /// SYN retransmissions in the client pod's netns during the run (client and relay connects).
    pub syn_retrans: u64,
    /// Connects that took over a TIME_WAIT 4-tuple in the client pod's netns (tcp_tw_reuse).
    pub tw_recycled: u64,
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
    /// Process CPU seconds per GiB moved.
    pub cpu_s_per_gib: f64,
    /// CPUs other processes kept busy meanwhile (noise indicator).
    pub others_cpu: f64,
    pub problem: Option<String>,
}

#[derive(Debug)]
pub struct PathResults {
    pub label: &'static str,
    /// Why the path was not measured.
    pub skipped: Option<String>,
    pub conn: Vec<ConnSample>,
    pub tput: Vec<TputSample>,
}

impl PathResults {
    pub fn new(label: &'static str) -> Self {
        PathResults {
            label,
            skipped: None,
            conn: Vec::new(),
            tput: Vec::new(),
        }
    }
    pub fn conn_median(&self) -> Option<f64> {
        median(self.conn.iter().map(|s| s.rate))
    }
    pub fn tput_median(&self) -> Option<f64> {
        median(self.tput.iter().map(|s| s.gbps))
    }
    fn problems(&self) -> Vec<&str> {
        let c = self.conn.iter().filter_map(|s| s.problem.as_deref());
        let t = self.tput.iter().filter_map(|s| s.problem.as_deref());
        c.chain(t).collect()
    }
}

fn median_u32(values: impl Iterator<Item = u32>) -> u32 {
    median(values.map(f64::from)).unwrap_or(0.0).round() as u32
}

fn join(values: impl Iterator<Item = String>) -> String {
    values.collect::<Vec<_>>().join(" ")
}

/// Prints both result tables, the ratios and the targets.
pub fn print(paths: &[PathResults], conns: usize, mib: u64) {
    println!();
    println!(
        "Connection setup: {conns} connections per run (connect, 1 byte out, 1 byte echoed, close)"
    );
    println!(
        "{:<46} {:>9}  {:<26} {:>9} {:>9} {:>11} {:>8} {:>9}",
        "path",
        "conn/s",
        "runs (conn/s)",
        "p50 µs",
        "p99 µs",
        "CPU µs/conn",
        "SYN rtx",
        "TW reused"
    );
    for p in paths {
        if let Some(why) = &p.skipped {
            println!("{:<46} {why}", p.label);
            continue;
        }
        let runs = join(p.conn.iter().map(|s| format!("{:.0}", s.rate)));
        println!(
            "{:<46} {:>9} {:<27} {:>9} {:>9} {:>11} {:>8} {:>9}",
            p.label,
            fmt(p.conn_median(), 0),
            runs,
            median_u32(p.conn.iter().map(|s| s.p50_us)),
            median_u32(p.conn.iter().map(|s| s.p99_us)),
            fmt(median(p.conn.iter().map(|s| s.cpu_us_per_conn)), 1),
            p.conn.iter().map(|s| s.syn_retrans).sum::<u64>(),
            p.conn.iter().map(|s| s.tw_recycled).sum::<u64>(),
        );
    }

    println!();
    println!("Single-stream throughput: {mib} MiB one way per run (GB/s = 10^9 bytes/s)");
    println!(
        "{:<46} {:>9}  {:<26} {:>11}",
        "path", "GB/s", "runs (GB/s)", "CPU s/GiB"
    );
    for p in paths {
        if let Some(why) = &p.skipped {
            println!("{:<46} {why}", p.label);
            continue;
        }
        let runs = join(p.tput.iter().map(|s| format!("{:.2}", s.gbps)));
        println!(
            "{:<46} {:>9} {:<27} {:>11}",
            p.label,
            fmt(p.tput_median(), 2),
            runs,
            fmt(median(p.tput.iter().map(|s| s.cpu_s_per_gib)), 2),
        );
    }

    println!();
    println!("Ratios (same run): of the medians, and the median of the per-run ratios");
    println!(
        "{:<10} {:>8} {:>9} {:>8} {:>9}",
        "ratio", "conn/s", "per-run", "GB/s", "per-run"
    );
    for r in ratios(paths) {
        println!(
            "{:<10} {:>8} {:>9} {:>8} {:>9}",
            r.name,
            fmt(r.conn, 3),
            fmt(r.conn_per_run, 3),
            fmt(r.gbps, 3),
            fmt(r.gbps_per_run, 3),
        );
    }

    println!();
    println!("Targets (on the ratio of medians)");
    let verdict = |r: Option<f64>, min: f64| match r {
        Some(r) if r >= min => format!("PASS ({r:.3}x)"),
        Some(r) => format!("MISS ({r:.3}x, short by {:.1}%)", (min - r) / min * 100.0),
        None => "not measured".to_string(),
    };
    for t in targets(paths) {
        println!(
            "  {:<30}{}",
            format!("{}:", t.name),
            verdict(t.ratio, t.min)
        );
    }

    if let Some((m, max)) = noise(paths) {
        println!();
        println!(
            "Noise: other processes kept {m:.2} CPUs busy during the median measurement (max {max:.2})."
        );
    }

    let problems = problems(paths);
    for (label, problem) in &problems {
        println!("INVALID {label}: {problem}");
    }
    if problems.is_empty() {
        println!();
        println!("Path checks: every measured connection took its intended path (counters matched), no errors.");
    }
}

/// One row of the ratio table: of the medians, and the median of the per-run ratios.
pub struct Ratio {
    pub name: &'static str,
    pub conn: Option<f64>,
    pub conn_per_run: Option<f64>,
    pub gbps: Option<f64>,
    pub gbps_per_run: Option<f64>,
}

/// The ratios between paths the table prints.
pub fn ratios(paths: &[PathResults]) -> Vec<Ratio> {
    let [a, b, c, d, e] = [&paths[0], &paths[1], &paths[2], &paths[3], &paths[4]];
    let conn_rates = |p: &PathResults| p.conn.iter().map(|s| s.rate).collect::<Vec<_>>();
    let gbps = |p: &PathResults| p.tput.iter().map(|s| s.gbps).collect::<Vec<_>>();
    [
        ("(b)/(a)", b, a),
        ("(d)/(b)", d, b),
        ("(d)/(c)", d, c),
        ("(c)/(b)", c, b),
        ("(e)/(d)", e, d),
    ]
    .into_iter()
    .map(|(name, x, y)| Ratio {
        name,
        conn: ratio(x.conn_median(), y.conn_median()),
        conn_per_run: paired(conn_rates(x), conn_rates(y)),
        gbps: ratio(x.tput_median(), y.tput_median()),
        gbps_per_run: paired(gbps(x), gbps(y)),
    })
    .collect()
}

/// A target on a ratio of medians: met when `ratio >= min`.
pub struct Target {
    pub name: &'static str,
    pub ratio: Option<f64>,
    pub min: f64,
}

pub fn targets(paths: &[PathResults]) -> [Target; 3] {
    let [b, c, d] = [&paths[1], &paths[2], &paths[3]];
    [
        Target {
            name: "(d) >= 0.97 x (b) on conn/s",
            ratio: ratio(d.conn_median(), b.conn_median()),
            min: 0.97,
        },
        Target {
            name: "(d) >= (c) on conn/s",
            ratio: ratio(d.conn_median(), c.conn_median()),
            min: 1.0,
        },
        Target {
            name: "(d) >= (c) on GB/s",
            ratio: ratio(d.tput_median(), c.tput_median()),
            min: 1.0,
        },
    ]
}

/// CPUs other processes kept busy: the median and the maximum over every measurement.
pub fn noise(paths: &[PathResults]) -> Option<(f64, f64)> {
    let others: Vec<f64> = paths
        .iter()
        .flat_map(|p| {
            let c = p.conn.iter().map(|s| s.others_cpu);
            c.chain(p.tput.iter().map(|s| s.others_cpu))
        })
        .collect();
    let m = median(others.iter().copied())?;
    Some((m, others.iter().copied().fold(0.0, f64::max)))
}

/// Every path's problems, as `INVALID` lines name them.
pub fn problems(paths: &[PathResults]) -> Vec<(&'static str, &str)> {
    paths
        .iter()
        .flat_map(|p| p.problems().into_iter().map(|problem| (p.label, problem)))
        .collect()
}

fn ratio(x: Option<f64>, y: Option<f64>) -> Option<f64> {
    match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    }
}

fn paired(x: Vec<f64>, y: Vec<f64>) -> Option<f64> {
    median(
        x.iter()
            .zip(&y)
            .filter(|(_, y)| **y > 0.0)
            .map(|(x, y)| x / y),
    )
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".into(),
    }
}
