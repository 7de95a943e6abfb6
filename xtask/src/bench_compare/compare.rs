//! From the runs' JSON to the comparison: per bench, path and figure the median over rounds of
//! each side, the ratio current/base, the spread of the per-round ratios, and which ratios are
//! worse than the 0.97 issue 10 allows.

use serde_json::{json, Value};

use super::{Bench, Run, Side};

/// A ratio this much worse than 1 is flagged: issue 10 wants conn/s, GB/s and p99 to stay at
/// least 0.97 of the base (for lower-is-better figures, at most 1/0.97).
pub const MIN_RATIO: f64 = 0.97;

/// Which way a figure is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Describes the path rather than its performance (TLS connections per app connection).
    Neither,
}

/// One figure of a path, as the benches' JSON names it: `paths[].<section>.<key>`.
#[derive(Debug)]
pub struct Figure {
    pub section: &'static str,
    pub key: &'static str,
    pub label: &'static str,
    pub better: Better,
    /// One of the figures issue 10 says must not get worse.
    pub gated: bool,
}

const fn fig(
    section: &'static str,
    key: &'static str,
    label: &'static str,
    better: Better,
    gated: bool,
) -> Figure {
    Figure {
        section,
        key,
        label,
        better,
        gated,
    }
}

/// Every figure compared, in print order; a path shows those its bench reports.
pub const FIGURES: &[Figure] = &[
    fig("conn", "conn_per_s", "conn/s", Better::Higher, true),
    fig(
        "conn",
        "p50_us",
        "connect->echo p50 µs",
        Better::Lower,
        false,
    ),
    fig(
        "conn",
        "p99_us",
        "connect->echo p99 µs",
        Better::Lower,
        true,
    ),
    // capture: the whole bench process (client, relay or ambit, server).
    fig(
        "conn",
        "cpu_us_per_conn",
        "CPU µs/conn (process)",
        Better::Lower,
        false,
    ),
    // hbone: the two agents of the path.
    fig(
        "conn",
        "agent_cpu_us_per_conn",
        "agent CPU µs/conn",
        Better::Lower,
        false,
    ),
    fig(
        "conn",
        "agent_cpu_us_per_conn_client",
        "  client node",
        Better::Lower,
        false,
    ),
    fig(
        "conn",
        "agent_cpu_us_per_conn_server",
        "  server node",
        Better::Lower,
        false,
    ),
    fig(
        "conn",
        "tls_conns_per_conn",
        "TLS conn/app conn",
        Better::Neither,
        false,
    ),
    fig("tput", "gbps", "GB/s", Better::Higher, true),
    fig(
        "tput",
        "cpu_s_per_gib",
        "CPU s/GiB (process)",
        Better::Lower,
        false,
    ),
    fig(
        "tput",
        "agent_cpu_s_per_gib",
        "agent CPU s/GiB",
        Better::Lower,
        false,
    ),
    fig("lat", "p50_us", "1-byte echo p50 µs", Better::Lower, false),
    fig("lat", "p99_us", "1-byte echo p99 µs", Better::Lower, true),
    fig(
        "lat",
        "p999_us",
        "1-byte echo p99.9 µs",
        Better::Lower,
        false,
    ),
];

/// Paths with no ambit proxy in their data path: what they move by is the comparison's noise.
fn is_control(bench: Bench, path: &str) -> bool {
    matches!((bench, path), (Bench::Capture, "a") | (Bench::Hbone, "a"))
}

/// One figure of one path, both sides.
#[derive(Debug)]
pub struct Row {
    pub bench: Bench,
    pub path: String,
    pub label: String,
    pub control: bool,
    pub figure: &'static Figure,
    /// Median over the rounds of each side's value.
    pub base: f64,
    pub current: f64,
    /// current / base; `None` when the base is 0.
    pub ratio: Option<f64>,
    /// current / base of each round that has both.
    pub round_ratios: Vec<f64>,
}

impl Row {
    /// Worse than `MIN_RATIO` allows, in the figure's good direction.
    pub fn worse(&self) -> bool {
        match (self.figure.better, self.ratio) {
            (Better::Higher, Some(r)) => r < MIN_RATIO,
            (Better::Lower, Some(r)) => r > 1.0 / MIN_RATIO,
            _ => false,
        }
    }
}

