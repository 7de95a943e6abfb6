//! Upstream HTTP/1.1 connections as byte streams, for the source-side relay
//! (`passthrough::source`), which writes a request's head and reads its response itself instead
//! of going through hyper's client. A connection is checked out for one request and back in the
//! pool after its response; idle ones are pooled, pruned, swept, let go and counted with the
//! others of their key (`Entry::raw`), under the same rules.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, Weak};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::debug;

use super::io::Io;
use super::{
    Entry, Inner, PoolSettings, Up, UpstreamError, UpstreamKey, Upstreams, MAX_IDLE_HTTP1,
    PRUNE_EVERY,
};
use crate::proxy::hbone::pool::GoingAway;
use crate::proxy::{PodContext, ProxyInputs};

/// One upstream HTTP/1.1 connection the relay reads and writes.
pub struct RawConn {
    pub(in crate::proxy::http) io: Io,
    going_away: Option<GoingAway>,
    created: Instant,
    idle_since: Instant,
    /// It carried a request before (a failure before any response on it is the failure of a
    /// connection the upstream closed while it was idle: the request goes again on a new one).
    pub(in crate::proxy::http) reused: bool,
    /// Which one it is in its key's pool (for the watch on its HBONE connection).
    id: u64,
    /// Dropped with it: ends that watch.
    _alive: Option<oneshot::Sender<()>>,
}

/// The next connection's id.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl RawConn {
    fn gone(&self) -> bool {
        self.going_away.as_ref().is_some_and(GoingAway::now)
    }

    /// Still open, with nothing to read: a close (or bytes no request asked for) that came
    /// while it was idle makes it unusable.
    fn open_and_quiet(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let polled =
            tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.io), &mut cx, &mut buf);
        polled.is_pending()
    }
}

impl Entry {
    /// The idle raw connections worth keeping: not going away, not idle past the timeout, not
    /// older than `maxConnectionDuration`, at most [`MAX_IDLE_HTTP1`] (the most recent).
    pub(super) fn prune_raw(&mut self, now: Instant) {
        let timeout = self.settings.idle_timeout;
        let max_age = self.settings.max_connection_duration;
        self.raw.retain(|c| {
            !c.gone()
                && timeout.is_none_or(|t| now.saturating_duration_since(c.idle_since) < t)
                && max_age.is_none_or(|d| now.saturating_duration_since(c.created) < d)
        });
        let over = self.raw.len().saturating_sub(MAX_IDLE_HTTP1);
        // Checked in at the end: the first ones are the longest idle.
        self.raw.drain(..over);
    }
}

impl Upstreams {
    /// An idle connection of `key` that is still usable (none while this agent drains).
    pub(in crate::proxy::http) fn checkout_raw(
        &self,
        key: &UpstreamKey,
        settings: PoolSettings,
        reuse: bool,
    ) -> Option<RawConn> {
        if !reuse {
            return None;
        }
        self.with_entry(key, settings, None, |e| {
            // At most every PRUNE_EVERY on the request path, as for hyper's connections (the
            // sweep does the rest; one going away is taken out when it does).
            let now = Instant::now();
            if e.pruned
                .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY)
            {
                e.prune_raw(now);
                e.pruned = Some(now);
            }
            while let Some(mut c) = e.raw.pop() {
                if c.gone() {
                    continue;
                }
                if c.open_and_quiet() {
                    return Some(c);
                }
            }
            None
        })
    }

    /// A new connection to `key.endpoint` from `pod` (an HBONE stream to a meshed endpoint),
    /// within the connect timeout.
    pub(in crate::proxy::http) async fn open_raw(
        &self,
        pi: &ProxyInputs,
        pod: &PodContext,
        key: &UpstreamKey,
        settings: PoolSettings,
    ) -> Result<RawConn, UpstreamError> {
        let up = Up {
            pi,
            pod,
            key,
            settings,
            limited: None,
            reuse: true,
        };
        let (io, going_away) = self.connect(&up).await?;
        let now = Instant::now();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let alive = going_away.clone().map(|g| {
            let (alive, dropped) = oneshot::channel();
            tokio::spawn(let_go_on(
                std::sync::Arc::downgrade(&self.inner),
                key.clone(),
                id,
                g,
                dropped,
            ));
            alive
        });
        Ok(RawConn {
            io,
            going_away,
            created: now,
            idle_since: now,
            reused: false,
            id,
            _alive: alive,
        })
    }

    /// Back in the pool after a whole response, unless this agent drains or the connection is
    /// going away or past its `maxConnectionDuration`.
    pub(in crate::proxy::http) fn checkin_raw(
        &self,
        key: &UpstreamKey,
        settings: PoolSettings,
        reuse: bool,
        mut conn: RawConn,
    ) {
        if !reuse || conn.gone() {
            return;
        }
        conn.reused = true;
        conn.idle_since = Instant::now();
        self.with_entry(key, settings, None, |e| {
            e.raw.push(conn);
            if e.raw.len() > MAX_IDLE_HTTP1 {
                e.prune_raw(Instant::now());
            }
        });
    }
}

/// Waits for the HBONE connection under raw connection `id` to go away (the peer's GOAWAY): the
/// connection is let go then, closed at once if it is idle in the pool (the draining peer's
/// stream ends, and with it the app's connection there), after its response if it is busy.
/// Ends when the connection is dropped first.
async fn let_go_on(
    inner: Weak<Inner>,
    key: UpstreamKey,
    id: u64,
    mut going_away: GoingAway,
    dropped: oneshot::Receiver<()>,
) {
    tokio::select! {
        () = going_away.wait() => {}
        _ = dropped => return,
    }
    let Some(inner) = inner.upgrade() else {
        return;
    };
    inner.let_go.fetch_add(1, Ordering::Relaxed);
    debug!(endpoint = %key.endpoint, "HBONE connection going away: upstream HTTP connection not reused");
    let mut conns = inner.conns.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = conns.get_mut(&key) {
        e.raw.retain(|c| c.id != id);
    }
}
