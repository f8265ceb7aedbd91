//! Durable state in embedded SQLite: sessions, their event logs, and the
//! audit trail. This is the only module that knows SQL.
//!
//! One thread owns the only writing connection. Writes arrive over a
//! bounded channel and are grouped into transactions: a batch closes when
//! the queue is empty, after [`BATCH_MAX`] commands, or [`BATCH_WINDOW`]
//! after it opened. Event ids are assigned by that thread, and events are
//! published to attached clients only after their transaction commits, so
//! every id a client ever saw still means the same event after a crash.
//! Reads use a small pool of read-only connections (WAL lets them run beside
//! the writer).
//!
//! - `schema`: what makes a file breakglass's, and the migrations;
//! - `writer`: the writer thread and its transactions;
//! - `read`: the read pool and the queries clients wait on;
//! - `audit`: the audit chain and its verification.

mod audit;
mod read;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::event::{Event, EventId, Stored};
use crate::hub::Hub;

pub use audit::{HEAD_FILE, verify_audit};
use read::Readers;
use schema::prepare;
pub use writer::{BATCH_MAX, BATCH_WINDOW};
use writer::{Command, Writer};

/// Commands waiting for the writer; senders wait beyond this (backpressure).
const QUEUE: usize = 4096;

/// How hard a commit holds on to its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// `synchronous=NORMAL`: survives a killed process; the last commits may
    /// be lost on power loss.
    Normal,
    /// `synchronous=FULL`: every commit is on disk before it is acknowledged.
    Full,
}

#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("storage is full: {0}")]
    Full(String),
    #[error("no such session")]
    NoSession,
    #[error("storage failed: {0}")]
    Sqlite(String),
    #[error("storage is closed")]
    Closed,
    #[error("not written: an earlier write of this turn failed")]
    Fenced,
    #[error("storage is not answering (a stalled or frozen disk); the write is still queued")]
    Stalled,
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        match err.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::Full(err.to_string()),
            _ => StoreError::Sqlite(err.to_string()),
        }
    }
}

/// Why a database file cannot be used. The server refuses to start on any
/// of these rather than replace or "repair" what it finds.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("{path}: cannot open it: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("{path}: not a usable SQLite database ({source}); refusing to touch it. Move it aside to start afresh.")]
    Corrupt { path: PathBuf, source: rusqlite::Error },
    #[error(
        "{path}: an SQLite database that is not breakglass's (application_id {found:#x}); refusing to touch it. \
         Point BREAKGLASS_DATA_DIR elsewhere."
    )]
    Foreign { path: PathBuf, found: i32 },
    #[error(
        "{path}: written by a newer breakglass (schema {found}, this one knows up to {known}); refusing to touch it. \
         Run the newer version."
    )]
    Newer { path: PathBuf, found: i64, known: i64 },
    #[error("{path}: another breakglass is using this data directory; refusing to start a second one on it")]
    InUse { path: PathBuf },
    #[error("{path}: cannot lock it: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("{path}: cannot write the audit trail's head anchor: {source}")]
    Anchor { path: PathBuf, source: std::io::Error },
    #[error("{path}: migrating the schema failed: {source}")]
    Migrate { path: PathBuf, source: rusqlite::Error },
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub id: Uuid,
    pub created_ms: i64,
    /// The first prompt, cut to [`TITLE_CHARS`].
    pub title: Option<String>,
    /// The agent CLI has announced this session: later turns pass `--resume`.
    pub agent_started: bool,
    pub last_activity_ms: i64,
    pub event_count: u64,
    /// A `user` event was logged and its `turn_end` not yet.
    pub turn_running: bool,
    /// The running turn's agent process group, once started.
    pub turn_pgid: Option<i32>,
    /// The running turn's environment marker (`KEY=value`).
    pub turn_marker: Option<String>,
}

/// Longest title kept from a first prompt.
pub const TITLE_CHARS: usize = 200;

/// One audit record as written (the chain fields are computed by the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub identity: String,
    pub peer: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

/// An audit record with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: i64,
    pub at_ms: i64,
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

