//! `/api/pve/…`: the verb catalogue and running a verb on the default
//! target (README "API", "Setting up the hypervisor"), answered when the
//! verb has finished; `/api/targets/…` runs them as operations. An API
//! backend's verb here is such an operation, waited for.

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::oneshot;

use super::AppState;
use super::audit::{record, record_or_count};
use super::auth::Identity;
use super::error::ApiError;
use super::extract::Path;
use crate::notify::Note;
use crate::power::{Backend, OpState, PowerError, Verb, catalogue};

pub fn router() -> Router<AppState> {
    Router::new().route("/pve/verbs", get(verbs)).route("/pve/{verb}", post(run_verb))
}

async fn verbs() -> Json<serde_json::Value> {
    let (verbs, mutating) = catalogue();
    Json(json!({ "verbs": verbs, "mutating": mutating }))
}

/// 200 when the host's exit code is 0, 502 otherwise; 400 before any ssh
/// for an unknown verb. A mutating verb that cannot be recorded in the audit
/// trail is not run (503): nothing changes a VM unrecorded. On a default
/// target reached through an API, 200 when its operation succeeded, 502
/// with the backend's words when it failed.
async fn run_verb(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path(verb): Path<String>,
) -> Result<Response, ApiError> {
    let verb: Verb = verb.parse().map_err(|e: crate::power::UnknownVerb| ApiError::BadRequest(e.to_string()))?;
    // The hypervisor script's catalogue: `shutdown` and `nmi` are verbs of
    // the API backends only, reached through `/api/targets/…`.
    if !Verb::CATALOGUE.contains(&verb) {
        return Err(ApiError::BadRequest(format!("unknown verb {:?}", verb.as_str())));
    }
    let api_target = match state.power.default_target() {
        Some(target) if !matches!(target.backend, Backend::Ssh(_)) => Some(target.name.clone()),
        Some(_) | None => None,
    };
    state
        .detach({
            let state = state.clone();
            async move {
                match api_target {
                    Some(name) => run_operation(&state, identity, name, verb).await,
                    None => run_audited(&state, &identity, verb).await,
                }
            }
        })
        .await
}

/// The verb as an operation on the default target (audited, notified, one
/// mutating at a time like any other), answered when it has ended: its
/// `GET /api/operations/{id}` answer, with `detail` saying why it failed.
async fn run_operation(state: &AppState, identity: Identity, name: String, verb: Verb) -> Result<Response, ApiError> {
    let (finished, ended) = oneshot::channel();
    let id = super::targets::begin(state, identity, name, verb, None, Some(finished)).await?;
    let ended = ended.await.map_err(|_| ApiError::Internal(format!("operation {id} ended without an outcome")))?;
    let mut answer = super::targets::operation_json(state, id).await?;
    if ended.state == OpState::Succeeded {
        return Ok((StatusCode::OK, Json(answer)).into_response());
    }
    answer["detail"] = json!(ended.error.unwrap_or_else(|| "failed".into()));
    Ok((StatusCode::BAD_GATEWAY, Json(answer)).into_response())
}

/// Audit "requested" (required for a mutating verb), run, audit the result.
async fn run_audited(state: &AppState, identity: &Identity, verb: Verb) -> Result<Response, ApiError> {
    let action = format!("verb.{verb}");
    let target = match state.power.default_target().map(|t| &t.backend) {
        Some(Backend::Ssh(ssh)) => ssh.host.clone(),
        Some(_) | None => String::new(),
    };
    if verb.is_mutating() {
        if let Err(err) = record(state, identity, &action, &target, "requested").await {
            tracing::error!(%err, %verb, "refusing a mutating verb: the audit trail cannot be written");
            return Err(ApiError::Unavailable(format!(
                "the audit trail cannot be written ({err}); refusing to run {verb}"
            )));
        }
    } else {
        record_or_count(state, identity, &action, &target, "requested").await;
    }
    let outcome = match state.power.run(verb).await {
        Ok(outcome) => outcome,
        Err(err) => {
            let outcome = match err {
                PowerError::CutOff => "cut off by shutdown".to_owned(),
                _ => format!("not run: {err}"),
            };
            record_or_count(state, identity, &action, &target, &outcome).await;
            if matches!(err, PowerError::CutOff | PowerError::Backend(_) | PowerError::Lost(_)) {
                state.notifier.send(Note::power(verb, &target, &outcome));
            }
            return Err(match err {
                PowerError::NotConfigured | PowerError::CutOff => ApiError::Unavailable(err.to_string()),
                PowerError::Busy => ApiError::Conflict(err.to_string()),
                PowerError::NotSsh(_) => ApiError::BadRequest(err.to_string()),
                PowerError::Backend(_) | PowerError::Lost(_) => ApiError::Internal(err.to_string()),
            });
        }
    };
    let result = match (outcome.exit_code, outcome.timed_out) {
        (Some(code), _) => format!("exit {code}"),
        (None, true) => "timed out".to_owned(),
        (None, false) => "ssh killed by a signal".to_owned(),
    };
    record_or_count(state, identity, &action, &target, &result).await;
    state.notifier.send(Note::power(verb, &target, &result));
    tracing::info!(%verb, exit_code = ?outcome.exit_code, by = %identity.name, "power verb ran");
    let status = if outcome.exit_code == Some(0) { StatusCode::OK } else { StatusCode::BAD_GATEWAY };
    Ok((status, Json(outcome)).into_response())
}
