//! One turn: one run of the agent CLI on one prompt (README "How a turn runs the agent").
//!
//! [`run`] prepares the workspace, starts the agent, translates its stdout
//! into events appended to the session's log, and reports how the turn
//! ended. It never appends `turn_end`: the session does that, so that the
//! end of a turn and the freeing of the session's turn slot are one step.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agent::line::{self, AgentLine};
use crate::agent::process::{AgentProcess, DRAIN, Line, LineReader, Spec};
use crate::agent::translate::{Translated, Translator};
use crate::agent::user::AgentUser;
use crate::approval::{Approvals, TurnHook};
use crate::config::AgentConfig;
use crate::event::{Event, TurnResult};
use crate::log::{Log, LogError};
use crate::store::{Fence, Pending};

/// Longest error message taken from the agent's stderr (README "How a turn runs the agent").
const ERROR_CHARS: usize = 500;

/// What every turn shares: how to run the agent, where, and how many at once.
#[derive(Debug)]
pub struct Runner {
    pub agent: AgentConfig,
    pub sessions_dir: PathBuf,
    /// Server-wide turn slots (`BREAKGLASS_MAX_CONCURRENT_TURNS`).
    pub slots: Semaphore,
    /// Agents alive now.
    pub running: Arc<Running>,
    /// Tool calls waiting for the operator, and the turns' hooks.
    pub approvals: Arc<Approvals>,
}

/// Counts the agents alive, so that the last one to end can sweep away
/// everything of the agent user (a process that left its group and
/// scrubbed its environment too). Spawning and sweeping hold the same lock:
/// a sweep never meets an agent that is just starting.
#[derive(Debug, Default)]
pub struct Running(std::sync::Mutex<usize>);

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts an agent, counted until the returned guard is dropped,
    /// however the turn ends (an early return, a panic, an abort).
    fn spawn(self: &Arc<Self>, spec: &Spec) -> std::io::Result<(AgentProcess, Alive)> {
        let mut count = self.lock();
        let agent = AgentProcess::spawn(spec)?;
        *count += 1;
        Ok((agent, Alive { running: self.clone(), user: spec.user.clone() }))
    }

    /// Kills every process of the agent user if no agent runs (a scan of
    /// /proc: called off the async threads).
    fn sweep_if_idle(&self, user: &AgentUser) {
        let count = self.lock();
        if *count == 0 {
            let killed = crate::agent::user::kill_all(user);
            if killed > 0 {
                tracing::info!(user = %user.name, killed, "killed what the agent user left running");
            }
        }
    }
}

/// One agent counted as alive; dropping it (once the agent is reaped) lets
/// the last one out sweep the agent user.
#[derive(Debug)]
struct Alive {
    running: Arc<Running>,
    user: Option<AgentUser>,
}

impl Drop for Alive {
    fn drop(&mut self) {
        let last = {
            let mut count = self.running.lock();
            *count = count.saturating_sub(1);
            *count == 0
        };
        if let (true, Some(user)) = (last, self.user.take()) {
            let running = self.running.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || running.sweep_if_idle(&user))),
                Err(_) => running.sweep_if_idle(&user),
            }
        }
    }
}

/// One prompt to run.
#[derive(Debug, Clone)]
pub struct Request {
    pub session_id: Uuid,
    pub prompt: String,
    pub model: String,
    /// `--resume` (the CLI knows this session) rather than `--session-id`.
    pub resume: bool,
    /// In the agent's environment, for finding this turn's processes later.
    pub marker: String,
}

/// Why a running turn is asked to stop early.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    /// The operator pressed Stop.
    pub cancel: CancellationToken,
    /// The server is draining.
    pub shutdown: CancellationToken,
}

/// How a turn ended.
#[derive(Debug)]
pub enum Ending {
    /// Exit 0 after a `result` line.
    Completed,
    /// Exit 0 without a `result` line.
    NoResult,
    /// Non-zero exit or killed by a signal, with stderr.
    Failed {
        status: ExitStatus,
        stderr: String,
    },
    TimedOut(Duration),
    Cancelled,
    Shutdown,
    CannotStart(String),
    /// The log refused an event; the agent was stopped.
    LogFailed(LogError),
    /// The turn's own code failed (a bug); its process group is gone.
    Internal,
}

