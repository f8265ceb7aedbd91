//! The power path (README "Targets", "Operations" and "Setting up the
//! hypervisor"): a closed set of verbs sent to the machines of the targets
//! file through their backends, with no agent in the path.
//!
//! - `targets`: the targets file, read and checked at start-up;
//! - `ssh`: the hypervisor's forced command (the only code that starts `ssh`);
//! - `recovery`: the checks that say a target is back;
//! - `operation`: a verb as an operation you can watch: its steps, durable
//!   in the store, fanned out to attached clients, and the recovery wait.
//!
//! Each backend is the only code that knows its wire format; the Proxmox
//! VE API and Redfish clients plug into [`Backend`]'s variants.

pub mod backend_types;
pub mod operation;
pub mod pve_api;
pub mod recovery;
pub mod redfish;
pub mod ssh;
pub mod targets;
mod tls;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use backend_types::{BackendError, PowerState};
pub use operation::{Finished, OnDone, OpState, Operations, StartError};
pub use recovery::Check;
pub use ssh::{OUTPUT_CAP, REFUSED, SshTarget, VerbOutcome};
pub use targets::{PveApiSettings, RedfishSettings, SshDefaults, TargetsError};
pub use tls::{BadFingerprint, Fingerprint, Timeouts, Trust};

use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    Status,
    Forensics,
    Reset,
    Stop,
    Start,
    Cycle,
    /// A graceful shutdown only (ACPI), where the backend offers one.
    Shutdown,
    /// A non-maskable interrupt (a guest kernel's crash dump), where offered.
    Nmi,
}

impl Verb {
    pub const ALL: [Verb; 8] =
        [Verb::Status, Verb::Forensics, Verb::Reset, Verb::Stop, Verb::Start, Verb::Cycle, Verb::Shutdown, Verb::Nmi];

    /// The six verbs every backend offers (and the hypervisor script's whole catalogue).
    pub const CATALOGUE: [Verb; 6] = [Verb::Status, Verb::Forensics, Verb::Reset, Verb::Stop, Verb::Start, Verb::Cycle];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Status => "status",
            Verb::Forensics => "forensics",
            Verb::Reset => "reset",
            Verb::Stop => "stop",
            Verb::Start => "start",
            Verb::Cycle => "cycle",
            Verb::Shutdown => "shutdown",
            Verb::Nmi => "nmi",
        }
    }

    /// Changes the machine's state (and so takes forensics first).
    pub fn is_mutating(self) -> bool {
        match self {
            Verb::Status | Verb::Forensics => false,
            Verb::Reset | Verb::Stop | Verb::Start | Verb::Cycle | Verb::Shutdown | Verb::Nmi => true,
        }
    }

    /// Ends with the machine running, which the operation then verifies
    /// (README "Operations").
    pub fn recovers(self) -> bool {
        matches!(self, Verb::Reset | Verb::Start | Verb::Cycle)
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

/// A list of verbs as the API answers it: names sorted, and the mutating ones.
pub fn catalogue_of(verbs: &[Verb]) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut names: Vec<_> = verbs.iter().map(|v| v.as_str()).collect();
    let mut mutating: Vec<_> = verbs.iter().filter(|v| v.is_mutating()).map(|v| v.as_str()).collect();
    names.sort_unstable();
    mutating.sort_unstable();
    (names, mutating)
}

/// The catalogue as `GET /api/pve/verbs` answers it: names sorted.
pub fn catalogue() -> (Vec<&'static str>, Vec<&'static str>) {
    catalogue_of(&Verb::CATALOGUE)
}

/// What the API backends' verbs are composed of (README "Operations").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A warm reset.
    Reset,
    /// Power off now.
    ForceOff,
    On,
    /// Ask the guest or OS to shut down (ACPI).
    GracefulShutdown,
    /// The backend's own off-and-on, where it has one.
    PowerCycle,
    Nmi,
}

/// How a target is reached: a closed set, each the only code that knows
/// its wire format. The Proxmox VE API and Redfish clients are not built
/// in yet: their variants hold the checked settings and every call
/// answers [`BackendError::Protocol`] until they are.
#[derive(Debug, Clone)]
pub enum Backend {
    Ssh(SshTarget),
    PveApi(PveApiSettings),
    Redfish(RedfishSettings),
}

