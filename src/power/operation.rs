//! A verb as an operation you can watch (README "Operations").
//!
//! An operation starts at once and runs to its end in a task of the power
//! path's tracker, whether or not anyone watches. Each step it takes is
//! written to the store (committed first, like a session's events) and
//! then published to the clients attached to it; the last one is `done`.
//! For `reset`, `cycle` and `start` it ends only once the target is
//! verifiably back: running, then passing its `check` (polled until it does
//! or `recover_timeout_seconds` runs out).
//!
//! The API backends' verbs are composed here from their actions: `stop` is
//! a graceful shutdown that escalates to a forced one after the target's
//! stop timeout, `cycle` is off, wait until off, on where the backend has no
//! power cycle of its own, and a verb that finds the target already in the
//! state it asks for succeeds and says so. The `ssh` backend's host script
//! composes its own verbs; its operations wrap them unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use thiserror::Error;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::recovery::{POLL, http_client};
use super::ssh::SshTarget;
use super::{Action, Backend, BackendError, PowerState, Slot, Target, Verb, VerbCounts, count_verb};
use crate::event::{EventId, Stored};
use crate::hub::{Hub, Subscription};
use crate::store::{Finish, OperationRow, Store, StoreError, now_ms};
use crate::util::rfc3339;

/// Called once an operation has finished, whatever happened: the audit
/// record, the notification and the session's line (README "Operations").
pub type OnDone = Box<dyn FnOnce(Finished) -> BoxFuture<'static, ()> + Send>;

/// What the failure of an operation cut off by shutdown says.
const CUT_OFF: &str = "cut off by shutdown: what the target did is unknown (check with status)";
/// What a restart says of an operation the last run left running.
pub const INTERRUPTED: &str = "interrupted";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Running => "running",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: Uuid,
    pub target: String,
    pub verb: Verb,
    pub state: OpState,
    pub error: Option<String>,
    pub recovered_after: Option<Duration>,
    /// Its last step before `done`, in the operator's words.
    pub last_step: String,
}

impl Finished {
    /// One line for the audit trail, a notification or a session's log.
    pub fn summary(&self) -> String {
        match (&self.error, self.state) {
            (Some(error), _) => format!("{}: {error}", self.state.as_str()),
            (None, _) if self.last_step.is_empty() => self.state.as_str().to_owned(),
            (None, state) => format!("{}: {}", state.as_str(), self.last_step),
        }
    }
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("no such target")]
    NoTarget,
    #[error("this target does not offer that verb")]
    NotOffered,
    #[error("a mutating operation is already running on this target")]
    Busy,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The operations of this server: their rows and steps in the store, and
/// the hub of each running one, for the clients attached to it.
#[derive(Debug)]
pub struct Operations {
    store: Arc<Store>,
    live: StdMutex<HashMap<Uuid, Arc<Hub>>>,
    /// For the targets' HTTP checks: made by the first operation that needs
    /// it, as loading the TLS roots costs start-up time and memory.
    checks: std::sync::OnceLock<Option<reqwest::Client>>,
    /// Where a finished operation is counted (README "Metrics").
    verbs: VerbCounts,
}

