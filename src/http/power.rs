//! `/api/pve/…`: the verb catalogue and running a verb (SPEC §3, §7).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use crate::power::{PowerError, Verb, catalogue};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/pve/verbs", get(verbs))
        .route("/pve/{verb}", post(run_verb))
}

async fn verbs() -> Json<serde_json::Value> {
    let (verbs, mutating) = catalogue();
    Json(json!({ "verbs": verbs, "mutating": mutating }))
}

/// 200 when the host's exit code is 0, 502 otherwise; 400 before any ssh for an unknown verb.
async fn run_verb(State(state): State<AppState>, Path(verb): Path<String>) -> Result<Response, ApiError> {
    let verb: Verb = verb
        .parse()
        .map_err(|e: crate::power::UnknownVerb| ApiError::BadRequest(e.to_string()))?;
    let outcome = state.power.run(verb).await.map_err(|err| match err {
        PowerError::NotConfigured => ApiError::Unavailable(err.to_string()),
        PowerError::Busy => ApiError::Conflict(err.to_string()),
        PowerError::CannotStart { .. } | PowerError::Lost(_) => ApiError::Internal(err.to_string()),
    })?;
    tracing::info!(%verb, exit_code = ?outcome.exit_code, "power verb ran");
    let status = if outcome.exit_code == Some(0) {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    Ok((status, Json(outcome)).into_response())
}
