//! The operator in the loop (README "Approvals"): every tool call of the
//! agent is put to [`policy`] before it runs, through a `PreToolUse` hook
//! the agent CLI calls back over loopback; what the policy does not allow
//! waits here for the operator's decision, the timeout, or the end of its
//! turn, whichever comes first.
//!
//! Each waiting call has exactly one decision, made by whoever takes it
//! out of the table of waiting calls: the operator's request, the call's
//! own timeout, or its turn ending. The taker logs the `approval_decision`
//! and writes the audit record; only then does the agent learn the answer,
//! so nothing runs that the log does not show was allowed.

pub mod policy;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::event::{Decision, Event};
use crate::log::{Log, LogError};
use crate::notify::{Note, Notifier};
use crate::store::{AuditRecord, AuthMethod, Store, StoreError, now_ms};
use policy::Verdict;

/// The operator in the loop (README "Approvals").
#[derive(Debug, Clone)]
pub struct ApprovalConfig {
    /// `BREAKGLASS_APPROVALS=on`: every tool call is checked.
    pub enabled: bool,
    /// No decision within this is a deny.
    pub timeout: Duration,
    pub policy: policy::Policy,
}

/// The path the agent's hook posts to (README "Approvals").
pub const HOOK_PATH: &str = "/hook/pre-tool-use";
/// The agent's environment variable holding its turn's hook secret; the
/// hook's header names it, so the secret is never in argv.
pub const HOOK_TOKEN_VAR: &str = "BREAKGLASS_HOOK_TOKEN";
/// How much longer than the approval timeout the CLI waits for its hook,
/// so that the server's own deny, not the CLI's timeout, ends a wait.
const HOOK_MARGIN: Duration = Duration::from_secs(30);
/// Longest a server-made decision waits for its audit record.
const AUDIT_WAIT: Duration = Duration::from_secs(5);
/// Longest command or input kept in an audit record's target.
const AUDIT_INPUT_CHARS: usize = 300;

/// What a decision is answered to the agent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub allow: bool,
    /// For the agent: why (a deny's reason is what the model reads).
    pub reason: String,
}

impl Answer {
    fn deny(reason: impl Into<String>) -> Self {
        Answer { allow: false, reason: reason.into() }
    }

    /// The hook's answer in the CLI's format (README "Approvals").
    pub fn to_hook_output(&self) -> Value {
        json!({
            "hookSpecificOutput": {
                "hookEventName": "PreToolUse",
                "permissionDecision": if self.allow { "allow" } else { "deny" },
                "permissionDecisionReason": self.reason,
            }
        })
    }
}

/// A tool call as the hook posts it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ToolCall {
    pub tool_name: String,
    #[serde(default)]
    pub tool_input: Value,
    pub tool_use_id: String,
}

/// Who decided a call, for the log and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedBy {
    /// An operator, by the identity the server knows them by.
    Operator { name: String, peer: String, via: AuthMethod },
    /// Nobody within the timeout.
    Timeout,
    /// The turn stopped (Stop, shutdown, its agent ending) while it waited.
    TurnEnded,
    /// The server restarted while it waited.
    Restart,
}

impl DecidedBy {
    /// The `by` of `approval_decision`.
    pub fn label(&self) -> &str {
        match self {
            DecidedBy::Operator { name, .. } => name,
            DecidedBy::Timeout => "timeout",
            DecidedBy::TurnEnded => "turn-ended",
            DecidedBy::Restart => "restart",
        }
    }

    /// Every [`DecidedBy::kind`].
    pub const KINDS: [&'static str; 4] = ["operator", "timeout", "turn-ended", "restart"];

    /// Who decided, without the operator's name (a label on `/metrics`,
    /// where names would make a series per person).
    pub fn kind(&self) -> &'static str {
        match self {
            DecidedBy::Operator { .. } => "operator",
            DecidedBy::Timeout => "timeout",
            DecidedBy::TurnEnded => "turn-ended",
            DecidedBy::Restart => "restart",
        }
    }
}

/// Why an operator's decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no such tool call waits in this session")]
    Unknown,
    #[error("this tool call is already decided")]
    AlreadyDecided,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Every waiting tool call, and the hooks of the turns running now.
