//! Which data-plane worker the current thread is. The data plane runs one single-threaded
//! runtime per worker thread, as Envoy runs one event loop per worker: a connection is accepted,
//! relayed and pooled on one thread, so a request never wakes another thread on its way through
//! the proxy. Pools key their connections by worker (Envoy's per-worker connection pools);
//! threads that are not workers (tests, the control runtime) are worker 0.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
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
