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
use serde::{Deserialize, Serialize};
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
/// left at the backup's path, and nothing in the data directory changed
/// (but for [`BackupError::Stuck`]).
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
    /// A step of the swap failed, and what it had changed was put back.
    #[error("{source}; the restore was undone: the data directory is as it was")]
    Undone { source: Box<BackupError> },
    /// A step of the swap failed, and putting things back failed too.
    #[error(
        "{source}; undoing the restore failed too ({undo}): the next server start (or restore) \
         in this data directory finishes the restore or undoes it, as its journal ({JOURNAL}) says"
    )]
    Stuck { source: Box<BackupError>, undo: Box<BackupError> },
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
    restore_with(data_dir, file, create, &mut |_| Ok(()))
}

/// [`restore`], calling `step` before each change the swap makes to the
/// data directory, so that tests can fail or crash it there.
fn restore_with(data_dir: &Path, file: &Path, create: bool, step: Step<'_>) -> Result<Restored, BackupError> {
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
    // A restore that crashed here is finished first, as a server would.
    finish_interrupted(data_dir)?;
    let swap = Swap::new(data_dir, now_ms());
    let prepared = prepare(file, &swap.temporary);
    let (copied, head) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            remove_with_journals(&swap.temporary);
            return Err(err);
        }
    };
    let kept = swap.aside(&swap.live, "");
    let taken = ["", "-wal", "-shm"].iter().map(|suffix| swap.aside(&swap.live, suffix));
    if taken.chain([swap.aside(&swap.anchor, "")]).any(|p| fs::symlink_metadata(p).is_ok()) {
        remove_with_journals(&swap.temporary);
        let source = io::Error::new(io::ErrorKind::AlreadyExists, "a database was kept under this name already");
        return Err(io_error(&kept, source));
    }
    let old_anchor = match fs::read_to_string(&swap.anchor) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            remove_with_journals(&swap.temporary);
            return Err(io_error(&swap.anchor, e));
        }
    };
    let mut journal = Journal { direction: Direction::Back, stamp: swap.stamp.clone(), head, old_anchor };
    if let Err(err) = step("journal").and_then(|()| swap.write_journal(&journal)) {
        // The journal may be in place with only its directory unsynced.
        let _ = fs::remove_file(&swap.journal);
        remove_with_journals(&swap.temporary);
        return Err(undone(io_error(&swap.journal, err)));
    }
    let had_database = swap.live.exists();
    let swapped = swap.link_aside(step).and_then(|()| {
        journal.direction = Direction::Forward;
        step("commit").and_then(|()| swap.write_journal(&journal)).map_err(|e| io_error(&swap.journal, e))?;
        swap.forward(&journal, step)
    });
    match swapped {
        Ok(()) => Ok(Restored { copied, kept: had_database.then_some(kept) }),
        Err(err) => {
            journal.direction = Direction::Back;
            // Once the journal says back, a crash while undoing is undone
            // by the next to take the lock; were it left saying forward,
            // the swap would be finished over an old database half put
            // back.
            let undo =
                swap.write_journal(&journal).map_err(|e| io_error(&swap.journal, e)).and_then(|()| swap.back(&journal));
            match undo {
                Ok(()) => Err(undone(err)),
                Err(undo) => Err(BackupError::Stuck { source: Box::new(err), undo: Box::new(undo) }),
            }
        }
    }
}

