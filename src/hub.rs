//! Fan-out of freshly appended events to attached clients.
//!
//! A bounded ring shared by all subscribers (`tokio::sync::broadcast`): the
//! writer never waits for a reader, and a reader that falls more than
//! [`CAPACITY`] events behind is told it lagged and catches up from the log,
//! which is the source of truth. Memory is bounded by the ring, whatever the
//! number or speed of clients.

use tokio::sync::broadcast;

use crate::event::Stored;

/// Events kept for subscribers that have not read them yet.
pub const CAPACITY: usize = 256;

#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Stored>,
}

pub type Subscription = broadcast::Receiver<Stored>;

impl Default for Hub {
    fn default() -> Self {
        Hub {
            tx: broadcast::Sender::new(CAPACITY),
        }
    }
}

impl Hub {
    /// Delivers an event already in the log to current subscribers.
    pub fn publish(&self, event: Stored) {
        // No subscribers is not an error: nobody is attached.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> Subscription {
        self.tx.subscribe()
    }

    /// Attached clients right now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}
