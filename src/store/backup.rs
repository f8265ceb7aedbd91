//! Backups: a consistent copy of the live database, made with SQLite's
//! online backup API while the server runs, and restoring one into a data
//! directory no server holds (README "Data, durability and backups").
//!
//! The audit trail's head anchor lives outside the database (`audit.head`,
//! see `audit`), so a copy of the database alone would either fail `audit
//! verify` (no anchor) or pass it for the wrong reason (an anchor made up
//! from the copy). A backup therefore carries its anchor inside the file: the
//! copy's last audit record, once its chain was checked against the live
//! anchor, in a one-row table `breakglass_backup` that restore moves back
//! out into `audit.head`. One file, nothing to lose on the way.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::Backup;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};
use thiserror::Error;

use super::audit::{Head, chain_head, head_path, read_head, verify_chain};
use super::schema::check_identity;
use super::{AuditCheck, OpenError, holder, lock_dir};
use crate::files::{match_parent_owner, write_atomically};
use crate::util::{now_ms, random_token, rfc3339};

/// The table a backup carries its audit head anchor in.
const ANCHOR_TABLE: &str = "breakglass_backup";

/// Pages copied at a time, and the pause between two steps: the copy reads
/// one snapshot throughout (see [`backup`]), so the pause only leaves the
/// disk to the server's writer now and then.
const PAGES_PER_STEP: i32 = 1024;
const PAUSE: Duration = Duration::from_millis(5);

/// Why a backup could not be made, or a file cannot be restored. Nothing is
/// left at the backup's path, and nothing in the data directory changed.
#[derive(Debug, Error)]
pub enum BackupError {
    #[error("{path} already exists; give --force to replace it")]
    Exists { path: PathBuf },
    #[error("{path}: no breakglass database here; give the server's --data-dir")]
    NoDatabase { path: PathBuf },
    #[error("{path}: no such directory; give --create to make it")]
    NoDataDir { path: PathBuf },
    #[error("{path}: a breakglass server{} is using this data directory; stop it before restoring (nothing was changed)", holder(*pid))]
    InUse { path: PathBuf, pid: Option<u32> },
    /// The live database cannot be used (foreign, newer, damaged, …).
    #[error(transparent)]
    Live(OpenError),
    #[error("{path}: not a usable SQLite database ({source}); refusing it")]
    Unreadable { path: PathBuf, source: rusqlite::Error },
    #[error("{path}: an SQLite database that is not breakglass's (application_id {found:#x}); refusing it")]
    Foreign { path: PathBuf, found: i32 },
    #[error("{path}: written by a newer breakglass (schema {found}, this one knows up to {known}); use that version")]
    Newer { path: PathBuf, found: i64, known: i64 },
    #[error("{path}: the database is damaged (SQLite's integrity_check: {findings}); refusing it")]
    Damaged { path: PathBuf, findings: String },
    #[error(
        "{path}: not a breakglass backup (it carries no audit head anchor: a database copied by hand?); \
         make backups with `breakglass backup`"
    )]
    NotBackup { path: PathBuf },
    #[error("{path}: its audit trail does not verify at record {seq}: {why}; refusing it")]
    Audit { path: PathBuf, seq: i64, why: String },
    #[error("{path}: copying the database failed: {source}")]
    Copy { path: PathBuf, source: rusqlite::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What a backup file holds, as checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub sessions: u64,
    pub events: u64,
    pub audit_records: u64,
    pub operations: u64,
    /// The schema version (migrations applied).
    pub schema: i64,
    /// When the copy was taken, in ms since the epoch.
    pub taken_ms: i64,
    pub bytes: u64,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sessions: {}, events: {}, audit records: {}, operations: {}; schema {}, {} bytes, taken {}",
            self.sessions,
            self.events,
            self.audit_records,
            self.operations,
            self.schema,
            self.bytes,
            rfc3339(self.taken_ms)
        )
    }
}

/// What `restore` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub copied: Copied,
    /// Where the database it replaced was kept (with its `-wal`, `-shm`
    /// and the anchor beside it), if there was one.
    pub kept: Option<PathBuf>,
}

