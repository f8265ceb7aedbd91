//! The database file: what makes it breakglass's, and its migrations.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use super::OpenError;
use super::audit::anchor_before_migrating;

/// `PRAGMA application_id` of a breakglass database ("BGLS").
pub(super) const APPLICATION_ID: i32 = 0x4247_4c53;

/// Schema migrations; `PRAGMA user_version` is how many have been applied.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 3: no change to the tables: from here on the audit trail's head is
    // anchored in <data>/audit.head (see `audit`), written just before this
    // migration is applied.
    "-- the audit head is anchored from here on",
    // 4: how each audit record's caller authenticated (NULL on older records).
    "ALTER TABLE audit ADD COLUMN via TEXT;",
    // 5: power operations (README "Operations") and their steps, as their
    // attached clients receive them.
    "CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        verb TEXT NOT NULL,
        state TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        result TEXT,
        error TEXT,
        recovered_after_ms INTEGER
    );
    CREATE INDEX operations_running ON operations (state) WHERE state = 'running';
    CREATE TABLE operation_steps (
        operation TEXT NOT NULL,
        id INTEGER NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (operation, id)
    ) WITHOUT ROWID;",
];

/// Where the file being prepared comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// Found in the data directory: checked (`quick_check`) when it holds a
    /// schema.
    Found,
    /// Just made by `create`: not checked, and its directory is synced by
    /// `create` once the database is in place.
    Made,
}

/// Refuses files that are not ours or are newer; creates or migrates ours.
pub(super) fn prepare(conn: &mut Connection, path: &Path, origin: Origin) -> Result<(), OpenError> {
    let corrupt = |source| OpenError::Corrupt { path: path.to_owned(), source };
    conn.busy_timeout(Duration::from_secs(5)).map_err(corrupt)?;
    let version = check_identity(conn, path)?;
    if version > 0 && origin == Origin::Found {
        quick_check(conn, path, QUICK_CHECK_WITHIN)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL").map_err(corrupt)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    anchor_before_migrating(conn, dir, version, origin == Origin::Made)?;
    // Every pending migration in one transaction: a file is at one schema
    // or the next, never in between, and a new database costs one commit.
    let pending = &MIGRATIONS[version as usize..];
    if pending.is_empty() {
        return Ok(());
    }
    let migrate = |source| OpenError::Migrate { path: path.to_owned(), source };
    let tx = conn.transaction().map_err(migrate)?;
    for sql in pending {
        tx.execute_batch(sql).map_err(migrate)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(migrate)?;
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64).map_err(migrate)?;
    tx.commit().map_err(migrate)?;
    tracing::info!(path = %path.display(), from = version, schema = MIGRATIONS.len(), "database schema migrated");
    Ok(())
}

/// Longest the start-up check of the database may take: on a huge file it
/// is cut short (and the server starts unchecked) rather than keep the
/// console down.
const QUICK_CHECK_WITHIN: Duration = Duration::from_secs(5);

/// How the start-up check ended when it found no damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checked {
    Sound,
    /// Cut short after the time allowed.
    TimedOut,
}

/// `PRAGMA quick_check` (every page and b-tree is well formed; cheaper than
/// `integrity_check`, which also matches indexes to tables), bounded in time
/// by interrupting it from a watchdog thread. Damage refuses the file.
pub(super) fn quick_check(conn: &Connection, path: &Path, within: Duration) -> Result<Checked, OpenError> {
    let interrupt = conn.get_interrupt_handle();
    let (finished, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let timed_out = watch.recv_timeout(within) == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
        if timed_out {
            interrupt.interrupt();
        }
        timed_out
    });
    let started = std::time::Instant::now();
    let findings = (|| {
        let mut stmt = conn.prepare("PRAGMA quick_check(10)")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    })();
    drop(finished);
    let timed_out = watchdog.join().unwrap_or(false);
    let damaged = |findings: String| OpenError::Damaged { path: path.to_owned(), findings };
    match findings {
        Ok(findings) if findings.iter().all(|f| f == "ok") => {
            tracing::info!(took = ?started.elapsed(), "database checked (quick_check): sound");
            Ok(Checked::Sound)
        }
        Ok(findings) => Err(damaged(findings.join("; "))),
        Err(err) if err.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) && timed_out => {
            tracing::warn!(
                ?within,
                "the database check (quick_check) took too long and was cut short; starting unchecked"
            );
            Ok(Checked::TimedOut)
        }
        Err(err) if matches!(err.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)) => {
            Err(damaged(err.to_string()))
        }
        Err(source) => Err(OpenError::Open { path: path.to_owned(), source }),
    }
}

/// The schema version of a database that is ours (0 for an empty one).
pub(super) fn check_identity(conn: &Connection, path: &Path) -> Result<i64, OpenError> {
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