impl Operations {
    pub fn new(store: Arc<Store>, verbs: VerbCounts) -> Self {
        Operations { store, live: StdMutex::default(), checks: std::sync::OnceLock::new(), verbs }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Steps published from now on, while the operation runs here; `None`
    /// once it has finished (everything is in the store then).
    pub fn subscribe(&self, id: Uuid) -> Option<Subscription> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|hub| hub.subscribe())
    }

    /// Marks what the last run left running as failed, "interrupted", with
    /// its `done` step: its task died with that server.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let running = self.store.running_operations().await?;
        for (row, next) in &running {
            let done = done_step(*next, OpState::Failed, None, Some(INTERRUPTED));
            let result = row.result.clone().unwrap_or_else(|| "{}".into());
            self.store
                .finish_operation(Finish {
                    id: row.id,
                    state: OpState::Failed.as_str().into(),
                    finished_ms: now_ms(),
                    result,
                    error: Some(INTERRUPTED.into()),
                    recovered_after_ms: None,
                    last_step: done,
                })
                .await?;
            tracing::warn!(operation = %row.id, target = %row.target, verb = %row.verb, "an operation was interrupted by the last stop");
        }
        Ok(running.len())
    }

    pub(super) async fn start(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        cut_off: &CancellationToken,
        slot: Arc<Slot>,
        verb: Verb,
        guard: Option<OwnedMutexGuard<()>>,
        on_done: OnDone,
    ) -> Result<Uuid, StartError> {
        let id = Uuid::new_v4();
        let row = OperationRow {
            id,
            target: slot.target.name.clone(),
            verb: verb.as_str().into(),
            state: OpState::Running.as_str().into(),
            started_ms: now_ms(),
            finished_ms: None,
            result: None,
            error: None,
            recovered_after_ms: None,
        };
        self.store.create_operation(row).await?;
        let hub = Arc::new(Hub::default());
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, hub.clone());
        let (operations, cut_off) = (self.clone(), cut_off.clone());
        tracker.spawn(async move {
            let mut run = Run { id, store: operations.store.clone(), hub, next: 0, result: Map::new(), last: String::new() };
            let target = &slot.target;
            tracing::info!(operation = %id, target = %target.name, %verb, "operation started");
            let outcome = tokio::select! {
                outcome = procedure(target, verb, &mut run, operations.checks.get_or_init(http_client).as_ref()) => outcome,
                () = cut_off.cancelled() => Err(CUT_OFF.to_owned()),
            };
            let finished = run.finish(target, verb, outcome).await;
            operations.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            drop(guard);
            count_verb(&operations.verbs, &target.name, verb, finished.state);
            tracing::info!(operation = %id, target = %target.name, %verb, outcome = %finished.summary(), "operation finished");
            on_done(finished).await;
        });
        Ok(id)
    }
}

/// The `done` step: the last of every operation.
fn done_step(id: EventId, state: OpState, recovered_after: Option<Duration>, error: Option<&str>) -> Stored {
    let mut done = json!({ "kind": "done", "id": id, "at": rfc3339(now_ms()), "state": state.as_str() });
    if let Some(after) = recovered_after {
        done["recovered_after_s"] = json!(seconds(after));
    }
    if let Some(error) = error {
        done["error"] = json!(error);
    }
    Stored { id, json: done.to_string().into() }
}

/// Seconds to a tenth, as the API gives them.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// Whole seconds, as the steps say them.
fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64().round() as u64)
}

/// One running operation's steps and result so far.
struct Run {
    id: Uuid,
    store: Arc<Store>,
    hub: Arc<Hub>,
    next: EventId,
    /// What the backend answered, as `result` (README "API").
    result: Map<String, Value>,
    last: String,
}

impl Run {
    /// Logs a step (committed, then published). A step the store cannot
    /// take is left out, never published unlogged; the operation goes on,
    /// since the target's power comes first.
    async fn step(&mut self, text: impl Into<String>) {
        let text = text.into();
        let json = json!({ "kind": "step", "id": self.next, "at": rfc3339(now_ms()), "text": text });
        let stored = Stored { id: self.next, json: json.to_string().into() };
        match self.store.operation_step(self.id, stored.clone()).await {
            Ok(()) => {
                self.next += 1;
                self.hub.publish(stored);
            }
            Err(err) => tracing::error!(%err, operation = %self.id, step = %text, "could not log an operation's step"),
        }
        self.last = text;
    }

    fn put(&mut self, key: &str, value: impl Into<Value>) {
        self.result.insert(key.into(), value.into());
    }