/// Every figure both sides report, for every path of every bench.
pub fn compare(benches: &[Bench], rounds: usize, runs: &[Run]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &bench in benches {
        let find = |side: Side, round: usize| {
            runs.iter()
                .find(|r| r.bench == bench && r.side == side && r.round == round)
        };
        // The paths of the first base run, in its order; a path either side skipped is left out.
        let Some(first) = find(Side::Base, 0) else {
            continue;
        };
        for path in first.result["paths"].as_array().into_iter().flatten() {
            let Some(letter) = path["path"].as_str() else {
                continue;
            };
            let label = path["label"].as_str().unwrap_or(letter).to_owned();
            for figure in FIGURES {
                let values = |side: Side| -> Vec<Option<f64>> {
                    (0..rounds)
                        .map(|round| {
                            find(side, round).and_then(|r| value(&r.result, letter, figure))
                        })
                        .collect()
                };
                let (b, c) = (values(Side::Base), values(Side::Current));
                let (Some(base), Some(current)) =
                    (median(b.iter().flatten()), median(c.iter().flatten()))
                else {
                    continue;
                };
                let round_ratios = b
                    .iter()
                    .zip(&c)
                    .filter_map(|(b, c)| ratio(c.as_ref()?, b.as_ref()?))
                    .collect();
                rows.push(Row {
                    bench,
                    path: letter.to_owned(),
                    label: label.clone(),
                    control: is_control(bench, letter),
                    figure,
                    base,
                    current,
                    ratio: ratio(&current, &base),
                    round_ratios,
                });
            }
        }
    }
    rows
}

/// A figure of path `letter` in one bench result; `None` when the path was skipped or the figure
/// is null (not measured on that path).
fn value(result: &Value, letter: &str, figure: &Figure) -> Option<f64> {
    let path = result["paths"]
        .as_array()?
        .iter()
        .find(|p| p["path"] == letter)?;
    if !path["skipped"].is_null() {
        return None;
    }
    path[figure.section][figure.key].as_f64()
}

fn ratio(current: &f64, base: &f64) -> Option<f64> {
    (*base != 0.0).then(|| current / base)
}

fn median<'a>(values: impl Iterator<Item = &'a f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// A number with about four significant digits, or `-`.
pub fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn better_text(b: Better) -> &'static str {
    match b {
        Better::Higher => "higher",
        Better::Lower => "lower",
        Better::Neither => "-",
    }
}

