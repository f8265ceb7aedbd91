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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, params};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::event::{Event, EventId, Stored};
use crate::hub::Hub;

/// Most commands in one transaction.
pub const BATCH_MAX: usize = 512;
/// Longest a batch stays open while commands keep arriving.
pub const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Commands waiting for the writer; senders wait beyond this (backpressure).
const QUEUE: usize = 4096;
/// Read connections kept open.
const READERS: usize = 4;
/// A page of events stops once it holds this many bytes (at least one event).
const READ_BUDGET: usize = 4 * 1024 * 1024;
/// Sessions whose next event id the writer remembers; beyond that it
/// forgets them all and reads each again when next written.
const ID_CACHE: usize = 10_000;

/// `PRAGMA application_id` of a breakglass database ("BGLS").
const APPLICATION_ID: i32 = 0x4247_4c53;

/// Schema migrations; `PRAGMA user_version` is how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: sessions, events, audit.
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL,
        title TEXT,
        agent_started INTEGER NOT NULL DEFAULT 0,
        last_activity_ms INTEGER NOT NULL,
        event_count INTEGER NOT NULL DEFAULT 0,
        turn_running INTEGER NOT NULL DEFAULT 0,
        turn_pgid INTEGER
    );
    CREATE INDEX sessions_by_created ON sessions (created_ms DESC);
    CREATE INDEX sessions_running ON sessions (turn_running) WHERE turn_running = 1;
    CREATE TABLE events (
        session TEXT NOT NULL,
        id INTEGER NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (session, id)
    ) WITHOUT ROWID;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        identity TEXT NOT NULL,
        peer TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );",
    // 2: the running turn's environment marker, to find its processes after a crash.
    "ALTER TABLE sessions ADD COLUMN turn_marker TEXT;",
];

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
}

enum Command {
    CreateSession {
        id: Uuid,
        now: i64,
        reply: oneshot::Sender<Result<SessionRow, StoreError>>,
    },
    Append {
        session: Uuid,
        event: Event,
        hub: Arc<Hub>,
        fence: Option<Fence>,
        reply: oneshot::Sender<Result<Stored, StoreError>>,
    },
    SetTurn {
        session: Uuid,
        pgid: Option<i32>,
        marker: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Audit {
        record: AuditRecord,
        reply: oneshot::Sender<Result<AuditEntry, StoreError>>,
    },
}

#[derive(Debug)]
pub struct Store {
    /// Held for the store's life: one server per data directory.
    _lock: std::fs::File,
    path: PathBuf,
    tx: mpsc::Sender<Command>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::CreateSession { .. } => "CreateSession",
            Command::Append { .. } => "Append",
            Command::SetTurn { .. } => "SetTurn",
            Command::Audit { .. } => "Audit",
        })
    }
}

