//! The `ssh` backend (README "Setting up the hypervisor"): the hypervisor's
//! forced command, one verb per connection. This is the only code that
//! starts `ssh`, and it only ever passes a [`Verb`] of the host script's
//! catalogue as the remote command.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::process::Command;

use super::{BackendError, PowerState, Verb};
use crate::capture::read_capped;

/// Output kept from each of ssh's stdout and stderr.
pub const OUTPUT_CAP: usize = 64 * 1024;

/// The forced command's exit code for a command outside the catalogue.
pub const REFUSED: i32 = 64;
/// The host script's exit codes (README "Setting up the hypervisor").
const QM_FAILED: i32 = 69;
const NO_FORENSICS: i32 = 73;
const BUSY: i32 = 75;
const BAD_CONFIG: i32 = 78;
const CYCLE_TIMED_OUT: i32 = 124;
/// ssh's own failures (connection, authentication, host key).
const SSH_FAILED: i32 = 255;

/// How to reach one hypervisor's forced command.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Pins the host key (README "Host key checking"); `None`: not checked.
    pub known_hosts: Option<PathBuf>,
    pub program: PathBuf,
    /// A verb taking longer is killed (`BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS`).
    pub timeout: Duration,
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

impl VerbOutcome {
    /// The outcome as an operation's result (README "API", operations).
    pub fn to_json(&self) -> Value {
        json!({
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
        })
    }

    /// Success, or the backend error its exit code means.
    pub fn error(&self) -> Option<BackendError> {
        let said = last_words(&self.stderr);
        match self.exit_code {
            Some(0) => None,
            None if self.timed_out => Some(BackendError::Unreachable(self.stderr.clone())),
            None => Some(BackendError::Unreachable("ssh was killed by a signal".into())),
            Some(SSH_FAILED) if self.stderr.contains("Host key verification failed") => Some(BackendError::Tls(said)),
            Some(SSH_FAILED) if self.stderr.contains("Permission denied") => Some(BackendError::Auth(said)),
            Some(SSH_FAILED) => Some(BackendError::Unreachable(said)),
            Some(REFUSED | QM_FAILED | NO_FORENSICS | BUSY | CYCLE_TIMED_OUT) => Some(BackendError::Refused(said)),
            Some(BAD_CONFIG) => Some(BackendError::Protocol(format!("the host script's configuration: {said}"))),
            Some(code) => Some(BackendError::Protocol(format!("exit {code}: {said}"))),
        }
    }

    /// Where the host saved the forensics it took before this verb: the
    /// script says `forensics saved to <file>` on stderr.
    pub fn forensics_file(&self) -> Option<&str> {
        self.stderr.lines().find_map(|line| line.split_once("forensics saved to ").map(|(_, file)| file.trim()))
    }
}

/// The last non-empty line of what a program said, without the script's
/// `breakglass-pve: ` prefix: the operator's words for what went wrong.
fn last_words(text: &str) -> String {
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    line.strip_prefix("breakglass-pve: ").unwrap_or(line).to_owned()
}

/// The power word from `qm status --verbose` (`status: running`, and
/// `qmpstatus: paused` for a paused guest), as every backend says it.
pub fn power_state(stdout: &str) -> PowerState {
    let field = |name: &str| {
        stdout.lines().find_map(|line| line.strip_prefix(name).map(|rest| rest.trim_start_matches(':').trim()))
    };
    if field("qmpstatus") == Some("paused") {
        return PowerState::Paused;
    }
    match field("status") {
        Some("running") => PowerState::Running,
        Some("stopped") => PowerState::Stopped,
        Some("paused") => PowerState::Paused,
        _ => PowerState::Unknown,
    }
}

impl SshTarget {
    /// The VM's power state, from the host's `status`.
    pub async fn power(&self) -> Result<(PowerState, Value), BackendError> {
        let outcome = self.run(Verb::Status).await?;
        if let Some(err) = outcome.error() {
            return Err(err);
        }
        Ok((power_state(&outcome.stdout), outcome.to_json()))
    }

    /// Runs one verb of the forced command, unchanged since the single
    /// hypervisor: ssh's exit code and output, or why ssh did not start.
    pub async fn run(&self, verb: Verb) -> Result<VerbOutcome, BackendError> {
        let mut command = Command::new(&self.program);
        command.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
        match &self.known_hosts {
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
            .arg(self.port.to_string())
            .arg("--")
            .arg(format!("{}@{}", self.user, self.host))
            .arg(verb.as_str())
            .env_remove("API_BEARER_TOKEN")
            .env_remove("BREAKGLASS_NOTIFY_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let cannot_start = |err: std::io::Error| {
            BackendError::CannotStart(format!("could not start {}: {err}", self.program.display()))
        };
        let mut child = command.spawn().map_err(cannot_start)?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(cannot_start(std::io::Error::other("no output pipes")));
        };
        let collect = async {
            let (out, err) = tokio::join!(read_capped(stdout, OUTPUT_CAP), read_capped(stderr, OUTPUT_CAP));
            let status = child.wait().await;
            (out.into_text(), err.into_text(), status)
        };
        let timeout = self.timeout;
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
                    stderr: format!("timed out after {}s; ssh was killed", timeout.as_secs()),
                    rejected: false,
                    timed_out: true,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_power_word_comes_from_qm_status() {
        assert_eq!(power_state("status: running\nname: devvm\nqmpstatus: running\n"), PowerState::Running);
        assert_eq!(power_state("status: stopped\n"), PowerState::Stopped);
        assert_eq!(power_state("status: running\nqmpstatus: paused\n"), PowerState::Paused);
        assert_eq!(power_state("status: prelaunch\n"), PowerState::Unknown);
        assert_eq!(power_state(""), PowerState::Unknown);
    }

    #[test]
    fn exit_codes_become_the_backend_errors_callers_branch_on() {
        let outcome = |code: Option<i32>, stderr: &str| VerbOutcome {
            verb: "reset",
            exit_code: code,
            stdout: String::new(),
            stderr: stderr.into(),
            rejected: false,
            timed_out: false,
        };
        assert!(outcome(Some(0), "").error().is_none());
        assert!(matches!(
            outcome(Some(255), "root@x: Permission denied (publickey).").error(),
            Some(BackendError::Auth(_))
        ));
        assert!(matches!(outcome(Some(255), "Host key verification failed.").error(), Some(BackendError::Tls(_))));
        assert!(matches!(
            outcome(Some(255), "connect to host x port 22: Connection refused").error(),
            Some(BackendError::Unreachable(_))
        ));
        let busy = outcome(Some(75), "breakglass-pve: busy: another mutating verb is running on this host").error();
        assert_eq!(
            busy.unwrap().to_string(),
            "the backend refused: busy: another mutating verb is running on this host"
        );
        let saved = outcome(Some(0), "breakglass-pve: forensics saved to /var/lib/f/vm101-x-stop-1.txt\n");
        assert_eq!(saved.forensics_file(), Some("/var/lib/f/vm101-x-stop-1.txt"));
    }
}
