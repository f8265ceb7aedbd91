//! A session's event log: append (which assigns the id), read after an id,
//! subscribe to what is appended next.
//!
//! This is the interface the rest of the server uses; [`crate::store`] keeps
//! the events in SQLite behind it. Invariants:
//! - ids are 0, 1, 2, … with no gaps, in append order;
//! - an event is committed before any subscriber sees it;
//! - subscribers see events in id order (the store publishes in commit order).

use std::sync::Arc;

use uuid::Uuid;

use crate::event::{Delta, Event, EventId, Stored};
use crate::hub::{Hub, Subscription};
use crate::store::{Fence, Pending, Publish, Store, StoreError};

pub type LogError = StoreError;

#[derive(Debug)]
pub struct Log {
    session: Uuid,
    store: Arc<Store>,
    hub: Arc<Hub>,
}

impl Log {
    pub fn new(session: Uuid, store: Arc<Store>) -> Self {
        Log { session, store, hub: Arc::new(Hub::default()) }
    }

    /// Appends an event and waits until it is committed and published.
    pub async fn append(&self, event: Event) -> Result<Stored, LogError> {
        self.submit(event, None).await?.committed().await
    }

    /// Queues an event behind those submitted before it and returns without
    /// waiting for the commit, so a fast producer fills whole transactions.
    /// Events sharing a `fence` are refused once one of them failed.
    pub async fn submit(&self, event: Event, fence: Option<Fence>) -> Result<Pending, LogError> {
        self.store.submit(self.session, event, self.hub.clone(), fence).await
    }

    /// Up to `limit` events with id > `after` (all from the start when `None`), in order.
    pub async fn read_after(&self, after: Option<EventId>, limit: usize) -> Result<Vec<Stored>, LogError> {
        self.store.read_after(self.session, after, limit).await
    }

    /// Hands `each` (with `state`) the events after `after` in order, until
    /// it returns false or about `budget` bytes went by, and returns `state`
    /// with the number of events in the log when they were read (see
    /// [`Store::scan_after`]).
    pub async fn scan_after<S, F>(
        &self,
        after: Option<EventId>,
        budget: usize,
        state: S,
        each: F,
    ) -> Result<(S, EventId), LogError>
    where
        S: Send + 'static,
        F: Fn(&mut S, EventId, &str) -> bool + Send + 'static,
    {
        self.store.scan_after(self.session, after, budget, state, each).await
    }

    /// Id the next appended event will get (the number of events so far).
    pub async fn next_id(&self) -> Result<EventId, LogError> {
        Ok(self.store.session(self.session).await?.map_or(0, |row| row.event_count))
    }

    /// Events appended after this call. Subscribe before reading the backlog
    /// so that nothing falls between the two.
    pub fn subscribe(&self) -> Subscription {
        self.hub.subscribe()
    }

    /// Tells attached clients something the log could not keep.
    pub fn notify(&self, event: &Event) {
        self.hub.notify(notice(event));
    }

    /// Sends new characters of a text block to attached clients; never
    /// logged (README, "API").
    pub fn delta(&self, delta: &Delta) {
        self.hub.delta(delta.to_json().to_string().into());
    }

    pub fn subscribers(&self) -> usize {
        self.hub.subscribers()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn session(&self) -> Uuid {
        self.session
    }
}

/// The store publishes each committed event to its session's hub: the log
/// is where the two meet, so neither knows the other.
impl Publish for Hub {
    fn publish(&self, event: Stored) {
        Hub::publish(self, event);
    }
}

/// The JSON of an event that is not in the log: no id.
pub fn notice(event: &Event) -> Arc<str> {
    let mut json = event.to_json(0);
    if let Some(obj) = json.as_object_mut() {
        obj.remove("id");
    }
    json.to_string().into()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::store::Durability;

    /// A log over a fresh store in a temporary directory (kept alive by the
    /// returned guard).
    pub async fn temp_log() -> (tempfile::TempDir, Log) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Durability::Normal).unwrap());
        let id = store.create_session(Uuid::new_v4()).await.unwrap().id;
        (dir, Log::new(id, store))
    }

    fn text(t: &str) -> Event {
        Event::Text { text: t.into(), message_id: None, index: None }
    }

    #[tokio::test]
    async fn ids_are_positions_without_gaps() {
        let (_dir, log) = temp_log().await;
        for i in 0..5 {
            let stored = log.append(text(&format!("e{i}"))).await.unwrap();
            assert_eq!(stored.id, i);
        }
        let all = log.read_after(None, usize::MAX >> 1).await.unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert!(all[3].json.contains(r#""text":"e3""#), "{}", all[3].json);
        assert!(all[3].json.contains(r#""id":3"#), "{}", all[3].json);
    }

    #[tokio::test]
    async fn read_after_pages_and_clamps() {
        let (_dir, log) = temp_log().await;
        for i in 0..10 {
            log.append(text(&i.to_string())).await.unwrap();
        }
        let page = log.read_after(Some(2), 3).await.unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(log.read_after(Some(9), 10).await.unwrap().is_empty());
        assert!(log.read_after(Some(u64::MAX), 10).await.unwrap().is_empty());
        assert_eq!(log.next_id().await.unwrap(), 10);
    }

    /// What a subscriber receives is already committed: another connection
    /// can read it the moment it arrives (submitted, not awaited, so the
    /// subscriber may well hear of it before the submitter does).
    #[tokio::test]
    async fn subscribers_see_appends_in_order_after_the_commit() {
        let (_dir, log) = temp_log().await;
        log.append(text("before")).await.unwrap();
        let mut sub = log.subscribe();
        let mut pending = Vec::new();
        for i in 0..200 {
            pending.push(log.submit(text(&i.to_string()), None).await.unwrap());
        }
        for expected in 1..=200u64 {
            let crate::hub::Published::Event(shared) = sub.recv().await.unwrap() else { panic!("no notices here") };
            assert_eq!(shared.event.id, expected);
            let read = log.read_after(Some(expected - 1), 1).await.unwrap();
            assert_eq!(read.first().map(|e| e.id), Some(expected), "published before it was readable");
        }
        drop(pending);
    }
}
