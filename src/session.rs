//! Sessions: a log, the clients attached to it, and at most one running turn.
//!
//! Turns run detached from any client (the tmux model): a prompt starts one
//! and returns at once; the turn keeps running when the phone sleeps. Each
//! turn task is owned by [`Sessions`]' tracker, so shutdown can stop and
//! await every one of them.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use thiserror::Error;
use tokio::sync::{Mutex, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::approval::{Approvals, DecidedBy};
use crate::config::Config;
use crate::event::Event;
use crate::log::{Log, LogError};
use crate::notify::{Note, Notifier};
use crate::store::{SessionRow, Store, StoreError};
use crate::turn::{Ending, Request, Runner, Stops};

/// How long shutdown waits for running turns to write their last events.
const DRAIN_TURNS: Duration = Duration::from_secs(15);
/// How long cancel waits for the turn's end to be logged before answering
/// (the agent is killed well within it: its kill grace).
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// Upper bounds of the turn duration histogram, in seconds: a quick
/// question to the default turn timeout (`BREAKGLASS_TURN_TIMEOUT_SECONDS`,
/// 30 minutes).
const TURN_SECONDS: [f64; 12] = [1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0];

/// What turns count for `GET /metrics` (README "Metrics"). Each is bumped
/// once per turn, never per event.
#[derive(Debug, Clone)]
pub struct TurnCounters {
    /// Turns started (their prompt logged and the turn spawned).
    pub started: Counter,
    /// Turns ended, by how ([`Ending::label`], a closed set).
    pub ended: Family<[(&'static str, &'static str); 1], Counter>,
    /// From the prompt to the turn's end in the log, in seconds.
    pub duration: Histogram,
}

impl Default for TurnCounters {
    /// Every way a turn can end is counted from zero, so that a scraper
    /// sees each series before its first turn ends that way.
    fn default() -> Self {
        let ended = Family::default();
        for how in Ending::LABELS {
            drop(ended.get_or_create(&[("how", how)]));
        }
        TurnCounters { started: Counter::default(), ended, duration: Histogram::new(TURN_SECONDS) }
    }
}

#[derive(Debug)]
pub struct Session {
    pub id: Uuid,
    pub log: Arc<Log>,
    /// The running turn, if any. Held while a turn starts and while it
    /// writes its last events, so "one turn at a time" has no gap.
    turn: Mutex<Option<RunningTurn>>,
    /// The agent CLI knows this session id: later turns pass `--resume`.
    agent_session_started: AtomicBool,
    /// The last turn's end could not be logged (storage failed): the next
    /// turn closes it first.
    unlogged_end: AtomicBool,
    /// A turn runs (the slot is taken by a spawned turn).
    running: AtomicBool,
}

#[derive(Debug)]
struct RunningTurn {
    cancel: CancellationToken,
    /// Set once the turn's `turn_end` is in the log: whether it ended
    /// because it was cancelled.
    done: watch::Receiver<Option<bool>>,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("a turn is already running in this session")]
    Busy,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Log(#[from] LogError),
}

impl Session {
    fn from_row(row: &SessionRow, log: Arc<Log>) -> Self {
        Session {
            id: row.id,
            log,
            turn: Mutex::new(None),
            agent_session_started: AtomicBool::new(row.agent_started),
            // Loaded afresh with a turn marked running: nobody runs it (a
            // running turn keeps its session loaded), so its end was lost.
            unlogged_end: AtomicBool::new(row.turn_running),
            running: AtomicBool::new(false),
        }
    }

    pub async fn turn_running(&self) -> bool {
        self.turn.lock().await.is_some()
    }
}

/// A session in use, without keeping it in use.
#[derive(Debug)]
struct Held {
    session: Weak<Session>,
    log: Weak<Log>,
}

/// Every session of this server, and what their turns share.
///
/// Only sessions in use stay in memory: a running turn or an attached client
/// holds its session, and a session nobody holds is loaded again from the
/// store when next asked for. Memory follows what is in use, not history.
#[derive(Debug)]
pub struct Sessions {
    live: StdMutex<HashMap<Uuid, Held>>,
    store: Arc<Store>,
    runner: Arc<Runner>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// False once shutdown has begun.
    accepting: tokio::sync::RwLock<bool>,
    /// Told when a turn ends (README "Notifications").
    notifier: Arc<Notifier>,
    counters: TurnCounters,
}

impl Sessions {
    pub fn new(config: &Config, store: Arc<Store>, approvals: Arc<Approvals>, notifier: Arc<Notifier>) -> Self {
        Sessions {
            live: StdMutex::default(),
            store,
            runner: Arc::new(Runner {
                agent: config.agent.clone(),
                sessions_dir: config.sessions_dir.clone(),
                slots: Semaphore::new(config.max_concurrent_turns),
                running: Default::default(),
                approvals,
            }),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            accepting: tokio::sync::RwLock::new(true),
            notifier,
            counters: TurnCounters::default(),
        }
    }

    /// What turns count (README "Metrics").
    pub fn turn_counters(&self) -> &TurnCounters {
        &self.counters
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn approvals(&self) -> &Arc<Approvals> {
        &self.runner.approvals
    }

    pub async fn create(&self) -> Result<Arc<Session>, StoreError> {
        let row = self.store.create_session(Uuid::new_v4()).await?;
        Ok(self.adopt(&row))
    }

    /// The session with this id, loaded from the store if nobody holds it.
    pub async fn get(&self, id: Uuid) -> Result<Option<Arc<Session>>, StoreError> {
        if let Some(session) = self.lock().get(&id).and_then(|h| h.session.upgrade()) {
            return Ok(Some(session));
        }
        Ok(self.store.session(id).await?.map(|row| self.adopt(&row)))
    }

    /// The one live object for a row: an existing one wins, so two turns can
    /// never run in one session through two objects.
    fn adopt(&self, row: &SessionRow) -> Arc<Session> {
        let mut live = self.lock();
        let held = live.get(&row.id);
        if let Some(session) = held.and_then(|h| h.session.upgrade()) {
            return session;
        }
        // An attach stream may still hold the log (and its subscribers):
        // keep it, so that what is appended reaches them.
        let log = held.and_then(|h| h.log.upgrade()).unwrap_or_else(|| Arc::new(Log::new(row.id, self.store.clone())));
        live.retain(|_, h| h.session.strong_count() > 0 || h.log.strong_count() > 0);
        let session = Arc::new(Session::from_row(row, log));
        live.insert(row.id, Held { session: Arc::downgrade(&session), log: Arc::downgrade(&session.log) });
        session
    }

    /// Closes the turns the server died during (README "Restart": nothing lost on a
    /// restart): kills what their agents left running, then logs their end.
    /// Runs at start-up, before any client can attach.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        if let Some(user) = self.runner.agent.user.clone() {
            // No turn runs yet: whatever the agent user runs is left over.
            let killed = tokio::task::spawn_blocking(move || crate::agent::user::kill_all(&user)).await.unwrap_or(0);
            if killed > 0 {
                tracing::warn!(killed, "killed processes the agent user left running before this start");
            }
        }
        let interrupted = self.store.interrupted().await?;
        for row in &interrupted {
            if let Some(marker) = row.turn_marker.clone() {
                let pgid = row.turn_pgid;
                let killed = tokio::task::spawn_blocking(move || crate::agent::process::kill_leftovers(pgid, &marker))
                    .await
                    .unwrap_or(0);
                tracing::info!(session = %row.id, pgid = ?row.turn_pgid, killed, "killed what the interrupted turn left running");
            }
            let log = Log::new(row.id, self.store.clone());
            let closed = async {
                self.runner.approvals.close_undecided(row.id, &log, DecidedBy::Restart).await?;
                log.append(Event::Error { error: "server stopped during the turn".into() }).await?;
                log.append(Event::TurnEnd).await
            };
            // Storage that cannot take even this (a full disk) must not keep
            // the console down: the session's next turn closes it instead.
            match closed.await {
                Ok(_) => tracing::warn!(session = %row.id, "closed a turn the server stopped during"),
                Err(err) => {
                    tracing::error!(session = %row.id, %err, "could not close an interrupted turn; its next turn will")
                }
            }
        }
        Ok(interrupted.len())
    }

    /// True while a turn of this session runs on this server.
    pub fn is_running(&self, id: Uuid) -> bool {
        self.lock().get(&id).and_then(|h| h.session.upgrade()).is_some_and(|s| s.running.load(Ordering::SeqCst))
    }

    /// The sessions whose turn runs on this server now.
    pub fn running_now(&self) -> std::collections::HashSet<Uuid> {
        let live = self.lock();
        live.iter()
            .filter(|(_, h)| h.session.upgrade().is_some_and(|s| s.running.load(Ordering::SeqCst)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Logs the prompt and starts a detached turn on it.
    pub async fn start_turn(
        &self,
        session: &Arc<Session>,
        prompt: String,
        model: String,
        by: String,
    ) -> Result<(), StartError> {
        // Held until the turn is spawned, so shutdown either sees the turn in
        // its tracker or refuses it here; never a turn it did not wait for.
        let accepting = self.accepting.read().await;
        if !*accepting {
            return Err(StartError::ShuttingDown);
        }
        let mut slot = session.turn.lock().await;
        if slot.is_some() {
            return Err(StartError::Busy);
        }
        if session.unlogged_end.load(Ordering::SeqCst) {
            self.runner.approvals.close_undecided(session.id, &session.log, DecidedBy::TurnEnded).await?;
            let error = Event::Error { error: "the end of the previous turn could not be logged".into() };
            session.log.append(error).await?;
            session.log.append(Event::TurnEnd).await?;
            session.unlogged_end.store(false, Ordering::SeqCst);
        }
        session.log.append(Event::User { text: prompt.clone(), by }).await?;
        let request = Request {
            session_id: session.id,
            prompt,
            model,
            resume: session.agent_session_started.load(Ordering::SeqCst),
            marker: turn_marker(session.id),
        };
        let stops = Stops { cancel: CancellationToken::new(), shutdown: self.shutdown.clone() };
        let (done_tx, done) = watch::channel(None);
        *slot = Some(RunningTurn { cancel: stops.cancel.clone(), done });
        session.running.store(true, Ordering::SeqCst);
        let runner = self.runner.clone();
        let approvals = self.runner.approvals.clone();
        let session = session.clone();
        let notifier = self.notifier.clone();
        let counters = self.counters.clone();
        let started = std::time::Instant::now();
        counters.started.inc();
        self.tracker.spawn(async move {
            // A bug in a turn must not wedge its session: the end is logged
            // and the slot freed whatever happened.
            let outcome = AssertUnwindSafe(runner.run(request, &session.log, &stops)).catch_unwind().await;
            let (ending, result) = match outcome {
                Ok(outcome) => {
                    if outcome.agent_session_started {
                        session.agent_session_started.store(true, Ordering::SeqCst);
                    }
                    (outcome.ending, outcome.result)
                }
                Err(_) => (Ending::Internal, None),
            };
            tracing::info!(session = %session.id, ending = ending.label(), "turn ended");
            let mut slot = session.turn.lock().await;
            // A turn that died of a bug could not close what it asked.
            if matches!(ending, Ending::Internal)
                && let Err(err) = approvals.close_undecided(session.id, &session.log, DecidedBy::TurnEnded).await
            {
                tracing::error!(session = %session.id, %err, "could not close the approvals of a failed turn");
            }
            for event in ending.events().into_iter().chain([Event::TurnEnd]) {
                if let Err(err) = session.log.append(event).await {
                    // Attached clients still learn how the turn ended.
                    tracing::error!(session = %session.id, %err, "could not log the end of a turn");
                    let error = format!("the end of this turn could not be logged: {err}");
                    session.log.notify(&Event::Error { error });
                    session.log.notify(&Event::TurnEnd);
                    session.unlogged_end.store(true, Ordering::SeqCst);
                    break;
                }
            }
            *slot = None;
            session.running.store(false, Ordering::SeqCst);
            counters.ended.get_or_create(&[("how", ending.label())]).inc();
            counters.duration.observe(started.elapsed().as_secs_f64());
            let _ = done_tx.send(Some(matches!(ending, Ending::Cancelled)));
            // Queued, never awaited: a slow receiver cannot hold up the turn.
            notifier.send(turn_note(session.id, &ending, result.as_ref()));
        });
        Ok(())
    }

    /// Stops the running turn and waits until its end is logged. True when
    /// a turn was running and ended because of this cancel.
    pub async fn cancel(&self, session: &Session) -> bool {
        let mut done = {
            let slot = session.turn.lock().await;
            let Some(turn) = slot.as_ref() else {
                return false;
            };
            turn.cancel.cancel();
            turn.done.clone()
        };
        // The agent is killed whatever storage does; logging its end can
        // wait on a stalled disk, and the answer does not (README "Bad
        // storage").
        match tokio::time::timeout(CANCEL_WAIT, done.wait_for(Option::is_some)).await {
            Ok(Ok(ended)) => ended.unwrap_or(false),
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::warn!(session = %session.id, "cancelled, but the turn's end is not logged yet");
                true
            }
        }
    }

    /// Refuses new turns, stops running ones and waits (bounded) until each
    /// has logged its `turn_end`.
    pub async fn shutdown(&self) {
        // Turns are told first: a prompt stuck on storage holds `accepting`.
        self.shutdown.cancel();
        *self.accepting.write().await = false;
        self.tracker.close();
        if tokio::time::timeout(DRAIN_TURNS, self.tracker.wait()).await.is_err() {
            tracing::warn!("some turns did not finish within {DRAIN_TURNS:?} of shutdown");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Held>> {
        self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What the operator is told when a turn ends: the agent's result line, or
/// why the turn ended without one.
fn turn_note(session: Uuid, ending: &Ending, result: Option<&crate::event::TurnResult>) -> Note {
    let error = || {
        ending
            .events()
            .iter()
            .find_map(|event| match event {
                Event::Error { error } => Some(error.clone()),
                Event::Cancelled => Some("cancelled".to_owned()),
                _ => None,
            })
            .unwrap_or_else(|| ending.label().to_owned())
    };
    match (ending, result) {
        (Ending::Completed, Some(result)) if !result.is_error => Note::turn_ended(session, Ok(&result.result)),
        (Ending::Completed, Some(result)) => Note::turn_ended(session, Err(&result.result)),
        _ => Note::turn_ended(session, Err(&error())),
    }
}

/// Set in the agent's environment, unique to one turn, so that what that
/// turn left running can be told apart from everything else after a restart
/// (including what earlier turns of the same session started).
pub fn turn_marker(session: Uuid) -> String {
    format!("BREAKGLASS_TURN={session}/{}", Uuid::new_v4().simple())
}
