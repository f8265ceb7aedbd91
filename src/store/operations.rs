//! Power operations as stored (README "Operations"): one row each, and
//! their steps, numbered 0, 1, 2, … like a session's events. The writer
//! thread writes them ([`super::writer`]); the read pool reads them back.

use std::sync::Arc;

use rusqlite::{OptionalExtension, Transaction, params};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::writer::Command;
use super::{Store, StoreError, to_sql};
use crate::event::{EventId, Stored};

/// One operation's row.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRow {
    pub id: Uuid,
    pub target: String,
    pub verb: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// The backend's answer, as JSON.
    pub result: Option<String>,
    pub error: Option<String>,
    pub recovered_after_ms: Option<i64>,
}

/// How an operation ended, written with its last step in one transaction.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: Uuid,
    pub state: String,
    pub finished_ms: i64,
    pub result: String,
    pub error: Option<String>,
    pub recovered_after_ms: Option<i64>,
    /// The `done` step.
    pub last_step: Stored,
}

impl Store {
    pub async fn create_operation(&self, row: OperationRow) -> Result<(), StoreError> {
        self.ask(|reply| Command::CreateOperation { row, reply }).await
    }

    /// Appends one step; it is committed when this returns.
    pub async fn operation_step(&self, operation: Uuid, step: Stored) -> Result<(), StoreError> {
        self.ask(|reply| Command::OperationStep { operation, step, reply }).await
    }

    pub async fn finish_operation(&self, finish: Finish) -> Result<(), StoreError> {
        self.ask(|reply| Command::FinishOperation { finish: Box::new(finish), reply }).await
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Command,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(command(reply)).await.map_err(|_| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    pub async fn operation(&self, id: Uuid) -> Result<Option<OperationRow>, StoreError> {
        self.read(move |conn| {
            let sql = format!("SELECT {OPERATION_COLUMNS} FROM operations WHERE id = ?1");
            Ok(conn.query_row(&sql, [id.to_string()], operation_row).optional()?)
        })
        .await
    }

    /// Operations still marked running, each with the id its next step takes.
    pub async fn running_operations(&self) -> Result<Vec<(OperationRow, EventId)>, StoreError> {
        self.read(|conn| {
            let sql = format!(
                "SELECT {OPERATION_COLUMNS}, (SELECT count(*) FROM operation_steps s WHERE s.operation = o.id)
                 FROM operations o WHERE state = 'running'"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map([], |r| Ok((operation_row(r)?, r.get::<_, i64>(9)? as EventId)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Up to `limit` steps of an operation with id > `after`, in order.
    pub async fn operation_steps(
        &self,
        operation: Uuid,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        self.read(move |conn| {
            let start = after.map_or(0, |a| a.saturating_add(1));
            let mut stmt = conn.prepare_cached(
                "SELECT id, json FROM operation_steps WHERE operation = ?1 AND id >= ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![operation.to_string(), to_sql(start), limit as i64], |r| {
                Ok(Stored { id: r.get::<_, i64>(0)? as EventId, json: Arc::from(r.get::<_, String>(1)?) })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}

const OPERATION_COLUMNS: &str = "id, target, verb, state, started_ms, finished_ms, result, error, recovered_after_ms";

fn operation_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OperationRow> {
    let id: String = row.get(0)?;
    Ok(OperationRow {
        id: Uuid::parse_str(&id)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?,
        target: row.get(1)?,
        verb: row.get(2)?,
        state: row.get(3)?,
        started_ms: row.get(4)?,
        finished_ms: row.get(5)?,
        result: row.get(6)?,
        error: row.get(7)?,
        recovered_after_ms: row.get(8)?,
    })
}

/// The writer's statements for the commands above, inside its transaction.
pub(super) fn create(tx: &Transaction<'_>, row: &OperationRow) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO operations (id, target, verb, state, started_ms, finished_ms, result, error, recovered_after_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        row.id.to_string(),
        row.target,
        row.verb,
        row.state,
        row.started_ms,
        row.finished_ms,
        row.result,
        row.error,
        row.recovered_after_ms
    ])?;
    Ok(())
}

pub(super) fn step(tx: &Transaction<'_>, operation: Uuid, step: &Stored) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO operation_steps (operation, id, json) VALUES (?1, ?2, ?3)")?.execute(params![
        operation.to_string(),
        to_sql(step.id),
        &*step.json
    ])?;
    Ok(())
}

pub(super) fn finish(tx: &Transaction<'_>, finish: &Finish) -> Result<(), StoreError> {
    step(tx, finish.id, &finish.last_step)?;
    let changed = tx
        .prepare_cached(
            "UPDATE operations SET state = ?2, finished_ms = ?3, result = ?4, error = ?5, recovered_after_ms = ?6
             WHERE id = ?1 AND state = 'running'",
        )?
        .execute(params![
            finish.id.to_string(),
            finish.state,
            finish.finished_ms,
            finish.result,
            finish.error,
            finish.recovered_after_ms
        ])?;
    if changed == 0 {
        return Err(StoreError::Sqlite(format!("operation {} is not running", finish.id)));
    }
    Ok(())
}
