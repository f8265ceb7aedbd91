//! `/api/push/…`: the console's Web Push subscriptions (README "Notifications").

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use super::audit::record_or_count;
use super::auth::Identity;
use super::body::JsonBody;
use super::error::ApiError;
use crate::notify::push::{Push, SubscribeError, Subscription};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/push/key", get(key))
        .route("/push/subscriptions", axum::routing::post(subscribe).delete(unsubscribe))
}

fn push(state: &AppState) -> Result<&std::sync::Arc<Push>, ApiError> {
    state.notifier.push().ok_or_else(|| ApiError::Unavailable("Web Push is not available on this server".into()))
}

/// The key browsers subscribe with (`applicationServerKey`).
async fn key(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "public_key": push(&state)?.public_key() })))
}

/// 201 once the subscription is kept; 422 when it is not one a browser
/// makes; 409 over the bound.
async fn subscribe(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    JsonBody(subscription): JsonBody<Subscription>,
) -> Result<Response, ApiError> {
    let push = push(&state)?.clone();
    let origin = reqwest::Url::parse(&subscription.endpoint).map(|u| crate::notify::origin(&u)).unwrap_or_default();
    state
        .detach({
            let state = state.clone();
            async move {
                push.subscribe(subscription).await.map_err(|err| match err {
                    SubscribeError::Invalid(_) => ApiError::Unprocessable(err.to_string()),
                    SubscribeError::TooMany => ApiError::Conflict(err.to_string()),
                    SubscribeError::Storage(_) => ApiError::Unavailable(err.to_string()),
                })?;
                // The endpoint's path is the subscription's secret: only its origin is recorded.
                record_or_count(&state, &identity, "push.subscribe", &origin, "ok").await;
                Ok((StatusCode::CREATED, Json(json!({ "subscribed": true }))).into_response())
            }
        })
        .await
}

#[derive(serde::Deserialize)]
struct Unsubscribe {
    endpoint: String,
}

async fn unsubscribe(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    JsonBody(request): JsonBody<Unsubscribe>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let push = push(&state)?.clone();
    let origin = reqwest::Url::parse(&request.endpoint).map(|u| crate::notify::origin(&u)).unwrap_or_default();
    state
        .detach({
            let state = state.clone();
            async move {
                let removed =
                    push.unsubscribe(&request.endpoint).await.map_err(|err| ApiError::Unavailable(err.to_string()))?;
                if removed {
                    record_or_count(&state, &identity, "push.unsubscribe", &origin, "ok").await;
                }
                Ok(Json(json!({ "removed": removed })))
            }
        })
        .await
}
