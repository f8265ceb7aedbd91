//! The audit chain: each record carries the hash of the one before, and
//! verification walks it.
//!
//! A chain alone cannot show that records were removed from its end: what
//! is left is a valid, shorter chain. So the head (the last record's sequence
//! number and hash) is also kept outside the database, in
//! `<data>/audit.head`, rewritten after each commit that adds records.
//! A crash between the commit and that rewrite leaves the anchor behind the
//! chain, never ahead of it, so verification accepts an anchor that names
//! any record of the chain, and reports a chain that ends before its anchor
//! or holds a different record where the anchor points.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::read::{AUDIT_COLUMNS, VIA_COLUMN, audit_entry};
use super::schema::check_identity;
use super::{AuditCheck, AuditRecord, OpenError};

/// The file holding the head anchor, beside the database.
pub const HEAD_FILE: &str = "audit.head";

/// The first schema version whose audit head is anchored: the anchor of an
/// older database is written, for the chain as it stands, just before this
/// migration is applied.
pub(super) const ANCHORED_SINCE: i64 = 3;

/// The first schema version whose audit records have a `via` column.
const VIA_SINCE: i64 = 4;

/// The last record of the chain as last committed: its sequence number (0
/// before the first record) and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Head {
    pub seq: i64,
    pub hash: String,
}

impl Head {
    fn genesis() -> Self {
        Head { seq: 0, hash: GENESIS.into() }
    }
}

pub(super) fn head_path(dir: &Path) -> PathBuf {
    dir.join(HEAD_FILE)
}

/// Replaces the anchor atomically: a temporary file, synced, renamed over
/// the old one, then the directory synced, so a crash leaves the old anchor
/// or the new one, never a torn one.
pub(super) fn write_head(dir: &Path, head: &Head) -> std::io::Result<()> {
    replace_head(dir, head)?;
    std::fs::File::open(dir)?.sync_all()
}

