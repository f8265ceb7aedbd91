//! The Proxmox VE HTTPS API backend (README "Power backends"): one VM,
//! reached with a scoped API token, never with a password or a ticket.
//!
//! This is the only code that knows PVE's wire format: the `PVEAPIToken`
//! header, the `{"data": …}` envelope and its `message` on errors, the
//! `status`/`qmpstatus` pair, and the UPID of every action, which is
//! followed until the task has stopped, because PVE answers an action as
//! soon as its worker starts, not when the VM has changed.

use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Serialize;
use serde_json::{Value, json};

use super::backend_types::{BackendError, PowerState};
use super::tls::{Answer, Https, Timeouts, Trust, segment};

/// How to reach one VM through the API.
#[derive(Debug, Clone)]
pub struct PveApiConfig {
    /// `https://host:8006`; plain `http://` only to loopback.
    pub url: String,
    pub node: String,
    pub vmid: u32,
    /// `USER@REALM!TOKENID`.
    pub token_id: String,
    pub token_secret: String,
    pub trust: Option<Trust>,
    pub timeouts: Timeouts,
    /// How long a reset, stop or start task may run before it is given up
    /// on (a shutdown gets its own timeout on top).
    pub task_timeout: Duration,
    /// How often a running task is asked about.
    pub poll_interval: Duration,
}

impl PveApiConfig {
    /// A configuration with the bounds an operator would want by default.
    pub fn new(url: &str, node: &str, vmid: u32, token_id: &str, token_secret: &str, trust: Option<Trust>) -> Self {
        PveApiConfig {
            url: url.to_owned(),
            node: node.to_owned(),
            vmid,
            token_id: token_id.to_owned(),
            token_secret: token_secret.to_owned(),
            trust,
            timeouts: Timeouts::default(),
            task_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// A client for one VM.
#[derive(Debug, Clone)]
pub struct PveApi {
    http: Https,
    node: String,
    vmid: u32,
    auth: HeaderValue,
    task_timeout: Duration,
    poll_interval: Duration,
}

/// The VM's power, and what PVE said (`status/current`'s data).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub power: PowerState,
    pub raw: Value,
}

/// A PVE task that ran to its end with `OK`.
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    pub upid: String,
    /// From the action's answer to the task's end, as this client saw it.
    pub took_ms: u64,
}

/// How a graceful shutdown ended.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Shutdown {
    /// The guest powered off within the timeout.
    Stopped(Task),
    /// The guest was still running when PVE's timeout ran out; the caller
    /// decides whether to force it.
    TimedOut { upid: String, message: String },
}

/// The actions of `POST /nodes/{node}/qemu/{vmid}/status/{action}` this
/// client sends: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Reset,
    Stop,
    Start,
    Shutdown,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Reset => "reset",
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Shutdown => "shutdown",
        }
    }
}

/// PVE's own words for a shutdown whose guest did not power off in time
/// (qemu-server's `vm_stop`), as opposed to a lock or other task error.
const POWERDOWN_TIMED_OUT: &str = "quit/powerdown failed";

impl PveApi {
    pub fn new(config: PveApiConfig) -> Result<PveApi, BackendError> {
        let Some((user, token)) = config.token_id.split_once('!') else {
            return Err(BackendError::Auth(format!("the token id {:?} is not USER@REALM!TOKENID", config.token_id)));
        };
        if !user.contains('@') || token.is_empty() {
            return Err(BackendError::Auth(format!("the token id {:?} is not USER@REALM!TOKENID", config.token_id)));
        }
        let mut auth = HeaderValue::from_str(&format!("PVEAPIToken={}={}", config.token_id, config.token_secret))
            .map_err(|_| BackendError::Auth("the token id or secret holds characters a header cannot carry".into()))?;
        auth.set_sensitive(true);
        Ok(PveApi {
            http: Https::new(&config.url, config.trust.as_ref(), config.timeouts)?,
            node: config.node,
            vmid: config.vmid,
            auth,
            task_timeout: config.task_timeout,
            poll_interval: config.poll_interval,
        })
    }

    /// `status/current`: `running` unless QEMU itself says it is paused.
    pub async fn status(&self) -> Result<Status, BackendError> {
        let raw = self.get(&self.vm_path("/status/current")).await?;
        let status = raw.get("status").and_then(Value::as_str);
        let qmp = raw.get("qmpstatus").and_then(Value::as_str);
        Ok(Status { power: power_of(status, qmp), raw })
    }