/// The result of checking the audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditCheck {
    Intact {
        records: u64,
    },
    /// The first record that does not check out, and why.
    Broken {
        seq: i64,
        why: String,
    },
}

/// A write waiting for its transaction to commit.
pub struct Pending(oneshot::Receiver<Result<Stored, StoreError>>);

impl Pending {
    pub async fn committed(self) -> Result<Stored, StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// Shared by the appends of one producer (a turn): once a transaction
/// holding one of them fails, the later ones are refused too, so that a
/// failure never leaves a hole in the middle of what the producer wrote.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<AtomicBool>);

impl Fence {
    pub fn is_tripped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn trip(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn same(&self, other: &Fence) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[derive(Debug)]
pub struct Store {
    /// Held for the store's life: one server per data directory.
    _lock: std::fs::File,
    path: PathBuf,
    tx: mpsc::Sender<Command>,
    readers: Arc<Readers>,
}

impl Store {
    /// Opens (creating and migrating when needed) `<dir>/breakglass.db` and
    /// starts its writer thread.
    pub fn open(dir: &Path, durability: Durability) -> Result<Store, OpenError> {
        let lock = lock_dir(dir)?;
        let path = dir.join("breakglass.db");
        let mut conn = Connection::open(&path).map_err(|source| OpenError::Open { path: path.clone(), source })?;
        prepare(&mut conn, &path)?;
        let anchoring = audit::anchor_agrees(&conn, dir);
        let synchronous = match durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(|source| OpenError::Open { path: path.clone(), source })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("breakglass-store".into())
            .spawn({
                let dir = dir.to_owned();
                move || Writer::new(conn, dir, anchoring).run(rx)
            })
            .map_err(|e| OpenError::Open {
                path: path.clone(),
                source: rusqlite::Error::InvalidPath(e.to_string().into()),
            })?;
        Ok(Store { _lock: lock, readers: Arc::new(Readers::new(path.clone())), path, tx })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn create_session(&self, id: Uuid) -> Result<SessionRow, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CreateSession { id, now: now_ms(), reply }).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Queues an event; ids follow the order of `submit` calls. Await the
    /// returned [`Pending`] for its id once it is committed (and published).
    pub async fn submit(
        &self,
        session: Uuid,
        event: Event,
        hub: Arc<Hub>,
        fence: Option<Fence>,
    ) -> Result<Pending, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Append { session, event, hub, fence, reply }).await?;
        Ok(Pending(rx))
    }

    /// Records how to find the running turn's processes after a crash: its
    /// environment marker (before it starts) and its process group (once it
    /// has one).
    pub async fn set_turn(&self, session: Uuid, pgid: Option<i32>, marker: String) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SetTurn { session, pgid, marker, reply }).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    pub async fn audit(&self, record: AuditRecord) -> Result<AuditEntry, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Audit { record, reply }).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    async fn send(&self, command: Command) -> Result<(), StoreError> {
        self.tx.send(command).await.map_err(|_| StoreError::Closed)
    }
}

