//! Sessions: a log, the clients attached to it, and at most one running turn.
//!
//! Turns run detached from any client (the tmux model): a prompt starts one
//! and returns at once; the turn keeps running when the phone sleeps. Each
//! turn task is owned by [`Sessions`]' tracker, so shutdown can stop and
//! await every one of them.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Mutex, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::Config;
use crate::event::Event;
use crate::log::{Log, LogError};
use crate::turn::{Ending, Request, Runner, Stops};

/// How long shutdown waits for running turns to write their last events.
const DRAIN_TURNS: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Session {
    pub id: Uuid,
    pub log: Arc<Log>,
    /// The running turn, if any. Held while a turn starts and while it
    /// writes its last events, so "one turn at a time" has no gap.
    turn: Mutex<Option<RunningTurn>>,
    /// The agent CLI knows this session id: later turns pass `--resume`.
    agent_session_started: AtomicBool,
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
    fn new(id: Uuid) -> Self {
        Session {
            id,
            log: Arc::new(Log::default()),
            turn: Mutex::new(None),
            agent_session_started: AtomicBool::new(false),
        }
    }

    pub async fn turn_running(&self) -> bool {
        self.turn.lock().await.is_some()
    }
}

/// Every session of this server, and what their turns share.
#[derive(Debug)]
pub struct Sessions {
    sessions: RwLock<HashMap<Uuid, Arc<Session>>>,
    runner: Arc<Runner>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// False once shutdown has begun.
    accepting: tokio::sync::RwLock<bool>,
}

impl Sessions {
    pub fn new(config: &Config) -> Self {
        Sessions {
            sessions: RwLock::default(),
            runner: Arc::new(Runner {
                agent: config.agent.clone(),
                sessions_dir: config.sessions_dir.clone(),
                slots: Semaphore::new(config.max_concurrent_turns),
            }),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            accepting: tokio::sync::RwLock::new(true),
        }
    }

    pub fn create(&self) -> Arc<Session> {
        let session = Arc::new(Session::new(Uuid::new_v4()));
        self.write().insert(session.id, session.clone());
        session
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<Session>> {
        self.read().get(&id).cloned()
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
        session
            .log
            .append(Event::User {
                text: prompt.clone(),
                by,
            })
            .await?;
        let request = Request {
            session_id: session.id,
            prompt,
            model,
            resume: session.agent_session_started.load(Ordering::SeqCst),
        };
        let stops = Stops {
            cancel: CancellationToken::new(),
            shutdown: self.shutdown.clone(),
        };
        let (done_tx, done) = watch::channel(None);
        *slot = Some(RunningTurn {
            cancel: stops.cancel.clone(),
            done,
        });
        let runner = self.runner.clone();
        let session = session.clone();
        self.tracker.spawn(async move {
            // A bug in a turn must not wedge its session: the end is logged
            // and the slot freed whatever happened.
            let outcome = AssertUnwindSafe(runner.run(request, &session.log, &stops))
                .catch_unwind()
                .await;
            let ending = match outcome {
                Ok(outcome) => {
                    if outcome.agent_session_started {
                        session.agent_session_started.store(true, Ordering::SeqCst);
                    }
                    outcome.ending
                }
                Err(_) => Ending::Internal,
            };
            tracing::info!(session = %session.id, ending = ending.label(), "turn ended");
            let mut slot = session.turn.lock().await;
            for event in ending.events().into_iter().chain([Event::TurnEnd]) {
                if let Err(err) = session.log.append(event).await {
                    tracing::error!(session = %session.id, %err, "could not log the end of a turn");
                    break;
                }
            }
            *slot = None;
            let _ = done_tx.send(Some(matches!(ending, Ending::Cancelled)));
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
        match done.wait_for(Option::is_some).await {
            Ok(ended) => ended.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Refuses new turns, stops running ones and waits (bounded) until each
    /// has logged its `turn_end`.
    pub async fn shutdown(&self) {
        *self.accepting.write().await = false;
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(DRAIN_TURNS, self.tracker.wait()).await.is_err() {
            tracing::warn!("some turns did not finish within {DRAIN_TURNS:?} of shutdown");
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Uuid, Arc<Session>>> {
        self.sessions.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Uuid, Arc<Session>>> {
        self.sessions.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
