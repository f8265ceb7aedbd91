//! The targets file (README "Targets"): which machines the power verbs
//! reach, and how. Read once at start-up; everything wrong with it stops
//! the server with a message naming the target and the key. Secrets come
//! from files named in it, read here, and are never logged.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

use super::recovery::Check;
use super::ssh::SshTarget;
use super::{Backend, BackendError, PveApiBackend, RedfishBackend, Target};

/// How long a recovering target may take to answer its check, unless the
/// file says (README "Targets").
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a graceful stop may take before it is forced, unless the file
/// says (`stop_timeout_seconds`).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest `recover_timeout_seconds` accepted: a day.
const MAX_RECOVER_TIMEOUT: u64 = 86_400;

/// A secret read from a file: its `Debug` never shows it, so neither a log
/// line nor a panic message can.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How an HTTPS backend's certificate is verified (README "Targets").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// The SHA-256 of the certificate the endpoint must present.
    Fingerprint([u8; 32]),
    /// A CA bundle (PEM) the certificate must chain to.
    CaFile { path: PathBuf, pem: Vec<u8> },
    /// Plain HTTP, allowed only to a loopback address.
    PlainLoopback,
}

/// A Proxmox VE API target (`backend = "pve-api"`).
#[derive(Debug, Clone)]
pub struct PveApiSettings {
    pub url: Url,
    pub node: String,
    pub vmid: u64,
    /// `USER@REALM!TOKENID`.
    pub token_id: String,
    pub token_secret: Secret,
    pub tls: Tls,
}

/// A BMC's Redfish target (`backend = "redfish"`).
#[derive(Debug, Clone)]
pub struct RedfishSettings {
    pub url: Url,
    /// The ComputerSystem's path; `None`: the BMC's only one.
    pub system: Option<String>,
    pub user: String,
    pub password: Secret,
    pub tls: Tls,
}

/// What every `ssh` target shares from the server's own settings.
#[derive(Debug, Clone)]
pub struct SshDefaults {
    pub program: PathBuf,
    pub timeout: Duration,
}

/// What is wrong with the targets file: the target (by name, or by its
/// place when it has none) and the key, so the operator knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetsError {
    pub file: PathBuf,
    pub target: Option<String>,
    pub key: Option<String>,
    pub why: String,
}

impl fmt::Display for TargetsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let Some(target) = &self.target {
            write!(f, " target {target}:")?;
        }
        if let Some(key) = &self.key {
            write!(f, " key {key:?}:")?;
        }
        write!(f, " {}", self.why)
    }
}

impl std::error::Error for TargetsError {}

/// Reads and checks a targets file, secrets included.
pub fn load(file: &Path, ssh: &SshDefaults) -> Result<Vec<Target>, TargetsError> {
    let whole = |why: String| TargetsError { file: file.to_owned(), target: None, key: None, why };
    let text = std::fs::read_to_string(file).map_err(|e| whole(format!("cannot read it: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| whole(format!("not TOML: {e}")))?;
    if let Some(key) = table.keys().find(|k| *k != "target") {
        return Err(TargetsError {
            file: file.to_owned(),
            target: None,
            key: Some(key.clone()),
            why: "unknown key: the file holds [[target]] tables".into(),
        });
    }
    let Some(toml::Value::Array(entries)) = table.get("target") else {
        return Err(whole("no [[target]] table".into()));
    };
    let mut names = HashSet::new();
    let mut targets = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let Some(entry) = entry.as_table() else {
            return Err(whole(format!("target #{} is not a table", i + 1)));
        };
        let mut fields = Fields { file, table: entry, target: format!("#{}", i + 1), used: Vec::new() };
        let name = fields.required_str("name")?;
        fields.target = format!("{name:?}");
        if name.is_empty()
            || name.len() > 63
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(fields.error("name", "must be 1-63 characters of a-z, 0-9 and '-'"));
        }
        if !names.insert(name.clone()) {
            return Err(fields.error("name", "another target has this name"));
        }
        let target = fields.target(name, ssh)?;
        fields.no_other_keys()?;
        targets.push(target);
    }
    if targets.is_empty() {
        return Err(whole("no [[target]] table".into()));
    }
    Ok(targets)
}

/// The keys of one `[[target]]` table, read once each.
struct Fields<'a> {
    file: &'a Path,
    table: &'a toml::Table,
    /// The target's name, quoted (or its place before the name is known).
    target: String,
    used: Vec<&'static str>,
}