fn to_sql(id: EventId) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// An exclusive lock on `<dir>/breakglass.lock`, released when the process
/// ends however it ends: two servers on one database would fight over ids.
fn lock_dir(dir: &Path) -> Result<std::fs::File, OpenError> {
    let path = dir.join("breakglass.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| OpenError::Lock { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::InUse { path: dir.to_owned() }),
        Err(std::fs::TryLockError::Error(source)) => Err(OpenError::Lock { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        (dir, store)
    }

    async fn append(store: &Store, session: Uuid, event: Event) -> Result<Stored, StoreError> {
        store.submit(session, event, Arc::new(Hub::default()), None).await?.committed().await
    }

    #[tokio::test]
    async fn events_get_consecutive_ids_and_read_back() {
        let (_dir, store) = open();
        let id = store.create_session(Uuid::new_v4()).await.unwrap().id;
        let mut pending = Vec::new();
        for i in 0..1000 {
            let hub = Arc::new(Hub::default());
            pending.push(
                store
                    .submit(id, Event::Text { text: i.to_string(), message_id: None, index: None }, hub, None)
                    .await
                    .unwrap(),
            );
        }
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.committed().await.unwrap().id, i as u64);
        }
        let page = store.read_after(id, Some(9), 5).await.unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![10, 11, 12, 13, 14]);
        assert!(page[0].json.contains(r#""text":"10""#));
        assert_eq!(store.session(id).await.unwrap().unwrap().event_count, 1000);
    }

    #[tokio::test]
    async fn events_of_an_unknown_session_are_refused_alone() {
        let (_dir, store) = open();
        let id = store.create_session(Uuid::new_v4()).await.unwrap().id;
        let stray = store.submit(Uuid::new_v4(), Event::TurnEnd, Arc::new(Hub::default()), None).await.unwrap();
        let fine = store.submit(id, Event::TurnEnd, Arc::new(Hub::default()), None).await.unwrap();
        assert!(matches!(stray.committed().await, Err(StoreError::NoSession)));
        assert_eq!(fine.committed().await.unwrap().id, 0);
    }

    #[tokio::test]
    async fn the_session_row_follows_its_events() {
        let (_dir, store) = open();
        let id = store.create_session(Uuid::new_v4()).await.unwrap().id;
        append(&store, id, Event::User { text: "  disk full on devvm?  ".into(), by: "alice".into() }).await.unwrap();
        store.set_turn(id, Some(4242), "BREAKGLASS_TURN=x".into()).await.unwrap();
        let row = store.session(id).await.unwrap().unwrap();
        assert_eq!(
            (row.title.as_deref(), row.turn_running, row.turn_pgid),
            (Some("disk full on devvm?"), true, Some(4242))
        );
        assert_eq!(store.interrupted().await.unwrap().len(), 1);
        append(&store, id, Event::Session { session_id: id.to_string() }).await.unwrap();
        append(&store, id, Event::TurnEnd).await.unwrap();
        append(&store, id, Event::User { text: "second".into(), by: "alice".into() }).await.unwrap();
        let row = store.session(id).await.unwrap().unwrap();
        assert_eq!(row.title.as_deref(), Some("disk full on devvm?"), "the title is the first prompt");
        assert!(row.agent_started);
        assert_eq!(row.event_count, 4);
    }

    #[tokio::test]
    async fn the_audit_chain_verifies_and_detects_an_edit() {
        let (dir, store) = open();
        for i in 0..5 {
            let record = AuditRecord {
                identity: "alice".into(),
                peer: "10.0.0.1".into(),
                action: "prompt".into(),
                target: format!("s{i}"),
                outcome: "ok".into(),
            };
            assert_eq!(store.audit(record).await.unwrap().seq, i + 1);
        }
        assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 5 });
        let conn = Connection::open(dir.path().join("breakglass.db")).unwrap();
        conn.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 3", []).unwrap();
        assert!(matches!(verify_audit(dir.path()).unwrap(), AuditCheck::Broken { seq: 3, .. }));
    }

    #[test]
    fn foreign_newer_and_corrupt_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("breakglass.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE photos (id INTEGER)").unwrap();
        drop(conn);
        assert!(matches!(Store::open(dir.path(), Durability::Normal), Err(OpenError::Foreign { .. })));

        std::fs::remove_file(&path).unwrap();
        drop(Store::open(dir.path(), Durability::Normal).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(dir.path(), Durability::Normal).unwrap_err();
        assert!(matches!(err, OpenError::Newer { found: 99, .. }), "{err}");

        for file in ["breakglass.db", "breakglass.db-wal", "breakglass.db-shm"] {
            let _ = std::fs::remove_file(dir.path().join(file));
        }
        let garbage = b"this is not a database, it is a grocery list\n".repeat(100);
        std::fs::write(&path, &garbage).unwrap();
        let err = Store::open(dir.path(), Durability::Normal).unwrap_err();
        assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("refusing to touch it"));
        assert_eq!(std::fs::read(&path).unwrap(), garbage, "the file is left as it was");
    }
}