/// [`write_head`] but the directory's sync, for a caller that syncs the
/// directory itself afterwards.
fn replace_head(dir: &Path, head: &Head) -> std::io::Result<()> {
    let tmp = dir.join(format!("{HEAD_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(format!("{}\n", serde_json::to_string(head).map_err(std::io::Error::other)?).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, head_path(dir))
}

/// The anchor, `None` when there is no file.
pub(super) fn read_head(dir: &Path) -> Result<Option<Head>, String> {
    match std::fs::read(head_path(dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// The last record of the chain in the database.
pub(super) fn chain_head(conn: &Connection) -> rusqlite::Result<Head> {
    Ok(conn
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok(Head { seq: r.get(0)?, hash: r.get(1)? })
        })
        .optional()?
        .unwrap_or_else(Head::genesis))
}

/// Before the migration that starts anchoring: anchors the chain as it
/// stands (a new database's empty one, or an older version's whole trail,
/// which can only be trusted as it is found). With `dir_synced_after`, the
/// caller syncs the directory once the database is in place, which makes
/// the anchor's rename durable too.
pub(super) fn anchor_before_migrating(
    conn: &Connection,
    dir: &Path,
    version: i64,
    dir_synced_after: bool,
) -> Result<(), OpenError> {
    if version >= ANCHORED_SINCE {
        return Ok(());
    }
    let path = dir.join("breakglass.db");
    let head = if version == 0 {
        Head::genesis()
    } else {
        chain_head(conn).map_err(|source| OpenError::Corrupt { path: path.clone(), source })?
    };
    let written = if dir_synced_after { replace_head(dir, &head) } else { write_head(dir, &head) };
    written.map_err(|source| OpenError::Anchor { path: head_path(dir), source })?;
    tracing::info!(seq = head.seq, "audit trail head anchored in {}", head_path(dir).display());
    Ok(())
}

/// At start-up: whether the anchor agrees with the chain, so that the
/// writer may move it forward. One that does not (records were removed
/// while the server was stopped, or the anchor was) is left as it is, so
/// that `breakglass audit verify` keeps reporting it, however many records
/// are written after it; the server still runs and records (the incident
/// comes first).
pub(super) fn anchor_agrees(conn: &Connection, dir: &Path) -> bool {
    let found = (|| -> Result<Option<String>, String> {
        let last = chain_head(conn).map_err(|e| e.to_string())?;
        let anchor = read_head(dir).map_err(|e| format!("the head anchor is unreadable: {e}"))?;
        let at = |seq: i64| -> Result<Option<String>, String> {
            if seq == 0 {
                return Ok(Some(GENESIS.into()));
            }
            conn.query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
                .optional()
                .map_err(|e| e.to_string())
        };
        Ok(head_problem(anchor.as_ref(), &last, at(anchor.as_ref().map_or(0, |a| a.seq))?.as_deref()))
    })();
    match found {
        Ok(None) => true,
        Ok(Some(why)) | Err(why) => {
            tracing::error!(
                "the audit trail does not match its head anchor ({why}); \
                 `breakglass audit verify` reports it, and the anchor is left as it is"
            );
            false
        }
    }
}

/// What is wrong between the anchor and a chain ending at `last` (already
/// verified link by link), given the hash of the record the anchor names
/// (`None`: the chain has no such record).
fn head_problem(anchor: Option<&Head>, last: &Head, hash_at_anchor: Option<&str>) -> Option<String> {
    let Some(anchor) = anchor else {
        return (last.seq > 0).then(|| {
            format!("its head anchor ({HEAD_FILE}) is missing, so records removed from its end would go unnoticed")
        });
    };
    if anchor.seq > last.seq {
        return Some(format!(
            "the trail was truncated: it ends at record {}, but its head anchor ({HEAD_FILE}) names record {}",
            last.seq, anchor.seq
        ));
    }
    (hash_at_anchor != Some(anchor.hash.as_str())).then(|| {
        format!(
            "record {} is not the one its head anchor ({HEAD_FILE}) names: records were removed and others written in their place",
            anchor.seq
        )
    })
}

/// Checks the audit chain of the database in `dir`, read-only: each record
/// links to the one before, and the chain reaches its head anchor.
pub fn verify_audit(dir: &Path) -> Result<AuditCheck, OpenError> {
    let path = dir.join("breakglass.db");
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| OpenError::Open { path: path.clone(), source })?;
    let version = check_identity(&conn, &path)?;
    verify_chain(&conn, &path, version, read_head(dir))
}

/// Checks the audit chain in `conn` (the database at `path`, at schema
/// `version`) against `anchor`, the head anchor as read (`None`: there is
/// none). A backup carries its own anchor, so it is checked the same way.
pub(super) fn verify_chain(
    conn: &Connection,
    path: &Path,
    version: i64,
    anchor: Result<Option<Head>, String>,
) -> Result<AuditCheck, OpenError> {
    let path = path.to_owned();
    // A database from before anchoring has none yet (its server writes it
    // on its first start after the upgrade).
    let anchor = match anchor {
        Ok(anchor) => anchor,
        Err(err) => {
            let last = chain_head(conn).map_err(|source| OpenError::Corrupt { path: path.clone(), source })?;
            let why = format!("its head anchor ({HEAD_FILE}) is unreadable: {err}");
            return Ok(AuditCheck::Broken { seq: last.seq, why });
        }
    };
    let mut hash_at_anchor = anchor.as_ref().filter(|a| a.seq == 0).map(|_| GENESIS.to_owned());
    let corrupt = |source| OpenError::Corrupt { path: path.clone(), source };
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {} FROM audit ORDER BY seq",
            if version >= VIA_SINCE { AUDIT_COLUMNS.to_owned() } else { AUDIT_COLUMNS.replace("via", "NULL") }
        ))
        .map_err(corrupt)?;
    let mut rows = stmt.query([]).map_err(corrupt)?;
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1;
    let mut records = 0;
    while let Some(row) = rows.next().map_err(corrupt)? {
        let entry = match audit_entry(row) {
            Ok(entry) => entry,
            // A method breakglass never writes: the record was edited.
            Err(rusqlite::Error::FromSqlConversionFailure(VIA_COLUMN, ..)) => {
                let seq = row.get(0).map_err(corrupt)?;
                return Ok(AuditCheck::Broken { seq, why: "its contents were changed after it was written".into() });
            }
            Err(err) => return Err(corrupt(err)),
        };
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
        if anchor.as_ref().is_some_and(|a| a.seq == entry.seq) {
            hash_at_anchor = Some(entry.hash.clone());
        }
        prev = entry.hash;
        expected_seq += 1;
        records += 1;
    }
    let last = Head { seq: expected_seq - 1, hash: prev };
    if (anchor.is_some() || version >= ANCHORED_SINCE)
        && let Some(why) = head_problem(anchor.as_ref(), &last, hash_at_anchor.as_deref())
    {
        let seq = anchor.as_ref().map_or(last.seq, |a| a.seq.min(last.seq + 1));
        return Ok(AuditCheck::Broken { seq, why });
    }
    Ok(AuditCheck::Intact { records })
}