impl Fields<'_> {
    fn error(&self, key: &str, why: impl Into<String>) -> TargetsError {
        TargetsError {
            file: self.file.to_owned(),
            target: Some(self.target.clone()),
            key: Some(key.to_owned()),
            why: why.into(),
        }
    }

    fn str(&mut self, key: &'static str) -> Result<Option<String>, TargetsError> {
        self.used.push(key);
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.error(key, "must be a string")),
        }
    }

    fn required_str(&mut self, key: &'static str) -> Result<String, TargetsError> {
        match self.str(key)? {
            Some(value) if !value.trim().is_empty() => Ok(value),
            Some(_) => Err(self.error(key, "is empty")),
            None => Err(self.error(key, "missing")),
        }
    }

    fn integer(
        &mut self,
        key: &'static str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, TargetsError> {
        self.used.push(key);
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if u64::try_from(*n).is_ok_and(|n| range.contains(&n)) => Ok(Some(*n as u64)),
            Some(_) => {
                Err(self.error(key, format!("must be a whole number from {} to {}", range.start(), range.end())))
            }
        }
    }

    fn no_other_keys(&self) -> Result<(), TargetsError> {
        match self.table.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(key) => Err(self.error(key, "unknown key for this backend")),
            None => Ok(()),
        }
    }

    /// A secret file's content, without the line end an editor adds.
    fn secret(&mut self, key: &'static str) -> Result<Secret, TargetsError> {
        let path = self.required_str(key)?;
        let text = std::fs::read_to_string(&path).map_err(|e| self.error(key, format!("cannot read {path}: {e}")))?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(self.error(key, format!("{path} is empty")));
        }
        Ok(Secret(secret.to_owned()))
    }

    fn target(&mut self, name: String, ssh: &SshDefaults) -> Result<Target, TargetsError> {
        let settings = match self.required_str("backend")?.as_str() {
            "ssh" => Settings::Ssh(self.ssh(ssh)?),
            "pve-api" => Settings::PveApi(self.pve_api()?),
            "redfish" => Settings::Redfish(self.redfish()?),
            other => {
                return Err(self.error("backend", format!("unknown backend {other:?}: use ssh, pve-api or redfish")));
            }
        };
        let check = match self.str("check")? {
            Some(text) => Some(Check::parse(&text).map_err(|why| self.error("check", why))?),
            None => None,
        };
        let recover_timeout = self
            .integer("recover_timeout_seconds", 1..=MAX_RECOVER_TIMEOUT)?
            .map_or(DEFAULT_RECOVER_TIMEOUT, Duration::from_secs);
        let stop_timeout = self
            .integer("stop_timeout_seconds", 1..=MAX_RECOVER_TIMEOUT)?
            .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_secs);
        // The clients are built here, once: what they refuse (a CA file
        // they cannot use, a secret a header cannot carry) stops the start
        // like any other mistake in the file.
        let backend = match settings {
            Settings::Ssh(ssh) => Backend::Ssh(ssh),
            Settings::PveApi(settings) => {
                let key = client_key(&settings.tls, "token_secret_file");
                Backend::PveApi(Arc::new(
                    PveApiBackend::new(settings, stop_timeout).map_err(|e| self.error(key(&e), e.to_string()))?,
                ))
            }
            Settings::Redfish(settings) => {
                let key = client_key(&settings.tls, "password_file");
                Backend::Redfish(Arc::new(
                    RedfishBackend::new(settings).map_err(|e| self.error(key(&e), e.to_string()))?,
                ))
            }
        };
        Ok(Target { name, backend, check, recover_timeout, stop_timeout })
    }

    fn ssh(&mut self, defaults: &SshDefaults) -> Result<SshTarget, TargetsError> {
        let host = self.required_str("host")?;
        ssh_word(&host).map_err(|why| self.error("host", why))?;
        let user = self.str("user")?.unwrap_or_else(|| "root".into());
        ssh_word(&user).map_err(|why| self.error("user", why))?;
        let port = self.integer("port", 1..=65535)?.unwrap_or(22) as u16;
        let known_hosts = match self.str("known_hosts")? {
            Some(path) => Some(known_hosts(&path).map_err(|why| self.error("known_hosts", why))?),
            None => None,
        };
        Ok(SshTarget { host, port, user, known_hosts, program: defaults.program.clone(), timeout: defaults.timeout })
    }

    fn pve_api(&mut self) -> Result<PveApiSettings, TargetsError> {
        let url = self.url()?;
        let node = self.required_str("node")?;
        if !node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return Err(self.error("node", "must be a node name (letters, digits, '-', '.')"));
        }
        let vmid = self.integer("vmid", 100..=999_999_999)?.ok_or_else(|| self.error("vmid", "missing"))?;
        let token_id = self.required_str("token_id")?;
        let well_formed = token_id.split_once('@').and_then(|(user, rest)| Some((user, rest.split_once('!')?)));
        if !matches!(well_formed, Some((user, (realm, id))) if !user.is_empty() && !realm.is_empty() && !id.is_empty())
            || token_id.contains(['=', ' '])
        {
            return Err(self.error("token_id", "must be USER@REALM!TOKENID"));
        }
        let token_secret = self.secret("token_secret_file")?;
        let tls = self.tls(&url)?;
        Ok(PveApiSettings { url, node, vmid, token_id, token_secret, tls })
    }

    fn redfish(&mut self) -> Result<RedfishSettings, TargetsError> {
        let url = self.url()?;
        let system = self.str("system")?;
        if let Some(path) = &system
            && (!path.starts_with("/redfish/v1/Systems/") || path.contains(['?', '#', ' ']) || path.contains(".."))
        {
            return Err(self.error("system", "must be a path under /redfish/v1/Systems/"));
        }
        let user = self.required_str("user")?;
        let password = self.secret("password_file")?;
        let tls = self.tls(&url)?;
        Ok(RedfishSettings { url, system, user, password, tls })
    }

    fn url(&mut self) -> Result<Url, TargetsError> {
        let text = self.required_str("url")?;
        match Url::parse(&text) {
            Ok(url)
                if matches!(url.scheme(), "http" | "https")
                    && url.has_host()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.query().is_none()
                    && url.fragment().is_none() =>
            {
                Ok(url)
            }
            _ => Err(self.error("url", "must be an http(s) URL without credentials, query or fragment")),
        }
    }

    /// `tls_fingerprint` or `ca_file` for HTTPS (exactly one); neither for
    /// plain HTTP, which only a loopback address may use.
    fn tls(&mut self, url: &Url) -> Result<Tls, TargetsError> {
        let fingerprint = self.str("tls_fingerprint")?;
        let ca_file = self.str("ca_file")?;
        if url.scheme() == "http" {
            if !is_loopback(url) {
                return Err(self.error("url", "plain http only to a loopback address; use https"));
            }
            if fingerprint.is_some() || ca_file.is_some() {
                return Err(self.error("url", "tls_fingerprint and ca_file need an https URL"));
            }
            return Ok(Tls::PlainLoopback);
        }
        match (fingerprint, ca_file) {
            (Some(text), None) => {
                parse_fingerprint(&text).map(Tls::Fingerprint).map_err(|why| self.error("tls_fingerprint", why))
            }
            (None, Some(path)) => {
                let pem =
                    std::fs::read(&path).map_err(|e| self.error("ca_file", format!("cannot read {path}: {e}")))?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    return Err(self.error("ca_file", format!("{path} holds no PEM certificate")));
                }
                Ok(Tls::CaFile { path: path.into(), pem })
            }
            (Some(_), Some(_)) => Err(self.error("ca_file", "give tls_fingerprint or ca_file, not both")),
            (None, None) => {
                Err(self.error("tls_fingerprint", "missing: an https URL needs tls_fingerprint or ca_file"))
            }
        }
    }
}

