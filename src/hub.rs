//! Fan-out of freshly committed events to attached clients.
//!
//! A bounded ring shared by all subscribers (`tokio::sync::broadcast`): the
//! writer never waits for a reader, and a reader that falls more than
//! [`CAPACITY`] items behind is told it lagged and catches up from the log,
//! which is the source of truth. Memory is bounded by the ring, whatever the
//! number or speed of clients.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::event::Stored;

/// Items kept for subscribers that have not read them yet.
pub const CAPACITY: usize = 256;

/// What attached clients are sent.
#[derive(Debug, Clone)]
pub enum Published {
    /// An event, committed to the log.
    Event(Stored),
    /// A notice that could not be logged (the log itself is failing): sent
    /// to whoever is attached now, without an id, never replayed.
    Notice(Arc<str>),
}

#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Published>,
}

pub type Subscription = broadcast::Receiver<Published>;

impl Default for Hub {
    fn default() -> Self {
        Hub { tx: broadcast::Sender::new(CAPACITY) }
    }
}

impl Hub {
    /// Delivers an event already in the log to current subscribers.
    pub fn publish(&self, event: Stored) {
        // No subscribers is not an error: nobody is attached.
        let _ = self.tx.send(Published::Event(event));
    }

    /// Delivers a notice that is not in the log (see [`Published::Notice`]).
    pub fn notify(&self, json: Arc<str>) {
        let _ = self.tx.send(Published::Notice(json));
    }

    pub fn subscribe(&self) -> Subscription {
        self.tx.subscribe()
    }

    /// Attached clients right now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}
