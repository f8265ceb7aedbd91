//! Reads: replays, lists and the audit page, on a small pool of read-only
//! connections (WAL lets them run beside the writer).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{AuditEntry, AuditRecord, AuthMethod, SessionRow, Store, StoreError, to_sql};
use crate::event::{EventId, Stored};

/// A tool call asked of the operator, as the log shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    pub tool_use_id: String,
    pub tool: String,
    pub input: serde_json::Value,
    pub decided: bool,
}

/// Read connections, at most; readers beyond these wait for one.
const READERS: usize = 4;
/// A page of events stops once it holds this many bytes (at least one event).
const READ_BUDGET: usize = 4 * 1024 * 1024;

impl Store {
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

    /// Hands `each` (with `state`) the events of a session with id >
    /// `after`, in order, until it returns false or `budget` bytes of JSON
    /// went by (at least one event), and returns `state` with the session's
    /// event count. The rows
    /// are borrowed from SQLite, never copied, and read in one transaction
    /// with the count: a count beyond the last row read is rows missing,
    /// not rows committed since (the attach stream's replay, ARCHITECTURE.md
    /// `sse`, tells the two apart this way).
    pub async fn scan_after<S, F>(
        &self,
        session: Uuid,
        after: Option<EventId>,
        budget: usize,
        mut state: S,
        each: F,
    ) -> Result<(S, EventId), StoreError>
    where
        S: Send + 'static,
        F: Fn(&mut S, EventId, &str) -> bool + Send + 'static,
    {
        self.read(move |conn| {
            let snapshot = conn.unchecked_transaction()?;
            let session = session.to_string();
            let count: i64 = snapshot
                .prepare_cached("SELECT event_count FROM sessions WHERE id = ?1")?
                .query_row([&session], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            let start = after.map_or(0, |a| a.saturating_add(1));
            // No LIMIT: the loop stops reading, and a bound LIMIT would make
            // SQLite re-prepare the statement on every use (see `open_reader`).
            let mut stmt =
                snapshot.prepare_cached("SELECT id, json FROM events WHERE session = ?1 AND id >= ?2 ORDER BY id")?;
            let mut rows = stmt.query(params![session, to_sql(start)])?;
            let mut bytes = 0;
            while let Some(row) = rows.next()? {
                let json = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
                bytes += json.len();
                if !each(&mut state, row.get::<_, i64>(0)? as EventId, json) || bytes >= budget {
                    break;
                }
            }
            Ok((state, count as EventId))
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

    /// The tool calls asked of the operator in a session (README
    /// "Approvals"), all of them or the one with `tool_use_id`, oldest
    /// first, each with whether its decision is in the log.
    pub async fn approvals(&self, session: Uuid, tool_use_id: Option<String>) -> Result<Vec<Asked>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT a.json ->> '$.tool_use_id', a.json ->> '$.tool', a.json -> '$.input',
                    EXISTS (SELECT 1 FROM events d WHERE d.session = a.session AND d.id > a.id
                            AND d.json ->> '$.kind' = 'approval_decision'
                            AND d.json ->> '$.tool_use_id' = a.json ->> '$.tool_use_id')
                 FROM events a
                 WHERE a.session = ?1 AND a.json ->> '$.kind' = 'approval'
                   AND (?2 IS NULL OR a.json ->> '$.tool_use_id' = ?2)
                 ORDER BY a.id",
            )?;
            let rows = stmt.query_map(params![session.to_string(), tool_use_id], |row| {
                let input: Option<String> = row.get(2)?;
                Ok(Asked {
                    tool_use_id: row.get(0)?,
                    tool: row.get(1)?,
                    input: input.and_then(|i| serde_json::from_str(&i).ok()).unwrap_or_default(),
                    decided: row.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Newest first; `before` pages by sequence number.
    pub async fn audit_page(&self, before: Option<i64>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![before.unwrap_or(i64::MAX), limit as i64], audit_entry)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Runs `f` on a read connection, off the async threads. Callers wait
    /// for one of the [`READERS`] connections: a thousand clients replaying
    /// at once cost four connections and four blocking threads, not a
    /// thousand of each (SQLite cannot close a connection's descriptors
    /// while another connection of the process holds a lock on the file, so
    /// every extra connection ever opened would stay open).
    pub(super) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = self.readers.permits.clone().acquire_owned().await.map_err(|_| StoreError::Closed)?;
        let readers = self.readers.clone();
        // The permit and the connection go back to the pool in the blocking
        // task itself, so a caller that gives up (a client that left) never
        // loses one.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match readers.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                Some(conn) => conn,
                None => open_reader(&readers.path)?,
            };
            let result = f(&conn);
            readers.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Sqlite(format!("reader task failed: {e}")))?
    }
}

pub(super) const SESSION_COLUMNS: &str =
    "id, created_ms, title, agent_started, last_activity_ms, event_count, turn_running, turn_pgid, turn_marker";

pub(super) fn session_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
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

pub(super) const AUDIT_COLUMNS: &str = "seq, at_ms, identity, peer, action, target, outcome, prev_hash, hash, via";
/// Where `via` is in [`AUDIT_COLUMNS`].
pub(super) const VIA_COLUMN: usize = 9;

pub(super) fn audit_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
    let via = match row.get::<_, Option<String>>(VIA_COLUMN)? {
        None => None,
        Some(text) => Some(AuthMethod::parse(&text).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                VIA_COLUMN,
                rusqlite::types::Type::Text,
                format!("unknown authentication method {text:?}").into(),
            )
        })?),
    };
    Ok(AuditEntry {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        record: AuditRecord {
            identity: row.get(2)?,
            peer: row.get(3)?,
            action: row.get(4)?,
            target: row.get(5)?,
            outcome: row.get(6)?,
            via,
        },
        prev_hash: row.get(7)?,
        hash: row.get(8)?,
    })
}

/// The read connections: opened when first needed, at most [`READERS`],
/// each lent to one read at a time.
#[derive(Debug)]
pub(super) struct Readers {
    path: PathBuf,
    /// One per connection that may be open; a read holds one while it runs.
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(super) fn new(path: PathBuf) -> Self {
        Readers { path, permits: Arc::new(Semaphore::new(READERS)), idle: Mutex::new(Vec::with_capacity(READERS)) }
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // A statement whose plan may depend on a bound value (a `LIMIT ?`, a
    // range on an indexed column with STAT4) is otherwise re-prepared
    // whenever that value changes, which is every page of a replay: the
    // cached statement would be parsed and planned again each time. Our
    // plans never depend on the values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    /// Regression: the replay's page statement (`LIMIT ?`) was parsed and
    /// planned again on every page, because SQLite re-prepares a statement
    /// whose plan may depend on a bound value each time that value changes.
    #[tokio::test]
    async fn a_cached_read_statement_is_not_prepared_again_for_new_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        let reprepared = store
            .read(|conn| {
                let sql = "SELECT id, json FROM events WHERE session = ?1 AND id >= ?2 ORDER BY id LIMIT ?3";
                for (start, limit) in [(0, 256), (256, 256), (512, 100)] {
                    let mut stmt = conn.prepare_cached(sql)?;
                    let mut rows = stmt.query(params!["s", start, limit])?;
                    while rows.next()?.is_some() {}
                }
                let stmt = conn.prepare_cached(sql)?;
                Ok(stmt.get_status(rusqlite::StatementStatus::RePrepare))
            })
            .await
            .unwrap();
        assert_eq!(reprepared, 0);
    }
}