/// The `prev_hash` of the first audit record.
pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 over the previous hash and the record's fields, encoded as a JSON
/// array so that no choice of field contents can collide with another. The
/// authentication method is the array's last element on records that have
/// one; records from before it was recorded hash as they were written.
pub(super) fn chain_hash(prev: &str, seq: i64, at_ms: i64, r: &AuditRecord) -> String {
    let mut fields = serde_json::json!([prev, seq, at_ms, r.identity, r.peer, r.action, r.target, r.outcome]);
    if let (Some(via), Some(fields)) = (r.via, fields.as_array_mut()) {
        fields.push(via.as_str().into());
    }
    let digest = Sha256::digest(fields.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{AuthMethod, Durability, Store};

    /// The `i`th of a run of ordinary records, for tests.
    pub fn sample_record(i: usize) -> AuditRecord {
        AuditRecord {
            identity: "alice".into(),
            peer: "10.0.0.1".into(),
            action: "prompt".into(),
            target: format!("s{i}"),
            outcome: "ok".into(),
            via: Some(AuthMethod::Proxy),
        }
    }

    async fn store_with_records(n: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        for i in 0..n {
            store.audit(sample_record(i)).await.unwrap();
        }
        (dir, store)
    }

    fn sql(dir: &Path, sql: &str) {
        Connection::open(dir.join("breakglass.db")).unwrap().execute_batch(sql).unwrap();
    }

    fn head_of(dir: &Path) -> Head {
        read_head(dir).unwrap().expect("an anchor")
    }

    #[tokio::test]
    async fn the_anchor_follows_each_committed_record() {
        let (dir, _store) = store_with_records(3).await;
        assert_eq!(head_of(dir.path()).seq, 3);
        assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 3 });
    }

    /// A crash between a commit and the anchor's rewrite leaves the anchor
    /// behind: that is no damage.
    #[tokio::test]
    async fn an_anchor_behind_the_chain_is_accepted() {
        let (dir, store) = store_with_records(2).await;
        let behind = head_of(dir.path());
        store.audit(AuditRecord { identity: "bob".into(), ..record() }).await.unwrap();
        write_head(dir.path(), &behind).unwrap();
        assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 3 });
        write_head(dir.path(), &Head::genesis()).unwrap();
        assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 3 });
    }

    fn record() -> AuditRecord {
        AuditRecord {
            identity: "alice".into(),
            peer: "::1".into(),
            action: "cancel".into(),
            target: "t".into(),
            outcome: "ok".into(),
            via: Some(AuthMethod::Bearer),
        }
    }

    #[tokio::test]
    async fn truncation_a_replaced_head_and_a_missing_anchor_are_reported() {
        let (dir, store) = store_with_records(5).await;
        drop(store);
        sql(dir.path(), "DELETE FROM audit WHERE seq > 3");
        let AuditCheck::Broken { seq: 4, why } = verify_audit(dir.path()).unwrap() else { panic!("not broken") };
        assert!(why.contains("truncated: it ends at record 3"), "{why}");

        let mut anchor = head_of(dir.path());
        anchor.seq = 3;
        write_head(dir.path(), &anchor).unwrap();
        let AuditCheck::Broken { seq: 3, why } = verify_audit(dir.path()).unwrap() else { panic!("not broken") };
        assert!(why.contains("record 3 is not the one its head anchor"), "{why}");

        std::fs::remove_file(head_path(dir.path())).unwrap();
        let AuditCheck::Broken { seq: 3, why } = verify_audit(dir.path()).unwrap() else { panic!("not broken") };
        assert!(why.contains("head anchor (audit.head) is missing"), "{why}");
    }

    /// A database as the version before anchoring left it (schema 2, no
    /// `via` column, no anchor), with `n` records chained as it chained them.
    fn database_from_before_anchoring(dir: &Path, n: i64) {
        let conn = Connection::open(dir.join("breakglass.db")).unwrap();
        for sql in &super::super::schema::MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "application_id", super::super::schema::APPLICATION_ID).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        let mut prev = GENESIS.to_owned();
        for seq in 1..=n {
            let r = AuditRecord { via: None, ..record() };
            let hash = chain_hash(&prev, seq, 1000 + seq, &r);
            conn.execute(
                "INSERT INTO audit (seq, at_ms, identity, peer, action, target, outcome, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                rusqlite::params![seq, 1000 + seq, r.identity, r.peer, r.action, r.target, r.outcome, prev, hash],
            )
            .unwrap();
            prev = hash;
        }
    }

    /// A database from before anchoring verifies without an anchor, gets
    /// one on its first start, and is protected from then on; its records,
    /// without an authentication method, verify beside newer ones with one.
    #[tokio::test]
    async fn a_database_from_before_anchoring_is_anchored_as_found() {
        let dir = tempfile::tempdir().unwrap();
        database_from_before_anchoring(dir.path(), 4);
        assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 4 });

        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        assert_eq!(head_of(dir.path()).seq, 4);
        store.audit(record()).await.unwrap();
        drop(store);
        assert_eq!(head_of(dir.path()).seq, 5);
        assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 5 });
        sql(dir.path(), "DELETE FROM audit WHERE seq >= 4");
        assert!(matches!(verify_audit(dir.path()).unwrap(), AuditCheck::Broken { seq: 4, .. }));
    }

    /// The method is covered by the hash of the records that have one, and
    /// cannot be added to those that have none.
    #[tokio::test]
    async fn the_authentication_method_is_part_of_the_chain() {
        for (edit, seq) in [
            ("UPDATE audit SET via = 'proxy' WHERE seq = 2", 2),
            ("UPDATE audit SET via = 'carrier pigeon' WHERE seq = 2", 2),
            ("UPDATE audit SET via = NULL WHERE seq = 2", 2),
            ("UPDATE audit SET via = 'bearer' WHERE seq = 1", 1),
        ] {
            let dir = tempfile::tempdir().unwrap();
            database_from_before_anchoring(dir.path(), 1);
            let store = Store::open(dir.path(), Durability::Normal).unwrap();
            store.audit(record()).await.unwrap();
            drop(store);
            assert_eq!(verify_audit(dir.path()).unwrap(), AuditCheck::Intact { records: 2 });
            sql(dir.path(), edit);
            let check = verify_audit(dir.path());
            let Ok(AuditCheck::Broken { seq: found, why }) = check else { panic!("{edit}: {check:?}") };
            assert_eq!((found, why.as_str()), (seq, "its contents were changed after it was written"), "{edit}");
        }
    }
}