/// A hook called with the name of each change the swap is about to make;
/// an error stops the swap there, as the change failing would.
type Step<'a> = &'a mut dyn FnMut(&'static str) -> io::Result<()>;

fn undone(err: BackupError) -> BackupError {
    BackupError::Undone { source: Box::new(err) }
}

/// The journal of a swap in progress, beside the database: written before
/// the first change to the data directory, removed after the last. Its
/// direction says which way a crash is finished by whoever takes the lock
/// next (see [`finish_interrupted`]): back until the replaced database is
/// linked aside whole and the copy is ready, forward from then on, and
/// back again once an error is being undone.
pub(super) const JOURNAL: &str = "breakglass.db.restore-journal";

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    direction: Direction,
    /// The kept names' suffix: `breakglass.db.before-restore-<stamp>`.
    stamp: String,
    /// The copy's anchor, for `audit.head` when it goes in.
    head: Head,
    /// `audit.head` as it was (none: there was none), for when it comes back.
    old_anchor: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Direction {
    Forward,
    Back,
}

/// The names a swap works with in one data directory.
struct Swap {
    dir: PathBuf,
    live: PathBuf,
    /// The checked copy; the lock is ours, no other restore runs, so a
    /// fixed name will do.
    temporary: PathBuf,
    anchor: PathBuf,
    journal: PathBuf,
    stamp: String,
}

impl Swap {
    fn new(dir: &Path, now_ms: i64) -> Swap {
        Swap::with_stamp(dir, stamp(now_ms))
    }

    fn with_stamp(dir: &Path, stamp: String) -> Swap {
        Swap {
            dir: dir.to_owned(),
            live: dir.join("breakglass.db"),
            temporary: dir.join("breakglass.db.restoring"),
            anchor: head_path(dir),
            journal: dir.join(JOURNAL),
            stamp,
        }
    }

    /// `path` (the database or the anchor) under its kept name.
    fn aside(&self, path: &Path, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}.before-restore-{}{suffix}", path.display(), self.stamp))
    }

    fn write_journal(&self, journal: &Journal) -> io::Result<()> {
        let text = serde_json::to_string(journal).map_err(io::Error::other)?;
        write_atomically(&self.journal, text.as_bytes(), 0o600)?;
        self.sync()
    }

    fn sync(&self) -> io::Result<()> {
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Gives the database, its WAL and its `-shm` their kept names too
    /// (hard links: the live names stay, whole, until the copy takes them).
    fn link_aside(&self, step: Step<'_>) -> Result<(), BackupError> {
        for suffix in ["-wal", "-shm", ""] {
            let (from, to) = (with(&self.live, suffix), self.aside(&self.live, suffix));
            step("link aside").map_err(|e| io_error(&to, e))?;
            match fs::hard_link(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&to, e)),
            }
        }
        step("sync").and_then(|()| self.sync()).map_err(|e| io_error(&self.dir, e))
    }

    /// Puts the copy in and its anchor, keeping the old anchor aside. Each
    /// step can be taken again after a crash: the journal is removed last.
    fn forward(&self, journal: &Journal, step: Step<'_>) -> Result<(), BackupError> {
        if let Some(old) = &journal.old_anchor {
            let kept = self.aside(&self.anchor, "");
            step("keep anchor")
                .and_then(|()| write_atomically(&kept, old.as_bytes(), 0o600))
                .map_err(|e| io_error(&kept, e))?;
        }
        step("anchor").map_err(|e| io_error(&self.anchor, e)).and_then(|()| write_anchor(&self.dir, &journal.head))?;
        // The old WAL must not meet the copy: SQLite would replay its pages
        // into it. It goes only where its kept link holds it.
        for suffix in ["-shm", "-wal"] {
            let (live, kept) = (with(&self.live, suffix), self.aside(&self.live, suffix));
            if !live.exists() {
                continue;
            }
            if !kept.exists() {
                let source = io::Error::other("not kept aside, so not removed; the copy is not put in beside it");
                return Err(io_error(&live, source));
            }
            step("remove").and_then(|()| fs::remove_file(&live)).map_err(|e| io_error(&live, e))?;
        }
        if self.temporary.exists() {
            // One rename replaces the old database with the copy.
            step("rename")
                .and_then(|()| fs::rename(&self.temporary, &self.live))
                .map_err(|e| io_error(&self.live, e))?;
        }
        step("sync").and_then(|()| self.sync()).map_err(|e| io_error(&self.dir, e))?;
        step("remove journal").and_then(|()| self.remove_journal()).map_err(|e| io_error(&self.journal, e))
    }

    /// Puts the replaced database, its WAL and its anchor back, and removes
    /// the copy and everything kept: the data directory is as it was. Each
    /// step can be taken again after a crash.
    fn back(&self, journal: &Journal) -> Result<(), BackupError> {
        for suffix in ["", "-wal", "-shm"] {
            let (live, kept) = (with(&self.live, suffix), self.aside(&self.live, suffix));
            if fs::symlink_metadata(&kept).is_err() {
                continue;
            }
            fs::rename(&kept, &live).map_err(|e| io_error(&live, e))?;
            // Still two links of one file (nothing had replaced the live
            // one): rename leaves both.
            remove_if_there(&kept)?;
        }
        match &journal.old_anchor {
            Some(old) => {
                write_atomically(&self.anchor, old.as_bytes(), 0o600).map_err(|e| io_error(&self.anchor, e))?
            }
            None => remove_if_there(&self.anchor)?,
        }
        remove_if_there(&self.aside(&self.anchor, ""))?;
        for suffix in ["", "-journal", "-wal", "-shm"] {
            remove_if_there(&with(&self.temporary, suffix))?;
        }
        self.sync().map_err(|e| io_error(&self.dir, e))?;
        self.remove_journal().map_err(|e| io_error(&self.journal, e))
    }

    fn remove_journal(&self) -> io::Result<()> {
        fs::remove_file(&self.journal)?;
        self.sync()
    }
}

