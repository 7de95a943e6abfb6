//! One `h2load` run in a client pod (in its cgroup and netns, so an enrolled pod's connections are
//! captured as an app's are), and what it printed: rate, request counts, status codes, the
//! protocol it spoke, and (with a log file) every request's time. A run is either a number of
//! requests ([`Load`], the l7 bench) or a duration ([`TimedLoad`], the hbone bench).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ambit::harness::Pod;

/// The load of one run.
#[derive(Debug, Clone)]
pub struct Load {
    pub uri: String,
    /// Connections (h2load `-c`), each with one request in flight (`-m 1`).
    pub conns: usize,
    /// Requests in all (`-n`).
    pub requests: u64,
    /// HTTP/2 prior knowledge; HTTP/1.1 keep-alive (`--h1`) otherwise.
    pub h2: bool,
    /// Requests per second of each connection (`--rps`); as fast as possible when `None`.
    pub rps_per_conn: Option<u64>,
    /// Extra request headers (`-H`).
    pub headers: Vec<String>,
    /// h2load threads (`-t`).
    pub threads: usize,
}

/// What h2load reported.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// "finished in": from the first connect to the last response.
    pub elapsed_s: f64,
    pub req_per_s: f64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub status_2xx: u64,
    /// "Application protocol:" (`h2c`, `http/1.1`).
    pub protocol: String,
    /// Per request (with a log file): (start µs since the epoch, status, µs to the end of the
    /// response).
    pub requests: Vec<(u64, i32, u32)>,
    pub output: String,
}

impl Outcome {
    /// Anything that says the run was not `n` good requests over the protocol asked for.
    pub fn problem(&self, load: &Load) -> Option<String> {
        let want_proto = if load.h2 { "h2c" } else { "http/1.1" };
        let ok = self.done == load.requests
            && self.succeeded == load.requests
            && self.status_2xx == load.requests
            && self.failed + self.errored + self.timeout == 0
            && self.protocol == want_proto;
        (!ok).then(|| self.describe(&load.requests.to_string(), want_proto))
    }

    /// Anything that says a timed run was not only good requests over the protocol asked for.
    pub fn timed_problem(&self, load: &TimedLoad) -> Option<String> {
        let want_proto = if load.h2 { "h2c" } else { "http/1.1" };
        let ok = self.done > 0
            && self.succeeded == self.done
            && self.status_2xx == self.done
            && self.failed + self.errored + self.timeout == 0
            && self.protocol == want_proto;
        (!ok).then(|| self.describe("timed", want_proto))
    }

    fn describe(&self, of: &str, want_proto: &str) -> String {
        format!(
            "h2load: {} done, {} succeeded, {} 2xx, {} failed, {} errored, {} timeout of {of} \
             requests; protocol {:?} (want {want_proto}); output:\n{}",
            self.done,
            self.succeeded,
            self.status_2xx,
            self.failed,
            self.errored,
            self.timeout,
            self.protocol,
            indent(&self.output)
        )
    }
}

/// A load of a fixed duration (h2load `-D`): `conns` connections, one request in flight on each,
/// as fast as they go. Connections are made and used during `warmup_s` first (`--warm-up-time`);
/// requests/s and the counts are of the timed `seconds` only.
#[derive(Debug, Clone)]
pub struct TimedLoad {
    pub uri: String,
    pub conns: usize,
    pub seconds: f64,
    pub warmup_s: f64,
    /// HTTP/2 prior knowledge; HTTP/1.1 keep-alive (`--h1`) otherwise.
    pub h2: bool,
    /// h2load threads (`-t`).
    pub threads: usize,
}

/// h2load's durations: whole milliseconds (it takes no fractional seconds).
fn millis(seconds: f64) -> String {
    format!("{}ms", (seconds * 1e3).round().max(1.0) as u64)
}

/// Runs `load` from `pod`, killing h2load if it has not finished within `timeout`.
pub fn run_timed(
    bin: &Path,
    pod: &Pod,
    load: &TimedLoad,
    timeout: Duration,
) -> Result<Outcome, String> {
    let mut cmd = pod.command(bin);
    cmd.arg("-D")
        .arg(millis(load.seconds))
        .arg("-c")
        .arg(load.conns.to_string())
        .args(["-m", "1"])
        .arg("-t")
        .arg(load.threads.to_string());
    if load.warmup_s > 0.0 {
        cmd.arg(format!("--warm-up-time={}", millis(load.warmup_s)));
    }
    if !load.h2 {
        cmd.arg("--h1");
    }
    cmd.arg(&load.uri);
    execute(pod, cmd, None, timeout)
}

