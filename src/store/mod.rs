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
//! - `audit`: the audit chain and its verification;
//! - `backup`: copies of the live database, and restoring one;
//! - `operations`: power operations and their steps.

mod audit;
mod backup;
mod operations;
mod read;
mod schema;
mod writer;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rusqlite::{Connection, ErrorCode};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::event::{Encoded, Event, EventId, Stored};

pub use audit::{HEAD_FILE, verify_audit};
pub use backup::{BackupError, Copied, Restored, backup, restore};
pub use operations::{Finish, OperationRow};
pub use read::Asked;
use read::Readers;
use schema::{Origin, prepare};
pub use writer::{BATCH_MAX, BATCH_WINDOW};
use writer::{Command, Writer};

/// Where the writer hands an event once its transaction has committed: the
/// session's hub, given by the log, so storage knows nothing of who listens
/// (ARCHITECTURE.md, "Layering"). Called on the writer thread, in commit
/// order and before the event's producer hears of it, so it must not block.
pub trait Publish: Send + Sync {
    fn publish(&self, event: Stored);
}

/// A closure is a sink too (tests, and writes nobody listens to).
impl<F: Fn(Stored) + Send + Sync> Publish for F {
    fn publish(&self, event: Stored) {
        self(event)
    }
}

/// Commands waiting for the writer; senders wait beyond this (backpressure).
const QUEUE: usize = 4096;

/// How hard a commit holds on to its data (README "Data, durability and
/// backups").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// `synchronous=NORMAL`: survives a killed process, but on power loss
    /// the last commits may vanish and their ids be given to other events,
    /// under a client that had already seen them. Opt-in.
    Normal,
    /// `synchronous=FULL` (the default): each commit is on disk (the WAL
    /// synced) before it is acknowledged or published, so an id a client
    /// has seen names that event for good. Group commit makes it one sync
    /// per batch, not per event.
    Full,
}

impl Durability {
    /// The `PRAGMA synchronous` value, as SQLite reads it back.
    fn synchronous(self) -> i64 {
        match self {
            Durability::Normal => 1,
            Durability::Full => 2,
        }
    }
}

#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("storage is full: {0}")]
    Full(String),
    #[error("no such session")]
    NoSession,
    #[error("storage failed: {0}")]
    Sqlite(String),
    /// The database file is damaged where this read or write went.
    #[error("storage is damaged: {0}")]
    Corrupt(String),
    #[error("storage is closed")]
    Closed,
    #[error("not written: an earlier write of this turn failed")]
    Fenced,
    #[error("storage is not answering (a stalled or frozen disk); the write is still queued")]
    Stalled,
}

impl StoreError {
    /// The kind of failure, in one word (a label on `/metrics`).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Full(_) => "full",
            StoreError::NoSession => "no-session",
            StoreError::Sqlite(_) => "failed",
            StoreError::Corrupt(_) => "damaged",
            StoreError::Closed => "closed",
            StoreError::Fenced => "fenced",
            StoreError::Stalled => "stalled",
        }
    }
}

/// What the store counts for `GET /metrics` (README "Metrics"). Each is a
/// shared atomic: the writer adds a batch's events in one step.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Events committed to sessions' logs.
    pub events_appended: Counter,
    /// Writes the storage could not make (a full disk, a damaged file, an
    /// I/O error), by [`StoreError::kind`].
    pub write_failures: Family<[(&'static str, &'static str); 1], Counter>,
    /// Times the writer thread died (once at most: the server then stops).
    pub writer_died: Counter,
}

impl Default for Counters {
    /// The failures a write meets are counted from zero, so that a scraper
    /// sees each series (an alert on a full disk) before the first one.
    fn default() -> Self {
        let write_failures = Family::default();
        for kind in ["full", "damaged", "failed"] {
            drop(write_failures.get_or_create(&[("error", kind)]));
        }
        Counters { events_appended: Counter::default(), write_failures, writer_died: Counter::default() }
    }
}