/// Copies `<data_dir>/breakglass.db` to `file` while its server may run,
/// checks the copy, and only then puts it at `file` (mode 0600), replacing
/// an existing file only with `force`.
///
/// SQLite's backup API restarts a copy from its first page whenever
/// another connection writes to the source between two steps, so a copy in
/// steps beside a busy server might never end. The copy reads in one read
/// transaction instead: in WAL mode that is one snapshot, which the
/// server's writer never waits for (it commits to the WAL beside it), so
/// the copy is of one moment and ends.
pub fn backup(data_dir: &Path, file: &Path, force: bool) -> Result<Copied, BackupError> {
    backup_in_steps(data_dir, file, force, PAGES_PER_STEP)
}

fn backup_in_steps(data_dir: &Path, file: &Path, force: bool, pages: i32) -> Result<Copied, BackupError> {
    let source = data_dir.join("breakglass.db");
    if !source.is_file() {
        return Err(BackupError::NoDatabase { path: data_dir.to_owned() });
    }
    if !force && fs::symlink_metadata(file).is_ok() {
        return Err(BackupError::Exists { path: file.to_owned() });
    }
    // Read before the copy begins, the anchor names no record the copy
    // lacks (the writer moves it only after a commit).
    let live_anchor = read_head(data_dir);
    let live = Connection::open_with_flags(&source, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source_err| BackupError::Live(OpenError::Open { path: source.clone(), source: source_err }))?;
    live.busy_timeout(Duration::from_secs(5)).map_err(|e| copy_error(&source, e))?;
    let version = check_identity(&live, &source).map_err(BackupError::Live)?;
    if version == 0 {
        return Err(BackupError::NoDatabase { path: data_dir.to_owned() });
    }

    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("backup");
    let temporary = dir.join(format!(".{name}.{}.tmp", random_token()));
    let made = (|| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|e| io_error(&temporary, e))?;
        copy_into(&live, &source, &temporary, pages)?;
        drop(live);
        anchor_copy(&temporary, file, version, live_anchor)?;
        let copy = Connection::open_with_flags(&temporary, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| copy_error(&temporary, e))?;
        let copied = check(&copy, &temporary, file)?;
        drop(copy);
        fs::File::open(&temporary).and_then(|f| f.sync_all()).map_err(|e| io_error(&temporary, e))?;
        place(&temporary, file, force)?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))?;
        Ok(copied)
    })();
    if made.is_err() {
        remove_with_journals(&temporary);
    }
    made
}

/// The online backup of `live` into the empty file `temporary`, in steps,
/// inside one read transaction of `live` (see [`backup`]).
fn copy_into(live: &Connection, source: &Path, temporary: &Path, pages: i32) -> Result<(), BackupError> {
    let mut copy = Connection::open(temporary).map_err(|e| copy_error(temporary, e))?;
    let snapshot = live.unchecked_transaction().map_err(|e| copy_error(source, e))?;
    // A deferred transaction starts reading at its first read.
    snapshot
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get::<_, i64>(0))
        .map_err(|e| copy_error(source, e))?;
    Backup::new(&snapshot, &mut copy)
        .and_then(|backup| backup.run_to_completion(pages, PAUSE, None))
        .map_err(|e| copy_error(source, e))?;
    drop(snapshot);
    // The copy is a file on its own: no WAL beside it, readable in place
    // (even read-only), and the server sets WAL again when it opens it.
    copy.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get::<_, String>(0))
        .map_err(|e| copy_error(temporary, e))?;
    copy.close().map_err(|(_, e)| copy_error(temporary, e))
}

/// Checks the copy's audit chain against the live anchor, then stores the
/// copy's head in it as its own anchor.
fn anchor_copy(
    temporary: &Path,
    shown: &Path,
    version: i64,
    live_anchor: Result<Option<Head>, String>,
) -> Result<(), BackupError> {
    let copy = Connection::open(temporary).map_err(|e| copy_error(temporary, e))?;
    audit_intact(&copy, temporary, shown, version, live_anchor)?;
    let head = chain_head(&copy).map_err(|e| copy_error(temporary, e))?;
    copy.execute_batch(&format!(
        "CREATE TABLE {ANCHOR_TABLE} (taken_ms INTEGER NOT NULL, audit_seq INTEGER NOT NULL, audit_hash TEXT NOT NULL)"
    ))
    .and_then(|()| {
        copy.execute(
            &format!("INSERT INTO {ANCHOR_TABLE} (taken_ms, audit_seq, audit_hash) VALUES (?1, ?2, ?3)"),
            rusqlite::params![now_ms(), head.seq, head.hash],
        )
    })
    .map_err(|e| copy_error(temporary, e))?;
    copy.close().map_err(|(_, e)| copy_error(temporary, e))
}

