//! The Redfish backend (README "Power backends"): one computer system behind
//! a BMC, for bare metal and for the hypervisor itself.
//!
//! This is the only code that knows Redfish's wire format: the systems
//! collection, `PowerState`, the `#ComputerSystem.Reset` action and the
//! reset types it declares in `ResetType@Redfish.AllowableValues` (or its
//! `@Redfish.ActionInfo`), the `{"error": …}` body, and the log services.
//! Authentication is HTTP basic on every request: it needs no session to
//! leak or expire in the middle of an incident, and every BMC accepts it.
//!
//! A BMC acts on a reset after answering it, often seconds later, so
//! [`Redfish::wait_for`] polls the power state rather than trusting the
//! answer.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::backend_types::{BackendError, PowerState};
use super::tls::{Answer, Https, Timeouts, Trust};

/// How many log services, and how many of each one's newest entries,
/// forensics keep; and how much of each entry's message.
pub const MAX_LOG_SERVICES: usize = 4;
pub const MAX_LOG_ENTRIES: usize = 50;
pub const MAX_MESSAGE_CHARS: usize = 1000;

#[derive(Debug, Clone)]
pub struct RedfishConfig {
    /// The BMC's base URL, `https://bmc`; plain `http://` only to loopback.
    pub url: String,
    /// The system's path (`/redfish/v1/Systems/1`) or id (`1`); found in
    /// `/redfish/v1/Systems` when the BMC has exactly one.
    pub system: Option<String>,
    pub user: String,
    pub password: String,
    pub trust: Option<Trust>,
    pub timeouts: Timeouts,
}

impl RedfishConfig {
    pub fn new(url: &str, user: &str, password: &str, trust: Option<Trust>) -> Self {
        RedfishConfig {
            url: url.to_owned(),
            system: None,
            user: user.to_owned(),
            password: password.to_owned(),
            trust,
            timeouts: Timeouts::default(),
        }
    }
}

/// The standard reset types this console sends: a closed set. Others a BMC
/// may declare are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum ResetType {
    On,
    ForceOn,
    ForceOff,
    GracefulShutdown,
    GracefulRestart,
    ForceRestart,
    PowerCycle,
    Nmi,
}

impl ResetType {
    pub const ALL: [ResetType; 8] = [
        ResetType::On,
        ResetType::ForceOn,
        ResetType::ForceOff,
        ResetType::GracefulShutdown,
        ResetType::GracefulRestart,
        ResetType::ForceRestart,
        ResetType::PowerCycle,
        ResetType::Nmi,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResetType::On => "On",
            ResetType::ForceOn => "ForceOn",
            ResetType::ForceOff => "ForceOff",
            ResetType::GracefulShutdown => "GracefulShutdown",
            ResetType::GracefulRestart => "GracefulRestart",
            ResetType::ForceRestart => "ForceRestart",
            ResetType::PowerCycle => "PowerCycle",
            ResetType::Nmi => "Nmi",
        }
    }
}

impl fmt::Display for ResetType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown reset type {0:?}")]
pub struct UnknownResetType(pub String);

impl FromStr for ResetType {
    type Err = UnknownResetType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResetType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownResetType(s.chars().take(64).collect()))
    }
}

/// The system's power: the common word, the BMC's own (`PoweringOn`
/// stays visible behind `unknown`), and the whole resource.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub power: PowerState,
    pub detail: String,
    pub raw: Value,
}

#[derive(Debug)]
pub struct Redfish {
    http: Https,
    auth: HeaderValue,
    configured_system: Option<String>,
    /// The system's path, once known.
    system: OnceCell<String>,
}