const SSH_VERBS: &[Verb] = &Verb::CATALOGUE;
const PVE_API_VERBS: &[Verb] =
    &[Verb::Status, Verb::Forensics, Verb::Reset, Verb::Stop, Verb::Start, Verb::Cycle, Verb::Shutdown];
const REDFISH_VERBS: &[Verb] = &Verb::ALL;

fn not_built(backend: &str) -> BackendError {
    BackendError::Protocol(format!("the {backend} client is not built into this server yet"))
}

impl Backend {
    /// The `backend` key of the targets file.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Ssh(_) => "ssh",
            Backend::PveApi(_) => "pve-api",
            Backend::Redfish(_) => "redfish",
        }
    }

    /// The verbs this backend offers: the six of the catalogue, and
    /// `shutdown` and `nmi` where it has them.
    pub fn verbs(&self) -> &'static [Verb] {
        match self {
            Backend::Ssh(_) => SSH_VERBS,
            Backend::PveApi(_) => PVE_API_VERBS,
            Backend::Redfish(_) => REDFISH_VERBS,
        }
    }

    pub fn offers(&self, verb: Verb) -> bool {
        self.verbs().contains(&verb)
    }

    /// Whether the backend can ask the guest to shut down, so that `stop`
    /// tries that first.
    pub fn has_graceful_stop(&self) -> bool {
        match self {
            Backend::Ssh(_) => false,
            Backend::PveApi(_) | Backend::Redfish(_) => true,
        }
    }

    /// Whether `cycle` is one action of the backend's rather than off,
    /// wait, on.
    pub fn has_native_cycle(&self) -> bool {
        match self {
            Backend::Ssh(_) | Backend::PveApi(_) => false,
            // Where `@Redfish.AllowableValues` offers `PowerCycle`.
            Backend::Redfish(_) => false,
        }
    }

    /// The power state, and what the backend said.
    pub async fn power(&self) -> Result<(PowerState, Value), BackendError> {
        match self {
            Backend::Ssh(ssh) => ssh.power().await,
            Backend::PveApi(_) => Err(not_built("Proxmox VE API")),
            Backend::Redfish(_) => Err(not_built("Redfish")),
        }
    }

    /// A point-in-time dump of what the backend knows of the machine.
    pub async fn forensics(&self) -> Result<Value, BackendError> {
        match self {
            Backend::Ssh(ssh) => {
                let outcome = ssh.run(Verb::Forensics).await?;
                match outcome.error() {
                    Some(err) => Err(err),
                    None => Ok(outcome.to_json()),
                }
            }
            Backend::PveApi(_) => Err(not_built("Proxmox VE API")),
            Backend::Redfish(_) => Err(not_built("Redfish")),
        }
    }

    /// One action of an API backend, followed to its end (a Proxmox task
    /// to its exit status).
    pub async fn act(&self, action: Action) -> Result<Value, BackendError> {
        match self {
            // The host script composes its own verbs: it is never asked
            // for a bare action.
            Backend::Ssh(_) => Err(BackendError::Protocol(format!("the ssh backend has no bare action {action:?}"))),
            Backend::PveApi(_) => Err(not_built("Proxmox VE API")),
            Backend::Redfish(_) => Err(not_built("Redfish")),
        }
    }
}

/// One machine the power verbs reach.
#[derive(Debug, Clone)]
pub struct Target {
    /// `[a-z0-9-]+`, unique.
    pub name: String,
    pub backend: Backend,
    /// Says the machine is back after `reset`, `cycle` or `start`.
    pub check: Option<Check>,
    /// How long a recovering machine may take to pass its check.
    pub recover_timeout: Duration,
    /// How long a graceful stop may take before it is forced (API backends).
    pub stop_timeout: Duration,
}

/// The power settings (README "Configuration", "Targets").
#[derive(Debug, Clone, Default)]
pub struct PowerConfig {
    /// The first is the default (`/api/pve/…`). Empty: no power verbs.
    pub targets: Vec<Target>,
}

