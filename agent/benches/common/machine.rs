//! The bench's settings from the environment, and the machine it runs on.

use std::str::FromStr;

/// The value of the environment variable `name`, or `default` when it is not set; exits with 64
/// when it does not parse.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("{name}={v:?}: invalid value");
            std::process::exit(64)
        }),
        Err(_) => default,
    }
}

/// The first line of a file, trimmed, or what went wrong reading it.
pub fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_else(|e| format!("({path}: {e})"))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown model".into())
}

/// Prints the header lines that describe the machine: kernel, CPUs, load average.
pub fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "kernel:   {} ({})",
        first_line("/proc/sys/kernel/osrelease"),
        first_line("/proc/sys/kernel/version")
    );
    println!("CPUs:     {cpus} ({})", cpu_model());
    println!("load avg: {} (start)", first_line("/proc/loadavg"));
}

/// Exits unless running as root, which the network benches need.
pub fn require_root(what: &str) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("error: this benchmark needs root ({what})");
        std::process::exit(1);
    }
}

/// Raises the open-files limit to its hard limit: the benches hold many sockets at once.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
