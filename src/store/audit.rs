//! The audit chain: each record carries the hash of the one before, and
//! verification walks it.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use super::read::audit_entry;
use super::schema::check_identity;
use super::{AuditCheck, AuditRecord, OpenError};

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
pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 over the previous hash and the record's fields, encoded as a JSON
/// array so that no choice of field contents can collide with another.
pub(super) fn chain_hash(prev: &str, seq: i64, at_ms: i64, r: &AuditRecord) -> String {
    let fields = serde_json::json!([prev, seq, at_ms, r.identity, r.peer, r.action, r.target, r.outcome]);
    let digest = Sha256::digest(fields.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