    /// A hard reset, followed to the task's end.
    pub async fn reset(&self) -> Result<Task, BackendError> {
        self.act(Action::Reset, "", self.task_timeout).await.map_err(BackendError::from)
    }

    /// A hard stop (QEMU is killed), followed to the task's end.
    pub async fn stop(&self) -> Result<Task, BackendError> {
        self.act(Action::Stop, "", self.task_timeout).await.map_err(BackendError::from)
    }

    pub async fn start(&self) -> Result<Task, BackendError> {
        self.act(Action::Start, "", self.task_timeout).await.map_err(BackendError::from)
    }

    /// An ACPI shutdown that PVE gives `timeout` to complete. A guest that
    /// ignores it is [`Shutdown::TimedOut`], not an error: escalating to a
    /// hard stop is the caller's decision.
    pub async fn shutdown(&self, timeout: Duration) -> Result<Shutdown, BackendError> {
        let seconds = timeout.as_secs().max(1);
        match self.act(Action::Shutdown, &format!("timeout={seconds}"), timeout + self.task_timeout).await {
            Ok(task) => Ok(Shutdown::Stopped(task)),
            Err(TaskFailed::Task { upid, exitstatus }) if exitstatus.contains(POWERDOWN_TIMED_OUT) => {
                Ok(Shutdown::TimedOut { upid, message: exitstatus })
            }
            Err(other) => Err(other.into()),
        }
    }

    /// What PVE knows of the VM before anything is changed: its status,
    /// config and pending changes, and whether the guest agent answers (an
    /// agent that does not is a finding, not a failure).
    pub async fn forensics(&self) -> Result<Value, BackendError> {
        let status = self.get(&self.vm_path("/status/current")).await?;
        let config = self.get(&self.vm_path("/config")).await?;
        let pending = self.get(&self.vm_path("/pending")).await?;
        let agent = match self.post(&self.vm_path("/agent/ping"), "").await {
            Ok(_) => json!({"answered": true}),
            Err(err) => json!({"answered": false, "message": err.to_string()}),
        };
        Ok(json!({"status": status, "config": config, "pending": pending, "agent": agent}))
    }

    fn vm_path(&self, rest: &str) -> String {
        format!("/api2/json/nodes/{}/qemu/{}{rest}", segment(&self.node), self.vmid)
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        headers
    }

    async fn get(&self, path: &str) -> Result<Value, BackendError> {
        data(self.http.get(self.http.url(path)?, self.headers()).await?)
    }

    async fn post(&self, path: &str, form: &str) -> Result<Value, BackendError> {
        let url = self.http.url(path)?;
        data(self.http.post(url, self.headers(), "application/x-www-form-urlencoded", form.to_owned()).await?)
    }

    /// Sends an action and follows its task for at most `within`.
    async fn act(&self, action: Action, form: &str, within: Duration) -> Result<Task, TaskFailed> {
        let upid = self.post(&self.vm_path(&format!("/status/{}", action.as_str())), form).await?;
        let Some(upid) = upid.as_str().filter(|u| u.starts_with("UPID:")).map(str::to_owned) else {
            return Err(
                BackendError::Protocol(format!("{} answered {upid} instead of a task id", action.as_str())).into()
            );
        };
        self.follow(upid, within).await
    }

