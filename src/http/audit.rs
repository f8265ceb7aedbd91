//! The audit trail over HTTP: recording what callers change, and
//! `GET /api/audit` to read it back (newest first, paged).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Identity, Via};
use super::error::ApiError;
use super::extract::Query;
use crate::store::{AuditEntry, AuditRecord, AuthMethod, StoreError};

pub fn router() -> Router<AppState> {
    Router::new().route("/audit", get(page))
}

/// Writes one record. Callers that must not act unrecorded (mutating verbs)
/// branch on the error; others use [`record_or_count`].
pub async fn record(
    state: &AppState,
    identity: &Identity,
    action: &str,
    target: &str,
    outcome: &str,
) -> Result<AuditEntry, StoreError> {
    let record = AuditRecord {
        identity: identity.name.clone(),
        peer: identity.peer.to_string(),
        action: action.into(),
        target: target.into(),
        outcome: outcome.into(),
        via: Some(auth_method(identity.via)),
    };
    // A stalled disk must not hold the request (a Stop, a verb) for ever:
    // the record stays queued and lands when storage answers again.
    tokio::time::timeout(AUDIT_WAIT, state.sessions.store().audit(record)).await.unwrap_or(Err(StoreError::Stalled))
}

/// How the audit trail names a way of authenticating.
pub fn auth_method(via: Via) -> AuthMethod {
    match via {
        Via::Bearer => AuthMethod::Bearer,
        Via::ProxyHeader => AuthMethod::Proxy,
        Via::Cookie => AuthMethod::Login,
    }
}

/// Longest a request waits for its audit record to be committed.
const AUDIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes one record; a failure is logged and counted, never passed on.
pub async fn record_or_count(state: &AppState, identity: &Identity, action: &str, target: &str, outcome: &str) {
    if let Err(err) = record(state, identity, action, target, outcome).await {
        state.audit_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%err, action, target, outcome, "could not write an audit record");
    }
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    /// Records with a smaller sequence number than this.
    before: Option<i64>,
    limit: Option<usize>,
}

async fn page(State(state): State<AppState>, Query(query): Query<PageQuery>) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let entries = state.sessions.store().audit_page(query.before, limit).await?;
    let next = if entries.len() == limit { entries.last().map(|e| e.seq) } else { None };
    let records: Vec<Value> = entries.into_iter().map(entry_json).collect();
    Ok(Json(json!({ "records": records, "next_before": next })))
}

fn entry_json(e: AuditEntry) -> Value {
    json!({
        "seq": e.seq,
        "at": crate::util::rfc3339(e.at_ms),
        "identity": e.record.identity,
        "peer": e.record.peer,
        "action": e.record.action,
        "target": e.record.target,
        "outcome": e.record.outcome,
        // How the caller authenticated: bearer, proxy or login (null on
        // records from before it was recorded).
        "via": e.record.via.map(AuthMethod::as_str),
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    })
}