impl Ending {
    /// The events that tell a client how the turn ended (before `turn_end`).
    pub fn events(&self) -> Vec<Event> {
        let error = |error: String| vec![Event::Error { error }];
        match self {
            Ending::Completed => Vec::new(),
            Ending::NoResult => error("agent ended without a result".into()),
            Ending::Failed { status, stderr } => {
                let trimmed = stderr.trim();
                if trimmed.is_empty() {
                    error(match (status.code(), std::os::unix::process::ExitStatusExt::signal(status)) {
                        (Some(code), _) => format!("exit {code}"),
                        (None, Some(signal)) => format!("killed by signal {signal}"),
                        (None, None) => status.to_string(),
                    })
                } else {
                    error(trimmed.chars().take(ERROR_CHARS).collect())
                }
            }
            Ending::TimedOut(after) => error(format!("turn timed out after {}s", after.as_secs())),
            Ending::Cancelled => vec![Event::Cancelled],
            Ending::Shutdown => error("turn stopped: the server is shutting down".into()),
            Ending::CannotStart(why) => error(format!("could not start agent: {why}")),
            Ending::LogFailed(err) => error(format!("turn stopped: {err}")),
            Ending::Internal => error("turn stopped by an internal error; see the server log".into()),
        }
    }

    /// Every [`Ending::label`], so that each can be counted from zero.
    pub const LABELS: [&'static str; 9] = [
        "completed",
        "no-result",
        "failed",
        "timed-out",
        "cancelled",
        "shutdown",
        "cannot-start",
        "log-failed",
        "internal",
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::NoResult => "no-result",
            Ending::Failed { .. } => "failed",
            Ending::TimedOut(_) => "timed-out",
            Ending::Cancelled => "cancelled",
            Ending::Shutdown => "shutdown",
            Ending::CannotStart(_) => "cannot-start",
            Ending::LogFailed(_) => "log-failed",
            Ending::Internal => "internal",
        }
    }
}

/// What a turn reports to its session.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    /// The agent CLI announced the session (`system/init`), so the next turn resumes it.
    pub agent_session_started: bool,
    /// The turn's `result` event, if the agent printed one (the last one).
    pub result: Option<TurnResult>,
}

impl Runner {
    /// The working directory of a session's agent.
    pub fn workspace(&self, session_id: Uuid) -> PathBuf {
        self.sessions_dir.join(session_id.to_string())
    }

    /// Runs one turn to its end. Waits for a server-wide slot first.
    pub async fn run(&self, mut request: Request, log: &Log, stops: &Stops) -> Outcome {
        let mut started = false;
        let mut result = None;
        let _slot = match self.wait_for_slot(log, stops).await {
            Ok(permit) => permit,
            Err(ending) => {
                return Outcome { ending, agent_session_started: started, result };
            }
        };
        let mut ending = self.run_agent(&request, log, stops, &mut started, &mut result).await;
        // The CLI already has this session (a turn started it but its
        // announcement never reached us): resume it instead, once.
        if let Ending::Failed { stderr, .. } = &ending
            && !request.resume
            && line::is_session_in_use(stderr)
            && !stops.cancel.is_cancelled()
            && !stops.shutdown.is_cancelled()
        {
            tracing::info!(session = %request.session_id, "the agent already knows this session; resuming it");
            request.resume = true;
            started = true;
            ending = self.run_agent(&request, log, stops, &mut started, &mut result).await;
        }
        Outcome { ending, agent_session_started: started, result }
    }

