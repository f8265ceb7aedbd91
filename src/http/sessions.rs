//! `/api/session…`: open, attach, prompt, cancel (README "API"), and the
//! session list, one session, and its export.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::audit::record_or_count;
use super::auth::Identity;
use super::body::JsonBody;
use super::error::ApiError;
use super::extract::{Path, Query};
use super::{AppState, MAX_PROMPT_CHARS};
use crate::config::validate_model;
use crate::export::{Format, export};
use crate::session::{Session, StartError};
use crate::sse;
use crate::store::SessionRow;
use crate::util::rfc3339;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/session", post(open))
        .route("/sessions", get(list))
        .route("/session/{id}", get(one))
        .route("/session/{id}/stream", get(attach))
        .route("/session/{id}/prompt", post(prompt))
        .route("/session/{id}/cancel", post(cancel))
        .route("/session/{id}/export", get(export_session))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::session_not_found())
}

pub(super) async fn find(state: &AppState, id: &str) -> Result<Arc<Session>, ApiError> {
    state.sessions.get(parse_id(id)?).await?.ok_or_else(ApiError::session_not_found)
}

async fn open(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
) -> Result<Json<Value>, ApiError> {
    let session = state
        .detach({
            let state = state.clone();
            async move {
                match state.sessions.create().await {
                    Ok(session) => {
                        record_or_count(&state, &identity, "session.open", &session.id.to_string(), "ok").await;
                        tracing::info!(session = %session.id, by = %identity.name, "session opened");
                        Ok(session)
                    }
                    Err(err) => {
                        record_or_count(&state, &identity, "session.open", "", &format!("failed: {err}")).await;
                        Err(err.into())
                    }
                }
            }
        })
        .await?;
    Ok(Json(json!({ "session_id": session.id.to_string() })))
}

/// What the API says of a session. "running" is whether a turn runs now,
/// on this server (the store's flag can outlive a turn whose end a full
/// disk swallowed). It must be read before the row: a turn logs its end
/// and only then stops running, so "not running" read first means the row
/// read after holds the whole turn (its `turn_end` counted).
fn session_json(state: &AppState, row: &SessionRow, running: bool) -> Value {
    json!({
        "id": row.id.to_string(),
        "title": row.title,
        "created": rfc3339(row.created_ms),
        "last_activity": rfc3339(row.last_activity_ms),
        "running": running,
        "event_count": row.event_count,
        // Tool calls waiting for the operator now (README "Approvals").
        "pending_approvals": state.sessions.approvals().waiting_in(row.id),
    })
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    /// Sessions created before this session (the last of the previous page).
    before: Option<String>,
}

/// Newest first.
async fn list(State(state): State<AppState>, Query(query): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let store = state.sessions.store();
    let before = match &query.before {
        Some(id) => Some(store.session(parse_id(id)?).await?.ok_or_else(ApiError::session_not_found)?),
        None => None,
    };
    let running = state.sessions.running_now();
    let rows = store.sessions(before.as_ref(), limit).await?;
    let sessions: Vec<Value> = rows.iter().map(|row| session_json(&state, row, running.contains(&row.id))).collect();
    Ok(Json(json!({ "sessions": sessions })))
}

async fn one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let running = state.sessions.is_running(id);
    let row = state.sessions.store().session(id).await?.ok_or_else(ApiError::session_not_found)?;
    Ok(Json(session_json(&state, &row, running)))
}

/// Attach (README "API", the attach stream): backlog, `caught-up`, live tail.
async fn attach(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<AttachQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = find(&state, &id).await?;
    // The header is what EventSource sends on its own reconnects; the query
    // parameter lets a page that opens a new EventSource say the same.
    let given =
        headers.get("last-event-id").map(HeaderValue::as_bytes).or(query.last_event_id.as_deref().map(str::as_bytes));
    // An id this log never issued (a log from another life) means a full
    // replay: the stream finds out with its first read of the log.
    let last = sse::parse_last_event_id(given);
    let stream =
        sse::attach(session.log.clone(), last, state.config.sse_keepalive, state.streams_end.clone(), &state.streams);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct AttachQuery {
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PromptBody {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
}

async fn prompt(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PromptBody>,
) -> Result<Json<Value>, ApiError> {
    let session = find(&state, &id).await?;
    if body.prompt.trim().is_empty() {
        return Err(ApiError::Unprocessable("prompt is empty".into()));
    }
    if body.prompt.contains('\0') {
        return Err(ApiError::Unprocessable("prompt contains a NUL character".into()));
    }
    let chars = body.prompt.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(ApiError::PayloadTooLarge(format!(
            "prompt is {chars} characters; the limit is {MAX_PROMPT_CHARS}"
        )));
    }
    let model = match body.model.filter(|m| !m.is_empty()) {
        Some(model) => {
            validate_model(&model).map_err(ApiError::Unprocessable)?;
            model
        }
        None => state.config.agent.default_model.clone(),
    };
    state
        .detach({
            let state = state.clone();
            async move {
                let result = state.sessions.start_turn(&session, body.prompt, model, identity.name.clone()).await;
                let outcome = match &result {
                    Ok(()) => "started".to_owned(),
                    Err(err) => format!("refused: {err}"),
                };
                // A prompt is never blocked by the audit trail: the incident comes first.
                record_or_count(&state, &identity, "prompt", &session.id.to_string(), &outcome).await;
                match result {
                    Ok(()) => {
                        tracing::info!(session = %session.id, by = %identity.name, chars, "prompt accepted");
                        Ok(Json(json!({ "status": "started" })))
                    }
                    Err(StartError::Busy) => Err(ApiError::Conflict("a turn is already running".into())),
                    Err(err @ StartError::ShuttingDown) => Err(ApiError::Unavailable(err.to_string())),
                    Err(StartError::Log(err)) => Err(err.into()),
                }
            }
        })
        .await
}

async fn cancel(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = find(&state, &id).await?;
    state
        .detach({
            let state = state.clone();
            async move {
                let cancelled = state.sessions.cancel(&session).await;
                tracing::info!(session = %session.id, by = %identity.name, cancelled, "cancel");
                let outcome = if cancelled { "cancelled" } else { "no turn running" };
                record_or_count(&state, &identity, "cancel", &session.id.to_string(), outcome).await;
                Ok(Json(json!({ "cancelled": cancelled })))
            }
        })
        .await
}

#[derive(Debug, Deserialize)]
struct ExportQuery {
    format: Option<String>,
}

/// The whole transcript as Markdown (an incident timeline) or JSON Lines,
/// streamed page by page from the log.
async fn export_session(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let row = state.sessions.store().session(parse_id(&id)?).await?.ok_or_else(ApiError::session_not_found)?;
    let format = match query.format.as_deref().unwrap_or("md") {
        "md" | "markdown" => Format::Markdown,
        "jsonl" | "ndjson" => Format::JsonLines,
        other => return Err(ApiError::BadRequest(format!("unknown export format {other:?}: use md or jsonl"))),
    };
    let (content_type, extension) = match format {
        Format::Markdown => ("text/markdown; charset=utf-8", "md"),
        Format::JsonLines => ("application/x-ndjson", "jsonl"),
    };
    let disposition = format!("attachment; filename=\"breakglass-{}.{extension}\"", row.id);
    let stream = export(state.sessions.store().clone(), row, format);
    let body = Body::from_stream(futures_util::StreamExt::map(stream, Ok::<Bytes, std::io::Error>));
    Ok(([(header::CONTENT_TYPE, content_type.to_owned()), (header::CONTENT_DISPOSITION, disposition)], body)
        .into_response())
}
