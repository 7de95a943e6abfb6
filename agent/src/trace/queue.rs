//! The hand-over between the data path and a tracer's export task: a bounded buffer the data
//! path appends to under a short lock, and that the exporter takes whole. The exporter is woken
//! only when a batch is full (or it is closing); otherwise it takes what is there on its flush
//! interval. A tokio channel would wake the exporter for every span, a cross-thread wake-up
//! (an eventfd write, a context switch on the control runtime) per sampled request, which at
//! 100 % sampling cost more than making the span.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

use super::span::Span;

/// Why a span was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    Full,
    Closed,
}

#[derive(Debug)]
pub(super) struct SpanQueue {
    spans: Mutex<Vec<Span>>,
    capacity: usize,
    /// The exporter is woken when this many spans wait.
    batch: usize,
    notify: Notify,
    closed: AtomicBool,
}

impl SpanQueue {
    pub(super) fn new(capacity: usize, batch: usize) -> SpanQueue {
        SpanQueue {
            spans: Mutex::new(Vec::with_capacity(batch.min(capacity).max(1))),
            capacity,
            batch: batch.min(capacity).max(1),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Appends `span` without waiting for the exporter.
    pub(super) fn push(&self, span: Span) -> Result<(), Refused> {
        let full_batch = {
            let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
            // Read under the lock `close` takes: no span gets in after the exporter's last take.
            if self.closed.load(Ordering::Relaxed) {
                return Err(Refused::Closed);
            }
            if spans.len() >= self.capacity {
                return Err(Refused::Full);
            }
            spans.push(span);
            spans.len() == self.batch
        };
        if full_batch {
            // A permit is kept if the exporter is busy sending: it comes straight back.
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Everything queued so far. The buffer left in its place has room for a batch, so the
    /// data path's pushes (under the lock) do not grow it and move spans around.
    pub(super) fn take(&self) -> Vec<Span> {
        let lock = || self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        if lock().is_empty() {
            return Vec::new();
        }
        let fresh = Vec::with_capacity(self.batch);
        std::mem::replace(&mut *lock(), fresh)
    }

    /// Waits until a batch is full or the queue is closed.
    pub(super) async fn ready(&self) {
        self.notify.notified().await
    }

    /// No more spans are taken; the exporter sends what is left and ends.
    pub(super) fn close(&self) {
        let _spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        self.closed.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}