impl Counters {
    fn write_failed(&self, err: &StoreError) {
        self.write_failures.get_or_create(&[("error", err.kind())]).inc();
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        match err.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::Full(err.to_string()),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt(err.to_string()),
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
    #[error(
        "{path}: the file is empty (0 bytes), so whatever it held is gone; refusing to set it up as a new database. \
         To start afresh on purpose, move it aside or delete it (with any breakglass.db-wal and -shm beside it)."
    )]
    Empty { path: PathBuf },
    #[error(
        "{path}: the database is damaged (SQLite's quick_check: {findings}); refusing to start on it. \
         Keep the file, stop here, and recover what it holds into a new one with the sqlite3 shell: \
         `sqlite3 breakglass.db .recover | sqlite3 recovered.db`, then move breakglass.db (with its -wal and -shm) \
         aside and recovered.db into its place."
    )]
    Damaged { path: PathBuf, findings: String },
    #[error(
        "{path}: another breakglass is using this data directory{}; refusing to start a second one on it",
        holder(*pid)
    )]
    InUse { path: PathBuf, pid: Option<u32> },
    #[error("{path}: cannot lock it: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
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
    /// How the caller authenticated; `None` only on records written before
    /// breakglass recorded it.
    pub via: Option<AuthMethod>,
}

/// How a caller authenticated, as the audit trail records it: the name
/// alone cannot tell a proxy user called `bearer` from the bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// The bearer token (`API_BEARER_TOKEN`).
    Bearer,
    /// The user header of a trusted proxy.
    Proxy,
    /// The cookie of the first-run login link.
    Login,
    /// Nobody: the server itself acted (an approval's timeout, a turn's end).
    Server,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Bearer => "bearer",
            AuthMethod::Proxy => "proxy",
            AuthMethod::Login => "login",
            AuthMethod::Server => "server",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [AuthMethod::Bearer, AuthMethod::Proxy, AuthMethod::Login, AuthMethod::Server]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
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
    /// Fires when the writer thread dies (a panic): storage is closed for
    /// good, and the server must stop so that its supervisor restarts it.
    writer_failed: CancellationToken,
    counters: Counters,
}

/// Faults to inject, for tests: read from the environment by debug builds
/// only (the tests run the debug binary); release builds have none.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Faults {
    /// `BREAKGLASS_FAULT_WRITER_PANIC_AFTER=<n>`: the writer thread panics
    /// once it has been given `n` commands.
    #[cfg(debug_assertions)]
    pub writer_panic_after: Option<u64>,
}

impl Faults {
    fn from_env() -> Self {
        #[cfg(debug_assertions)]
        let faults = Faults {
            writer_panic_after: std::env::var("BREAKGLASS_FAULT_WRITER_PANIC_AFTER").ok().and_then(|n| n.parse().ok()),
        };
        #[cfg(not(debug_assertions))]
        let faults = Faults {};
        faults
    }
}

impl Store {
    /// Opens (creating and migrating when needed) `<dir>/breakglass.db` and
    /// starts its writer thread.
    pub fn open(dir: &Path, durability: Durability) -> Result<Store, OpenError> {
        Store::open_with(dir, durability, Faults::from_env())
    }