    async fn finish(self, target: &Target, verb: Verb, outcome: Result<Option<Duration>, String>) -> Finished {
        let (state, recovered_after, error) = match outcome {
            Ok(after) => (OpState::Succeeded, after, None),
            Err(error) => (OpState::Failed, None, Some(error)),
        };
        let done = done_step(self.next, state, recovered_after, error.as_deref());
        let finish = Finish {
            id: self.id,
            state: state.as_str().into(),
            finished_ms: now_ms(),
            result: Value::Object(self.result).to_string(),
            error: error.clone(),
            recovered_after_ms: recovered_after.map(|d| d.as_millis() as i64),
            last_step: done.clone(),
        };
        match self.store.finish_operation(finish).await {
            Ok(()) => self.hub.publish(done),
            // Left running in the store: the next start marks it interrupted.
            Err(err) => tracing::error!(%err, operation = %self.id, "could not log an operation's end"),
        }
        Finished { id: self.id, target: target.name.clone(), verb, state, error, recovered_after, last_step: self.last }
    }
}

fn failed(err: BackendError) -> String {
    err.to_string()
}

/// What a verb does on a target, step by step; `Ok` with the recovery
/// time for the verbs that verify one.
async fn procedure(
    target: &Target,
    verb: Verb,
    run: &mut Run,
    checks: Option<&reqwest::Client>,
) -> Result<Option<Duration>, String> {
    let backend = &target.backend;
    match verb {
        Verb::Status => {
            let (state, said) = backend.power().await.map_err(failed)?;
            run.put("power", state.as_str());
            run.put("backend", said);
            run.step(format!("power: {state}")).await;
            return Ok(None);
        }
        Verb::Forensics => {
            forensics(backend, run).await?;
            return Ok(None);
        }
        Verb::Stop | Verb::Shutdown | Verb::Start => {
            let want = if verb == Verb::Start { PowerState::Running } else { PowerState::Stopped };
            let (state, _) = backend.power().await.map_err(failed)?;
            if state == want {
                run.put("power", state.as_str());
                run.put("already", true);
                run.step(format!("already {want}: nothing to do")).await;
                return Ok(None);
            }
        }
        Verb::Reset | Verb::Cycle | Verb::Nmi => {}
    }
    // The recovery clock starts at the action (README "Operations"): the
    // API backends' forensics come before it, and may take long on a BMC
    // with big logs; the host script takes its own forensics inside the
    // one run that also acts, so there it starts with that run.
    let acted = match backend {
        Backend::Ssh(ssh) => {
            let sent = Instant::now();
            ssh_verb(ssh, verb, run, sent).await?;
            sent
        }
        Backend::PveApi(_) | Backend::Redfish(_) => composed(target, verb, run).await?,
    };
    if verb.recovers() { recover(target, run, acted, checks).await.map(Some) } else { Ok(None) }
}

/// Forensics, saved where the backend keeps them: on the host for `ssh`,
/// in the operation's result for the API backends.
async fn forensics(backend: &Backend, run: &mut Run) -> Result<(), String> {
    match backend {
        Backend::Ssh(ssh) => {
            let outcome = ssh.run(Verb::Forensics).await.map_err(failed)?;
            run.put("backend", outcome.to_json());
            if let Some(file) = outcome.forensics_file() {
                run.step(format!("forensics saved ({file} on the host)")).await;
            }
            outcome.error().map_or(Ok(()), |err| Err(err.to_string()))
        }
        Backend::PveApi(_) | Backend::Redfish(_) => {
            let dump = backend.forensics().await.map_err(failed)?;
            run.put("forensics", dump);
            run.step("forensics saved (in this operation's result)").await;
            Ok(())
        }
    }
}

