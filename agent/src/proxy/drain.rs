//! The proxy's drain signal. When the agent stops (SIGTERM, or a successor took its listeners over)
//! every accept loop stops accepting, each HBONE connection is sent GOAWAY (server side: graceful,
//! so streams in flight are still served; client side: no new stream, GOAWAY once the last ends),
//! and established connections get until the grace period to finish (ztunnel's `drain` module and
//! Envoy's drain sequence do the same). HTTP/1.1 has no GOAWAY: a keep-alive connection from an
//! agent's upstream pool is closed by that pool (told by the HBONE GOAWAY, or by this drain when
//! the pool is this agent's), not by the draining server, so no request meets a closing
//! connection (`http::inbound`, `http::client`).

//!
//! [`Drain::started`] sits in the hot loops (each HBONE server connection's, each HTTP
//! connection's `select!`), so polling it must be cheap and touch nothing shared: each waiter has
//! its own [`AtomicWaker`], registered once in the drain's list and re-armed lock-free on every
//! poll. (A `tokio::sync::watch` or `Notify` future takes the channel's one mutex on every poll
//! while it waits: every connection of the process polling one lock cost about 5% CPU per byte in
//! the HBONE bench.)

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

#[derive(Debug, Clone, Default)]
pub struct Drain(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    /// Waiters not yet woken, by id; a waiter removes itself when dropped.
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    next: u64,
    by_id: std::collections::HashMap<u64, Arc<AtomicWaker>>,
}

impl Drain {
    /// Starts the drain (once; later calls do nothing): every waiter wakes.
    pub fn start(&self) {
        if self.0.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        let waiters = std::mem::take(
            &mut self
                .0
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_id,
        );
        for w in waiters.values() {
            w.wake();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// Resolves once the drain has started (at once if it has).
    pub fn started(&self) -> Started {
        Started {
            drain: self.0.clone(),
            slot: None,
        }
    }
}

/// See [`Drain::started`].
#[derive(Debug)]
pub struct Started {
    drain: Arc<Inner>,
    /// (id in the drain's list, this waiter's waker), once polled.
    slot: Option<(u64, Arc<AtomicWaker>)>,
}

impl Future for Started {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.drain.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        match &this.slot {
            Some((_, waker)) => waker.register(cx.waker()),
            None => {
                let waker = Arc::new(AtomicWaker::new());
                waker.register(cx.waker());
                let mut waiters = this
                    .drain
                    .waiters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let id = waiters.next;
                waiters.next += 1;
                waiters.by_id.insert(id, waker.clone());
                this.slot = Some((id, waker));
            }
        }
        // Registered before this second look: a start in between either sees the waker in the
        // list, or is seen here.
        if this.drain.draining.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some((id, _)) = self.slot.take() {
            self.drain
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_id
                .remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_before_and_after_the_start_both_see_it() {
        let drain = Drain::default();
        assert!(!drain.is_draining());
        let early = tokio::spawn({
            let d = drain.clone();
            async move { d.started().await }
        });
        drain.start();
        drain.start();
        early.await.expect("an early waiter wakes");
        drain.started().await;
        assert!(drain.is_draining());
    }

    struct Flag(AtomicBool);

    impl futures::task::ArcWake for Flag {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_future_is_woken_by_the_start_and_a_dropped_one_leaves_the_list() {
        let drain = Drain::default();
        let (flag, other) = (
            Arc::new(Flag(AtomicBool::new(false))),
            Arc::new(Flag(AtomicBool::new(false))),
        );
        let waker = futures::task::waker(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut waiting = Box::pin(drain.started());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        // Polled again (as a select! does on every wake): still one entry, still pending.
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        let mut gone = Box::pin(drain.started());
        let other_waker = futures::task::waker(other.clone());
        assert!(gone
            .as_mut()
            .poll(&mut Context::from_waker(&other_waker))
            .is_pending());
        assert_eq!(drain.0.waiters.lock().unwrap().by_id.len(), 2);
        drop(gone);
        assert_eq!(drain.0.waiters.lock().unwrap().by_id.len(), 1);

        drain.start();
        assert!(
            flag.0.load(Ordering::SeqCst),
            "the waiting future's task is woken"
        );
        assert!(!other.0.load(Ordering::SeqCst), "a dropped waiter is not");
        assert!(waiting.as_mut().poll(&mut cx).is_ready());
        assert!(drain.0.waiters.lock().unwrap().by_id.is_empty());
    }
}
