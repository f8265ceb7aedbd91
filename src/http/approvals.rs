//! Approvals over HTTP (README "Approvals"): the agent's `PreToolUse` hook,
//! and the operator's decision on a waiting tool call.

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::Identity;
use super::body::JsonBody;
use super::error::ApiError;
use super::extract::Path;
use crate::approval::{Answer, DecideError, DecidedBy, ToolCall};

/// Longest message an operator may send the agent with a decision.
const MAX_MESSAGE_CHARS: usize = 2000;
/// Longest tool call id taken (the CLI's are about 30 characters).
const MAX_TOOL_USE_ID: usize = 200;

/// `/api` routes (behind authentication).
pub fn router() -> Router<AppState> {
    Router::new().route("/session/{id}/approvals/{tool_use_id}", post(decide))
}

/// The agent's hook: its turn's secret in `Authorization`, the tool call in
/// the body; the answer in the CLI's hook format. Anything wrong is a
/// refusal the CLI turns into a blocked call (`onFailure: block`).
pub async fn pre_tool_use(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some((turn, session_id)) = secret.and_then(|s| state.sessions.approvals().turn_of(s)) else {
        return refused(StatusCode::UNAUTHORIZED, "no running turn holds this hook secret");
    };
    let call: ToolCall = match serde_json::from_slice(&body) {
        Ok(call) => call,
        Err(err) => {
            tracing::warn!(session = %session_id, %err, "the agent's hook sent a tool call that does not parse");
            return refused(StatusCode::BAD_REQUEST, &format!("not a PreToolUse hook input: {err}"));
        }
    };
    if call.tool_use_id.is_empty() || call.tool_use_id.len() > MAX_TOOL_USE_ID {
        return Json(Answer { allow: false, reason: "denied: the tool call has no usable id".into() }.to_hook_output())
            .into_response();
    }
    let session = match state.sessions.get(session_id).await {
        Ok(Some(session)) => session,
        Ok(None) => return refused(StatusCode::NOT_FOUND, "session not found"),
        Err(err) => return refused(StatusCode::SERVICE_UNAVAILABLE, &format!("storage: {err}")),
    };
    // Detached: the wait and its decision go on if the connection drops,
    // so a timeout is still logged; the turn's end closes what remains.
    let approvals = state.sessions.approvals().clone();
    let waited = state.tasks.spawn(async move { approvals.ask(turn, session.id, &session.log, call).await }).await;
    let answer = waited.unwrap_or_else(|err| Answer { allow: false, reason: format!("denied: {err}") });
    Json(answer.to_hook_output()).into_response()
}

/// A hook request that is not answered: the status says why, and the body
/// is a deny too, so that no reading of it by the CLI lets the call run.
fn refused(status: StatusCode, detail: &str) -> Response {
    let mut body = Answer { allow: false, reason: format!("denied: {detail}") }.to_hook_output();
    body["detail"] = detail.into();
    (status, Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct DecisionBody {
    decision: String,
    #[serde(default)]
    message: Option<String>,
}

async fn decide(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path((id, tool_use_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<DecisionBody>,
) -> Result<Json<Value>, ApiError> {
    let session = super::sessions::find(&state, &id).await?;
    let allow = match body.decision.as_str() {
        "allow" => true,
        "deny" => false,
        other => {
            return Err(ApiError::Unprocessable(format!("decision must be \"allow\" or \"deny\", not {other:?}")));
        }
    };
    let message = body.message.map(|m| m.trim().to_owned()).filter(|m| !m.is_empty());
    if let Some(message) = &message {
        if message.chars().count() > MAX_MESSAGE_CHARS {
            return Err(ApiError::Unprocessable(format!("message is longer than {MAX_MESSAGE_CHARS} characters")));
        }
        if message.chars().any(|c| c.is_control() && c != '\n') {
            return Err(ApiError::Unprocessable("message contains control characters".into()));
        }
    }
    if tool_use_id.len() > MAX_TOOL_USE_ID {
        return Err(ApiError::NotFound("no such tool call in this session".into()));
    }
    let by = DecidedBy::Operator {
        name: identity.name.clone(),
        peer: identity.peer.to_string(),
        via: super::audit::auth_method(identity.via),
    };
    state
        .detach({
            let state = state.clone();
            async move {
                let decided =
                    state.sessions.approvals().decide(session.id, &session.log, &tool_use_id, allow, message, by).await;
                match decided {
                    Ok(()) => Ok(Json(json!({ "decision": if allow { "allow" } else { "deny" } }))),
                    Err(DecideError::Unknown) => Err(ApiError::NotFound("no such tool call in this session".into())),
                    Err(err @ DecideError::AlreadyDecided) => Err(ApiError::Conflict(err.to_string())),
                    Err(DecideError::Log(err)) => Err(err.into()),
                }
            }
        })
        .await
}
