//! The power path (README "Setting up the hypervisor"): a closed set of verbs sent to the hypervisor's
//! forced command over ssh, with no agent in the path.
//!
//! This is the only module that starts `ssh`, and it only ever passes a
//! [`Verb`] from the enum below as the remote command.

pub mod backend_types;
pub mod pve_api;
pub mod redfish;
mod tls;

pub use tls::{BadFingerprint, Fingerprint, Timeouts, Trust};

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use std::sync::Arc;
use thiserror::Error;
use tokio::process::Command;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::capture::read_capped;

/// How power verbs reach the hypervisor (README "Setting up the hypervisor").
#[derive(Debug, Clone)]
pub struct PowerConfig {
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    pub known_hosts: Option<PathBuf>,
    pub ssh_program: PathBuf,
    pub timeout: Duration,
}

/// Output kept from each of ssh's stdout and stderr.
pub const OUTPUT_CAP: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verb {
    Status,
    Forensics,
    Reset,
    Stop,
    Start,
    Cycle,
}

impl Verb {
    pub const ALL: [Verb; 6] = [Verb::Status, Verb::Forensics, Verb::Reset, Verb::Stop, Verb::Start, Verb::Cycle];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Status => "status",
            Verb::Forensics => "forensics",
            Verb::Reset => "reset",
            Verb::Stop => "stop",
            Verb::Start => "start",
            Verb::Cycle => "cycle",
        }
    }

    /// Changes the VM's state (and so takes forensics first on the host).
    pub fn is_mutating(self) -> bool {
        match self {
            Verb::Status | Verb::Forensics => false,
            Verb::Reset | Verb::Stop | Verb::Start | Verb::Cycle => true,
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Error)]
#[error("unknown verb {0:?}")]
pub struct UnknownVerb(pub String);

impl FromStr for Verb {
    type Err = UnknownVerb;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Verb::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownVerb(s.chars().take(64).collect()))
    }
}

/// The catalogue as `GET /api/pve/verbs` answers it: names sorted.
pub fn catalogue() -> (Vec<&'static str>, Vec<&'static str>) {
    let mut verbs: Vec<_> = Verb::ALL.iter().map(|v| v.as_str()).collect();
    let mut mutating: Vec<_> = Verb::ALL.iter().filter(|v| v.is_mutating()).map(|v| v.as_str()).collect();
    verbs.sort_unstable();
    mutating.sort_unstable();
    (verbs, mutating)
}

/// What a verb did on the host.
#[derive(Debug, Clone, Serialize)]
pub struct VerbOutcome {
    pub verb: &'static str,
    /// ssh's exit code (255 for ssh's own failures); `null` when killed.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The host's forced command refused the verb.
    pub rejected: bool,
    /// ssh was killed after `BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS`.
    pub timed_out: bool,
}

#[derive(Debug, Error)]
pub enum PowerError {
    #[error("no hypervisor is configured: set BREAKGLASS_PVE_HOST")]
    NotConfigured,
    #[error("another power verb is running")]
    Busy,
    #[error("the verb's task failed: {0}")]
    Lost(String),
    #[error("could not start {program}: {source}")]
    CannotStart { program: String, source: std::io::Error },
    #[error(
        "the server is shutting down: ssh was killed before the verb finished; what the host did is unknown \
         (check with status)"
    )]
    CutOff,
}

#[derive(Debug)]
pub struct Power {
    config: Arc<PowerConfig>,
    /// One mutating verb at a time from this server.
    mutating: Arc<Mutex<()>>,
    /// Verbs in flight. A verb runs to its end even when the client that
    /// asked for it goes away: a `cycle` cut between stop and start would
    /// leave the VM stopped.
    tracker: TaskTracker,
    /// Fired when shutdown can wait no longer: verbs still running are cut
    /// off, recorded and answered rather than dropped with the process.
    cut_off: CancellationToken,
}

