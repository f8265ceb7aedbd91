//! Fan-out of freshly committed events to attached clients.
//!
//! A bounded ring shared by all subscribers (`tokio::sync::broadcast`): the
//! writer never waits for a reader, and a reader that falls more than
//! [`CAPACITY`] items behind is told it lagged and catches up from the log,
//! which is the source of truth. Memory is bounded by the ring, whatever the
//! number or speed of clients.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::event::{EventId, Stored};

/// Items kept for subscribers that have not read them yet.
pub const CAPACITY: usize = 256;

/// What attached clients are sent.
#[derive(Debug, Clone)]
pub enum Published {
    /// An event, committed to the log.
    Event(Arc<Shared>),
    /// A notice that could not be logged (the log itself is failing): sent
    /// to whoever is attached now, without an id, never replayed.
    Notice(Arc<str>),
    /// New characters of a text block (an [`crate::event::Delta`]'s JSON):
    /// never logged, so a subscriber that lags simply misses some.
    Delta {
        /// The last event published before it: a stream whose client already
        /// has a later event (from the log) drops it, since that event may be
        /// the text the delta belongs to.
        after: Option<EventId>,
        json: Arc<str>,
    },
}

/// An event as every subscriber receives it: one allocation shared by all,
/// with room for its wire form, so that a thousand attached clients encode
/// it once (the first to send it does), not a thousand times.
#[derive(Debug)]
pub struct Shared {
    pub event: Stored,
    frame: OnceLock<Bytes>,
}

impl Shared {
    /// The event's wire form: `encode`d by the first caller, shared after.
    pub fn frame(&self, encode: impl FnOnce(&Stored) -> Bytes) -> Bytes {
        self.frame.get_or_init(|| encode(&self.event)).clone()
    }
}

#[derive(Debug)]
pub struct Hub {
    /// Held while sending, so that a delta's `after` is exactly the event
    /// sent before it.
    tx: std::sync::Mutex<Sent>,
}

#[derive(Debug)]
struct Sent {
    tx: broadcast::Sender<Published>,
    last_event: Option<EventId>,
}

pub type Subscription = broadcast::Receiver<Published>;

impl Default for Hub {
    fn default() -> Self {
        Hub { tx: std::sync::Mutex::new(Sent { tx: broadcast::Sender::new(CAPACITY), last_event: None }) }
    }
}

impl Hub {
    /// Delivers an event already in the log to current subscribers.
    pub fn publish(&self, event: Stored) {
        let mut sent = self.sent();
        sent.last_event = Some(event.id);
        // No subscribers is not an error: nobody is attached.
        let _ = sent.tx.send(Published::Event(Arc::new(Shared { event, frame: OnceLock::new() })));
    }

    /// Delivers a notice that is not in the log (see [`Published::Notice`]).
    pub fn notify(&self, json: Arc<str>) {
        let _ = self.sent().tx.send(Published::Notice(json));
    }

    /// Delivers a delta's JSON (see [`Published::Delta`]).
    pub fn delta(&self, json: Arc<str>) {
        let sent = self.sent();
        let _ = sent.tx.send(Published::Delta { after: sent.last_event, json });
    }

    pub fn subscribe(&self) -> Subscription {
        self.sent().tx.subscribe()
    }

    /// Attached clients right now.
    pub fn subscribers(&self) -> usize {
        self.sent().tx.receiver_count()
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }
}