impl Redfish {
    pub fn new(config: RedfishConfig) -> Result<Redfish, BackendError> {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", config.user, config.password));
        let mut auth = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| BackendError::Auth("the user or password holds characters a header cannot carry".into()))?;
        auth.set_sensitive(true);
        let configured_system = config.system.map(|s| {
            if s.starts_with('/') { s.trim_end_matches('/').to_owned() } else { format!("/redfish/v1/Systems/{s}") }
        });
        Ok(Redfish {
            http: Https::new(&config.url, config.trust.as_ref(), config.timeouts)?,
            auth,
            configured_system,
            system: OnceCell::new(),
        })
    }

    /// The system's path: the configured one, or the only member of
    /// `/redfish/v1/Systems`.
    pub async fn system(&self) -> Result<&str, BackendError> {
        self.system
            .get_or_try_init(|| async {
                if let Some(path) = &self.configured_system {
                    return Ok(path.clone());
                }
                let systems = self.get("/redfish/v1/Systems").await?;
                let members: Vec<&str> = systems
                    .get("Members")
                    .and_then(Value::as_array)
                    .map(|m| m.iter().filter_map(|m| m.get("@odata.id").and_then(Value::as_str)).collect())
                    .unwrap_or_default();
                match members.as_slice() {
                    [one] => Ok(one.trim_end_matches('/').to_owned()),
                    [] => Err(BackendError::Protocol("the BMC lists no system in /redfish/v1/Systems".into())),
                    many => Err(BackendError::Protocol(format!(
                        "the BMC has {} systems ({}): set `system` to one of them",
                        many.len(),
                        many.join(", ")
                    ))),
                }
            })
            .await
            .map(String::as_str)
    }

    pub async fn status(&self) -> Result<Status, BackendError> {
        let raw = self.get(self.system().await?).await?;
        let detail = raw.get("PowerState").and_then(Value::as_str).unwrap_or("").to_owned();
        Ok(Status { power: power_of(&detail), detail, raw })
    }

    /// The reset types the system offers. A BMC that declares none is taken
    /// to offer the standard set, and refuses what it lacks when asked.
    pub async fn reset_types(&self) -> Result<Vec<ResetType>, BackendError> {
        let system = self.get(self.system().await?).await?;
        self.offered(&system).await
    }

    /// Sends one reset, if the system offers it. The power state changes
    /// later: see [`Redfish::wait_for`].
    pub async fn reset(&self, reset: ResetType) -> Result<(), BackendError> {
        let path = self.system().await?.to_owned();
        let system = self.get(&path).await?;
        let offered = self.offered(&system).await?;
        if !offered.contains(&reset) {
            let names: Vec<&str> = offered.iter().map(|t| t.as_str()).collect();
            return Err(BackendError::Refused(format!(
                "the BMC does not offer the reset type {reset} (it offers {})",
                names.join(", ")
            )));
        }
        let target = action(&system)
            .and_then(|a| a.get("target"))
            .and_then(Value::as_str)
            .map_or_else(|| format!("{path}/Actions/ComputerSystem.Reset"), str::to_owned);
        let body = json!({"ResetType": reset.as_str()}).to_string();
        let answer = self.http.post(self.http.url(&target)?, self.headers(), "application/json", body).await?;
        check(answer).map(drop)
    }

    /// Polls the power state until it is `want`, for at most `within`;
    /// `None` when it never got there.
    pub async fn wait_for(
        &self,
        want: PowerState,
        within: Duration,
        every: Duration,
    ) -> Result<Option<Duration>, BackendError> {
        let started = Instant::now();
        loop {
            if self.status().await?.power == want {
                return Ok(Some(started.elapsed()));
            }
            if started.elapsed() >= within {
                return Ok(None);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The system resource and the newest entries of its log services,
    /// bounded. A log that cannot be read is noted, not fatal: the power
    /// state matters more than the log in an incident.
    pub async fn forensics(&self) -> Result<Value, BackendError> {
        let path = self.system().await?;
        let system = self.get(path).await?;
        let mut logs = Vec::new();
        let services = system.get("LogServices").and_then(|l| l.get("@odata.id")).and_then(Value::as_str);
        let note = match services {
            None => Some("the BMC offers no log service for this system"),
            Some(services) => {
                match self.get(services).await {
                    Ok(collection) => {
                        for service in members(&collection).into_iter().take(MAX_LOG_SERVICES) {
                            logs.push(self.log_service(service).await);
                        }
                    }
                    Err(err) => logs.push(json!({"service": services, "error": err.to_string()})),
                }
                None
            }
        };
        let mut out = json!({"system": system, "logs": logs});
        if let Some(note) = note {
            out["logs_note"] = json!(note);
        }
        Ok(out)
    }

    async fn log_service(&self, service: &str) -> Value {
        let entries = match self.get(service).await {
            Ok(s) => s.get("Entries").and_then(|e| e.get("@odata.id")).and_then(Value::as_str).map(str::to_owned),
            Err(err) => return json!({"service": service, "error": err.to_string()}),
        };
        let Some(entries) = entries else {
            return json!({"service": service, "entries": []});
        };
        match self.get(&entries).await {
            Ok(listing) => {
                let all = listing.get("Members").and_then(Value::as_array).cloned().unwrap_or_default();
                // Services list oldest first; the newest tell what happened.
                let kept: Vec<Value> = all.iter().skip(all.len().saturating_sub(MAX_LOG_ENTRIES)).map(entry).collect();
                json!({"service": service, "entries": kept, "total": all.len()})
            }
            Err(err) => json!({"service": service, "error": err.to_string()}),
        }
    }

    /// The reset types `system` (the resource as read) declares, following
    /// its `@Redfish.ActionInfo` where the values are not inline.
    pub async fn offered(&self, system: &Value) -> Result<Vec<ResetType>, BackendError> {
        let reset = action(system);
        let declared = match reset.and_then(|a| a.get("ResetType@Redfish.AllowableValues")) {
            Some(values) => Some(values.clone()),
            None => match reset.and_then(|a| a.get("@Redfish.ActionInfo")).and_then(Value::as_str) {
                Some(info) => {
                    let info = self.get(info).await?;
                    info.get("Parameters").and_then(Value::as_array).and_then(|params| {
                        params
                            .iter()
                            .find(|p| p.get("Name").and_then(Value::as_str) == Some("ResetType"))
                            .and_then(|p| p.get("AllowableValues").cloned())
                    })
                }
                None => None,
            },
        };
        Ok(match declared {
            Some(Value::Array(values)) => {
                let mut types: Vec<ResetType> =
                    values.iter().filter_map(Value::as_str).filter_map(|v| v.parse().ok()).collect();
                types.sort_unstable();
                types.dedup();
                types
            }
            _ => ResetType::ALL.to_vec(),
        })
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        headers
    }

    async fn get(&self, path: &str) -> Result<Value, BackendError> {
        let answer = self.http.get(self.http.url(path)?, self.headers()).await?;
        let body = check(answer)?;
        serde_json::from_slice(&body).map_err(|e| BackendError::Protocol(format!("{path}: not JSON: {e}")))
    }
}

fn action(system: &Value) -> Option<&Value> {
    system.get("Actions").and_then(|a| a.get("#ComputerSystem.Reset"))
}

fn members(collection: &Value) -> Vec<&str> {
    collection
        .get("Members")
        .and_then(Value::as_array)
        .map(|m| m.iter().filter_map(|m| m.get("@odata.id").and_then(Value::as_str)).collect())
        .unwrap_or_default()
}

/// One log entry's useful fields, its message cut to a bounded length.
fn entry(e: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for key in ["Id", "Created", "Severity", "EntryType", "MessageId", "SensorType"] {
        if let Some(v) = e.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    if let Some(message) = e.get("Message").and_then(Value::as_str) {
        out.insert("Message".to_owned(), json!(message.chars().take(MAX_MESSAGE_CHARS).collect::<String>()));
    }
    Value::Object(out)
}

fn power_of(word: &str) -> PowerState {
    match word {
        "On" => PowerState::Running,
        "Off" => PowerState::Stopped,
        "Paused" => PowerState::Paused,
        // PoweringOn, PoweringOff, or nothing: in between, and said so in
        // the status's detail.
        _ => PowerState::Unknown,
    }
}

/// The body of a successful answer, or the error the BMC's Redfish
/// `{"error": {"message", "@Message.ExtendedInfo"}}` names.
fn check(answer: Answer) -> Result<Vec<u8>, BackendError> {
    if answer.status.is_success() {
        return Ok(answer.body);
    }
    let body: Option<Value> = serde_json::from_slice(&answer.body).ok();
    let error = body.as_ref().and_then(|b| b.get("error"));
    let mut parts: Vec<String> = Vec::new();
    if let Some(message) = error.and_then(|e| e.get("message")).and_then(Value::as_str) {
        parts.push(message.trim().to_owned());
    }
    for info in error.and_then(|e| e.get("@Message.ExtendedInfo")).and_then(Value::as_array).into_iter().flatten() {
        if let Some(message) = info.get("Message").and_then(Value::as_str)
            && !parts.iter().any(|p| p == message.trim())
        {
            parts.push(message.trim().to_owned());
        }
    }
    let message = if parts.is_empty() { format!("HTTP {}", answer.status) } else { parts.join("; ") };
    Err(match answer.status.as_u16() {
        401 | 403 => BackendError::Auth(message),
        300..=399 => {
            BackendError::Protocol(format!("{message}: the BMC redirected; set `system` to the resource's path"))
        }
        _ => BackendError::Refused(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_maps_on_and_off_and_keeps_transitions_unknown() {
        let cases = [
            ("On", PowerState::Running),
            ("Off", PowerState::Stopped),
            ("Paused", PowerState::Paused),
            ("PoweringOn", PowerState::Unknown),
            ("PoweringOff", PowerState::Unknown),
            ("", PowerState::Unknown),
        ];
        for (word, want) in cases {
            assert_eq!(power_of(word), want, "{word:?}");
        }
    }

    #[test]
    fn reset_types_round_trip_their_redfish_names() {
        for t in ResetType::ALL {
            assert_eq!(t.as_str().parse::<ResetType>().unwrap(), t);
        }
        assert!("PushPowerButton".parse::<ResetType>().is_err());
    }

    #[test]
    fn a_bare_system_id_becomes_its_path() {
        let mut config = RedfishConfig::new("http://127.0.0.1:1", "u", "p", None);
        config.system = Some("1".into());
        assert_eq!(Redfish::new(config).unwrap().configured_system.as_deref(), Some("/redfish/v1/Systems/1"));
    }
}
