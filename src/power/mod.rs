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
//! Each backend is the only code that knows its wire format (`ssh`,
//! `pve_api`, `redfish`, sharing `tls` and `backend_types`); [`Backend`]
//! holds each target's client, built once at start-up, and maps the
//! operations' actions onto it.

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

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::sync::{Mutex, OnceCell};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use backend_types::{BackendError, PowerState};
pub use operation::{Finished, OnDone, OpState, Operations, StartError};
pub use recovery::Check;
pub use ssh::{OUTPUT_CAP, REFUSED, SshTarget, VerbOutcome};
pub use targets::{PveApiSettings, RedfishSettings, SshDefaults, TargetsError};
pub use tls::{BadFingerprint, Fingerprint, Timeouts, Trust};

use crate::store::Store;
use pve_api::{PveApi, PveApiConfig};
use redfish::{Redfish, RedfishConfig, ResetType};

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
/// its wire format. The API backends hold their client, built once at
/// start-up from the checked settings.
#[derive(Debug, Clone)]
pub enum Backend {
    Ssh(SshTarget),
    PveApi(Arc<PveApiBackend>),
    Redfish(Arc<RedfishBackend>),
}

/// A Proxmox VE API target: its settings and its client.
#[derive(Debug)]
pub struct PveApiBackend {
    pub settings: PveApiSettings,
    client: PveApi,
    /// The graceful shutdown's timeout, which PVE itself enforces: the
    /// target's `stop_timeout_seconds`.
    shutdown_timeout: Duration,
}

impl PveApiBackend {
    pub fn new(settings: PveApiSettings, shutdown_timeout: Duration) -> Result<PveApiBackend, BackendError> {
        let vmid = u32::try_from(settings.vmid)
            .map_err(|_| BackendError::Protocol(format!("vmid {} is too large", settings.vmid)))?;
        let config = PveApiConfig::new(
            settings.url.as_str(),
            &settings.node,
            vmid,
            &settings.token_id,
            settings.token_secret.expose(),
            trust(&settings.tls),
        );
        Ok(PveApiBackend { client: PveApi::new(config)?, settings, shutdown_timeout })
    }

    async fn act(&self, action: Action) -> Result<Value, BackendError> {
        let said = match action {
            Action::Reset => serde_json::to_value(self.client.reset().await?),
            Action::ForceOff => serde_json::to_value(self.client.stop().await?),
            Action::On => serde_json::to_value(self.client.start().await?),
            // A guest that outlasts the timeout is an answer, not an
            // error: `stop` then escalates (README "Operations").
            Action::GracefulShutdown => serde_json::to_value(self.client.shutdown(self.shutdown_timeout).await?),
            Action::PowerCycle | Action::Nmi => {
                return Err(BackendError::Refused(format!("the Proxmox VE API has no {action:?}")));
            }
        };
        said.map_err(|e| BackendError::Protocol(e.to_string()))
    }
}

/// A BMC's Redfish target: its settings, its client, and the reset types
/// the BMC declares once it has said.
#[derive(Debug)]
pub struct RedfishBackend {
    pub settings: RedfishSettings,
    client: Redfish,
    /// Asked at start-up in the background ([`Power::probe`]) and again by
    /// the first verb that needs it until the BMC answers; kept for the
    /// server's life, as a BMC's reset types come with its firmware.
    offered: OnceCell<Vec<ResetType>>,
}

impl RedfishBackend {
    pub fn new(settings: RedfishSettings) -> Result<RedfishBackend, BackendError> {
        let mut config =
            RedfishConfig::new(settings.url.as_str(), &settings.user, settings.password.expose(), trust(&settings.tls));
        config.system.clone_from(&settings.system);
        Ok(RedfishBackend { client: Redfish::new(config)?, settings, offered: OnceCell::new() })
    }

    /// The reset types the BMC offers, asked once it answers.
    async fn reset_types(&self) -> Result<&[ResetType], BackendError> {
        self.offered.get_or_try_init(|| self.client.reset_types()).await.map(Vec::as_slice)
    }

    async fn act(&self, action: Action) -> Result<Value, BackendError> {
        let reset = match action {
            // A hard reset, as PVE's `reset` and the host script's are.
            Action::Reset => ResetType::ForceRestart,
            Action::ForceOff => ResetType::ForceOff,
            Action::On => ResetType::On,
            Action::GracefulShutdown => ResetType::GracefulShutdown,
            Action::PowerCycle => ResetType::PowerCycle,
            Action::Nmi => ResetType::Nmi,
        };
        self.client.reset(reset).await?;
        Ok(json!({ "reset_type": reset.as_str() }))
    }
}

/// What an HTTPS client trusts, from the targets file's checked settings.
fn trust(tls: &targets::Tls) -> Option<Trust> {
    match tls {
        targets::Tls::Fingerprint(digest) => Some(Trust::Fingerprint(Fingerprint::from(*digest))),
        targets::Tls::CaFile { path, .. } => Some(Trust::CaFile(path.clone())),
        targets::Tls::PlainLoopback => None,
    }
}