    async fn wait_for_slot(&self, log: &Log, stops: &Stops) -> Result<SemaphorePermit<'_>, Ending> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let waiting = Event::Status { text: "waiting for a free agent slot".into() };
        log.append(waiting).await.map_err(Ending::LogFailed)?;
        tokio::select! {
            permit = self.slots.acquire() => permit.map_err(|_| Ending::Shutdown),
            _ = stops.cancel.cancelled() => Err(Ending::Cancelled),
            _ = stops.shutdown.cancelled() => Err(Ending::Shutdown),
        }
    }

    async fn run_agent(
        &self,
        request: &Request,
        log: &Log,
        stops: &Stops,
        started: &mut bool,
        result: &mut Option<TurnResult>,
    ) -> Ending {
        let workspace = self.workspace(request.session_id);
        let prepared = prepare_workspace(&workspace, self.agent.user.as_ref()).await;
        if let Err(err) = prepared {
            return Ending::CannotStart(format!("workspace {}: {err}", workspace.display()));
        }
        // Registered before the agent starts, closed once it is reaped: a
        // tool call can only wait while its agent can still run it.
        let hook = self.approvals.open_turn(request.session_id);
        let spec = self.spec(request, workspace, hook.as_ref());
        // Recorded first, so that a restart can find this turn's processes
        // even if the server dies before it learns their process group.
        let recorded = tokio::select! {
            recorded = log.store().set_turn(request.session_id, None, spec.marker.clone()) => recorded,
            ending = stop_or_shutdown(stops) => return ending,
        };
        if let Err(err) = recorded {
            return Ending::LogFailed(err);
        }
        // Held until the agent is reaped, whichever way this function ends.
        let (mut agent, _alive) = match self.running.spawn(&spec) {
            Ok(spawned) => spawned,
            Err(err) => return Ending::CannotStart(format!("{}: {err}", spec.program.display())),
        };
        let began = Instant::now();
        tracing::info!(session = %request.session_id, pgid = agent.pgid(), resume = request.resume, "agent started");
        // Recorded so that a restart can kill what this turn leaves behind.
        let recorded = tokio::select! {
            recorded = log.store().set_turn(request.session_id, Some(agent.pgid()), spec.marker.clone()) => {
                recorded.map_err(Ending::LogFailed)
            }
            ending = stop_or_shutdown(stops) => Err(ending),
        };
        if let Err(ending) = recorded {
            agent.kill_group(self.agent.kill_grace).await;
            let _ = agent.reap().await;
            return ending;
        }
        let mut output = Output::new(log, started, result, hook.as_ref());

        let deadline = tokio::time::sleep(self.agent.turn_timeout);
        tokio::pin!(deadline);
        // Every wait below also watches Stop, shutdown and the deadline, so a
        // stalled disk (a write waiting for its commit) never delays killing
        // the agent.
        let stopped = loop {
            tokio::select! {
                ending = stop_requested(stops, &mut deadline, self.agent.turn_timeout) => break Some(ending),
                _ = agent.exit.wait() => break None,
                line = agent.stdout.next_line() => match line {
                    Ok(Some(line)) => tokio::select! {
                        written = output.lines(line, &mut agent.stdout) => if let Err(err) = written {
                            break Some(Ending::LogFailed(err));
                        },
                        ending = stop_requested(stops, &mut deadline, self.agent.turn_timeout) => break Some(ending),
                    },
                    // End of output: the leader may still be running.
                    Ok(None) | Err(_) => tokio::select! {
                        ending = stop_requested(stops, &mut deadline, self.agent.turn_timeout) => break Some(ending),
                        _ = agent.exit.wait() => break None,
                    },
                },
            }
        };

        let grace = if stopped.is_some() { self.agent.kill_grace } else { Duration::ZERO };
        agent.kill_group(grace).await;
        let mut drained = Ok(());
        if stopped.is_none() {
            // What the agent wrote before it exited is still in the pipe.
            let drain = tokio::time::sleep(DRAIN);
            tokio::pin!(drain);
            loop {
                let line = tokio::select! {
                    _ = &mut drain => break,
                    line = agent.stdout.next_line() => line,
                };
                let Ok(Some(line)) = line else { break };
                if let Err(err) = output.line(line).await {
                    drained = Err(err);
                    break;
                }
            }
        }
        let finished = agent.reap().await;
        tracing::debug!(session = %request.session_id, elapsed_ms = began.elapsed().as_millis() as u64, "agent reaped");
        let saw_result = output.saw_result;
        let flushed = match drained {
            Ok(()) => output.flush().await,
            Err(err) => Err(err),
        };
        drop(output);
        // The agent is gone: whatever it still waits on is denied, and
        // logged before the turn's end.
        if let Some(hook) = hook {
            hook.close(log).await;
        }
        if let Err(err) = flushed {
            return Ending::LogFailed(err);
        }
        if let Some(ending) = stopped {
            return ending;
        }
        match finished.status {
            Ok(status) if status.success() && saw_result => Ending::Completed,
            Ok(status) if status.success() => Ending::NoResult,
            Ok(status) => Ending::Failed { status, stderr: String::from_utf8_lossy(&finished.stderr).into_owned() },
            Err(err) => Ending::CannotStart(format!("lost track of the agent: {err}")),
        }
    }

    /// The agent's command line (README "How a turn runs the agent"), with the prompt after `--` so it
    /// is never read as an option, or on stdin when it is too long for one
    /// argument.
    fn spec(&self, request: &Request, cwd: PathBuf, hook: Option<&TurnHook>) -> Spec {
        let session_flag = if request.resume { "--resume" } else { "--session-id" };
        let mut args: Vec<OsString> = [
            "-p",
            "--agent",
            &self.agent.name,
            "--dangerously-skip-permissions",
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
            &request.model,
            session_flag,
            &request.session_id.to_string(),
            // The agent comes from the command line, and no settings file is
            // read (nor any MCP server's): every one of them is a file the
            // agent user can write, and one `disableAllHooks` there would
            // switch the approvals off for every later turn (README
            // "Approvals").
            "--agents",
            &self.agent.definition,
            "--setting-sources",
            "",
            "--strict-mcp-config",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        // Stream events too, so the console shows text as it is written
        // (README, "How a turn runs the agent").
        if self.agent.partial_messages {
            args.push("--include-partial-messages".into());
        }
        // Every tool call is put to the server first (README "Approvals").
        if let Some(hook) = hook {
            args.push("--settings".into());
            args.push(hook.settings().into());
        }
        let stdin = if request.prompt.len() < MAX_PROMPT_ARG {
            args.push("--".into());
            args.push(request.prompt.clone().into());
            None
        } else {
            Some(request.prompt.clone().into_bytes())
        };
        Spec {
            program: self.agent.program.clone(),
            args,
            cwd,
            stdin,
            marker: request.marker.clone(),
            user: self.agent.user.clone(),
            env: hook.map(TurnHook::env).into_iter().collect(),
        }
    }
}