/// A mutating verb of the host script, which takes forensics first and
/// composes `cycle` itself (README "Setting up the hypervisor").
async fn ssh_verb(ssh: &SshTarget, verb: Verb, run: &mut Run, sent: Instant) -> Result<(), String> {
    run.step(match verb {
        Verb::Stop => "stop sent (the host saves forensics first; its stop is a forced one)".to_owned(),
        Verb::Cycle => {
            "cycle sent (the host saves forensics, stops the VM, waits until it is off, starts it)".to_owned()
        }
        _ => format!("{verb} sent (the host saves forensics first)"),
    })
    .await;
    let outcome = ssh.run(verb).await.map_err(failed)?;
    run.put("backend", outcome.to_json());
    if let Some(file) = outcome.forensics_file() {
        run.step(format!("forensics saved ({file} on the host)")).await;
    }
    if let Some(err) = outcome.error() {
        return Err(err.to_string());
    }
    let took = secs(sent.elapsed());
    match verb {
        Verb::Stop => {
            run.put("stop", "forced");
            run.step(format!("stopped after {took} (forced)")).await;
        }
        Verb::Cycle => run.step(format!("stopped and started again after {took}")).await,
        _ => run.step(format!("{verb} done after {took}")).await,
    }
    Ok(())
}

/// A mutating verb of an API backend, from its actions; forensics first.
/// Returns when the action a recovery is timed from was sent: the reset,
/// the power-on (the last action of a composed cycle) or the power cycle;
/// for the verbs that recover nothing, when the first action was.
async fn composed(target: &Target, verb: Verb, run: &mut Run) -> Result<Instant, String> {
    let backend = &target.backend;
    forensics(backend, run).await?;
    let act = |action| backend.act(action);
    let mut acted = Instant::now();
    match verb {
        Verb::Reset => {
            acted = Instant::now();
            run.put("reset", act(Action::Reset).await.map_err(failed)?);
            run.step("reset sent").await;
        }
        Verb::Start => {
            acted = Instant::now();
            run.put("start", act(Action::On).await.map_err(failed)?);
            run.step("start sent").await;
        }
        Verb::Nmi => {
            acted = Instant::now();
            run.put("nmi", act(Action::Nmi).await.map_err(failed)?);
            run.step("NMI sent").await;
        }
        Verb::Shutdown => {
            let sent = Instant::now();
            run.step("shutdown sent").await;
            run.put("shutdown", act(Action::GracefulShutdown).await.map_err(failed)?);
            // The stop timeout counts from the request: PVE spends it
            // inside its own shutdown task, a BMC after answering.
            match wait_for(backend, PowerState::Stopped, left(sent, target.stop_timeout)).await? {
                Waited::There => run.step(format!("stopped after {}", secs(sent.elapsed()))).await,
                Waited::Late(None) => {
                    return Err(format!(
                        "still running after {}: the guest did not shut down",
                        secs(target.stop_timeout)
                    ));
                }
                Waited::Late(Some(err)) => {
                    return Err(format!("not seen stopped after {}{}", secs(target.stop_timeout), last_read(&err)));
                }
            }
        }
        Verb::Stop => {
            let sent = Instant::now();
            let mut how = "forced";
            if backend.has_graceful_stop().await.map_err(failed)? {
                run.step("graceful shutdown sent").await;
                run.put("shutdown", act(Action::GracefulShutdown).await.map_err(failed)?);
                match wait_for(backend, PowerState::Stopped, left(sent, target.stop_timeout)).await? {
                    Waited::There => how = "graceful",
                    Waited::Late(None) => {
                        run.step(format!("still running after {}: forced stop sent", secs(target.stop_timeout))).await;
                    }
                    Waited::Late(Some(err)) => {
                        let limit = secs(target.stop_timeout);
                        run.step(format!("not seen stopped after {limit}{}: forced stop sent", last_read(&err))).await;
                    }
                }
            } else {
                run.step("forced stop sent").await;
            }
            if how == "forced" {
                run.put("force_off", act(Action::ForceOff).await.map_err(failed)?);
                match wait_for(backend, PowerState::Stopped, target.stop_timeout).await? {
                    Waited::There => {}
                    Waited::Late(None) => {
                        return Err(format!("still running {} after a forced stop", secs(target.stop_timeout)));
                    }
                    Waited::Late(Some(err)) => {
                        let limit = secs(target.stop_timeout);
                        return Err(format!("not seen stopped {limit} after a forced stop{}", last_read(&err)));
                    }
                }
            }
            run.put("stop", how);
            run.step(format!("stopped after {} ({how})", secs(sent.elapsed()))).await;
        }
        Verb::Cycle if backend.has_native_cycle().await.map_err(failed)? => {
            acted = Instant::now();
            run.put("cycle", act(Action::PowerCycle).await.map_err(failed)?);
            run.step("power cycle sent").await;
        }
        Verb::Cycle => {
            let sent = Instant::now();
            run.put("force_off", act(Action::ForceOff).await.map_err(failed)?);
            run.step("stop sent").await;
            match wait_for(backend, PowerState::Stopped, target.stop_timeout).await? {
                Waited::There => {}
                Waited::Late(None) => {
                    let limit = secs(target.stop_timeout);
                    return Err(format!("still running {limit} after the stop: not starting it"));
                }
                Waited::Late(Some(err)) => {
                    let limit = secs(target.stop_timeout);
                    return Err(format!("not seen stopped {limit} after the stop{}: not starting it", last_read(&err)));
                }
            }
            run.step(format!("stopped after {}", secs(sent.elapsed()))).await;
            acted = Instant::now();
            run.put("start", act(Action::On).await.map_err(failed)?);
            run.step("start sent").await;
        }
        Verb::Status | Verb::Forensics => {}
    }
    Ok(acted)
}

