//! CPU accounting around one measurement: this process (the client and the servers run in it) and
//! the whole machine, whose difference is the noise indicator of a shared machine.

use std::time::Instant;

/// USER_HZ, the unit of /proc/stat (fixed at 100 by the kernel ABI).
const USER_HZ: f64 = 100.0;

/// CPU clocks read at the start of a measurement.
pub struct Meter {
    ours: f64,
    machine: f64,
    wall: Instant,
}

/// What a measurement cost, from `Meter::finish`.
pub struct Spent {
    /// CPU seconds this process used.
    pub ours: f64,
    /// CPU seconds the whole machine was busy.
    pub machine: f64,
    /// Wall-clock seconds.
    pub wall: f64,
}

impl Meter {
    pub fn start() -> Meter {
        Meter {
            ours: own_cpu_seconds(),
            machine: machine_busy_seconds(),
            wall: Instant::now(),
        }
    }

    pub fn finish(self) -> Spent {
        let wall = self.wall.elapsed().as_secs_f64();
        Spent {
            ours: own_cpu_seconds() - self.ours,
            machine: machine_busy_seconds() - self.machine,
            wall,
        }
    }
}

impl Spent {
    /// CPUs kept busy on average by processes other than this one, less `also_ours` CPU seconds
    /// of other processes the bench accounts for itself (the agents).
    pub fn others_cpu(&self, also_ours: f64) -> f64 {
        ((self.machine - self.ours - also_ours) / self.wall).max(0.0)
    }
}

/// user + nice + system time of all CPUs, from /proc/stat. Softirq time is left out: with IRQ time
/// accounting the kernel books packet processing there, not to a process.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let ticks: f64 = cpu
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks / USER_HZ
}

/// User + system CPU of this whole process (client, servers and in-process relays run in it).
fn own_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).unwrap_or_else(|e| panic!("getrusage: {e}"));
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    s(u.user_time()) + s(u.system_time())
}

/// CPU seconds of this process's reaped children (h2load), for the noise indicator.
pub fn children_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) else {
        return 0.0;
    };
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    s(u.user_time()) + s(u.system_time())
}