impl Store {
    /// Opens (creating and migrating when needed) `<dir>/breakglass.db` and
    /// starts its writer thread.
    pub fn open(dir: &Path, durability: Durability) -> Result<Store, OpenError> {
        let lock = lock_dir(dir)?;
        let path = dir.join("breakglass.db");
        let mut conn = Connection::open(&path).map_err(|source| OpenError::Open { path: path.clone(), source })?;
        prepare(&mut conn, &path)?;
        let synchronous = match durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(|source| OpenError::Open { path: path.clone(), source })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new().name("breakglass-store".into()).spawn(move || Writer::new(conn).run(rx)).map_err(
            |e| OpenError::Open { path: path.clone(), source: rusqlite::Error::InvalidPath(e.to_string().into()) },
        )?;
        Ok(Store { _lock: lock, path, tx, readers: Mutex::new(Vec::new()) })
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

    /// Up to `limit` events of a session with id > `after`, in order.
    pub async fn read_after(
        &self,
        session: Uuid,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        self.read(move |conn| {
            let start = after.map_or(0, |a| a.saturating_add(1));
            let mut stmt = conn
                .prepare_cached("SELECT id, json FROM events WHERE session = ?1 AND id >= ?2 ORDER BY id LIMIT ?3")?;
            let mut rows = stmt.query(params![session.to_string(), to_sql(start), limit as i64])?;
            let (mut page, mut bytes) = (Vec::new(), 0);
            while let Some(row) = rows.next()? {
                let json: String = row.get(1)?;
                bytes += json.len();
                page.push(Stored { id: row.get::<_, i64>(0)? as EventId, json: json.into() });
                if bytes >= READ_BUDGET {
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    pub async fn session(&self, id: Uuid) -> Result<Option<SessionRow>, StoreError> {
        self.read(move |conn| {
            let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1");
            Ok(conn.query_row(&sql, [id.to_string()], session_row).optional()?)
        })
        .await
    }

    /// Newest first; `before` (a session of the previous page, usually its
    /// last) pages on creation time, then id, so that sessions created in
    /// the same millisecond are neither skipped nor repeated.
    pub async fn sessions(&self, before: Option<&SessionRow>, limit: usize) -> Result<Vec<SessionRow>, StoreError> {
        let (before_ms, before_id) = before.map_or((i64::MAX, String::new()), |r| (r.created_ms, r.id.to_string()));
        self.read(move |conn| {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE (created_ms, id) < (?1, ?2)
                 ORDER BY created_ms DESC, id DESC LIMIT ?3"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![before_ms, before_id, limit as i64], session_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Sessions whose last turn was never closed (the server died during it).
    pub async fn interrupted(&self) -> Result<Vec<SessionRow>, StoreError> {
        self.read(|conn| {
            let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE turn_running = 1");
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map([], session_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Newest first; `before` pages by sequence number.
    pub async fn audit_page(&self, before: Option<i64>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, at_ms, identity, peer, action, target, outcome, prev_hash, hash FROM audit
                 WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![before.unwrap_or(i64::MAX), limit as i64], audit_entry)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Runs `f` on a read connection, off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let path = self.path.clone();
        let (result, conn) = tokio::task::spawn_blocking(move || {
            let conn = match pooled {
                Some(conn) => conn,
                None => match open_reader(&path) {
                    Ok(conn) => conn,
                    Err(err) => return (Err(err), None),
                },
            };
            (f(&conn), Some(conn))
        })
        .await
        .map_err(|e| StoreError::Sqlite(format!("reader task failed: {e}")))?;
        if let Some(conn) = conn {
            let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            if readers.len() < READERS {
                readers.push(conn);
            }
        }
        result
    }
}

/// Checks the audit chain of the database in `dir`, read-only.
pub fn verify_audit(dir: &Path) -> Result<AuditCheck, OpenError> {
    let path = dir.join("breakglass.db");
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| OpenError::Open { path: path.clone(), source })?;
    check_identity(&conn, &path)?;
    let corrupt = |source| OpenError::Corrupt { path: path.clone(), source };
    let mut stmt = conn
        .prepare("SELECT seq, at_ms, identity, peer, action, target, outcome, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(corrupt)?;
    let mut rows = stmt.query([]).map_err(corrupt)?;
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1;
    let mut records = 0;
    while let Some(row) = rows.next().map_err(corrupt)? {
        let entry = audit_entry(row).map_err(corrupt)?;
        if entry.seq != expected_seq {
            return Ok(AuditCheck::Broken { seq: entry.seq, why: format!("record {expected_seq} is missing") });
        }
        if entry.prev_hash != prev {
            return Ok(AuditCheck::Broken { seq: entry.seq, why: "it does not follow the record before it".into() });
        }
        if chain_hash(&prev, entry.seq, entry.at_ms, &entry.record) != entry.hash {
            return Ok(AuditCheck::Broken {
                seq: entry.seq,
                why: "its contents were changed after it was written".into(),
            });
        }
        prev = entry.hash;
        expected_seq += 1;
        records += 1;
    }
    Ok(AuditCheck::Intact { records })
}

/// The `prev_hash` of the first audit record.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 over the previous hash and the record's fields, encoded as a JSON
/// array so that no choice of field contents can collide with another.
fn chain_hash(prev: &str, seq: i64, at_ms: i64, r: &AuditRecord) -> String {
    let fields = serde_json::json!([prev, seq, at_ms, r.identity, r.peer, r.action, r.target, r.outcome]);
    let digest = Sha256::digest(fields.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

const SESSION_COLUMNS: &str =
    "id, created_ms, title, agent_started, last_activity_ms, event_count, turn_running, turn_pgid, turn_marker";

fn session_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    let id: String = row.get(0)?;
    Ok(SessionRow {
        id: Uuid::parse_str(&id)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?,
        created_ms: row.get(1)?,
        title: row.get(2)?,
        agent_started: row.get(3)?,
        last_activity_ms: row.get(4)?,
        event_count: row.get::<_, i64>(5)? as u64,
        turn_running: row.get(6)?,
        turn_pgid: row.get(7)?,
        turn_marker: row.get(8)?,
    })
}

fn audit_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        record: AuditRecord {
            identity: row.get(2)?,
            peer: row.get(3)?,
            action: row.get(4)?,
            target: row.get(5)?,
            outcome: row.get(6)?,
        },
        prev_hash: row.get(7)?,
        hash: row.get(8)?,
    })
}

fn to_sql(id: EventId) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
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

/// Refuses files that are not ours or are newer; creates or migrates ours.
fn prepare(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let corrupt = |source| OpenError::Corrupt { path: path.to_owned(), source };
    conn.busy_timeout(Duration::from_secs(5)).map_err(corrupt)?;
    let version = check_identity(conn, path)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(corrupt)?;
    let migrate = |source| OpenError::Migrate { path: path.to_owned(), source };
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(migrate)?;
        tx.execute_batch(sql).map_err(migrate)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(migrate)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(migrate)?;
        tx.commit().map_err(migrate)?;
        tracing::info!(path = %path.display(), schema = i + 1, "database schema migrated");
    }
    Ok(())
}

/// The schema version of a database that is ours (0 for an empty one).
fn check_identity(conn: &Connection, path: &Path) -> Result<i64, OpenError> {
    let corrupt = |source| OpenError::Corrupt { path: path.to_owned(), source };
    let application_id: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0)).map_err(corrupt)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(corrupt)?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(corrupt)?;
    let known = MIGRATIONS.len() as i64;
    match application_id {
        0 if tables == 0 && version == 0 => Ok(0),
        APPLICATION_ID if version > known => Err(OpenError::Newer { path: path.to_owned(), found: version, known }),
        APPLICATION_ID => Ok(version),
        found => Err(OpenError::Foreign { path: path.to_owned(), found }),
    }
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    /// Next event id per session, as committed.
    next_ids: HashMap<Uuid, u64>,
    /// Sequence number and hash of the last committed audit record.
    audit_tail: Option<(i64, String)>,
}

/// Changes made by the open transaction, applied to the writer's state only
/// once it commits.
#[derive(Default)]
struct Staged {
    next_ids: HashMap<Uuid, u64>,
    audit_tail: Option<(i64, String)>,
}

/// What a command did inside a transaction that then committed.
enum Done {
    Session(SessionRow),
    Event(Stored),
    Nothing,
    Audit(AuditEntry),
    /// The command's own input was wrong; the rest of the batch stands.
    Refused(StoreError),
}

impl Command {
    /// Answers the sender. A committed event is published to its attached
    /// clients first, in commit order.
    fn answer(self, outcome: Result<Done, StoreError>) {
        // A sender that has gone (a client disconnected) needs no answer.
        match (self, outcome) {
            (Command::CreateSession { reply, .. }, Ok(Done::Session(row))) => drop(reply.send(Ok(row))),
            (Command::Append { hub, reply, .. }, Ok(Done::Event(stored))) => {
                hub.publish(stored.clone());
                drop(reply.send(Ok(stored)));
            }
            (Command::SetTurn { reply, .. }, Ok(Done::Nothing)) => drop(reply.send(Ok(()))),
            (Command::Audit { reply, .. }, Ok(Done::Audit(entry))) => drop(reply.send(Ok(entry))),
            (command, Ok(Done::Refused(err)) | Err(err)) => command.fail(err),
            (command, Ok(_)) => command.fail(StoreError::Sqlite("internal: mismatched answer".into())),
        }
    }

    fn fail(self, err: StoreError) {
        match self {
            Command::CreateSession { reply, .. } => drop(reply.send(Err(err))),
            Command::Append { reply, .. } => drop(reply.send(Err(err))),
            Command::SetTurn { reply, .. } => drop(reply.send(Err(err))),
            Command::Audit { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

impl Writer {
    fn new(conn: Connection) -> Self {
        Writer { conn, next_ids: HashMap::new(), audit_tail: None }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let opened = Instant::now();
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX && opened.elapsed() < BATCH_WINDOW {
                match rx.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.apply(batch);
        }
        // Every sender is gone: the server is stopping. Leave a clean file.
        if let Err(err) = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
            tracing::warn!(%err, "could not checkpoint the database on close");
        }
    }

    /// One transaction for the whole batch; on failure nothing of it is kept
    /// and every command in it is told why.
    fn apply(&mut self, batch: Vec<Command>) {
        let mut staged = Staged::default();
        let mut done = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction()?;
            for command in &batch {
                done.push(execute(&tx, &self.next_ids, &self.audit_tail, &mut staged, command)?);
            }
            tx.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                if self.next_ids.len() > ID_CACHE {
                    self.next_ids.clear();
                }
                self.next_ids.extend(staged.next_ids);
                if staged.audit_tail.is_some() {
                    self.audit_tail = staged.audit_tail;
                }
                for (command, done) in batch.into_iter().zip(done) {
                    command.answer(Ok(done));
                }
            }
            Err(err) => {
                tracing::error!(%err, commands = batch.len(), "a storage transaction failed; its writes are refused");
                for command in batch {
                    if let Command::Append { fence: Some(fence), .. } = &command {
                        fence.trip();
                    }
                    command.answer(Err(err.clone()));
                }
            }
        }
    }
}

/// Runs one command inside the open transaction; an error aborts the batch.
fn execute(
    tx: &Transaction<'_>,
    next_ids: &HashMap<Uuid, u64>,
    audit_tail: &Option<(i64, String)>,
    staged: &mut Staged,
    command: &Command,
) -> Result<Done, StoreError> {
    match command {
        Command::CreateSession { id, now, .. } => {
            tx.prepare_cached("INSERT INTO sessions (id, created_ms, last_activity_ms) VALUES (?1, ?2, ?2)")?
                .execute(params![id.to_string(), now])?;
            staged.next_ids.insert(*id, 0);
            Ok(Done::Session(SessionRow {
                id: *id,
                created_ms: *now,
                title: None,
                agent_started: false,
                last_activity_ms: *now,
                event_count: 0,
                turn_running: false,
                turn_pgid: None,
                turn_marker: None,
            }))
        }
        Command::Append { fence: Some(fence), .. } if fence.is_tripped() => Ok(Done::Refused(StoreError::Fenced)),
        Command::Append { session, event, .. } => {
            let next = match staged.next_ids.get(session).or_else(|| next_ids.get(session)) {
                Some(next) => Some(*next),
                None => tx
                    .prepare_cached("SELECT event_count FROM sessions WHERE id = ?1")?
                    .query_row([session.to_string()], |r| r.get::<_, i64>(0))
                    .optional()?
                    .map(|n| n as u64),
            };
            let Some(id) = next else {
                return Ok(Done::Refused(StoreError::NoSession));
            };
            let stored = Stored::new(id, event);
            let sid = session.to_string();
            tx.prepare_cached("INSERT INTO events (session, id, json) VALUES (?1, ?2, ?3)")?.execute(params![
                sid,
                to_sql(id),
                &*stored.json
            ])?;
            tx.prepare_cached("UPDATE sessions SET event_count = ?2, last_activity_ms = ?3 WHERE id = ?1")?
                .execute(params![sid, to_sql(id + 1), now_ms()])?;
            // What an event means for its session's row.
            match event {
                Event::User { text, .. } => {
                    let title: String = text.trim().chars().take(TITLE_CHARS).collect();
                    tx.prepare_cached(
                        "UPDATE sessions SET turn_running = 1, title = coalesce(title, ?2) WHERE id = ?1",
                    )?
                    .execute(params![sid, title])?;
                }
                Event::Session { .. } => {
                    tx.prepare_cached("UPDATE sessions SET agent_started = 1 WHERE id = ?1")?.execute([&sid])?;
                }
                Event::TurnEnd => {
                    tx.prepare_cached(
                        "UPDATE sessions SET turn_running = 0, turn_pgid = NULL, turn_marker = NULL WHERE id = ?1",
                    )?
                    .execute([&sid])?;
                }
                _ => {}
            }
            staged.next_ids.insert(*session, id + 1);
            Ok(Done::Event(stored))
        }
        Command::SetTurn { session, pgid, marker, .. } => {
            tx.prepare_cached("UPDATE sessions SET turn_pgid = ?2, turn_marker = ?3 WHERE id = ?1")?
                .execute(params![session.to_string(), pgid, marker])?;
            Ok(Done::Nothing)
        }
        Command::Audit { record, .. } => {
            let (prev_seq, prev_hash) = match staged.audit_tail.clone().or_else(|| audit_tail.clone()) {
                Some(tail) => tail,
                None => tx
                    .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })
                    .optional()?
                    .unwrap_or_else(|| (0, GENESIS.to_owned())),
            };
            let seq = prev_seq + 1;
            let at_ms = now_ms();
            let hash = chain_hash(&prev_hash, seq, at_ms, record);
            tx.prepare_cached(
                "INSERT INTO audit (seq, at_ms, identity, peer, action, target, outcome, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                seq,
                at_ms,
                record.identity,
                record.peer,
                record.action,
                record.target,
                record.outcome,
                prev_hash,
                hash
            ])?;
            staged.audit_tail = Some((seq, hash.clone()));
            Ok(Done::Audit(AuditEntry { seq, at_ms, record: record.clone(), prev_hash, hash }))
        }
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
            pending.push(store.submit(id, Event::Text { text: i.to_string() }, hub, None).await.unwrap());
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