/// What is left of `limit` since `since`.
fn left(since: Instant, limit: Duration) -> Duration {
    (since + limit).saturating_duration_since(Instant::now())
}

/// How a wait for a power state ended, short of an error that ends it.
enum Waited {
    /// The target is in the state waited for.
    There,
    /// The limit passed first; with the last read's error if it failed.
    Late(Option<BackendError>),
}

/// What a late wait's message adds when its last read failed.
fn last_read(err: &BackendError) -> String {
    format!("; the last power read failed: {err}")
}

/// Polls the power state until it is `want` or `within` has passed. A
/// rebooting BMC or node answers 503s, a half-started service's page or
/// nothing for a while, so any error is polled again; only a refused login
/// or certificate ends the wait at once ([`BackendError::ends_a_wait`]):
/// retrying would not help.
async fn wait_for(backend: &Backend, want: PowerState, within: Duration) -> Result<Waited, String> {
    let deadline = Instant::now() + within;
    loop {
        let last = match backend.power().await {
            Ok((state, _)) if state == want => return Ok(Waited::There),
            Ok(_) => None,
            Err(err) if err.ends_a_wait() => return Err(err.to_string()),
            Err(err) => {
                tracing::debug!(%err, "a power read failed while waiting; asking again");
                Some(err)
            }
        };
        if Instant::now() >= deadline {
            return Ok(Waited::Late(last));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The target is back: running, then passing its check, within its
/// `recover_timeout` of the action. Returns the time from the action to
/// the first passing check (or to running, without a check).
async fn recover(
    target: &Target,
    run: &mut Run,
    sent: Instant,
    checks: Option<&reqwest::Client>,
) -> Result<Duration, String> {
    let deadline = sent + target.recover_timeout;
    let limit = secs(target.recover_timeout);
    if let Waited::Late(last) =
        wait_for(&target.backend, PowerState::Running, deadline.saturating_duration_since(Instant::now())).await?
    {
        let said =
            format!("not running within the limit ({limit}){}", last.as_ref().map(last_read).unwrap_or_default());
        run.step(said.clone()).await;
        return Err(said);
    }
    let running = sent.elapsed();
    run.step("running").await;
    let Some(check) = &target.check else {
        return Ok(running);
    };
    run.step(format!("waiting for {check} (at most {limit})")).await;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left.max(POLL), check.passes(checks)).await.unwrap_or(false) {
            let after = sent.elapsed();
            run.step(format!("reachable again after {}", secs(after))).await;
            return Ok(after);
        }
        if Instant::now() >= deadline {
            run.step(format!("not reachable within the limit ({limit})")).await;
            return Err(format!("not reachable within the limit ({limit})"));
        }
        tokio::time::sleep(POLL).await;
    }
}