    /// Polls `/nodes/{node}/tasks/{upid}/status` until the task has
    /// stopped; its `exitstatus` is `OK` or the task's error. A read of the
    /// status that fails (a node's proxy restarting, a 595 while it cannot
    /// reach the node) is asked again until `within`, as the operations'
    /// power waits are, unless asking again cannot help
    /// ([`BackendError::ends_a_wait`]); a task that ended in an error is
    /// that error at once.
    async fn follow(&self, upid: String, within: Duration) -> Result<Task, TaskFailed> {
        let started = Instant::now();
        let path = format!("/api2/json/nodes/{}/tasks/{}/status", segment(&self.node), segment(&upid));
        loop {
            let last = match self.get(&path).await {
                Ok(task) => match task.get("status").and_then(Value::as_str) {
                    Some("stopped") => {
                        let exitstatus = task.get("exitstatus").and_then(Value::as_str).unwrap_or("").to_owned();
                        if exitstatus == "OK" {
                            let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                            return Ok(Task { upid, took_ms });
                        }
                        return Err(TaskFailed::Task { upid, exitstatus });
                    }
                    Some("running") => None,
                    _ => Some(BackendError::Protocol(format!("task {upid}: unexpected status {task}"))),
                },
                Err(err) if err.ends_a_wait() => return Err(err.into()),
                Err(err) => Some(err),
            };
            if started.elapsed() >= within {
                let waited = started.elapsed().as_secs();
                return Err(match last {
                    None => BackendError::Refused(format!("task {upid} was still running after {waited}s")),
                    Some(err) => BackendError::Refused(format!(
                        "task {upid} was not seen to end within {waited}s; the last status read failed: {err}"
                    )),
                }
                .into());
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }
}

/// An action that did not end with `OK`: its task's own error is kept apart
/// so a shutdown can tell a guest that ignored it from a task that failed.
enum TaskFailed {
    Task { upid: String, exitstatus: String },
    Other(BackendError),
}

impl From<BackendError> for TaskFailed {
    fn from(err: BackendError) -> Self {
        TaskFailed::Other(err)
    }
}

impl From<TaskFailed> for BackendError {
    fn from(failed: TaskFailed) -> Self {
        match failed {
            TaskFailed::Task { exitstatus, .. } if exitstatus.is_empty() => {
                BackendError::Refused("the task failed without an exit status".into())
            }
            TaskFailed::Task { exitstatus, .. } => BackendError::Refused(exitstatus),
            TaskFailed::Other(err) => err,
        }
    }
}

fn power_of(status: Option<&str>, qmpstatus: Option<&str>) -> PowerState {
    match (status, qmpstatus) {
        (Some("stopped"), _) => PowerState::Stopped,
        (Some("running"), None | Some("running")) => PowerState::Running,
        (Some("running"), Some("paused" | "suspended")) => PowerState::Paused,
        _ => PowerState::Unknown,
    }
}

/// The `data` of a successful answer, or the error PVE's `message` names.
fn data(answer: Answer) -> Result<Value, BackendError> {
    let body: Option<Value> = serde_json::from_slice(&answer.body).ok();
    if answer.status.is_success() {
        return match body {
            Some(Value::Object(mut map)) if map.contains_key("data") => Ok(map.remove("data").unwrap_or(Value::Null)),
            _ => Err(BackendError::Protocol(format!("HTTP {} without a data envelope", answer.status))),
        };
    }
    let mut message = body
        .as_ref()
        .and_then(|b| b.get("message"))
        .and_then(Value::as_str)
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("HTTP {}", answer.status));
    // A parameter error names each field in `errors`.
    if let Some(errors) = body.as_ref().and_then(|b| b.get("errors")).filter(|e| !e.is_null()) {
        message = format!("{message} {errors}");
    }
    Err(match answer.status.as_u16() {
        401 | 403 => BackendError::Auth(message),
        // pveproxy's own answers when it cannot reach the VM's node.
        595 | 596 => BackendError::Unreachable(message),
        _ => BackendError::Refused(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_follows_status_then_qmpstatus() {
        let cases = [
            (Some("running"), Some("running"), PowerState::Running),
            (Some("running"), None, PowerState::Running),
            (Some("running"), Some("paused"), PowerState::Paused),
            (Some("running"), Some("suspended"), PowerState::Paused),
            (Some("stopped"), Some("stopped"), PowerState::Stopped),
            (Some("running"), Some("inmigrate"), PowerState::Unknown),
            (None, None, PowerState::Unknown),
        ];
        for (status, qmp, want) in cases {
            assert_eq!(power_of(status, qmp), want, "{status:?} {qmp:?}");
        }
    }

    #[test]
    fn a_token_id_without_realm_and_name_is_refused() {
        for bad in ["breakglass", "breakglass!power", "breakglass@pve!"] {
            let err = PveApi::new(PveApiConfig::new("http://127.0.0.1:1", "pve1", 100, bad, "s", None)).unwrap_err();
            assert!(matches!(&err, BackendError::Auth(m) if m.contains("USER@REALM!TOKENID")), "{bad}: {err:?}");
        }
    }
}