/// The settings the power path is built from, as `config` received them.
#[derive(Debug, Clone)]
pub struct PowerSettings {
    /// `BREAKGLASS_TARGETS_FILE`: when set, it alone defines the targets.
    pub targets_file: Option<PathBuf>,
    /// `BREAKGLASS_PVE_*`: one `ssh` target named `vm`, without a targets file.
    pub pve_host: Option<String>,
    pub pve_port: u16,
    pub pve_user: String,
    pub pve_known_hosts: Option<PathBuf>,
    pub ssh: SshDefaults,
}

/// The name of the target `BREAKGLASS_PVE_HOST` makes without a targets file.
pub const LEGACY_TARGET: &str = "vm";

impl PowerConfig {
    /// Checks the settings (reading the targets file and its secrets);
    /// every error names the variable, or the file's target and key.
    pub fn load(settings: PowerSettings) -> anyhow::Result<PowerConfig> {
        if let Some(file) = &settings.targets_file {
            let targets =
                targets::load(file, &settings.ssh).map_err(|e| anyhow::anyhow!("BREAKGLASS_TARGETS_FILE: {e}"))?;
            if settings.pve_host.is_some() {
                tracing::warn!("BREAKGLASS_TARGETS_FILE is set, so BREAKGLASS_PVE_HOST is ignored");
            }
            return Ok(PowerConfig { targets });
        }
        let host = settings.pve_host.filter(|h| !h.is_empty());
        if let Some(host) = &host {
            targets::ssh_word(host).map_err(|e| anyhow::anyhow!("BREAKGLASS_PVE_HOST: {e}"))?;
        }
        targets::ssh_word(&settings.pve_user).map_err(|e| anyhow::anyhow!("BREAKGLASS_PVE_USER: {e}"))?;
        let known_hosts = match &settings.pve_known_hosts {
            Some(path) => Some(
                targets::known_hosts(&path.to_string_lossy())
                    .map_err(|e| anyhow::anyhow!("BREAKGLASS_PVE_KNOWN_HOSTS: {e}"))?,
            ),
            None => None,
        };
        let targets = host
            .map(|host| Target {
                name: LEGACY_TARGET.to_owned(),
                backend: Backend::Ssh(SshTarget {
                    host,
                    port: settings.pve_port,
                    user: settings.pve_user,
                    known_hosts,
                    program: settings.ssh.program,
                    timeout: settings.ssh.timeout,
                }),
                check: None,
                recover_timeout: targets::DEFAULT_RECOVER_TIMEOUT,
                stop_timeout: targets::DEFAULT_STOP_TIMEOUT,
            })
            .into_iter()
            .collect();
        Ok(PowerConfig { targets })
    }

    /// The default target, which `/api/pve/…` reaches.
    pub fn default_target(&self) -> Option<&Target> {
        self.targets.first()
    }

    /// The targets as the agent's prompt names them.
    pub fn agent_notes(&self) -> Vec<crate::agent::definition::TargetNote> {
        self.targets
            .iter()
            .map(|target| crate::agent::definition::TargetNote {
                name: target.name.clone(),
                backend: target.backend.name().to_owned(),
                verbs: catalogue_of(target.backend.verbs()).0.into_iter().map(str::to_owned).collect(),
            })
            .collect()
    }
}

#[derive(Debug, Error)]
pub enum PowerError {
    #[error("no hypervisor is configured: set BREAKGLASS_PVE_HOST")]
    NotConfigured,
    #[error("another power verb is running")]
    Busy,
    #[error("the verb's task failed: {0}")]
    Lost(String),
    #[error(
        "the server is shutting down: ssh was killed before the verb finished; what the host did is unknown \
         (check with status)"
    )]
    CutOff,
    /// The default target is not reached over ssh: its verbs are operations.
    #[error("the default target {0:?} is not an ssh target: use POST /api/targets/{0}/verbs/<verb>")]
    NotSsh(String),
    #[error("{0}")]
    Backend(BackendError),
}

/// A target and what its verbs share.
#[derive(Debug)]
pub struct Slot {
    pub target: Target,
    /// One mutating verb at a time on this target from this server,
    /// whether asked as an operation or through `/api/pve/…`.
    mutating: Arc<Mutex<()>>,
}

