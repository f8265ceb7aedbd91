//! `/api/targets…` and `/api/operations/…` (README "API", "Operations"):
//! the targets and their verbs, starting a verb as an operation, and
//! watching it (its JSON, or its steps over SSE with the same replay,
//! `caught-up` and `Last-Event-ID` rules as a session's stream).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::AppState;
use super::audit::{record, record_or_count};
use super::auth::Identity;
use super::error::ApiError;
use super::extract::{Path, Query};
use crate::event::{Event, EventId, Stored};
use crate::hub::{Published, Subscription};
use crate::notify::Note;
use crate::power::{Finished, OnDone, StartError, Verb, catalogue_of};
use crate::session::Session;
use crate::sse;
use crate::store::Store;
use crate::util::rfc3339;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/targets", get(targets))
        .route("/targets/{name}/verbs/{verb}", post(start))
        .route("/operations/{id}", get(operation))
        .route("/operations/{id}/stream", get(stream))
}

async fn targets(State(state): State<AppState>) -> Json<Value> {
    let targets: Vec<Value> = state
        .power
        .targets()
        .map(|target| {
            let (verbs, mutating) = catalogue_of(&target.backend.verbs());
            json!({ "name": target.name, "backend": target.backend.name(), "verbs": verbs, "mutating": mutating })
        })
        .collect();
    Json(json!({ "targets": targets }))
}

/// The optional body of a verb's POST: the operator's open session, whose
/// log gets a line when the operation starts and when it ends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    session: Option<String>,
}

/// 202 `{"operation_id"}` at once; the operation runs to its end whether
/// or not its client stays. A mutating verb whose "requested" audit record
/// cannot be written is not run (503): nothing changes a machine unrecorded.
async fn start(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    Path((name, verb)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let target = state.power.target(&name).ok_or_else(|| ApiError::NotFound(format!("no target named {name:?}")))?;
    let verb: Verb = verb.parse().map_err(|e: crate::power::UnknownVerb| ApiError::BadRequest(e.to_string()))?;
    if !target.backend.offers(verb).await {
        let (offered, _) = catalogue_of(&target.backend.verbs());
        return Err(ApiError::BadRequest(format!(
            "target {name:?} ({}) does not offer {verb}; it offers {}",
            target.backend.name(),
            offered.join(", ")
        )));
    }
    let body: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| match err.classify() {
            serde_json::error::Category::Data => ApiError::Unprocessable(format!("invalid request body: {err}")),
            _ => ApiError::BadRequest(format!("request body is not JSON: {err}")),
        })?
    };
    let session = match body.session {
        Some(id) => {
            let id =
                Uuid::parse_str(&id).map_err(|_| ApiError::Unprocessable(format!("{id:?} is not a session id")))?;
            Some(state.sessions.get(id).await?.ok_or_else(|| ApiError::Unprocessable("no such session".into()))?)
        }
        None => None,
    };
    state
        .detach({
            let state = state.clone();
            async move {
                let id = begin(&state, identity, name, verb, session, None).await?;
                Ok((StatusCode::ACCEPTED, Json(json!({ "operation_id": id.to_string() }))).into_response())
            }
        })
        .await
}

/// Audits the request (a mutating verb is not run unrecorded), starts the
/// operation and returns its id; when it finishes, it is audited, notified,
/// written in `session`'s log, and handed to `finished` if given.
pub(super) async fn begin(
    state: &AppState,
    identity: Identity,
    name: String,
    verb: Verb,
    session: Option<Arc<Session>>,
    finished: Option<oneshot::Sender<Finished>>,
) -> Result<Uuid, ApiError> {
    let action = format!("verb.{verb}");
    if verb.is_mutating() {
        if let Err(err) = record(state, &identity, &action, &name, "requested").await {
            tracing::error!(%err, %verb, target = %name, "refusing a mutating verb: the audit trail cannot be written");
            return Err(ApiError::Unavailable(format!(
                "the audit trail cannot be written ({err}); refusing to run {verb}"
            )));
        }
    } else {
        record_or_count(state, &identity, &action, &name, "requested").await;
    }
    let on_done: OnDone = Box::new({
        let (state, identity, action, session) = (state.clone(), identity.clone(), action.clone(), session.clone());
        move |done: Finished| {
            Box::pin(async move {
                let outcome = done.summary();
                record_or_count(&state, &identity, &action, &done.target, &outcome).await;
                state.notifier.send(Note::power(done.verb, &done.target, &outcome));
                if let Some(session) = session {
                    let text = format!("power: {} on {}: {outcome}", done.verb, done.target);
                    timeline(&session, text).await;
                }
                if let Some(finished) = finished {
                    let _ = finished.send(done);
                }
            })
        }
    });
    let id = match state.power.start(&name, verb, on_done).await {
        Ok(id) => id,
        Err(err) => {
            record_or_count(state, &identity, &action, &name, &format!("not run: {err}")).await;
            return Err(match err {
                StartError::NoTarget => ApiError::NotFound(format!("no target named {name:?}")),
                StartError::NotOffered => ApiError::BadRequest(err.to_string()),
                StartError::Busy => ApiError::Conflict(err.to_string()),
                StartError::ShuttingDown => ApiError::Unavailable(err.to_string()),
                StartError::Store(err) => err.into(),
            });
        }
    };
    tracing::info!(operation = %id, %verb, target = %name, by = %identity.name, "operation requested");
    if let Some(session) = &session {
        timeline(session, format!("power: {verb} on {name} started by {} (operation {id})", identity.name)).await;
    }
    Ok(id)
}

/// A line in a session's log (a `status` event), so that its incident
/// timeline shows the power actions; never holds up the operation.
async fn timeline(session: &Session, text: String) {
    if let Err(err) = session.log.append(Event::Status { text }).await {
        tracing::warn!(%err, session = %session.id, "could not log a power action in the session");
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| not_found())
}