fn audit_intact(
    conn: &Connection,
    path: &Path,
    shown: &Path,
    version: i64,
    anchor: Result<Option<Head>, String>,
) -> Result<u64, BackupError> {
    match verify_chain(conn, path, version, anchor).map_err(|e| identity_error(e, shown))? {
        AuditCheck::Intact { records } => Ok(records),
        AuditCheck::Broken { seq, why } => Err(BackupError::Audit { path: shown.to_owned(), seq, why }),
    }
}

/// Everything a backup must be to be restored: an SQLite database of
/// breakglass's at a schema this binary knows, sound by `integrity_check`,
/// carrying its anchor, with an audit trail that reaches it. `conn` has
/// `path` open; `shown` is the path the operator knows the file by.
fn check(conn: &Connection, path: &Path, shown: &Path) -> Result<Copied, BackupError> {
    let path = path.to_owned();
    let corrupt = |source| identity_error(OpenError::Corrupt { path: path.clone(), source }, shown);
    let version = check_identity(conn, &path).map_err(|e| identity_error(e, shown))?;
    if version == 0 {
        return Err(BackupError::NotBackup { path: shown.to_owned() });
    }
    let damaged = |findings| BackupError::Damaged { path: shown.to_owned(), findings };
    let findings = (|| {
        let mut stmt = conn.prepare("PRAGMA integrity_check(10)")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    })();
    match findings {
        Ok(findings) if findings.iter().all(|f| f == "ok") => {}
        Ok(findings) => return Err(damaged(findings.join("; "))),
        Err(err) if matches!(err.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)) => {
            return Err(damaged(err.to_string()));
        }
        Err(err) => return Err(copy_error(shown, err)),
    }
    let has_anchor: bool = conn
        .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1", [ANCHOR_TABLE], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(corrupt)?
        > 0;
    let anchor = if has_anchor {
        conn.query_row(&format!("SELECT taken_ms, audit_seq, audit_hash FROM {ANCHOR_TABLE}"), [], |r| {
            Ok((r.get::<_, i64>(0)?, Head { seq: r.get(1)?, hash: r.get(2)? }))
        })
        .optional()
        .map_err(corrupt)?
    } else {
        None
    };
    let Some((taken_ms, head)) = anchor else {
        return Err(BackupError::NotBackup { path: shown.to_owned() });
    };
    let audit_records = audit_intact(conn, &path, shown, version, Ok(Some(head)))?;
    let count = |table: &str| -> Result<u64, BackupError> {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(corrupt)
    };
    // Operations came with schema 5 (see `schema::MIGRATIONS`).
    let operations = if version >= 5 { count("operations")? } else { 0 };
    Ok(Copied {
        sessions: count("sessions")?,
        events: count("events")?,
        audit_records,
        operations,
        schema: version,
        taken_ms,
        bytes: fs::metadata(&path).map_err(|e| io_error(&path, e))?.len(),
    })
}

/// Puts the checked copy at `file`: without `force`, never over a file
/// that appeared meanwhile (a link fails when the name exists).
fn place(temporary: &Path, file: &Path, force: bool) -> Result<(), BackupError> {
    if force {
        return fs::rename(temporary, file).map_err(|e| io_error(file, e));
    }
    fs::hard_link(temporary, file).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => BackupError::Exists { path: file.to_owned() },
        _ => io_error(file, e),
    })?;
    fs::remove_file(temporary).map_err(|e| io_error(temporary, e))
}