#[derive(Debug)]
pub struct Power {
    slots: Vec<Arc<Slot>>,
    by_name: HashMap<String, usize>,
    /// Verbs and operations in flight. A verb runs to its end even when the
    /// client that asked for it goes away: a `cycle` cut between stop and
    /// start would leave the machine stopped.
    tracker: TaskTracker,
    /// Fired when shutdown can wait no longer: verbs still running are cut
    /// off, recorded and answered rather than dropped with the process.
    cut_off: CancellationToken,
    operations: Arc<Operations>,
}

impl Power {
    pub fn new(config: PowerConfig, store: Arc<Store>) -> Self {
        let slots: Vec<Arc<Slot>> = config
            .targets
            .into_iter()
            .map(|target| Arc::new(Slot { target, mutating: Arc::new(Mutex::new(())) }))
            .collect();
        let by_name = slots.iter().enumerate().map(|(i, s)| (s.target.name.clone(), i)).collect();
        Power {
            slots,
            by_name,
            tracker: TaskTracker::new(),
            cut_off: CancellationToken::new(),
            operations: Arc::new(Operations::new(store)),
        }
    }

    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.slots.iter().map(|s| &s.target)
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.by_name.get(name).map(|i| &self.slots[*i].target)
    }

    pub fn default_target(&self) -> Option<&Target> {
        self.slots.first().map(|s| &s.target)
    }

    pub fn operations(&self) -> &Arc<Operations> {
        &self.operations
    }

    /// Marks the operations a previous run left running as failed
    /// ("interrupted"); returns how many.
    pub async fn recover(&self) -> Result<usize, crate::store::StoreError> {
        self.operations.recover().await
    }

    /// Starts `verb` on the target named `name` as an operation (README
    /// "Operations") and returns its id at once; `on_done` runs when it
    /// has finished, whatever happened.
    pub async fn start(&self, name: &str, verb: Verb, on_done: OnDone) -> Result<uuid::Uuid, StartError> {
        let slot = self.by_name.get(name).map(|i| self.slots[*i].clone()).ok_or(StartError::NoTarget)?;
        if !slot.target.backend.offers(verb) {
            return Err(StartError::NotOffered);
        }
        if self.tracker.is_closed() {
            return Err(StartError::ShuttingDown);
        }
        let guard = if verb.is_mutating() {
            Some(slot.mutating.clone().try_lock_owned().map_err(|_| StartError::Busy)?)
        } else {
            None
        };
        self.operations.start(&self.tracker, &self.cut_off, slot, verb, guard, on_done).await
    }

    /// Runs a verb on the default target (`/api/pve/{verb}`) in a task of
    /// its own and waits for its outcome.
    pub async fn run(&self, verb: Verb) -> Result<VerbOutcome, PowerError> {
        let Some(slot) = self.slots.first().cloned() else {
            return Err(PowerError::NotConfigured);
        };
        let Backend::Ssh(ssh) = slot.target.backend.clone() else {
            return Err(PowerError::NotSsh(slot.target.name.clone()));
        };
        let guard = if verb.is_mutating() {
            Some(slot.mutating.clone().try_lock_owned().map_err(|_| PowerError::Busy)?)
        } else {
            None
        };
        let cut_off = self.cut_off.clone();
        let task = self.tracker.spawn(async move {
            // Dropping ssh's future kills it (kill_on_drop); it has no
            // children of its own.
            let outcome = tokio::select! {
                outcome = ssh.run(verb) => outcome.map_err(PowerError::Backend),
                () = cut_off.cancelled() => Err(PowerError::CutOff),
            };
            drop(guard);
            outcome
        });
        task.await.unwrap_or_else(|err| Err(PowerError::Lost(err.to_string())))
    }

    /// Waits (bounded by `within`) for verbs and operations in flight at
    /// shutdown, then cuts off those still running and gives them
    /// `cut_off` to be recorded and answered.
    pub async fn drain(&self, within: Duration, cut_off: Duration) {
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait()).await.is_err() {
            tracing::warn!("a power verb was still running {within:?} into shutdown; cutting it off");
            self.cut_off.cancel();
            let _ = tokio::time::timeout(cut_off, self.tracker.wait()).await;
        }
    }
}