fn not_found() -> ApiError {
    ApiError::NotFound("operation not found".into())
}

/// Steps of one operation read at a time (an operation has a handful).
const PAGE: usize = 256;

async fn operation(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    operation_json(&state, parse_id(&id)?).await.map(Json)
}

/// An operation as `GET /api/operations/{id}` answers it.
pub(super) async fn operation_json(state: &AppState, id: Uuid) -> Result<Value, ApiError> {
    let store = state.power.operations().store();
    let row = store.operation(id).await?.ok_or_else(not_found)?;
    let mut steps = Vec::new();
    let mut after = None;
    loop {
        let page = store.operation_steps(id, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        steps.extend(
            page.iter()
                .filter_map(|s| serde_json::from_str::<Value>(&s.json).ok())
                .filter(|step| step["kind"] == "step"),
        );
    }
    let mut answer = json!({
        "id": row.id.to_string(),
        "target": row.target,
        "verb": row.verb,
        "state": row.state,
        "started": rfc3339(row.started_ms),
        "finished": row.finished_ms.map(rfc3339),
        "steps": steps,
        "result": row.result.and_then(|r| serde_json::from_str::<Value>(&r).ok()).unwrap_or_else(|| json!({})),
    });
    if let Some(error) = row.error {
        answer["error"] = json!(error);
    }
    if let Some(ms) = row.recovered_after_ms {
        answer["recovered_after_s"] = json!(crate::power::operation::seconds(Duration::from_millis(ms as u64)));
    }
    Ok(answer)
}

#[derive(Debug, Deserialize)]
struct AttachQuery {
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

/// Attach to an operation's steps: backlog (all, or after `Last-Event-ID`),
/// `caught-up`, then the live steps up to `done`, and keepalives after.
async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<AttachQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let operations = state.power.operations();
    // Subscribe before reading the backlog, so no step falls between them.
    let subscription = operations.subscribe(id);
    let store = operations.store().clone();
    store.operation(id).await?.ok_or_else(not_found)?;
    let given =
        headers.get("last-event-id").map(HeaderValue::as_bytes).or(query.last_event_id.as_deref().map(str::as_bytes));
    let mut last = sse::parse_last_event_id(given);
    // An id this operation never issued (another life's): replay it all.
    if let Some(after) = last
        && store.operation_steps(id, after.checked_sub(1), 1).await?.first().is_none_or(|s| s.id != after)
    {
        last = None;
    }
    let attached = Attached {
        store,
        id,
        subscription,
        sent: last,
        pending: VecDeque::new(),
        caught_up: false,
        keepalive: state.config.sse_keepalive,
        shutdown: state.streams_end.clone(),
        _attached: sse::Attachment::new(&state.streams, "operation"),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(frames(attached)),
    )
        .into_response())
}

/// One client attached to an operation.
struct Attached {
    store: std::sync::Arc<Store>,
    id: Uuid,
    /// `None` once the operation is not running here (finished, or from an
    /// earlier run): the store holds all its steps.
    subscription: Option<Subscription>,
    /// The highest step id sent (or the client already had).
    sent: Option<EventId>,
    pending: VecDeque<Stored>,
    caught_up: bool,
    keepalive: Duration,
    shutdown: CancellationToken,
    /// Counts this stream as attached while it lives (README "Metrics").
    _attached: sse::Attachment,
}

fn frames(attached: Attached) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold(attached, |mut attached| async move {
        let frame = attached.next_frame().await?;
        Some((Ok(frame), attached))
    })
}

impl Attached {
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(step) = self.pending.pop_front() {
                if self.sent.is_some_and(|sent| step.id <= sent) {
                    continue;
                }
                self.sent = Some(step.id);
                return Some(sse::frame(&step));
            }
            if !self.caught_up {
                if !self.fill().await? {
                    self.caught_up = true;
                    return Some(Bytes::from_static(sse::CAUGHT_UP.as_bytes()));
                }
                continue;
            }
            let received = tokio::select! {
                () = self.shutdown.cancelled() => return None,
                received = async {
                    match self.subscription.as_mut() {
                        Some(subscription) => tokio::time::timeout(self.keepalive, subscription.recv()).await.ok(),
                        None => {
                            tokio::time::sleep(self.keepalive).await;
                            None
                        }
                    }
                } => received,
            };
            match received {
                None => return Some(Bytes::from_static(sse::KEEPALIVE.as_bytes())),
                Some(Ok(Published::Event(step))) if self.sent.is_none_or(|sent| step.event.id == sent + 1) => {
                    self.pending.push_back(step.event.clone())
                }
                Some(Ok(Published::Event(step))) if self.sent.is_some_and(|sent| step.event.id <= sent) => {}
                // A gap, a lag or the operation's end: the store has every
                // step that was published.
                Some(Ok(Published::Event(_))) | Some(Err(RecvError::Lagged(_))) => {
                    self.fill().await?;
                }
                Some(Err(RecvError::Closed)) => {
                    self.subscription = None;
                    self.fill().await?;
                }
                Some(Ok(Published::Notice(_) | Published::Delta { .. })) => {}
            }
        }
    }

    /// Queues the next page of steps after what was sent; false when there
    /// was nothing more. `None` ends the stream (the client reconnects).
    async fn fill(&mut self) -> Option<bool> {
        match self.store.operation_steps(self.id, self.sent, PAGE).await {
            Ok(page) => {
                let more = !page.is_empty();
                self.pending.extend(page);
                Some(more)
            }
            Err(err) => {
                tracing::warn!(%err, operation = %self.id, "operation stream ends: its steps cannot be read");
                None
            }
        }
    }
}