/// How long `POST …/verbs/{verb}` waits for a BMC to say whether it offers
/// `shutdown` or `nmi` before trying the verb anyway.
const ASK_BMC: Duration = Duration::from_secs(5);

/// A Redfish target's verbs: the six of the catalogue, and `shutdown` and
/// `nmi` where the BMC's `@Redfish.AllowableValues` (once known) offers
/// `GracefulShutdown` and `Nmi`.
fn redfish_verbs(offered: Option<&[ResetType]>) -> Vec<Verb> {
    let mut verbs = Verb::CATALOGUE.to_vec();
    let offered = offered.unwrap_or_default();
    if offered.contains(&ResetType::GracefulShutdown) {
        verbs.push(Verb::Shutdown);
    }
    if offered.contains(&ResetType::Nmi) {
        verbs.push(Verb::Nmi);
    }
    verbs
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

    /// The verbs this backend offers, as far as is known now: the six of
    /// the catalogue, `shutdown` for `pve-api`, and for `redfish`
    /// `shutdown` and `nmi` once the BMC has said it offers them.
    pub fn verbs(&self) -> Vec<Verb> {
        match self {
            Backend::Ssh(_) => Verb::CATALOGUE.to_vec(),
            Backend::PveApi(_) => {
                let mut verbs = Verb::CATALOGUE.to_vec();
                verbs.push(Verb::Shutdown);
                verbs
            }
            Backend::Redfish(bmc) => redfish_verbs(bmc.offered.get().map(Vec::as_slice)),
        }
    }

    /// Whether `verb` may be asked now: offered, or a Redfish verb the BMC
    /// has not yet said whether it offers (the operation then finds out).
    pub fn may_offer(&self, verb: Verb) -> bool {
        self.verbs().contains(&verb)
            || matches!(self, Backend::Redfish(bmc) if bmc.offered.get().is_none())
                && redfish_verbs(Some(&ResetType::ALL)).contains(&verb)
    }

    /// Whether the target offers `verb`. A BMC that has not said which
    /// reset types it offers is asked now, for at most [`ASK_BMC`]; one
    /// that still does not answer has the verb tried, and the operation
    /// fails in its words.
    pub async fn offers(&self, verb: Verb) -> bool {
        if !self.may_offer(verb) {
            return false;
        }
        match self {
            Backend::Redfish(bmc) if !self.verbs().contains(&verb) => {
                match tokio::time::timeout(ASK_BMC, bmc.reset_types()).await {
                    Ok(Ok(types)) => redfish_verbs(Some(types)).contains(&verb),
                    Ok(Err(_)) | Err(_) => true,
                }
            }
            _ => true,
        }
    }

    /// Whether the backend can ask the guest to shut down, so that `stop`
    /// tries that first.
    pub async fn has_graceful_stop(&self) -> Result<bool, BackendError> {
        match self {
            Backend::Ssh(_) => Ok(false),
            Backend::PveApi(_) => Ok(true),
            Backend::Redfish(bmc) => Ok(bmc.reset_types().await?.contains(&ResetType::GracefulShutdown)),
        }
    }

    /// Whether `cycle` is one action of the backend's rather than off,
    /// wait, on: where `@Redfish.AllowableValues` offers `PowerCycle`.
    pub async fn has_native_cycle(&self) -> Result<bool, BackendError> {
        match self {
            Backend::Ssh(_) | Backend::PveApi(_) => Ok(false),
            Backend::Redfish(bmc) => Ok(bmc.reset_types().await?.contains(&ResetType::PowerCycle)),
        }
    }

    /// The power state, and what the backend said.
    pub async fn power(&self) -> Result<(PowerState, Value), BackendError> {
        match self {
            Backend::Ssh(ssh) => ssh.power().await,
            Backend::PveApi(pve) => {
                let status = pve.client.status().await?;
                Ok((status.power, status.raw))
            }
            Backend::Redfish(bmc) => {
                let status = bmc.client.status().await?;
                // The system resource declares the reset types: learn them
                // here if the start-up probe could not.
                if bmc.offered.get().is_none()
                    && let Ok(types) = bmc.client.offered(&status.raw).await
                {
                    let _ = bmc.offered.set(types);
                }
                Ok((status.power, status.raw))
            }
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
            Backend::PveApi(pve) => pve.client.forensics().await,
            Backend::Redfish(bmc) => bmc.client.forensics().await,
        }
    }

    /// One action of an API backend, followed to its end (a Proxmox task
    /// to its exit status; a BMC's reset to its answer, its effect landing
    /// later), and what the backend said.
    pub async fn act(&self, action: Action) -> Result<Value, BackendError> {
        match self {
            // The host script composes its own verbs: it is never asked
            // for a bare action.
            Backend::Ssh(_) => Err(BackendError::Protocol(format!("the ssh backend has no bare action {action:?}"))),
            Backend::PveApi(pve) => pve.act(action).await,
            Backend::Redfish(bmc) => bmc.act(action).await,
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
                verbs: catalogue_of(&target.backend.verbs()).0.into_iter().map(str::to_owned).collect(),
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

/// The labels of a finished verb's count on `GET /metrics` (README
/// "Metrics"): targets are the targets file's, verbs and outcomes closed sets.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VerbLabels {
    pub target: String,
    pub verb: &'static str,
    /// [`OpState::as_str`] of a finished verb: `succeeded` or `failed`.
    pub outcome: &'static str,
}

/// Verbs that ran to an end, whichever path asked for them.
pub type VerbCounts = Family<VerbLabels, Counter>;

/// Counts one verb that ran to its end.
fn count_verb(counts: &VerbCounts, target: &str, verb: Verb, outcome: OpState) {
    let labels = VerbLabels { target: target.to_owned(), verb: verb.as_str(), outcome: outcome.as_str() };
    counts.get_or_create(&labels).inc();
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
    /// Fired at shutdown: the start-up questions to BMCs stop waiting.
    probing: CancellationToken,
    operations: Arc<Operations>,
    /// Verbs run, operations and `/api/pve/…` alike (README "Metrics").
    verbs: VerbCounts,
}

impl Power {
    pub fn new(config: PowerConfig, store: Arc<Store>) -> Self {
        let slots: Vec<Arc<Slot>> = config
            .targets
            .into_iter()
            .map(|target| Arc::new(Slot { target, mutating: Arc::new(Mutex::new(())) }))
            .collect();
        let by_name = slots.iter().enumerate().map(|(i, s)| (s.target.name.clone(), i)).collect();
        let verbs = VerbCounts::default();
        Power {
            slots,
            by_name,
            tracker: TaskTracker::new(),
            cut_off: CancellationToken::new(),
            probing: CancellationToken::new(),
            operations: Arc::new(Operations::new(store, verbs.clone())),
            verbs,
        }
    }

    /// Verbs run to their end, by target, verb and outcome.
    pub fn verb_counts(&self) -> &VerbCounts {
        &self.verbs
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
        if !slot.target.backend.may_offer(verb) {
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
        let outcome = task.await.unwrap_or_else(|err| Err(PowerError::Lost(err.to_string())));
        let state = match &outcome {
            Ok(ran) if ran.exit_code == Some(0) => OpState::Succeeded,
            Ok(_) | Err(_) => OpState::Failed,
        };
        count_verb(&self.verbs, &slot.target.name, verb, state);
        outcome
    }

    /// Asks each Redfish target's BMC, in the background, which reset types
    /// it offers, so that `GET /api/targets` lists `shutdown` and `nmi`
    /// where it does. A BMC that does not answer delays nothing: its target
    /// lists the six verbs of the catalogue until the BMC answers one of
    /// the later questions (README "Targets").
    pub fn probe(&self) {
        for slot in &self.slots {
            let Backend::Redfish(bmc) = &slot.target.backend else { continue };
            let (bmc, name, stop) = (bmc.clone(), slot.target.name.clone(), self.probing.clone());
            self.tracker.spawn(async move {
                tokio::select! {
                    asked = bmc.reset_types() => match asked {
                        Ok(types) => tracing::info!(target = %name, offered = ?types, "the BMC said which reset types it offers"),
                        Err(err) => tracing::warn!(
                            target = %name, %err,
                            "the BMC did not say which reset types it offers: its target lists the six verbs until it does"
                        ),
                    },
                    () = stop.cancelled() => {}
                }
            });
        }
    }

    /// Waits (bounded by `within`) for verbs and operations in flight at
    /// shutdown, then cuts off those still running and gives them
    /// `cut_off` to be recorded and answered.
    pub async fn drain(&self, within: Duration, cut_off: Duration) {
        self.probing.cancel();
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait()).await.is_err() {
            tracing::warn!("a power verb was still running {within:?} into shutdown; cutting it off");
            self.cut_off.cancel();
            let _ = tokio::time::timeout(cut_off, self.tracker.wait()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redfish_target_lists_shutdown_and_nmi_only_where_the_bmc_offers_them() {
        let names = |offered: Option<&[ResetType]>| catalogue_of(&redfish_verbs(offered)).0;
        let six = ["cycle", "forensics", "reset", "start", "status", "stop"];
        assert_eq!(names(None), six, "not known yet: the catalogue");
        assert_eq!(names(Some(&[ResetType::On, ResetType::ForceOff, ResetType::ForceRestart])), six);
        assert_eq!(
            names(Some(&[ResetType::On, ResetType::ForceOff, ResetType::GracefulShutdown])),
            ["cycle", "forensics", "reset", "shutdown", "start", "status", "stop"]
        );
        assert_eq!(
            names(Some(&ResetType::ALL)),
            ["cycle", "forensics", "nmi", "reset", "shutdown", "start", "status", "stop"]
        );
    }
}
