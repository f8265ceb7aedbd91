//! A session's event log: append (which assigns the id), read after an id,
//! subscribe to what is appended next.
//!
//! This is the interface the rest of the server uses; the storage behind it
//! can change without touching the HTTP layer. Invariants:
//! - ids are 0, 1, 2, … with no gaps, in append order;
//! - an event is in the log before any subscriber sees it;
//! - subscribers see events in id order (publication happens under the same
//!   lock as the append).

use std::sync::Mutex;

use thiserror::Error;

use crate::event::{Event, EventId, Stored};
use crate::hub::{Hub, Subscription};

#[derive(Debug, Error)]
pub enum LogError {
    #[error("the event log cannot be written: {0}")]
    Unavailable(String),
}

#[derive(Debug, Default)]
pub struct Log {
    events: Mutex<Vec<Stored>>,
    hub: Hub,
}

impl Log {
    /// Appends an event, publishes it, and returns it with its id.
    pub async fn append(&self, event: Event) -> Result<Stored, LogError> {
        let mut events = self.lock();
        let stored = Stored::new(events.len() as EventId, &event);
        events.push(stored.clone());
        self.hub.publish(stored.clone());
        Ok(stored)
    }

    /// Up to `limit` events with id > `after` (all from the start when `None`), in order.
    pub async fn read_after(&self, after: Option<EventId>, limit: usize) -> Result<Vec<Stored>, LogError> {
        let events = self.lock();
        let start = after.map_or(0, |id| id.saturating_add(1));
        let start = usize::try_from(start).unwrap_or(usize::MAX).min(events.len());
        Ok(events[start..].iter().take(limit).cloned().collect())
    }

    /// Id the next appended event will get (the number of events so far).
    pub async fn next_id(&self) -> Result<EventId, LogError> {
        Ok(self.lock().len() as EventId)
    }

    /// Events appended after this call. Subscribe before reading the backlog
    /// so that nothing falls between the two.
    pub fn subscribe(&self) -> Subscription {
        self.hub.subscribe()
    }

    pub fn subscribers(&self) -> usize {
        self.hub.subscribers()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Stored>> {
        // A panic while holding this lock cannot leave the Vec half-updated
        // (push is the only mutation), so a poisoned lock is still usable.
        self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str) -> Event {
        Event::Text { text: t.into() }
    }

    #[tokio::test]
    async fn ids_are_positions_without_gaps() {
        let log = Log::default();
        for i in 0..5 {
            let stored = log.append(text(&format!("e{i}"))).await.unwrap();
            assert_eq!(stored.id, i);
        }
        let all = log.read_after(None, usize::MAX).await.unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert!(all[3].json.contains(r#""text":"e3""#), "{}", all[3].json);
        assert!(all[3].json.contains(r#""id":3"#), "{}", all[3].json);
    }

    #[tokio::test]
    async fn read_after_pages_and_clamps() {
        let log = Log::default();
        for i in 0..10 {
            log.append(text(&i.to_string())).await.unwrap();
        }
        let page = log.read_after(Some(2), 3).await.unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(log.read_after(Some(9), 10).await.unwrap().is_empty());
        assert!(log.read_after(Some(u64::MAX), 10).await.unwrap().is_empty());
        assert_eq!(log.next_id().await.unwrap(), 10);
    }

    #[tokio::test]
    async fn subscribers_see_appends_in_order_after_the_log() {
        let log = Log::default();
        log.append(text("before")).await.unwrap();
        let mut sub = log.subscribe();
        log.append(text("a")).await.unwrap();
        log.append(text("b")).await.unwrap();
        let first = sub.recv().await.unwrap();
        let second = sub.recv().await.unwrap();
        assert_eq!((first.id, second.id), (1, 2));
        // Whatever a subscriber sees is already readable from the log.
        let tail = log.read_after(Some(0), 10).await.unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(&*tail[1].json, &*second.json);
    }
}
