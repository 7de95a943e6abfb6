//! Processes a world started (`spawn`): handles that tests can signal and wait on, and that the
//! world kills and reaps on teardown.

use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A process started with `spawn`; the world SIGKILLs and reaps it on teardown. Clones share it.
#[derive(Clone, Debug)]
pub struct Process {
    pid: u32,
    child: Arc<Mutex<Child>>,
}

/// Locks, ignoring poison: a panicking test must not stop teardown.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Process {
    pub(crate) fn new(child: Child) -> Process {
        Process {
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
        }
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` unless the process has already exited (so a reused pid is never hit).
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        let mut child = lock(&self.child);
        match child.try_wait() {
            Ok(None) => kill(Pid::from_raw(self.pid as i32), signal),
            _ => Ok(()),
        }
    }

    /// SIGKILL and reap; a no-op if it has already exited.
    pub fn kill(&self) {
        let _ = self.kill_and_reap();
    }

    pub(crate) fn kill_and_reap(&self) -> std::io::Result<ExitStatus> {
        let mut child = lock(&self.child);
        child.kill()?;
        child.wait()
    }

    pub fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        lock(&self.child).try_wait()
    }

    /// Waits for exit up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        // Polls rather than blocking in wait(), so that teardown can still take the lock.
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn take_stdin(&self) -> Option<ChildStdin> {
        lock(&self.child).stdin.take()
    }

    pub fn take_stdout(&self) -> Option<ChildStdout> {
        lock(&self.child).stdout.take()
    }

    pub fn take_stderr(&self) -> Option<ChildStderr> {
        lock(&self.child).stderr.take()
    }
}
