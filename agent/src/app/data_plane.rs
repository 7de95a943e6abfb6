//! The data-plane workers: one thread per worker, each running its own single-threaded tokio
//! runtime (Envoy's threading model). Every worker accepts on every listener, so a connection
//! lands on whichever worker takes it first and then stays there: its relay, its requests and the
//! upstream connections it pools all run on that thread. A multi-threaded runtime moves tasks
//! between threads instead, and each hop wakes another thread: measured in the l7 bench, that was
//! a third of the agents' CPU at a steady 1,000 requests/s.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::proxy::worker;

/// How long a stopping worker lets its tasks finish.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The running workers; stopped (each runtime shut down, each thread joined) when dropped.
pub struct DataPlane {
    workers: Vec<Worker>,
}

impl DataPlane {
    /// Starts `n` workers (at least one), threads named `ambit-data-<i>`.
    pub fn start(n: usize) -> io::Result<DataPlane> {
        let mut workers = Vec::new();
        crate::proxy::worker::init_loads(n.max(1));
        for id in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("ambit-data-{id}"))
                .spawn(move || {
                    worker::set_current(id);
                    // Tasks spawned through the handle run while this thread blocks on the runtime.
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    rt.shutdown_timeout(SHUTDOWN_GRACE);
                })?;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(DataPlane { workers })
    }

    /// Each worker's runtime, in worker order.
    pub fn handles(&self) -> Vec<Handle> {
        self.workers.iter().map(|w| w.handle.clone()).collect()
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread_and_knows_its_id() {
        let dp = DataPlane::start(3).unwrap();
        let mut seen = Vec::new();
        for (i, h) in dp.handles().into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            h.spawn(async move {
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send((worker::current(), name));
            });
            let (id, name) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(id, i);
            assert_eq!(name.as_deref(), Some(format!("ambit-data-{i}").as_str()));
            seen.push(id);
        }
        assert_eq!(seen, vec![0, 1, 2]);
        drop(dp); // joins the threads: returns only if every worker stopped
    }

    #[test]
    fn zero_workers_means_one() {
        assert_eq!(DataPlane::start(0).unwrap().handles().len(), 1);
    }
}