fn with(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

fn remove_if_there(path: &Path) -> Result<(), BackupError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path, e)),
    }
}

/// What [`finish_interrupted`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// There was no restore to finish.
    Nothing,
    /// An interrupted restore was finished: the copy is in place.
    Restored,
    /// An interrupted restore was undone: the old database is back.
    Undone,
}

/// Finishes a restore that a crash interrupted in `data_dir`, in the
/// direction its journal says, and removes a copy no restore is using.
/// Only for the holder of the data directory's lock (a server starting, a
/// restore): no one may open the database before this.
pub(super) fn finish_interrupted(data_dir: &Path) -> Result<Finished, BackupError> {
    let swap = Swap::with_stamp(data_dir, String::new());
    let text = match fs::read_to_string(&swap.journal) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A restore that crashed before its journal changed nothing
            // but the copy.
            remove_with_journals(&swap.temporary);
            return Ok(Finished::Nothing);
        }
        Err(e) => return Err(io_error(&swap.journal, e)),
    };
    let journal: Journal = serde_json::from_str(&text).map_err(|e| io_error(&swap.journal, io::Error::other(e)))?;
    let swap = Swap::with_stamp(data_dir, journal.stamp.clone());
    let finished = match journal.direction {
        Direction::Forward => swap.forward(&journal, &mut |_| Ok(())).map(|()| Finished::Restored)?,
        Direction::Back => swap.back(&journal).map(|()| Finished::Undone)?,
    };
    match finished {
        Finished::Restored => tracing::warn!(dir = %data_dir.display(), "finished a restore a crash had interrupted"),
        Finished::Undone => tracing::warn!(dir = %data_dir.display(), "undid a restore a crash had interrupted"),
        Finished::Nothing => {}
    }
    Ok(finished)
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

    /// What a data directory holds as `verify_audit` and `audit.head` see
    /// it, and how many sessions its database has.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        records: u64,
        head: Head,
        sessions: i64,
    }

    fn seen(data: &Path) -> Seen {
        let records = match crate::store::verify_audit(data).unwrap() {
            AuditCheck::Intact { records } => records,
            broken => panic!("the trail does not verify: {broken:?}"),
        };
        let sessions = Connection::open_with_flags(data.join("breakglass.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
            .unwrap();
        Seen { records, head: read_head(data).unwrap().unwrap(), sessions }
    }

    /// A data directory as a server killed -9 leaves it (its last commits,
    /// audit records among them, only in the WAL, and `audit.head` naming
    /// the last record), a backup taken earlier, and what each holds.
    struct Crashed {
        data: tempfile::TempDir,
        file: PathBuf,
        old: Seen,
        new: Seen,
        _scratch: tempfile::TempDir,
    }

    async fn crashed_data_and_an_older_backup() -> Crashed {
        let scratch = tempfile::tempdir().unwrap();
        let store = Store::open(scratch.path(), Durability::Normal).unwrap();
        for i in 0..2 {
            store.audit(crate::store::audit::tests::sample_record(i)).await.unwrap();
        }
        let file = scratch.path().join("copy.db");
        backup(scratch.path(), &file, false).unwrap();
        for i in 2..5 {
            store.audit(crate::store::audit::tests::sample_record(i)).await.unwrap();
        }
        store.create_session(uuid::Uuid::new_v4()).await.unwrap();
        let data = tempfile::tempdir().unwrap();
        for name in ["breakglass.db", "breakglass.db-wal", "audit.head"] {
            fs::copy(scratch.path().join(name), data.path().join(name)).unwrap();
        }
        drop(store);
        assert!(fs::metadata(data.path().join("breakglass.db-wal")).unwrap().len() > 0, "the WAL holds commits");
        let old = seen(data.path());
        assert_eq!((old.records, old.sessions), (5, 1));
        assert!(data.path().join("breakglass.db-wal").exists(), "reading leaves the WAL");
        let head = Connection::open_with_flags(&file, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row(&format!("SELECT audit_seq, audit_hash FROM {ANCHOR_TABLE}"), [], |r| {
                Ok(Head { seq: r.get(0)?, hash: r.get(1)? })
            })
            .unwrap();
        let new = Seen { records: 2, head, sessions: 0 };
        Crashed { data, file, old, new, _scratch: scratch }
    }

    /// The names in a directory, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// Regression: once the anchor was reset, a failed step of the swap
    /// returned at once, leaving `audit.head` at genesis (the old trail no
    /// longer anchored), the temporary behind, and after the database was
    /// moved away, no database at all. An error at any step now puts back
    /// the database with its WAL, its anchor and nothing else, and says so.
    #[tokio::test]
    async fn a_restore_that_fails_at_any_step_leaves_the_old_database_its_wal_and_its_anchor() {
        let mut steps = 0;
        for fail_at in 1.. {
            let crashed = crashed_data_and_an_older_backup().await;
            let data = crashed.data.path();
            let mut before = listing(data);
            before.push("breakglass.lock".into());
            before.sort();
            let mut step = 0;
            let result = restore_with(data, &crashed.file, false, &mut |name| {
                step += 1;
                if step == fail_at { Err(io::Error::other(format!("injected failure at {name}"))) } else { Ok(()) }
            });
            let Err(err) = result else {
                assert_eq!(seen(data), crashed.new, "a restore that did not fail took effect");
                steps = fail_at - 1;
                break;
            };
            let said = err.to_string();
            assert!(said.contains("injected failure"), "step {fail_at}: {said}");
            assert!(said.contains("undone"), "step {fail_at}: the error says the restore was undone: {said}");
            assert_eq!(listing(data), before, "step {fail_at}: {said}");
            assert_eq!(seen(data), crashed.old, "step {fail_at}: {said}");
        }
        assert!(steps >= 5, "every step was failed once: {steps}");
    }

    /// A crash at any step of the swap leaves, once the next server has
    /// opened the data directory, the old database with its WAL's commits
    /// and its anchor, or the restored one with its own: never no database
    /// (which the server would have replaced by an empty one), never a
    /// trail anchored to the other database, never the temporary.
    #[tokio::test]
    async fn a_restore_that_crashes_at_any_step_leaves_the_old_database_or_the_new_one() {
        let (mut old, mut new) = (0, 0);
        for crash_at in 1.. {
            let crashed = crashed_data_and_an_older_backup().await;
            let data = crashed.data.path();
            let file = crashed.file.clone();
            let restored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut step = 0;
                restore_with(data, &file, false, &mut |name| {
                    step += 1;
                    assert_ne!(step, crash_at, "the process dies at {name}");
                    Ok(())
                })
            }));
            if restored.is_ok() {
                break;
            }
            drop(Store::open(data, Durability::Normal).unwrap());
            let now = seen(data);
            if now == crashed.old {
                old += 1;
            } else {
                assert_eq!(now, crashed.new, "crash at step {crash_at}");
                new += 1;
            }
            let names = listing(data);
            assert!(!names.iter().any(|n| n.contains("restoring")), "crash at step {crash_at}: {names:?}");
        }
        assert!(old > 0 && new > 0, "the crashes fell before and after the swap: {old} old, {new} new");
    }
}
