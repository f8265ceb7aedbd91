//! HTTP: the routes of SPEC §3, authentication, and error mapping.
//!
//! [`router`] is a plain function of the shared state, so tests can build
//! the whole application without a socket.

mod audit;
pub mod auth;
mod body;
pub mod error;
mod power;
mod sessions;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router, middleware};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::config::Config;
use crate::power::Power;
use crate::session::Sessions;
use error::ApiError;

/// Largest request body accepted (SPEC §6).
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest prompt accepted, in characters (SPEC §6).
pub const MAX_PROMPT_CHARS: usize = 100_000;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub sessions: Arc<Sessions>,
    pub power: Arc<Power>,
    /// Fires when attach streams must end (after turns have drained).
    pub streams_end: CancellationToken,
    /// Audit records that could not be written (SPEC: logged and counted).
    pub audit_failures: Arc<AtomicU64>,
    /// What requests started and must finish even if their client leaves.
    pub tasks: TaskTracker,
}

impl AppState {
    /// Runs the part of a request that changes state in a task of its own:
    /// a client that goes away mid-request (a phone losing signal) drops the
    /// handler, and must not cut a state change in half (a prompt logged but
    /// its turn never started, a verb run but its result never audited).
    pub async fn detach<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.tasks
            .spawn(work)
            .await
            .unwrap_or_else(|err| Err(ApiError::Internal(format!("request task failed: {err}"))))
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .merge(sessions::router())
        .merge(audit::router())
        .merge(power::router())
        .fallback(api_not_found)
        .method_not_allowed_fallback(api_method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .nest("/api", api)
        // `nest` leaves these two to the outer fallback; they are API paths too.
        .route("/api/", any(api_not_found))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "service": "breakglass" }))
}

/// Prometheus text format (no auth: counters only, nothing about sessions).
async fn metrics(State(state): State<AppState>) -> Response {
    let body = format!(
        "# HELP breakglass_audit_failures_total Audit records that could not be written.\n\
         # TYPE breakglass_audit_failures_total counter\n\
         breakglass_audit_failures_total {}\n",
        state.audit_failures.load(Ordering::Relaxed)
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn index() -> Html<&'static str> {
    Html(concat!(
        "<!doctype html><meta charset=utf-8><title>breakglass</title>",
        "<p>breakglass is running. The API is under <code>/api</code>; see <a href=/health>/health</a>.</p>"
    ))
}

async fn api_not_found() -> ApiError {
    ApiError::NotFound("no such API endpoint".into())
}

async fn api_method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(format!("method {method} is not allowed here"))
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "not found\n").into_response()
}
