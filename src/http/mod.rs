//! HTTP: the routes of README "API", authentication, and error mapping.
//!
//! [`router`] is a plain function of the shared state, so tests can build
//! the whole application without a socket.

mod approvals;
mod audit;
pub mod auth;
mod body;
pub mod error;
mod extract;
pub mod login;
mod metrics;
mod power;
mod push;
mod sessions;
mod targets;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::DefaultBodyLimit;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router, middleware};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::power::Power;
use crate::session::Sessions;
use error::ApiError;

/// Largest request body accepted (README "Authentication").
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest prompt accepted, in characters (README "Authentication").
pub const MAX_PROMPT_CHARS: usize = 100_000;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub sessions: Arc<Sessions>,
    pub power: Arc<Power>,
    /// Fires when attach streams must end (after turns have drained).
    pub streams_end: CancellationToken,
    /// Audit records that could not be written (README "The audit trail": logged and counted).
    pub audit_failures: Arc<AtomicU64>,
    /// What requests started and must finish even if their client leaves.
    pub tasks: TaskTracker,
    /// Login links and the cookies they become.
    pub logins: Arc<login::Logins>,
    /// Notifications to the operator (README "Notifications"): `send` queues and returns.
    pub notifier: Arc<crate::notify::Notifier>,
    /// Attach streams open and bytes replayed (README "Metrics").
    pub streams: crate::sse::StreamCounters,
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

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .merge(sessions::router())
        .merge(audit::router())
        .route("/whoami", get(whoami))
        .route("/presets", get(presets))
        .merge(power::router())
        .merge(targets::router())
        .merge(approvals::router())
        .merge(push::router())
        .fallback(api_not_found)
        .method_not_allowed_fallback(api_method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::scrape).with_state(Arc::new(metrics::registry(&state))))
        // The agent's hook authenticates with its turn's secret, not as a caller of `/api`.
        .route(crate::approval::HOOK_PATH, axum::routing::post(approvals::pre_tool_use))
        // HEAD is not GET here: it must not spend the link (see `login_head`).
        .route("/login", get(login).head(login_head))
        .nest("/api", api)
        // `nest` leaves these two to the outer fallback; they are API paths too.
        .route("/api/", any(api_not_found))
        .fallback(crate::web::asset)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// The request log line, once the response head is ready, in the span every
/// line the handler logs carries. The response body is left as it is: a
/// tracing layer that wraps it enters the span on every poll of the body,
/// which for an attach stream is every chunk of every client for hours.
async fn log_request(request: Request<axum::body::Body>, next: middleware::Next) -> Response {
    let span = tracing::info_span!("request", method = %request.method(), path = %request.uri().path());
    let started = std::time::Instant::now();
    async move {
        let response = next.run(request).await;
        let latency = format_args!("{} ms", started.elapsed().as_millis());
        let status = response.status();
        tracing::info!(%latency, status = status.as_u16(), "finished processing request");
        if status.is_server_error() {
            tracing::error!(classification = %format_args!("Status code: {status}"), %latency, "response failed");
        }
        response
    }
    .instrument(span)
    .await
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "service": "breakglass" }))
}

/// Who the server sees, and what the console needs to know of it.
async fn whoami(
    State(state): State<AppState>,
    axum::extract::Extension(identity): axum::extract::Extension<auth::Identity>,
) -> Json<serde_json::Value> {
    let via = match identity.via {
        auth::Via::Bearer => "bearer",
        auth::Via::ProxyHeader => "proxy",
        auth::Via::Cookie => "login",
    };
    Json(json!({
        "identity": identity.name,
        "via": via,
        "keepalive_seconds": state.config.sse_keepalive.as_secs(),
        "power_configured": state.power.default_target().is_some(),
    }))
}

async fn presets(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "presets": state.config.presets }))
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// A login link (README, "The web console"): sets the console's cookie and
/// sends the browser to `/`, so the token leaves the address bar and history.
// A page for browsers: a query that does not parse is answered in text,
// which axum's own extractor does (clippy.toml steers `/api` away from it).
#[allow(clippy::disallowed_types)]
async fn login(
    State(state): State<AppState>,
    ConnectInfo(auth::Peer(peer)): ConnectInfo<auth::Peer>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<LoginQuery>,
) -> Response {
    let redeemed = match query.token {
        // Redeeming reads the data directory: off the runtime's threads.
        Some(token) => {
            let logins = state.logins.clone();
            tokio::task::spawn_blocking(move || logins.redeem(&token)).await.ok().flatten()
        }
        None => None,
    };
    let Some(cookie) = redeemed else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
            "This login link is wrong, expired or already used. \
             Run `breakglass login` on the server for a new one.\n",
        )
            .into_response();
    };
    // Never sent in clear once the browser is on HTTPS.
    let secure = if auth::came_over_https(&state.config.auth, &headers, peer.ip()) { "; Secure" } else { "" };
    let set_cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        login::COOKIE,
        cookie.value,
        cookie.max_age.as_secs()
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_owned()),
            (header::SET_COOKIE, set_cookie),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
    )
        .into_response()
}

/// Link previews and chat apps send HEAD to a link before (or instead of) a
/// person opening it, so HEAD answers without looking at the token, and the
/// GET that follows still signs the browser in (README, "The web console").
async fn login_head() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], "")
}

async fn api_not_found() -> ApiError {
    ApiError::NotFound("no such API endpoint".into())
}

async fn api_method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(format!("method {method} is not allowed here"))
}