#[derive(Debug)]
pub struct Approvals {
    config: ApprovalConfig,
    /// Where the agent's hook posts: this server, over loopback.
    hook_url: String,
    table: Mutex<Table>,
    /// Audit records that could not be written (shared with `/metrics`).
    audit_failures: Arc<AtomicU64>,
    /// Bumped whenever a turn logs a `tool`.
    tool_logged_changed: tokio::sync::watch::Sender<u64>,
    /// Tells the operator a call waits (README "Notifications").
    notifier: Arc<Notifier>,
    /// Decisions logged, by decision and by who decided (README "Metrics").
    decided: Family<[(&'static str, &'static str); 2], Counter>,
}

/// Tool call ids remembered per running turn.
const TOOL_LOGGED_KEPT: usize = 64;
/// Longest an approval waits for its `tool` to be logged first. The CLI
/// prints a call before it asks its hook, but the two reach the server by
/// different paths (stdout and HTTP), and the hook may win the race.
const TOOL_LOGGED_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Table {
    /// Tool calls each running turn's agent has printed (and the turn has
    /// logged as `tool`), the latest few: an approval waits for its `tool`.
    tool_logged: HashMap<Uuid, std::collections::VecDeque<String>>,
    /// Running turns by the SHA-256 of their hook secret.
    turns: HashMap<[u8; 32], Uuid>,
    /// Waiting calls by session and tool call id.
    waiting: HashMap<(Uuid, String), Waiting>,
}

#[derive(Debug)]
struct Waiting {
    call: ToolCall,
    /// The hook request, told the answer once the decision is logged.
    answer: oneshot::Sender<Answer>,
}