/// Restores the backup `file` into `data_dir`, holding the data
/// directory's lock throughout, so that it refuses while a server runs
/// there and no server starts on a database half replaced. The database it
/// replaces is kept beside it, renamed, with its WAL: nothing is deleted.
pub fn restore(data_dir: &Path, file: &Path, create: bool) -> Result<Restored, BackupError> {
    if !data_dir.is_dir() {
        if !create {
            return Err(BackupError::NoDataDir { path: data_dir.to_owned() });
        }
        // The server's files are its own alone (README "Security").
        fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).map_err(|e| io_error(data_dir, e))?;
    }
    let _lock = lock_dir(data_dir).map_err(|e| match e {
        OpenError::InUse { path, pid } => BackupError::InUse { path, pid },
        other => BackupError::Live(other),
    })?;
    // The lock is ours: no other restore either, so a fixed name will do.
    let temporary = data_dir.join("breakglass.db.restoring");
    remove_with_journals(&temporary);
    let prepared = prepare(file, &temporary);
    let (copied, head) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            remove_with_journals(&temporary);
            return Err(err);
        }
    };

    let live = data_dir.join("breakglass.db");
    let stamp = stamp(now_ms());
    let aside = data_dir.join(format!("breakglass.db.before-restore-{stamp}"));
    let with = |path: &Path, suffix: &str| PathBuf::from(format!("{}{suffix}", path.display()));
    if [&aside, &with(&aside, "-wal"), &with(&aside, "-shm")].iter().any(|p| p.exists()) {
        remove_with_journals(&temporary);
        let source = io::Error::new(io::ErrorKind::AlreadyExists, "a database was kept under this name already");
        return Err(io_error(&aside, source));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e| io_error(&path, e)
    };
    // The genesis anchor is accepted by any chain, the old database's and
    // the restored one's alike: a crash anywhere below leaves a trail that
    // verifies (weakly anchored until the last step).
    let anchor = head_path(data_dir);
    if anchor.exists() {
        fs::copy(&anchor, format!("{}.before-restore-{stamp}", anchor.display())).map_err(io(&anchor))?;
    }
    write_anchor(data_dir, &Head { seq: 0, hash: super::audit::GENESIS.into() })?;
    let mut kept = None;
    // The WAL beside the old database may hold its last commits: it moves
    // with it, under the name SQLite looks for, so the kept file is whole.
    for suffix in ["", "-wal", "-shm"] {
        let from = with(&live, suffix);
        match fs::rename(&from, with(&aside, suffix)) {
            Ok(()) if suffix.is_empty() => kept = Some(aside.clone()),
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&from, e)),
        }
    }
    fs::rename(&temporary, &live).map_err(io(&live))?;
    write_anchor(data_dir, &head)?;
    fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io(data_dir))?;
    Ok(Restored { copied, kept })
}

/// Copies the backup into `temporary` (mode 0600, the data directory's
/// owner), checks the copy (not the file, which could change meanwhile),
/// and takes its anchor out of it: the head for `audit.head`.
fn prepare(file: &Path, temporary: &Path) -> Result<(Copied, Head), BackupError> {
    let mut from = fs::File::open(file).map_err(|e| io_error(file, e))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temporary)
        .map_err(|e| io_error(temporary, e))?;
    io::copy(&mut from, &mut to).map_err(|e| io_error(temporary, e))?;
    drop(to);
    let conn = Connection::open(temporary).map_err(|e| copy_error(file, e))?;
    let copied = check(&conn, temporary, file)?;
    let head = conn
        .query_row(&format!("SELECT audit_seq, audit_hash FROM {ANCHOR_TABLE}"), [], |r| {
            Ok(Head { seq: r.get(0)?, hash: r.get(1)? })
        })
        .and_then(|head| conn.execute_batch(&format!("DROP TABLE {ANCHOR_TABLE}")).map(|()| head))
        .map_err(|e| copy_error(temporary, e))?;
    conn.close().map_err(|(_, e)| copy_error(temporary, e))?;
    fs::File::open(temporary).and_then(|f| f.sync_all()).map_err(|e| io_error(temporary, e))?;
    match_parent_owner(temporary).map_err(|e| io_error(temporary, e))?;
    Ok((copied, head))
}

/// Replaces `audit.head` whole, mode 0600 and the directory's owner.
fn write_anchor(data_dir: &Path, head: &Head) -> Result<(), BackupError> {
    let path = head_path(data_dir);
    let line = format!("{}\n", serde_json::to_string(head).map_err(|e| io_error(&path, io::Error::other(e)))?);
    write_atomically(&path, line.as_bytes(), 0o600).map_err(|e| io_error(&path, e))
}

/// A compact UTC time for file names: `20250102T030405.678Z`.
fn stamp(ms: i64) -> String {
    rfc3339(ms).replace(['-', ':'], "")
}