/// Resolves on Stop or shutdown.
async fn stop_or_shutdown(stops: &Stops) -> Ending {
    tokio::select! {
        _ = stops.cancel.cancelled() => Ending::Cancelled,
        _ = stops.shutdown.cancelled() => Ending::Shutdown,
    }
}

/// Resolves when the turn must stop early: Stop, shutdown, or its deadline.
async fn stop_requested(
    stops: &Stops,
    deadline: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    timeout: Duration,
) -> Ending {
    tokio::select! {
        _ = stops.cancel.cancelled() => Ending::Cancelled,
        _ = stops.shutdown.cancelled() => Ending::Shutdown,
        _ = deadline.as_mut() => Ending::TimedOut(timeout),
    }
}

/// Linux refuses a single argv string of 128 KiB or more (MAX_ARG_STRLEN).
const MAX_PROMPT_ARG: usize = 128 * 1024 - 1;

/// Events on their way into the log. Up to [`IN_FLIGHT`] are submitted
/// without waiting for their commit, so a flooding agent fills whole
/// transactions instead of waiting for one commit per event.
struct Output<'a> {
    log: &'a Log,
    /// Told of each `tool` logged, for the approval that may wait on it.
    hook: Option<&'a TurnHook>,
    /// Once a write of this turn fails, none after it is kept either.
    fence: Fence,
    pending: VecDeque<Pending>,
    translator: Translator,
    saw_result: bool,
    started: &'a mut bool,
    /// The last `result` event, for the turn's notification.
    result: &'a mut Option<TurnResult>,
}

/// Events of one turn submitted and not yet known to be committed: as
/// many as one transaction takes ([`crate::store::BATCH_MAX`]), so that a
/// flooding turn fills whole transactions while the one before commits.
const IN_FLIGHT: usize = crate::store::BATCH_MAX;

impl<'a> Output<'a> {
    fn new(
        log: &'a Log,
        started: &'a mut bool,
        result: &'a mut Option<TurnResult>,
        hook: Option<&'a TurnHook>,
    ) -> Self {
        Output {
            log,
            hook,
            fence: Fence::default(),
            pending: VecDeque::new(),
            translator: Translator::default(),
            saw_result: false,
            started,
            result,
        }
    }