impl Approvals {
    /// `listen` is the address the server is bound to; the hook reaches it
    /// over loopback when it listens on every address.
    pub fn new(
        config: ApprovalConfig,
        listen: std::net::SocketAddr,
        audit_failures: Arc<AtomicU64>,
        notifier: Arc<Notifier>,
    ) -> Self {
        let ip = match listen.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        let hook_url = format!("http://{}{HOOK_PATH}", std::net::SocketAddr::new(ip, listen.port()));
        Approvals {
            config,
            hook_url,
            table: Mutex::default(),
            audit_failures,
            tool_logged_changed: tokio::sync::watch::Sender::new(0),
            notifier,
            decided: {
                // Counted from zero, so that every series is there from the start.
                let decided = Family::default();
                for decision in [Decision::Allow, Decision::Deny] {
                    for by in DecidedBy::KINDS {
                        drop(decided.get_or_create(&[("decision", decision.as_str()), ("by", by)]));
                    }
                }
                decided
            },
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a turn's hook: `None` with approvals off. The guard holds
    /// the turn's secret and its `--settings`; [`TurnHook::close`] ends it.
    pub fn open_turn(self: &Arc<Self>, session: Uuid) -> Option<TurnHook> {
        if !self.config.enabled {
            return None;
        }
        let secret = crate::util::random_token();
        self.lock().turns.insert(digest(&secret), session);
        Some(TurnHook { approvals: self.clone(), session, secret, closed: false })
    }

    /// The running turn that holds this hook secret, and its session.
    pub fn turn_of(&self, secret: &str) -> Option<(TurnKey, Uuid)> {
        let key = TurnKey(digest(secret));
        self.lock().turns.get(&key.0).map(|session| (key, *session))
    }

    /// Tool calls waiting for the operator now, in every session.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Decisions logged so far, by `decision` and `by` ([`DecidedBy::kind`]).
    pub fn decided(&self) -> &Family<[(&'static str, &'static str); 2], Counter> {
        &self.decided
    }

    /// Tool calls of this session waiting now.
    pub fn waiting_in(&self, session: Uuid) -> usize {
        self.lock().waiting.keys().filter(|(s, _)| *s == session).count()
    }

    /// The hook's question: allowed at once, or logged as an `approval` and
    /// answered once decided. Never fails open: anything that goes wrong
    /// is a deny.
    pub async fn ask(&self, turn: TurnKey, session: Uuid, log: &Log, call: ToolCall) -> Answer {
        let (reason, effect) = match self.config.policy.check(&call.tool_name, &call.tool_input) {
            Verdict::Allow { reason } => {
                tracing::debug!(%session, tool = %call.tool_name, %reason, "tool call allowed by the policy");
                return Answer { allow: true, reason };
            }
            Verdict::Ask { reason, effect } => (reason, effect),
        };
        self.until_tool_logged(session, &call.tool_use_id).await;
        let key = (session, call.tool_use_id.clone());
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut table = self.lock();
            // The turn may have ended while this request waited for its
            // `tool`: its end decided everything waiting then, and nothing
            // may start waiting after it.
            if !table.turns.contains_key(&turn.0) {
                return Answer::deny("denied: the turn ended");
            }
            if table.waiting.contains_key(&key) {
                return Answer::deny("this tool call id is already waiting for the operator");
            }
            table.waiting.insert(key.clone(), Waiting { call: call.clone(), answer: answer_tx });
        }
        let deadline_ms = now_ms().saturating_add(i64::try_from(self.config.timeout.as_millis()).unwrap_or(i64::MAX));
        let said = format!("{}: {}", shown(&call), effect.as_deref().unwrap_or(&reason));
        let approval = Event::Approval {
            tool_use_id: call.tool_use_id.clone(),
            tool: call.tool_name.clone(),
            input: call.tool_input.clone(),
            reason: reason.clone(),
            effect,
            deadline_ms,
        };
        if let Err(err) = log.append(approval).await {
            self.lock().waiting.remove(&key);
            tracing::error!(%session, %err, "could not log a tool call waiting for the operator; denied");
            return Answer::deny(format!("denied: the request for approval could not be logged ({err})"));
        }
        tracing::info!(%session, tool = %call.tool_name, tool_use_id = %call.tool_use_id, %reason, "tool call waits for the operator");
        self.notifier.send(Note::approval(session, &call.tool_name, &said));
        let mut answer_rx = answer_rx;
        tokio::select! {
            answer = &mut answer_rx => return answer.unwrap_or_else(|_| Answer::deny("denied: the turn ended")),
            _ = tokio::time::sleep(self.config.timeout) => {}
        }
        // The timeout: decide, unless someone else just took the call.
        let taken = self.lock().waiting.remove(&key);
        match taken {
            Some(waiting) => {
                let answer = Answer::deny(format!(
                    "denied: no operator decided within {} s; ask again or try something else",
                    self.config.timeout.as_secs()
                ));
                if let Err(err) =
                    self.log_decision(session, log, &waiting.call, &DecidedBy::Timeout, &answer, None).await
                {
                    tracing::error!(%session, %err, "could not log a timed-out approval");
                }
                answer
            }
            None => answer_rx.await.unwrap_or_else(|_| Answer::deny("denied: the turn ended")),
        }
    }

    /// Notes that a turn has logged the `tool` of this call.
    fn tool_logged(&self, session: Uuid, tool_use_id: &str) {
        {
            let mut table = self.lock();
            let logged = table.tool_logged.entry(session).or_default();
            if logged.len() >= TOOL_LOGGED_KEPT {
                logged.pop_front();
            }
            logged.push_back(tool_use_id.to_owned());
        }
        self.tool_logged_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits (bounded) until the turn has logged this call's `tool`, so
    /// that the log shows a call before the request to approve it.
    async fn until_tool_logged(&self, session: Uuid, tool_use_id: &str) {
        let mut changed = self.tool_logged_changed.subscribe();
        let seen = || self.lock().tool_logged.get(&session).is_some_and(|p| p.iter().any(|id| id == tool_use_id));
        let waited = tokio::time::timeout(TOOL_LOGGED_WAIT, async {
            while !seen() {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            tracing::debug!(%session, %tool_use_id, "asked about a call the agent's output has not shown");
        }
    }

    /// The operator's decision on a waiting call.
    pub async fn decide(
        &self,
        session: Uuid,
        log: &Log,
        tool_use_id: &str,
        allow: bool,
        message: Option<String>,
        by: DecidedBy,
    ) -> Result<(), DecideError> {
        let taken = self.lock().waiting.remove(&(session, tool_use_id.to_owned()));
        let Some(waiting) = taken else {
            // Asked but not waiting: decided, or being decided right now
            // (its decision on its way into the log).
            let asked = log.store().approvals(session, Some(tool_use_id.to_owned())).await?;
            return Err(if asked.is_empty() { DecideError::Unknown } else { DecideError::AlreadyDecided });
        };
        let answer = match (allow, &message) {
            (true, _) => Answer { allow: true, reason: format!("allowed by the operator ({})", by.label()) },
            (false, Some(message)) => Answer::deny(format!("denied by the operator: {message}")),
            (false, None) => Answer::deny("denied by the operator"),
        };
        let logged = self.log_decision(session, log, &waiting.call, &by, &answer, message).await;
        // Fail closed: an allow the log could not take is not an allow.
        let answer = match &logged {
            Ok(()) => answer,
            Err(err) => Answer::deny(format!("denied: the decision could not be logged ({err})")),
        };
        let _ = waiting.answer.send(answer);
        logged.map_err(DecideError::Log)
    }

    /// Decides every call of a session's turn that still waits: the turn
    /// has ended, so nothing it asked for may run.
    pub async fn end_turn(&self, session: Uuid, log: &Log) {
        let ended: Vec<Waiting> = {
            let mut table = self.lock();
            let keys: Vec<_> = table.waiting.keys().filter(|(s, _)| *s == session).cloned().collect();
            keys.into_iter().filter_map(|key| table.waiting.remove(&key)).collect()
        };
        for waiting in ended {
            let answer = Answer::deny("denied: the turn ended");
            if let Err(err) = self.log_decision(session, log, &waiting.call, &DecidedBy::TurnEnded, &answer, None).await
            {
                tracing::error!(%session, %err, "could not log the end of a waiting approval");
            }
            let _ = waiting.answer.send(answer);
        }
    }

    /// Decides every call the log shows asked but undecided: calls of a
    /// turn whose end could not decide them (the server died, as `restart`;
    /// a turn that failed before it could, as `turn-ended`). Their agent is
    /// gone, and a new turn asks again if it still wants to (README
    /// "Approvals").
    pub async fn close_undecided(&self, session: Uuid, log: &Log, by: DecidedBy) -> Result<usize, LogError> {
        let asked = log.store().approvals(session, None).await?;
        let mut closed = 0;
        for asked in asked.into_iter().filter(|a| !a.decided) {
            if self.lock().waiting.contains_key(&(session, asked.tool_use_id.clone())) {
                continue; // still waiting on a running turn: not ours to decide
            }
            let call = ToolCall { tool_name: asked.tool, tool_input: asked.input, tool_use_id: asked.tool_use_id };
            let answer = Answer::deny("denied: its turn is over");
            self.log_decision(session, log, &call, &by, &answer, None).await?;
            closed += 1;
        }
        Ok(closed)
    }

    /// Appends the decision and writes its audit record (a record that
    /// cannot be written is logged, as for every other action).
    async fn log_decision(
        &self,
        session: Uuid,
        log: &Log,
        call: &ToolCall,
        by: &DecidedBy,
        answer: &Answer,
        message: Option<String>,
    ) -> Result<(), LogError> {
        let decision = if answer.allow { Decision::Allow } else { Decision::Deny };
        log.append(Event::ApprovalDecision {
            tool_use_id: call.tool_use_id.clone(),
            decision,
            by: by.label().to_owned(),
            at_ms: now_ms(),
            message,
        })
        .await?;
        tracing::info!(%session, tool_use_id = %call.tool_use_id, decision = decision.as_str(), by = by.label(), "tool call decided");
        self.decided.get_or_create(&[("decision", decision.as_str()), ("by", by.kind())]).inc();
        audit(log.store(), &self.audit_failures, session, call, by, decision).await;
        Ok(())
    }
}

/// The audit record of one decision.
pub async fn audit(
    store: &Store,
    failures: &AtomicU64,
    session: Uuid,
    call: &ToolCall,
    by: &DecidedBy,
    decision: Decision,
) {
    let (identity, peer, via) = match by {
        DecidedBy::Operator { name, peer, via } => (name.clone(), peer.clone(), *via),
        other => (other.label().to_owned(), "-".to_owned(), AuthMethod::Server),
    };
    let shown: String = shown(call).chars().take(AUDIT_INPUT_CHARS).collect();
    let record = AuditRecord {
        identity,
        peer,
        action: "approval".into(),
        target: format!("{session}/{} {}: {shown}", call.tool_use_id, call.tool_name),
        outcome: decision.as_str().into(),
        via: Some(via),
    };
    let written = tokio::time::timeout(AUDIT_WAIT, store.audit(record)).await.unwrap_or(Err(StoreError::Stalled));
    if let Err(err) = written {
        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(%err, %session, tool_use_id = %call.tool_use_id, "could not write the audit record of an approval");
    }
}

/// Which running turn a hook request belongs to (the digest of its secret).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TurnKey([u8; 32]);

/// A running turn's hook: its secret (for the agent's environment) and the
/// CLI's `--settings`. Dropped without [`TurnHook::close`] (a panic), it
/// still unregisters, and the calls waiting are denied unlogged.
pub struct TurnHook {
    approvals: Arc<Approvals>,
    session: Uuid,
    secret: String,
    closed: bool,
}

/// Never prints the secret.
impl std::fmt::Debug for TurnHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnHook").field("session", &self.session).field("closed", &self.closed).finish()
    }
}

impl TurnHook {
    /// `KEY=value` for the agent's environment.
    pub fn env(&self) -> (String, String) {
        (HOOK_TOKEN_VAR.to_owned(), self.secret.clone())
    }

    /// The CLI's `--settings`: one `PreToolUse` hook for every tool, of
    /// type `http`, that blocks the call when the server cannot be asked.
    /// The secret is in the environment; the settings only name it.
    pub fn settings(&self) -> String {
        let timeout = (self.approvals.config.timeout + HOOK_MARGIN).as_secs();
        json!({
            "hooks": {
                "PreToolUse": [{
                    "matcher": "*",
                    "hooks": [{
                        "type": "http",
                        "url": self.approvals.hook_url,
                        "headers": { "Authorization": format!("Bearer ${HOOK_TOKEN_VAR}") },
                        "allowedEnvVars": [HOOK_TOKEN_VAR],
                        "timeout": timeout,
                        "onFailure": "block",
                    }]
                }]
            }
        })
        .to_string()
    }

    /// The turn has logged this call's `tool` (its hook may be waiting on it).
    pub fn tool_logged(&self, tool_use_id: &str) {
        self.approvals.tool_logged(self.session, tool_use_id);
    }

    /// Ends the hook: its secret stops working and every call still
    /// waiting is denied, logged as `turn-ended`.
    pub async fn close(mut self, log: &Log) {
        self.unregister();
        self.approvals.end_turn(self.session, log).await;
    }

    fn unregister(&mut self) {
        if !self.closed {
            self.closed = true;
            let mut table = self.approvals.lock();
            table.turns.remove(&digest(&self.secret));
            table.tool_logged.remove(&self.session);
        }
    }
}

impl Drop for TurnHook {
    fn drop(&mut self) {
        if !self.closed {
            self.unregister();
            let mut table = self.approvals.lock();
            table.waiting.retain(|(session, _), _| *session != self.session);
        }
    }
}

/// A call in a line: Bash's command, or the tool's input as JSON.
fn shown(call: &ToolCall) -> String {
    match call.tool_input.get("command").and_then(Value::as_str) {
        Some(command) => command.to_owned(),
        None => call.tool_input.to_string(),
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hook input the pinned CLI posted for a Bash call, verbatim.
    #[test]
    fn the_clis_recorded_hook_input_parses_as_a_tool_call() {
        let recorded = include_str!("../../tests/fixtures/hooks/pre_tool_use_bash.json");
        let call: ToolCall = serde_json::from_str(recorded).unwrap();
        assert_eq!(call.tool_name, "Bash");
        assert_eq!(call.tool_input["command"], "echo hi-from-bash");
        assert!(call.tool_use_id.starts_with("toolu_"), "{call:?}");
    }

    /// A 200 without `hookSpecificOutput` lets the CLI run the tool, so
    /// every answer carries the decision, a deny included.
    #[test]
    fn every_answer_carries_the_decision_in_the_clis_format() {
        for (answer, decision) in [(Answer { allow: true, reason: "r".into() }, "allow"), (Answer::deny("no"), "deny")]
        {
            let output = answer.to_hook_output();
            assert_eq!(output["hookSpecificOutput"]["hookEventName"], "PreToolUse");
            assert_eq!(output["hookSpecificOutput"]["permissionDecision"], decision);
            assert_eq!(output["hookSpecificOutput"]["permissionDecisionReason"], answer.reason.as_str());
        }
    }
}