impl Power {
    pub fn new(config: PowerConfig) -> Self {
        Power {
            config: Arc::new(config),
            mutating: Arc::new(Mutex::new(())),
            tracker: TaskTracker::new(),
            cut_off: CancellationToken::new(),
        }
    }

    /// Runs a verb in a task of its own and waits for its outcome.
    pub async fn run(&self, verb: Verb) -> Result<VerbOutcome, PowerError> {
        if self.config.host.is_none() {
            return Err(PowerError::NotConfigured);
        }
        let guard = if verb.is_mutating() {
            Some(self.mutating.clone().try_lock_owned().map_err(|_| PowerError::Busy)?)
        } else {
            None
        };
        let (config, cut_off) = (self.config.clone(), self.cut_off.clone());
        let task = self.tracker.spawn(async move {
            // Dropping ssh's future kills it (kill_on_drop); it has no
            // children of its own.
            let outcome = tokio::select! {
                outcome = run_ssh(&config, verb) => outcome,
                () = cut_off.cancelled() => Err(PowerError::CutOff),
            };
            drop(guard);
            outcome
        });
        task.await.unwrap_or_else(|err| Err(PowerError::Lost(err.to_string())))
    }

    /// Waits (bounded by `within`) for verbs in flight at shutdown, then
    /// cuts off those still running and gives them `cut_off` to be
    /// recorded and answered.
    pub async fn drain(&self, within: Duration, cut_off: Duration) {
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait()).await.is_err() {
            tracing::warn!("a power verb was still running {within:?} into shutdown; cutting it off");
            self.cut_off.cancel();
            let _ = tokio::time::timeout(cut_off, self.tracker.wait()).await;
        }
    }
}

async fn run_ssh(config: &PowerConfig, verb: Verb) -> Result<VerbOutcome, PowerError> {
    let Some(host) = config.host.as_deref() else {
        return Err(PowerError::NotConfigured);
    };
    let mut command = Command::new(&config.ssh_program);
    command.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
    match &config.known_hosts {
        Some(file) => {
            command.args(["-o", "StrictHostKeyChecking=yes", "-o"]);
            command.arg(format!("UserKnownHostsFile={}", file.display()));
        }
        None => {
            command.args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]);
        }
    }
    command
        .args(["-o", "LogLevel=ERROR", "-p"])
        .arg(config.port.to_string())
        .arg("--")
        .arg(format!("{}@{}", config.user, host))
        .arg(verb.as_str())
        .env_remove("API_BEARER_TOKEN")
        .env_remove("BREAKGLASS_NOTIFY_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|source| PowerError::CannotStart { program: config.ssh_program.display().to_string(), source })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(PowerError::CannotStart {
            program: config.ssh_program.display().to_string(),
            source: std::io::Error::other("no output pipes"),
        });
    };
    let collect = async {
        let (out, err) = tokio::join!(read_capped(stdout, OUTPUT_CAP), read_capped(stderr, OUTPUT_CAP));
        let status = child.wait().await;
        (out.into_text(), err.into_text(), status)
    };
    let timeout = config.timeout;
    Ok(match tokio::time::timeout(timeout, collect).await {
        Ok((stdout, stderr, status)) => {
            let exit_code = status.ok().and_then(|s| s.code());
            let rejected = exit_code == Some(REFUSED);
            VerbOutcome { verb: verb.as_str(), rejected, exit_code, stdout, stderr, timed_out: false }
        }
        Err(_) => {
            // Dropping the future dropped the child, and kill_on_drop kills
            // and reaps it; ssh has no children of its own to leave behind.
            VerbOutcome {
                verb: verb.as_str(),
                exit_code: None,
                stdout: String::new(),
                stderr: timed_out(timeout),
                rejected: false,
                timed_out: true,
            }
        }
    })
}

/// The forced command's exit code for a command outside the catalogue.
pub const REFUSED: i32 = 64;

fn timed_out(after: Duration) -> String {
    format!("timed out after {}s; ssh was killed", after.as_secs())
}
