//! `/api/session…`: open, attach, prompt, cancel (SPEC §3–§5).

use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::auth::Identity;
use super::body::JsonBody;
use super::error::ApiError;
use super::{AppState, MAX_PROMPT_CHARS};
use crate::config::validate_model;
use crate::session::{Session, StartError};
use crate::sse;
use std::sync::Arc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/session", post(open))
        .route("/session/{id}/stream", get(attach))
        .route("/session/{id}/prompt", post(prompt))
        .route("/session/{id}/cancel", post(cancel))
}

fn find(state: &AppState, id: &str) -> Result<Arc<Session>, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::session_not_found())?;
    state.sessions.get(id).ok_or_else(ApiError::session_not_found)
}

async fn open(State(state): State<AppState>, Extension(identity): Extension<Identity>) -> Json<serde_json::Value> {
    let session = state.sessions.create();
    tracing::info!(session = %session.id, by = %identity.name, "session opened");
    Json(json!({ "session_id": session.id.to_string() }))
}

/// Attach (SPEC §4): backlog, `caught-up`, live tail.
async fn attach(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = find(&state, &id)?;
    let mut last = sse::parse_last_event_id(headers.get("last-event-id").map(HeaderValue::as_bytes));
    // An id this log never issued (a log from another life): replay it all.
    if let Some(id) = last {
        let next = session
            .log
            .next_id()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        if id >= next {
            tracing::warn!(session = %session.id, last_event_id = id, next, "Last-Event-ID beyond the log; replaying it all");
            last = None;
        }
    }
    let stream = sse::attach(
        session.log.clone(),
        last,
        state.config.sse_keepalive,
        state.streams_end.clone(),
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
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
) -> Result<Json<serde_json::Value>, ApiError> {
    let session = find(&state, &id)?;
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
    match state
        .sessions
        .start_turn(&session, body.prompt, model, identity.name.clone())
        .await
    {
        Ok(()) => {
            tracing::info!(session = %session.id, by = %identity.name, chars, "prompt accepted");
            Ok(Json(json!({ "status": "started" })))
        }
        Err(StartError::Busy) => Err(ApiError::Conflict("a turn is already running".into())),
        Err(err @ StartError::ShuttingDown) => Err(ApiError::Unavailable(err.to_string())),
        Err(err @ StartError::Log(_)) => Err(ApiError::Unavailable(err.to_string())),
    }
}

async fn cancel(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let session = find(&state, &id)?;
    let cancelled = state.sessions.cancel(&session).await;
    tracing::info!(session = %session.id, by = %identity.name, cancelled, "cancel");
    Ok(Json(json!({ "cancelled": cancelled })))
}