fn remove_with_journals(path: &Path) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// A file's identity problems, said of the file as the operator named it.
fn identity_error(err: OpenError, shown: &Path) -> BackupError {
    let path = shown.to_owned();
    match err {
        OpenError::Corrupt { source, .. } => BackupError::Unreadable { path, source },
        OpenError::Foreign { found, .. } => BackupError::Foreign { path, found },
        OpenError::Newer { found, known, .. } => BackupError::Newer { path, found, known },
        other => BackupError::Live(other),
    }
}

fn copy_error(path: &Path, source: rusqlite::Error) -> BackupError {
    BackupError::Copy { path: path.to_owned(), source }
}

fn io_error(path: &Path, source: io::Error) -> BackupError {
    BackupError::Io { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};

    use super::*;
    use crate::store::{Durability, Store};

    /// A data directory with a breakglass database of `events` events of
    /// one session, and no server.
    fn data_with_events(events: usize) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Normal).unwrap());
        let session = uuid::Uuid::new_v4().to_string();
        let conn = Connection::open(dir.path().join("breakglass.db")).unwrap();
        conn.execute("INSERT INTO sessions (id, created_ms, last_activity_ms) VALUES (?1, 0, 0)", [&session]).unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        for id in 0..events {
            tx.execute(
                "INSERT INTO events (session, id, json) VALUES (?1, ?2, ?3)",
                rusqlite::params![session, id as i64, "x".repeat(500)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        (dir, session)
    }

    /// Regression: SQLite restarts an online backup from its first page
    /// when another connection writes between two steps, so a copy in small
    /// steps beside a server that writes all the time never ended. Read in
    /// one snapshot, it ends, and holds what was there when it began.
    #[test]
    fn a_copy_in_steps_ends_while_another_connection_keeps_writing() {
        let (dir, session) = data_with_events(2000);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (db, stop) = (dir.path().join("breakglass.db"), stop.clone());
            move || {
                let conn = Connection::open(db).unwrap();
                let mut id = 2000_i64;
                while !stop.load(Ordering::SeqCst) {
                    conn.execute(
                        "INSERT INTO events (session, id, json) VALUES (?1, ?2, 'more')",
                        rusqlite::params![session, id],
                    )
                    .unwrap();
                    id += 1;
                }
                id
            }
        });
        let file = dir.path().join("copy.db");
        let (done, finished) = mpsc::channel();
        std::thread::spawn({
            let (data, file) = (dir.path().to_owned(), file.clone());
            move || done.send(backup_in_steps(&data, &file, false, 4))
        });
        let copied = finished.recv_timeout(Duration::from_secs(60));
        stop.store(true, Ordering::SeqCst);
        let written = writer.join().unwrap();
        let copied = copied.expect("the copy ended").expect("the copy succeeded");
        assert!(copied.events >= 2000 && (copied.events as i64) < written, "{copied:?}, {written} written");
        let ids: Vec<i64> = Connection::open_with_flags(&file, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .prepare("SELECT id FROM events ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, (0..copied.events as i64).collect::<Vec<_>>(), "no gap");
    }

    /// The anchor a backup carries is its own last audit record, and a
    /// restore writes it as `audit.head`: the restored trail verifies with
    /// every record of the copy, neither missing an anchor nor trusting
    /// one made up afterwards.
    #[tokio::test]
    async fn a_backup_carries_its_audit_head_and_restore_anchors_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        for i in 0..3 {
            store.audit(crate::store::audit::tests::sample_record(i)).await.unwrap();
        }
        let file = dir.path().join("copy.db");
        let copied = backup(dir.path(), &file, false).unwrap();
        assert_eq!(copied.audit_records, 3);
        drop(store);

        let target = tempfile::tempdir().unwrap();
        let restored = restore(target.path(), &file, false).unwrap();
        assert_eq!(restored.kept, None);
        let head = read_head(target.path()).unwrap().unwrap();
        assert_eq!(head, read_head(dir.path()).unwrap().unwrap());
        assert_eq!(crate::store::verify_audit(target.path()).unwrap(), AuditCheck::Intact { records: 3 });
        let tables: i64 = Connection::open(target.path().join("breakglass.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM sqlite_schema WHERE name = ?1", [ANCHOR_TABLE], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0, "the anchor leaves the database for audit.head");
    }
}
