//! The printed tables: each measurement per path (medians over runs, and every run), the ratios
//! against direct, added latency, the route of the same-node path, the targets, noise and checks.

use std::fmt::Write as _;

use crate::figures::{self, Target, RATIO_FIGURES, RATIO_PAIRS};
use crate::samples::{med, med_cpu, AgentCpu, ConnSample, HttpSample, PathResults, TputSample};
use crate::Config;

const LABEL: usize = 44;

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

fn cpu_text(c: Option<AgentCpu>, prec: usize) -> String {
    c.map_or("-".into(), |c| c.text(prec))
}

pub fn print(results: &[PathResults], cfg: &Config) {
    conn_table(
        &format!(
            "New connections: {} per run, {} in flight (connect, 1 byte out, 1 byte echoed, close)",
            cfg.conns, cfg.concurrency
        ),
        results,
        |r| &r.conn,
    );
    if cfg.seq_conns > 0 {
        conn_table(
            &format!("New connections one at a time: {} per run", cfg.seq_conns),
            results,
            |r| &r.conn_seq,
        );
    }
    tput_table(
        &format!("Throughput, one stream: {} MiB one way per run", cfg.mib),
        results,
        |r| &r.tput,
    );
    if cfg.streams > 0 {
        tput_table(
            &format!(
                "Throughput, {} streams at once: {} MiB one way per run in all",
                cfg.streams, cfg.mib
            ),
            results,
            |r| &r.tput_par,
        );
    }
    if cfg.http_seconds > 0.0 {
        http_table(results, cfg);
    }
    lat_table(results, cfg);
    ratio_table(results);

    println!();
    for (n, d) in figures::ADDED_PAIRS {
        let a = figures::added_latency(results, n, d);
        if a.p50.is_none() {
            continue;
        }
        println!(
            "added latency ({n}) - ({d}): p50 {} µs (per-run median {}), p99 {} µs (per-run \
             median {})",
            fmt_opt(a.p50, 1, 0),
            fmt_opt(a.p50_per_run, 1, 0),
            fmt_opt(a.p99, 1, 0),
            fmt_opt(a.p99_per_run, 1, 0)
        );
    }
    println!(
        "agent CPU per GB transferred, (b) warm, one stream: {} s (both agents, user + sys)",
        fmt_opt(figures::warm_agent_cpu_per_gb(results), 2, 0)
    );
    if let Some(route) = figures::same_node_route(results) {
        println!("(d) same node went: {route}");
    }

    println!();
    println!("Targets (issue 14, on the medians, against direct in this run)");
    for t in figures::targets(results, cfg.concurrency, cfg.http_conns) {
        println!("  {:<58} {}", t.name, verdict(&t));
    }

    let (others_median, others_max) = figures::noise(results);
    println!();
    println!(
        "Noise: other processes kept {} CPUs busy during the median measurement (max {:.2}).",
        fmt_opt(others_median, 2, 0),
        others_max
    );
    let mut problems = String::new();
    for (label, p) in figures::all_problems(results) {
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

fn conn_table(title: &str, results: &[PathResults], get: fn(&PathResults) -> &Vec<ConnSample>) {
    println!();
    println!("{title}");
    println!(
        "{:<LABEL$} {:>7}  {:<20} {:>7} {:>7} {:>11}  {:>22}",
        "path", "conn/s", "runs (conn/s)", "p50 µs", "p99 µs", "TLS conn/", "agent CPU µs/conn"
    );
    println!(
        "{:<LABEL$} {:>7}  {:<20} {:>7} {:>7} {:>11}  {:>22}",
        "", "", "", "", "", "app conn", "client node+server node"
    );
    for r in results {
        let v = get(r);
        if v.is_empty() {
            continue;
        }
        println!(
            "{:<LABEL$} {}  {:<20} {} {} {}  {:>22}",
            r.label,
            fmt_opt(med(v, |s| s.rate), 0, 7),
            runs(v.iter().map(|s| s.rate), 0),
            fmt_opt(med(v, |s| s.p50_us), 0, 7),
            fmt_opt(med(v, |s| s.p99_us), 0, 7),
            fmt_opt(
                med(v, |s| s.hbone_conns_per_conn.unwrap_or(f64::NAN)),
                3,
                11
            ),
            cpu_text(med_cpu(v, |s| s.agent_cpu_us), 0)
        );
    }
}

fn tput_table(title: &str, results: &[PathResults], get: fn(&PathResults) -> &Vec<TputSample>) {
    println!();
    println!("{title} (GB/s = 10^9 bytes/s)");
    println!(
        "{:<LABEL$} {:>7} {:>7}  {:<20} {:>22}",
        "path", "GB/s", "Gbit/s", "runs (GB/s)", "agent CPU s/GB"
    );
    println!(
        "{:<LABEL$} {:>7} {:>7}  {:<20} {:>22}",
        "", "", "", "", "client node+server node"
    );
    for r in results {
        let v = get(r);
        if v.is_empty() {
            continue;
        }
        let gbps = med(v, |s| s.gbps);
        println!(
            "{:<LABEL$} {} {}  {:<20} {:>22}",
            r.label,
            fmt_opt(gbps, 2, 7),
            fmt_opt(gbps.map(|g| g * 8.0), 2, 7),
            runs(v.iter().map(|s| s.gbps), 2),
            cpu_text(med_cpu(v, |s| s.agent_cpu_s_per_gb), 2)
        );
    }
}

fn http_table(results: &[PathResults], cfg: &Config) {
    println!();
    println!(
        "HTTP/1.1 keep-alive requests/s (h2load --h1, 1 request in flight per connection, {} s \
         timed after {} s), 1 KiB responses",
        cfg.http_seconds, cfg.http_warmup_s
    );
    let many = format!("{} conns", cfg.http_conns);
    println!(
        "{:<LABEL$} {:>8}  {:<20} {:>8}  {:<20} {:>20}  server",
        "path", "1 conn", "runs", many, "runs", "agent CPU µs/req"
    );
    println!(
        "{:<LABEL$} {:>8}  {:<20} {:>8}  {:<20} {:>20}  side",
        "",
        "req/s",
        "",
        "req/s",
        "",
        format!("at {many}")
    );
    for r in results {
        if r.http_one.is_empty() && r.http_many.is_empty() {
            continue;
        }
        let rate = |v: &[HttpSample]| med(v, |s| s.req_per_s);
        let l7 = r
            .http_many
            .iter()
            .chain(&r.http_one)
            .filter_map(|s| s.dest_l7)
            .collect::<Vec<_>>();
        let side = match (l7.iter().all(|v| *v), l7.iter().any(|v| *v)) {
            _ if l7.is_empty() => "-",
            (true, _) => "L7",
            (false, false) => "L4",
            (false, true) => "L7 in some",
        };
        println!(
            "{:<LABEL$} {}  {:<20} {}  {:<20} {:>20}  {side}",
            r.label,
            fmt_opt(rate(&r.http_one), 0, 8),
            runs(r.http_one.iter().map(|s| s.req_per_s), 0),
            fmt_opt(rate(&r.http_many), 0, 8),
            runs(r.http_many.iter().map(|s| s.req_per_s), 0),
            cpu_text(med_cpu(&r.http_many, |s| s.agent_cpu_us), 1),
        );
    }
}

fn lat_table(results: &[PathResults], cfg: &Config) {
    println!();
    println!(
        "Request latency: {}-byte echo on long-lived connections, {} round trips per run",
        cfg.ping_bytes, cfg.pings
    );
    println!(
        "{:<LABEL$} {:>7} {:>7} {:>8}  {:<20}",
        "path", "p50 µs", "p99 µs", "p99.9 µs", "runs (p99 µs)"
    );
    for r in results.iter().filter(|r| !r.lat.is_empty()) {
        println!(
            "{:<LABEL$} {} {} {}  {:<20}",
            r.label,
            fmt_opt(med(&r.lat, |s| s.p50_us), 1, 7),
            fmt_opt(med(&r.lat, |s| s.p99_us), 1, 7),
            fmt_opt(med(&r.lat, |s| s.p999_us), 1, 8),
            runs(r.lat.iter().map(|s| s.p99_us), 1),
        );
    }
}

fn ratio_table(results: &[PathResults]) {
    println!();
    println!("Ratios (same run): of the medians / the median of the per-run ratios");
    let mut head = format!("{:<9}", "ratio");
    for f in &RATIO_FIGURES {
        let _ = write!(head, " {:>15}", f.label);
    }
    let mut rows = Vec::new();
    for (n, d) in RATIO_PAIRS {
        let cells: Vec<String> = RATIO_FIGURES
            .iter()
            .map(|f| {
                let r = figures::ratio(results, n, d, f);
                match (r.of_medians, r.per_run) {
                    (Some(m), Some(p)) => format!("{m:.3} / {p:.3}"),
                    _ => "-".into(),
                }
            })
            .collect();
        if cells.iter().all(|c| c == "-") {
            continue;
        }
        let mut line = format!("{:<9}", figures::ratio_name(n, d));
        for c in cells {
            let _ = write!(line, " {c:>15}");
        }
        rows.push(line);
    }
    if rows.is_empty() {
        println!("  none: no pair of paths was measured");
    } else {
        println!("{head}\n{}", rows.join("\n"));
    }
}

fn verdict(t: &Target) -> String {
    let show = |v: f64| {
        if t.unit == "x" {
            format!("{v:.3}x")
        } else {
            format!("{v:.2}{}", t.unit)
        }
    };
    match (t.value, t.pass()) {
        (Some(v), Some(true)) => format!("PASS ({})", show(v)),
        (Some(v), _) => format!("MISS ({})", show(v)),
        _ => "not measured".into(),
    }
}