    pub(crate) fn open_with(dir: &Path, durability: Durability, faults: Faults) -> Result<Store, OpenError> {
        let lock = lock_dir(dir)?;
        // A restore a crash interrupted is finished before the database is
        // opened, or the server would meet it half replaced (README "Data,
        // durability and backups").
        backup::finish_interrupted(dir).map_err(|err| OpenError::Io {
            path: dir.join(backup::JOURNAL),
            source: std::io::Error::other(err.to_string()),
        })?;
        let path = dir.join("breakglass.db");
        let created = match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == 0 => return Err(OpenError::Empty { path }),
            Ok(_) => false,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                create(dir, &path)?;
                true
            }
            Err(err) => return Err(OpenError::Io { path, source: err }),
        };
        let mut conn = Connection::open(&path).map_err(|source| OpenError::Open { path: path.clone(), source })?;
        prepare(&mut conn, &path, if created { Origin::Made } else { Origin::Found })?;
        let anchoring = audit::anchor_agrees(&conn, dir);
        let open_error = |source| OpenError::Open { path: path.clone(), source };
        conn.pragma_update(None, "synchronous", durability.synchronous()).map_err(open_error)?;
        // Read back: what the writer will really do, said at start-up.
        let synchronous: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0)).map_err(open_error)?;
        let name = match synchronous {
            0 => "OFF",
            1 => "NORMAL",
            2 => "FULL",
            3 => "EXTRA",
            _ => "unknown",
        };
        tracing::info!(durability = ?durability, "database durability: synchronous={name} in WAL mode");
        if synchronous != durability.synchronous() {
            return Err(open_error(rusqlite::Error::InvalidParameterName(format!(
                "synchronous is {name}, not what BREAKGLASS_DURABILITY asks for"
            ))));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_failed = CancellationToken::new();
        let counters = Counters::default();
        let writer = Writer::new(conn, dir.to_owned(), anchoring, durability, faults, counters.clone());
        std::thread::Builder::new()
            .name("breakglass-store".into())
            .spawn({
                let (failed, died) = (writer_failed.clone(), counters.writer_died.clone());
                move || {
                    // The writer returns only once every sender is gone (the
                    // store was dropped); anything else is a panic, which
                    // must not leave the server serving with storage closed.
                    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| writer.run(rx))) {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(panic = what, "the storage writer died: storage is closed, the server stops");
                        died.inc();
                        failed.cancel();
                    }
                }
            })
            .map_err(|e| OpenError::Open {
                path: path.clone(),
                source: rusqlite::Error::InvalidPath(e.to_string().into()),
            })?;
        Ok(Store { _lock: lock, readers: Arc::new(Readers::new(path.clone())), path, tx, writer_failed, counters })
    }

    /// Fires when the writer thread has died: every write from then on is
    /// refused, so the server should stop (with an error) and be restarted.
    pub fn writer_failed(&self) -> CancellationToken {
        self.writer_failed.clone()
    }

    /// Times the writer thread died.
    pub fn writer_failures(&self) -> u64 {
        self.counters.writer_died.get()
    }

    /// What the store counts (README "Metrics").
    pub fn counters(&self) -> &Counters {
        &self.counters
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
    /// returned [`Pending`] for its id once it is committed (and published to
    /// `sink`).
    pub async fn submit(
        &self,
        session: Uuid,
        event: Event,
        sink: Arc<dyn Publish>,
        fence: Option<Fence>,
    ) -> Result<Pending, StoreError> {
        let (reply, rx) = oneshot::channel();
        // Encoded here, on the producer's task, not on the writer thread.
        let (encoded, effect) = (Encoded::new(&event), writer::Effect::of(&event));
        self.send(Command::Append { session, encoded, effect, sink, fence, reply }).await?;
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

pub use crate::util::now_ms;

/// Creates a new database under a temporary name and renames it into place
/// once it is set up, so that an empty `breakglass.db` is never one of ours
/// half made (and can be refused as damage).
fn create(dir: &Path, path: &Path) -> Result<(), OpenError> {
    let fresh = dir.join("breakglass.db.new");
    let io = |source| OpenError::Io { path: fresh.clone(), source };
    for leftover in ["breakglass.db.new", "breakglass.db.new-wal", "breakglass.db.new-shm"] {
        match std::fs::remove_file(dir.join(leftover)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(io(err)),
            _ => {}
        }
    }
    let open = |source| OpenError::Open { path: fresh.clone(), source };
    let mut conn = Connection::open(&fresh).map_err(open)?;
    // Nothing names this file until the rename below, which follows one
    // sync of the whole file: a sync at each of SQLite's steps would keep
    // nothing more (a crash before the rename leaves a `.new` file, removed
    // above at the next start), and a dozen of them were most of a first
    // start's time.
    conn.pragma_update(None, "synchronous", "OFF").map_err(open)?;
    prepare(&mut conn, &fresh, Origin::Made)?;
    // Closing the last connection checkpoints the WAL into the file and
    // removes it: the file alone is the whole database.
    conn.close().map_err(|(_, source)| open(source))?;
    std::fs::File::open(&fresh).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&fresh, path).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    tracing::info!(path = %path.display(), "created a new database");
    Ok(())
}

/// An exclusive lock on `<dir>/breakglass.lock`, released when the process
/// ends however it ends: two servers on one database would fight over ids,
/// and `breakglass restore` takes it too, so that no server starts on a
/// database being replaced. The holder writes its pid in the file, so that
/// whoever is refused can say who holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, OpenError> {
    let path = dir.join("breakglass.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| OpenError::Lock { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => {
            use std::io::Write;
            // The pid is only a hint for the message above: failing to
            // write it takes nothing from the lock.
            let _ = file.set_len(0).and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()));
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).ok().and_then(|text| text.trim().parse().ok());
            Err(OpenError::InUse { path: dir.to_owned(), pid })
        }
        Err(std::fs::TryLockError::Error(source)) => Err(OpenError::Lock { path, source }),
    }
}