/// Prints the comparison tables, the runs' noise and the verdict.
pub fn print(rows: &[Row], runs: &[Run], rounds: usize, differences: &[String]) {
    println!();
    println!(
        "bench-compare: medians over {rounds} round(s) per side (each the bench's own median of its \
         runs); ratio = current/base"
    );
    println!(
        "flags: WORSE = ratio < {MIN_RATIO} where higher is better, > {:.3} where lower is better; \
         * = gated by issue 10 (conn/s, GB/s, p99)",
        1.0 / MIN_RATIO
    );
    let mut bench = None;
    let mut path = None;
    for r in rows {
        if bench != Some(r.bench) {
            bench = Some(r.bench);
            path = None;
            println!();
            println!(
                "{:<28} {:>6} {:>10} {:>10} {:>8} {:>15} {:>10}",
                r.bench.name(),
                "better",
                "base",
                "current",
                "ratio",
                "per round",
                "delta"
            );
        }
        if path.as_deref() != Some(r.path.as_str()) {
            path = Some(r.path.clone());
            let control = if r.control {
                "  [control: no ambit proxy on this path; its ratios are noise]"
            } else {
                ""
            };
            println!("{}{control}", r.label);
        }
        let spread = match (
            r.round_ratios.iter().copied().reduce(f64::min),
            r.round_ratios.iter().copied().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) if r.round_ratios.len() > 1 => format!("{lo:.3}-{hi:.3}"),
            _ => "-".into(),
        };
        println!(
            "  {:<26} {:>6} {:>10} {:>10} {:>8} {:>15} {:>10}{}",
            format!(
                "{}{}",
                r.figure.label,
                if r.figure.gated { " *" } else { "" }
            ),
            better_text(r.figure.better),
            fmt_num(Some(r.base)),
            fmt_num(Some(r.current)),
            r.ratio.map_or("-".into(), |v| format!("{v:.3}")),
            spread,
            fmt_num(Some(r.current - r.base)),
            if r.worse() { "  WORSE" } else { "" }
        );
    }

    println!();
    println!(
        "runs (others = CPUs other processes kept busy, median / max over the run's measurements):"
    );
    for r in runs {
        let problems = r.result["problems"].as_array().map_or(0, Vec::len);
        println!(
            "  round {} {:<8} {:<7} {:>5.0} s  others {} / {}{}",
            r.round + 1,
            r.bench.name(),
            r.side.to_string(),
            r.seconds,
            fmt_num(r.result["noise"]["others_cpu_median"].as_f64()),
            fmt_num(r.result["noise"]["others_cpu_max"].as_f64()),
            if problems > 0 {
                format!(
                    "  INVALID: {problems} path-check problems ({})",
                    r.log.display()
                )
            } else {
                String::new()
            }
        );
    }
    if !differences.is_empty() {
        println!();
        println!(
            "method: the benches or the harness differ between the trees: {}",
            differences.join(", ")
        );
    }

    let gated: Vec<&Row> = rows
        .iter()
        .filter(|r| r.figure.gated && r.worse())
        .collect();
    let invalid = runs.iter().any(|r| {
        r.result["problems"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    println!();
    if gated.is_empty() {
        println!(
            "issue 10 gate: PASS (every conn/s, GB/s and p99 within {MIN_RATIO} of the base){}",
            if invalid {
                ", but some runs are INVALID (above)"
            } else {
                ""
            }
        );
    } else {
        println!("issue 10 gate: MISS on");
        for r in &gated {
            println!(
                "  {} {} {}: {}{}",
                r.bench.name(),
                r.label,
                r.figure.label,
                r.ratio.map_or("-".into(), |v| format!("{v:.3}")),
                if r.control {
                    " (control path: noise, not the change)"
                } else {
                    ""
                }
            );
        }
        println!(
            "  a miss inside the per-round spread, or on the control paths too, is noise: rerun \
             with more --rounds on a quieter machine (others near 0)"
        );
    }
}

pub fn to_json(rows: &[Row]) -> Value {
    rows.iter()
        .map(|r| {
            json!({
                "bench": r.bench.name(),
                "path": r.path,
                "label": r.label,
                "control": r.control,
                "section": r.figure.section,
                "figure": r.figure.key,
                "better": better_text(r.figure.better),
                "gated": r.figure.gated,
                "base": r.base,
                "current": r.current,
                "ratio": r.ratio,
                "round_ratios": r.round_ratios,
                "worse": r.worse(),
            })
        })
        .collect()
}

pub fn run_json(r: &Run) -> Value {
    json!({
        "round": r.round + 1,
        "bench": r.bench.name(),
        "side": r.side.to_string(),
        "seconds": r.seconds,
        "json": r.json,
        "log": r.log,
        "others_cpu_median": r.result["noise"]["others_cpu_median"],
        "others_cpu_max": r.result["noise"]["others_cpu_max"],
        "problems": r.result["problems"],
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn run(round: usize, side: Side, conn_per_s: f64, p99: f64) -> Run {
        Run {
            round,
            bench: Bench::Capture,
            side,
            seconds: 1.0,
            result: json!({
                "bench": "capture",
                "paths": [
                    {"path": "a", "label": "(a) direct", "skipped": null,
                     "conn": {"conn_per_s": conn_per_s, "p99_us": p99, "cpu_us_per_conn": null}},
                    {"path": "e", "label": "(e) skipped", "skipped": "not selected"},
                ],
                "noise": {"others_cpu_median": 0.0, "others_cpu_max": 0.1},
                "problems": [],
            }),
            json: PathBuf::new(),
            log: PathBuf::new(),
        }
    }

    #[test]
    fn ratios_are_of_the_medians_over_rounds_and_flag_the_bad_direction() {
        let runs = [
            run(0, Side::Base, 1000.0, 100.0),
            run(0, Side::Current, 950.0, 104.0),
            run(1, Side::Current, 960.0, 103.0),
            run(1, Side::Base, 1000.0, 100.0),
            run(2, Side::Base, 2000.0, 100.0),
            run(2, Side::Current, 940.0, 102.0),
        ];
        let rows = compare(&[Bench::Capture], 3, &runs);
        // Skipped paths and null figures are left out.
        let names: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.path.as_str(), r.figure.key))
            .collect();
        assert_eq!(names, [("a", "conn_per_s"), ("a", "p99_us")]);
        let conn = &rows[0];
        assert_eq!((conn.base, conn.current), (1000.0, 950.0));
        assert_eq!(conn.ratio, Some(0.95));
        assert!(conn.worse());
        assert_eq!(conn.round_ratios, [0.95, 0.96, 0.47]);
        assert!(conn.control);
        let p99 = &rows[1];
        assert_eq!(p99.ratio, Some(1.03));
        // 1.03 <= 1/0.97 = 1.0309: within the allowance where lower is better.
        assert!(!p99.worse());
    }

    #[test]
    fn numbers_keep_about_four_digits() {
        assert_eq!(fmt_num(Some(13019.4)), "13019");
        assert_eq!(fmt_num(Some(716.26)), "716.3");
        assert_eq!(fmt_num(Some(2.546)), "2.546");
        assert_eq!(fmt_num(Some(-12.345)), "-12.35");
        assert_eq!(fmt_num(None), "-");
    }
}
