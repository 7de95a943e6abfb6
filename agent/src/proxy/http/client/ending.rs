//! How pooled upstream connections end: the sweep that closes idle ones, the agent's drain (every
//! connection let go), and the HBONE connection under one going away (the peer's GOAWAY: that
//! connection is let go).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use tracing::debug;

use super::{ConnState, Inner, UpstreamKey};
use crate::proxy::drain::Drain;
use crate::proxy::hbone::pool::GoingAway;

/// The longest pause of the sweep (it wakes sooner for shorter idle timeouts).
pub(super) const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// What a connection's driver calls when the HBONE connection under it goes away: the
/// connection is not reused (its request in flight, if any, finishes; dropping its sender
/// then closes it).
pub(super) fn let_go_on(
    inner: &Arc<Inner>,
    key: &UpstreamKey,
    state: &Arc<ConnState>,
) -> impl FnOnce() + Send {
    let (inner, key, state) = (Arc::downgrade(inner), key.clone(), Arc::downgrade(state));
    move || {
        let Some(state) = state.upgrade() else {
            return;
        };
        state.going_away.store(true, Ordering::Release);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.let_go.fetch_add(1, Ordering::Relaxed);
        debug!(endpoint = %key.endpoint, "HBONE connection going away: upstream HTTP connection not reused");
        let mut conns = inner.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(e) = conns.get_mut(&key) else {
            return;
        };
        e.http1.retain(|c| !Arc::ptr_eq(&c.state, &state));
        e.http2
            .retain(|slot| slot.0.get().is_none_or(|c| !Arc::ptr_eq(&c.state, &state)));
    }
}

/// This agent drains: every pooled connection is let go (idle ones close now, busy ones
/// after their request in flight), and none is reused from now on.
fn let_go_all(inner: &Inner) {
    let all = std::mem::take(&mut *inner.conns.lock().unwrap_or_else(PoisonError::into_inner));
    for e in all.values() {
        for c in &e.http1 {
            c.state.going_away.store(true, Ordering::Release);
        }
        for c in e.http2.iter().filter_map(|slot| slot.0.get()) {
            c.state.going_away.store(true, Ordering::Release);
        }
    }
}

/// A connection's driver (hyper's connection task), boxed: one per connection.
pub(super) type Driver = std::pin::Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// Runs a connection's `driver` to its end. When the HBONE connection under it goes away first,
/// `let_go` takes it out of the pool before it runs on: its request in flight finishes, and it
/// closes once its sender has been dropped.
pub(super) async fn drive(
    mut driver: Driver,
    going_away: Option<GoingAway>,
    let_go: impl FnOnce(),
) -> Result<(), hyper::Error> {
    if let Some(mut going_away) = going_away {
        tokio::select! {
            out = &mut driver => return out,
            () = going_away.wait() => let_go(),
        }
    }
    driver.await
}

/// Closes what is idle past its timeout; how long until the next look.
pub(super) fn sweep(inner: &Inner) -> Duration {
    let now = Instant::now();
    let mut conns = inner.conns.lock().unwrap_or_else(PoisonError::into_inner);
    conns.retain(|_, e| e.prune(now));
    let next = conns
        .values()
        .filter_map(|e| e.settings.idle_timeout)
        .map(sweep_interval)
        .min()
        .unwrap_or(MAX_SWEEP_INTERVAL);
    let ms = u64::try_from(next.as_millis()).unwrap_or(u64::MAX).max(1);
    inner.sweep_every_ms.store(ms, Ordering::Release);
    next
}

/// How often to look for connections idle past `timeout`: twice per timeout, so one closes at
/// most half a timeout late.
pub(super) fn sweep_interval(timeout: Duration) -> Duration {
    (timeout / 2).clamp(Duration::from_millis(10), MAX_SWEEP_INTERVAL)
}

/// Sweeps until the pool is dropped; lets every connection go when the agent drains.
pub(super) async fn sweeper(inner: Weak<Inner>, drain: Drain) {
    let mut drained = false;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = sweep(&strong);
        // Not holding the pool while asleep, so that dropping it ends the sweep.
        let wake = strong.wake.clone();
        drop(strong);
        let draining = async {
            if drained {
                std::future::pending().await
            } else {
                drain.started().await
            }
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = wake.notified() => {}
            () = draining => {
                drained = true;
                if let Some(strong) = inner.upgrade() {
                    let_go_all(&strong);
                }
            }
        }
    }
}