/// " (pid N)" when the lock's holder is known.
fn holder(pid: Option<u32>) -> String {
    pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        (dir, store)
    }

    /// A sink for events nobody is attached to.
    pub(super) fn nobody() -> Arc<dyn Publish> {
        Arc::new(|_: Stored| ())
    }

    async fn append(store: &Store, session: Uuid, event: Event) -> Result<Stored, StoreError> {
        store.submit(session, event, nobody(), None).await?.committed().await
    }

    #[tokio::test]
    async fn events_get_consecutive_ids_and_read_back() {
        let (_dir, store) = open();
        let id = store.create_session(Uuid::new_v4()).await.unwrap().id;
        let mut pending = Vec::new();
        for i in 0..1000 {
            pending.push(
                store
                    .submit(id, Event::Text { text: i.to_string(), message_id: None, index: None }, nobody(), None)
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
        let stray = store.submit(Uuid::new_v4(), Event::TurnEnd, nobody(), None).await.unwrap();
        let fine = store.submit(id, Event::TurnEnd, nobody(), None).await.unwrap();
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
            let record = audit::tests::sample_record(i);
            assert_eq!(store.audit(record).await.unwrap().seq, i as i64 + 1);
        }
        assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 5 });
        let conn = Connection::open(dir.path().join("breakglass.db")).unwrap();
        conn.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 3", []).unwrap();
        assert!(matches!(verify_audit(dir.path()).unwrap(), AuditCheck::Broken { seq: 3, .. }));
    }

    /// A writer that dies is noticed: its token fires, it is counted, and
    /// writes are refused from then on rather than waiting for ever.
    #[tokio::test]
    async fn a_dead_writer_fires_its_token_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults { writer_panic_after: Some(2) };
        let store = Store::open_with(dir.path(), Durability::Normal, faults).unwrap();
        let failed = store.writer_failed();
        let id = store.create_session(Uuid::new_v4()).await.unwrap().id;
        assert_eq!(store.writer_failures(), 0);
        assert!(matches!(append(&store, id, Event::TurnEnd).await, Err(StoreError::Closed)));
        tokio::time::timeout(std::time::Duration::from_secs(10), failed.cancelled()).await.expect("the token fires");
        assert_eq!(store.writer_failures(), 1);
        assert!(matches!(store.create_session(Uuid::new_v4()).await, Err(StoreError::Closed)));
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