    /// Takes `first` and then every line already read in with it: a
    /// flooding agent's lines come in dozens to a read, and they need no
    /// trip back through the turn's wait on Stop, shutdown and its deadline
    /// each (that wait still surrounds this whole call).
    async fn lines<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        first: Line,
        reader: &mut LineReader<R>,
    ) -> Result<(), LogError> {
        self.line(first).await?;
        while let Some(line) = reader.buffered_line() {
            self.line(line).await?;
        }
        Ok(())
    }

    /// Translates one line of the agent's output and submits its events.
    async fn line(&mut self, line: Line) -> Result<(), LogError> {
        let Line::Complete(raw) = line else {
            tracing::debug!("skipped an over-long agent line");
            return Ok(());
        };
        let Some(parsed) = line::parse(&raw) else {
            return Ok(());
        };
        match parsed {
            AgentLine::Init { .. } => *self.started = true,
            AgentLine::Result(_) => self.saw_result = true,
            _ => {}
        }
        for translated in self.translator.line(parsed) {
            let event = match translated {
                Translated::Event(event) => {
                    if let Event::Result(result) = &event {
                        *self.result = Some(result.clone());
                    }
                    event
                }
                Translated::Delta(delta) => {
                    // Events submitted before it reach clients before it.
                    self.flush().await?;
                    self.log.delta(&delta);
                    continue;
                }
            };
            if self.pending.len() >= IN_FLIGHT
                && let Some(oldest) = self.pending.pop_front()
            {
                oldest.committed().await?;
            }
            let tool_use_id = match (&event, self.hook) {
                (Event::Tool { tool_use_id, .. }, Some(_)) => Some(tool_use_id.clone()),
                _ => None,
            };
            self.pending.push_back(self.log.submit(event, Some(self.fence.clone())).await?);
            // Submitted: the writer keeps the order, so an approval appended
            // from now on comes after this `tool`.
            if let (Some(hook), Some(id)) = (self.hook, tool_use_id) {
                hook.tool_logged(&id);
            }
        }
        Ok(())
    }

    /// Waits until everything submitted is committed.
    async fn flush(&mut self) -> Result<(), LogError> {
        while let Some(pending) = self.pending.pop_front() {
            pending.committed().await?;
        }
        Ok(())
    }
}

/// Creates the workspace. Nothing is written inside it: the agent's
/// definition goes on the command line (README "How a turn runs the
/// agent").
///
/// With an agent user the workspace is handed over once, and root never
/// touches anything inside it again: the agent owns what is in it and
/// could plant symlinks there that root would follow. Until the handover
/// the workspace is root's and closed (0700), so nothing in it can have
/// been planted by the agent user; the handover changes owners without
/// following links.
async fn prepare_workspace(workspace: &Path, user: Option<&AgentUser>) -> std::io::Result<()> {
    let Some(user) = user else {
        return tokio::fs::create_dir_all(workspace).await;
    };
    match tokio::fs::symlink_metadata(workspace).await {
        Ok(meta) if !meta.is_dir() => return Err(std::io::Error::other("the workspace is not a directory")),
        Ok(meta) if std::os::unix::fs::MetadataExt::uid(&meta) == user.uid => return Ok(()),
        Ok(_) => {}
        // The sessions directory is root's: only root creates here.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => tokio::fs::create_dir(workspace).await?,
        Err(err) => return Err(err),
    }
    tokio::fs::set_permissions(workspace, std::os::unix::fs::PermissionsExt::from_mode(0o700)).await?;
    let (workspace, user) = (workspace.to_owned(), user.clone());
    tokio::task::spawn_blocking(move || user.give_tree(&workspace)).await.map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/metrics` counts turn endings from zero by this list: a way to end
    /// missing from it would show up only after it first happened.
    #[test]
    fn every_ending_label_is_in_the_list_counted_from_zero() {
        let status = std::os::unix::process::ExitStatusExt::from_raw(256);
        let endings = [
            Ending::Completed,
            Ending::NoResult,
            Ending::Failed { status, stderr: String::new() },
            Ending::TimedOut(Duration::from_secs(1)),
            Ending::Cancelled,
            Ending::Shutdown,
            Ending::CannotStart("no such file".into()),
            Ending::LogFailed(LogError::Closed),
            Ending::Internal,
        ];
        let labels: Vec<&str> = endings.iter().map(Ending::label).collect();
        assert_eq!(labels, Ending::LABELS);
    }
}