fn indent(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("progress:"))
        .map(|l| format!("      | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `load` from `pod`, killing h2load if it has not finished within `timeout` (a hang is then
/// the error, with what it printed). `log` asks for the per-request times.
pub fn run(
    bin: &Path,
    pod: &Pod,
    load: &Load,
    log: Option<&Path>,
    timeout: Duration,
) -> Result<Outcome, String> {
    let mut cmd = pod.command(bin);
    cmd.arg("-n")
        .arg(load.requests.to_string())
        .arg("-c")
        .arg(load.conns.to_string())
        .args(["-m", "1"])
        .arg("-t")
        .arg(load.threads.to_string());
    if !load.h2 {
        cmd.arg("--h1");
    }
    if let Some(r) = load.rps_per_conn {
        cmd.arg(format!("--rps={r}"));
    }
    for h in &load.headers {
        cmd.arg("-H").arg(h);
    }
    if let Some(log) = log {
        let _ = std::fs::remove_file(log);
        cmd.arg(format!("--log-file={}", log.display()));
    }
    cmd.arg(&load.uri);
    execute(pod, cmd, log, timeout)
}

/// Runs h2load as `cmd` says, and reads what it printed (and its log, if it wrote one).
fn execute(
    pod: &Pod,
    mut cmd: std::process::Command,
    log: Option<&Path>,
    timeout: Duration,
) -> Result<Outcome, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = pod.spawn(&mut cmd);
    // h2load prints a few KB at most: the pipes hold it until it exits.
    let mut out_pipe = child.take_stdout();
    let mut err_pipe = child.take_stderr();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_string(&mut out);
        }
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_string(&mut out);
        }
        out
    });
    let status = child
        .wait_timeout(timeout)
        .map_err(|e| format!("waiting for h2load: {e}"))?;
    if status.is_none() {
        child.kill();
    }
    let output = reader.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(format!(
            "h2load did not finish within {timeout:?} (killed: a hang); it printed:\n{}",
            indent(&output)
        ));
    };
    let mut outcome = parse(&output);
    outcome.output = output;
    if !status.success() && outcome.done == 0 {
        return Err(format!(
            "h2load failed ({status}):\n{}",
            indent(&outcome.output)
        ));
    }
    if let Some(log) = log {
        outcome.requests = read_log(log)?;
    }
    Ok(outcome)
}

/// The numbers of h2load's summary.
fn parse(text: &str) -> Outcome {
    let mut o = Outcome::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 5.00s, 20000.00 req/s, 22.00MB/s"
            let mut parts = rest.split(", ");
            o.elapsed_s = parts.next().map_or(0.0, seconds);
            o.req_per_s = parts
                .next()
                .and_then(|p| p.strip_suffix(" req/s"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(", ") {
                let (n, what) = part.split_once(' ').unwrap_or((part, ""));
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "done" => o.done = n,
                    "succeeded" => o.succeeded = n,
                    "failed" => o.failed = n,
                    "errored" => o.errored = n,
                    "timeout" => o.timeout = n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            o.status_2xx = rest
                .split(", ")
                .find_map(|p| p.strip_suffix(" 2xx"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Application protocol:") {
            o.protocol = rest.trim().to_string();
        }
    }
    o
}

/// "5.00s", "987.12ms", "12.3us" as seconds.
fn seconds(text: &str) -> f64 {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().unwrap_or(0.0);
    match unit {
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => n,
    }
}

fn read_log(path: &Path) -> Result<Vec<(u64, i32, u32)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("h2load log {}: {e}", path.display()))?;
    let rows = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let start = f.next()?.trim().parse().ok()?;
            let status = f.next()?.trim().parse().ok()?;
            let us = f.next()?.trim().parse().ok()?;
            Some((start, status, us))
        })
        .collect();
    let _ = std::fs::remove_file(path);
    Ok(rows)
}

/// A file for h2load's per-request log.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("h2load-requests.tsv")
}