/// A backend's checked settings, before its client is built.
enum Settings {
    Ssh(SshTarget),
    PveApi(PveApiSettings),
    Redfish(RedfishSettings),
}

/// The key of the file a client's construction error is about: the
/// secret for a credential a header cannot carry, `ca_file` for a CA file
/// the TLS library refuses, `url` for the rest.
fn client_key(tls: &Tls, secret: &'static str) -> impl Fn(&BackendError) -> &'static str + use<> {
    let ca_file = matches!(tls, Tls::CaFile { .. });
    move |err| match err {
        BackendError::Auth(_) => secret,
        BackendError::Tls(_) if ca_file => "ca_file",
        _ => "url",
    }
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `sha256:AB:CD:…` (as `openssl x509 -fingerprint -sha256` prints it,
/// with or without the prefix and colons).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let hex: String = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .unwrap_or(text)
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bad = || "must be a SHA-256 fingerprint: sha256: and 32 hex bytes (AB:CD:…)".to_owned();
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(bytes)
}

/// Host and user reach ssh's argv, so neither may look like an option.
pub fn ssh_word(value: &str) -> Result<(), String> {
    if value.is_empty() || value.starts_with('-') || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{value:?} is not a usable host or user name"));
    }
    Ok(())
}

/// ssh splits `UserKnownHostsFile`'s value on spaces and expands % and ~.
pub fn known_hosts(path: &str) -> Result<PathBuf, String> {
    if path.chars().any(|c| c.is_whitespace() || c == '%' || c == '~' || c.is_control()) {
        return Err(format!("{path:?}: use a path without spaces, '%' or '~'"));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> SshDefaults {
        SshDefaults { program: "ssh".into(), timeout: Duration::from_secs(60) }
    }

    fn load_text(text: &str) -> Result<Vec<Target>, TargetsError> {
        let dir = tempfile::tempdir().unwrap();
        let text = text.replace("$DIR", &dir.path().display().to_string());
        std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
        let file = dir.path().join("targets.toml");
        std::fs::write(&file, text).unwrap();
        load(&file, &defaults())
    }

    /// Every path is appended to a target's URL: after a `#` it would be
    /// a fragment, and every request would go to the base URL itself.
    #[test]
    fn a_url_with_a_fragment_is_refused() {
        let err = load_text(
            r#"
            [[target]]
            name = "hypervisor"
            backend = "redfish"
            url = "http://127.0.0.1:8000#x"
            user = "breakglass"
            password_file = "$DIR/secret"
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(r#"target "hypervisor": key "url""#) && err.contains("fragment"), "{err}");
    }

    #[test]
    fn one_target_of_each_backend_loads_with_its_secrets() {
        let fp = ["AB"; 32].join(":");
        let targets = load_text(&format!(
            r#"
            [[target]]
            name = "devvm"
            backend = "pve-api"
            url = "https://192.0.2.10:8006"
            node = "pve1"
            vmid = 101
            token_id = "breakglass@pve!power"
            token_secret_file = "$DIR/secret"
            tls_fingerprint = "sha256:{fp}"
            check = "tcp:192.0.2.20:22"
            recover_timeout_seconds = 120

            [[target]]
            name = "hypervisor"
            backend = "redfish"
            url = "https://192.0.2.5"
            system = "/redfish/v1/Systems/1"
            user = "breakglass"
            password_file = "$DIR/secret"
            tls_fingerprint = "{fp}"

            [[target]]
            name = "vm"
            backend = "ssh"
            host = "192.0.2.10"
            "#
        ))
        .unwrap();
        let names: Vec<_> = targets.iter().map(|t| (t.name.as_str(), t.backend.name())).collect();
        assert_eq!(names, [("devvm", "pve-api"), ("hypervisor", "redfish"), ("vm", "ssh")]);
        let Backend::PveApi(pve) = &targets[0].backend else { panic!() };
        assert_eq!(pve.settings.token_secret.expose(), "s3cret");
        assert_eq!(pve.settings.tls, Tls::Fingerprint([0xab; 32]));
        for target in &targets {
            assert!(!format!("{target:?}").contains("s3cret"), "a secret never shows in Debug: {}", target.name);
        }
        assert_eq!(targets[0].recover_timeout, Duration::from_secs(120));
        assert_eq!(targets[1].recover_timeout, DEFAULT_RECOVER_TIMEOUT);
        let Backend::Ssh(ssh) = &targets[2].backend else { panic!() };
        assert_eq!((ssh.user.as_str(), ssh.port), ("root", 22));
    }

    #[test]
    fn each_mistake_names_its_target_and_key() {
        let cases = [
            ("[[target]]\nname = \"a\"\nbackend = \"ipmi\"\n", "target \"a\": key \"backend\": unknown backend"),
            ("[[target]]\nname = \"a\"\nbackend = \"ssh\"\n", "target \"a\": key \"host\": missing"),
            ("[[target]]\nname = \"A b\"\nbackend = \"ssh\"\nhost = \"h\"\n", "key \"name\": must be"),
            ("[[target]]\nbackend = \"ssh\"\nhost = \"h\"\n", "target #1: key \"name\": missing"),
            (
                "[[target]]\nname = \"a\"\nbackend = \"ssh\"\nhost = \"h\"\n[[target]]\nname = \"a\"\nbackend = \"ssh\"\nhost = \"h\"\n",
                "target \"a\": key \"name\": another target has this name",
            ),
            (
                "[[target]]\nname = \"a\"\nbackend = \"redfish\"\nurl = \"https://192.0.2.5\"\nuser = \"u\"\npassword_file = \"/nonexistent/pw\"\ntls_fingerprint = \"x\"\n",
                "target \"a\": key \"password_file\": cannot read /nonexistent/pw",
            ),
            (
                "[[target]]\nname = \"a\"\nbackend = \"redfish\"\nurl = \"http://192.0.2.5\"\nuser = \"u\"\npassword_file = \"$DIR/secret\"\n",
                "key \"url\": plain http only to a loopback address",
            ),
            (
                "[[target]]\nname = \"a\"\nbackend = \"ssh\"\nhost = \"h\"\ncheck = \"udp:h:1\"\n",
                "target \"a\": key \"check\":",
            ),
            (
                "[[target]]\nname = \"a\"\nbackend = \"ssh\"\nhost = \"h\"\nhots = \"x\"\n",
                "target \"a\": key \"hots\": unknown key",
            ),
        ];
        for (text, expected) in cases {
            let err = load_text(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}\n=> {err}");
        }
    }

    #[test]
    fn a_ca_file_the_tls_library_refuses_is_named_as_the_ca_file() {
        let text = "[[target]]\nname = \"a\"\nbackend = \"redfish\"\nurl = \"https://192.0.2.5\"\nuser = \"u\"\n\
                    password_file = \"$DIR/secret\"\nca_file = \"$DIR/secret.pem\"\n";
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("secret.pem"), pem).unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
        let file = dir.path().join("targets.toml");
        std::fs::write(&file, text.replace("$DIR", &dir.path().display().to_string())).unwrap();
        let err = load(&file, &defaults()).unwrap_err();
        assert_eq!((err.target.as_deref(), err.key.as_deref()), (Some("\"a\""), Some("ca_file")), "{err}");
    }

    #[test]
    fn fingerprints_read_as_openssl_prints_them() {
        let colons = ["0f"; 32].join(":");
        assert_eq!(parse_fingerprint(&format!("sha256:{colons}")), Ok([0x0f; 32]));
        assert_eq!(parse_fingerprint(&"0F".repeat(32)), Ok([0x0f; 32]));
        assert!(parse_fingerprint("sha256:AB:CD").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}
