//! A Redfish BMC the tests serve themselves on loopback, over plain HTTP
//! (which the client allows to loopback only, README "Power backends"),
//! for what sushy-emulator cannot do (docs/BACKENDS.md): answer errors for
//! a while after a reset, as a rebooting BMC does, and keep its log service
//! slow to answer. It speaks the part of Redfish `src/power/redfish.rs`
//! uses: the Systems collection, one system with `PowerState` and its
//! `#ComputerSystem.Reset` action with the allowable reset types, and a
//! log service collection with no services in it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::harness::Background;

const SYSTEM: &str = "/redfish/v1/Systems/1";
const LOGS: &str = "/redfish/v1/Systems/1/LogServices";
const RESET: &str = "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset";

/// One answer the BMC gives instead of the system while it reboots.
#[derive(Debug, Clone, Copy)]
pub enum Glitch {
    /// 503 with a Redfish error body: the BMC's web server is up, its
    /// Redfish service is not yet.
    Unavailable,
    /// 200 with an HTML page: a half-started service's placeholder.
    Garbage,
    /// 401: the BMC refuses the login.
    Unauthorized,
}

impl Glitch {
    fn answer(self) -> Response {
        match self {
            Glitch::Unavailable => {
                let body = json!({"error": {"code": "Base.1.8.ServiceTemporarilyUnavailable",
                    "message": "The service is temporarily unavailable"}});
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
            }
            Glitch::Garbage => {
                ([(header::CONTENT_TYPE, "text/html")], "<html><body>Starting up…</body></html>").into_response()
            }
            Glitch::Unauthorized => {
                let body = json!({"error": {"code": "Base.1.8.NoValidSession", "message": "Invalid credentials"}});
                (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
            }
        }
    }
}

/// What the BMC does; the test sets it before the server starts.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// What the system's reads answer after a reset, one each, before its
    /// power again.
    pub after_reset: Vec<Glitch>,
    /// Answer every read after a reset with the last of `after_reset`.
    pub glitch_for_ever: bool,
    /// How long the log service collection (read by forensics) takes.
    pub log_delay: Duration,
}

#[derive(Debug, Default)]
struct State {
    behaviour: Behaviour,
    pending: VecDeque<Glitch>,
    /// Reads of the system answered with a glitch.
    glitched: usize,
    resets: Vec<String>,
}

pub struct Bmc {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<Mutex<State>>,
    _server: Background,
}

impl Bmc {
    pub fn serve(behaviour: Behaviour) -> Bmc {
        let state = Arc::new(Mutex::new(State { behaviour, ..State::default() }));
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: String| {
            let state = shared.clone();
            async move { answer(&state, &method, uri.path(), &headers, &body).await }
        });
        let server = Background::serve(app);
        Bmc { url: server.base_url.clone(), state, _server: server }
    }

    /// How many reads of the system were answered with a glitch.
    pub fn glitched(&self) -> usize {
        self.state.lock().unwrap().glitched
    }

    /// The reset types received, in order.
    pub fn resets(&self) -> Vec<String> {
        self.state.lock().unwrap().resets.clone()
    }
}

async fn answer(state: &Mutex<State>, method: &Method, path: &str, headers: &HeaderMap, body: &str) -> Response {
    if !headers.get(header::AUTHORIZATION).is_some_and(|v| v.as_bytes().starts_with(b"Basic ")) {
        return Glitch::Unauthorized.answer();
    }
    match (method.as_str(), path) {
        ("GET", "/redfish/v1/Systems") => {
            axum::Json(json!({"Members": [{"@odata.id": SYSTEM}], "Members@odata.count": 1})).into_response()
        }
        ("GET", SYSTEM) => {
            let mut state = state.lock().unwrap();
            let glitch = match state.pending.pop_front() {
                Some(glitch) if state.behaviour.glitch_for_ever && state.pending.is_empty() => {
                    state.pending.push_back(glitch);
                    Some(glitch)
                }
                other => other,
            };
            if let Some(glitch) = glitch {
                state.glitched += 1;
                return glitch.answer();
            }
            axum::Json(json!({
                "@odata.id": SYSTEM,
                "Id": "1",
                "Name": "small-bmc",
                "PowerState": "On",
                "Actions": {"#ComputerSystem.Reset": {
                    "target": RESET,
                    "ResetType@Redfish.AllowableValues": ["On", "ForceOff", "ForceRestart", "GracefulShutdown"],
                }},
                "LogServices": {"@odata.id": LOGS},
            }))
            .into_response()
        }
        ("GET", LOGS) => {
            let delay = state.lock().unwrap().behaviour.log_delay;
            tokio::time::sleep(delay).await;
            axum::Json(json!({"@odata.id": LOGS, "Members": []})).into_response()
        }
        ("POST", RESET) => {
            let reset = serde_json::from_str::<serde_json::Value>(body).ok();
            let Some(kind) = reset.as_ref().and_then(|r| r["ResetType"].as_str()) else {
                return (StatusCode::BAD_REQUEST, "no ResetType").into_response();
            };
            let mut state = state.lock().unwrap();
            state.resets.push(kind.to_owned());
            state.pending = state.behaviour.after_reset.iter().copied().collect();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
