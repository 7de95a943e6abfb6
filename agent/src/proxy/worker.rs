//! Which data-plane worker the current thread is. The data plane runs one single-threaded
//! runtime per worker thread, as Envoy runs one event loop per worker: a connection is accepted,
//! relayed and pooled on one thread, so a request never wakes another thread on its way through
//! the proxy. Pools key their connections by worker (Envoy's per-worker connection pools);
//! threads that are not workers (tests, the control runtime) are worker 0.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Connections each worker serves now; set once by the data plane (absent: one worker, tests).
static LOADS: OnceLock<Box<[AtomicUsize]>> = OnceLock::new();

/// Declares `n` workers, for the load counts (first call wins).
pub fn init_loads(n: usize) {
    let _ = LOADS.set((0..n).map(|_| AtomicUsize::new(0)).collect());
}

/// The worker that should serve a new connection of the pod with `affinity` (its netns cookie),
/// when not this one: the pod's home worker (`affinity` modulo the workers), so that its
/// connections share that worker's pools, unless the home worker serves `margin` or more
/// connections beyond the least loaded one, which then takes it.
pub fn target(affinity: u64, margin: usize) -> Option<usize> {
    let loads = LOADS.get()?;
    let now: Vec<usize> = loads.iter().map(|l| l.load(Ordering::Relaxed)).collect();
    choose(&now, affinity, margin, current())
}

/// [`target`] on a snapshot of the loads, for worker `me`.
fn choose(loads: &[usize], affinity: u64, margin: usize, me: usize) -> Option<usize> {
    let n = loads.len();
    if n < 2 {
        return None;
    }
    let home = usize::try_from(affinity % n as u64).unwrap_or(0);
    let least = (0..n).min_by_key(|i| loads[*i])?;
    let target = if loads[home] >= loads[least] + margin {
        least
    } else {
        home
    };
    (target != me).then_some(target)
}

/// One connection served by this thread's worker, until dropped.
#[derive(Debug)]
pub struct Load(Option<usize>);

impl Load {
    pub fn start() -> Load {
        let me = current();
        match LOADS.get().and_then(|l| l.get(me)) {
            Some(l) => {
                l.fetch_add(1, Ordering::Relaxed);
                Load(Some(me))
            }
            None => Load(None),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let (Some(i), Some(loads)) = (self.0, LOADS.get()) {
            if let Some(l) = loads.get(i) {
                l.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Connections all workers serve now (0 without a data plane).
pub fn open_connections() -> usize {
    LOADS
        .get()
        .map_or(0, |l| l.iter().map(|n| n.load(Ordering::Relaxed)).sum())
}

/// The worker this thread is (0 outside the data plane's worker threads).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Marks this thread as worker `id`; called once by each worker thread as it starts.
pub fn set_current(id: usize) {
    WORKER.with(|w| w.set(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_connections_go_home_until_home_is_busier_by_the_margin() {
        // Pod 5 with two workers lives on worker 1.
        assert_eq!(
            choose(&[0, 0], 5, 2, 0),
            Some(1),
            "accepted elsewhere: handed home"
        );
        assert_eq!(choose(&[0, 0], 5, 2, 1), None, "accepted at home: stays");
        assert_eq!(
            choose(&[3, 4], 5, 2, 0),
            Some(1),
            "home busier by less than the margin"
        );
        assert_eq!(
            choose(&[3, 5], 5, 2, 1),
            Some(0),
            "home busier by the margin: the least"
        );
        assert_eq!(
            choose(&[3, 5], 5, 2, 0),
            None,
            "...which keeps what it accepted"
        );
        assert_eq!(choose(&[9], 5, 2, 0), None, "one worker: never");
        assert_eq!(
            choose(&[1, 1, 0], 4, 1, 0),
            Some(2),
            "three workers: the least loaded"
        );
    }

    #[test]
    fn each_thread_has_its_own_worker_id() {
        assert_eq!(current(), 0);
        let other = std::thread::spawn(|| {
            set_current(3);
            current()
        })
        .join()
        .unwrap();
        assert_eq!(other, 3);
        assert_eq!(
            current(),
            0,
            "another thread's id does not leak into this one"
        );
    }
}
