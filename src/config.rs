//! The validated configuration, built once from the command line.
//!
//! Everything that can be wrong with the settings is reported here, at
//! start-up, with the name of the variable to fix; nothing later re-parses
//! strings.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::http::HeaderName;
use ipnet::IpNet;

use crate::cli::ServeArgs;
use crate::store::Durability;

/// The recovery agent written into each workspace unless `BREAKGLASS_AGENT_FILE` names another.
pub const DEFAULT_AGENT_DEFINITION: &str = include_str!("agent/breakglass.md");

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub sessions_dir: PathBuf,
    pub durability: Durability,
    pub agent: AgentConfig,
    pub auth: AuthConfig,
    pub sse_keepalive: Duration,
    /// How long a connection may refuse our bytes before it is closed.
    pub write_timeout: Duration,
    pub max_concurrent_turns: usize,
    pub power: PowerConfig,
}

/// How turns start the agent CLI (SPEC §5).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub program: PathBuf,
    /// Passed to `--agent`; also the file name of the definition, so it is a plain name.
    pub name: String,
    /// Markdown written to `<workspace>/.claude/agents/<name>.md` when absent.
    pub definition: String,
    pub default_model: String,
    pub turn_timeout: Duration,
    /// Between SIGTERM and SIGKILL of the agent's process group.
    pub kill_grace: Duration,
}

/// Who may call `/api` (SPEC §6).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub bearer_token: Option<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub user_header: HeaderName,
}

impl AuthConfig {
    /// Neither a token nor a proxy: every `/api` request is refused.
    pub fn is_closed(&self) -> bool {
        self.bearer_token.is_none() && self.trusted_proxies.is_empty()
    }
}

/// How power verbs reach the hypervisor (SPEC §7).
#[derive(Debug, Clone)]
pub struct PowerConfig {
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    pub known_hosts: Option<PathBuf>,
    pub ssh_program: PathBuf,
    pub timeout: Duration,
}

impl Config {
    pub fn from_args(args: ServeArgs) -> anyhow::Result<Self> {
        let listen = args
            .listen
            .to_socket_addrs()
            .with_context(|| format!("BREAKGLASS_LISTEN: cannot use {:?} as an address", args.listen))?
            .next()
            .with_context(|| format!("BREAKGLASS_LISTEN: {:?} resolves to no address", args.listen))?;
        let sessions_dir = args.sessions_dir.unwrap_or_else(|| args.data_dir.join("sessions"));
        validate_agent_name(&args.agent)?;
        validate_model(&args.model).map_err(|e| anyhow::anyhow!("BREAKGLASS_MODEL: {e}"))?;
        let definition = match &args.agent_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("BREAKGLASS_AGENT_FILE: cannot read {}", path.display()))?,
            None => DEFAULT_AGENT_DEFINITION.to_owned(),
        };
        let trusted_proxies = args
            .trusted_proxies
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(parse_cidr)
            .collect::<anyhow::Result<Vec<_>>>()
            .context("BREAKGLASS_TRUSTED_PROXIES")?;
        let user_header = HeaderName::try_from(args.trusted_user_header.as_str()).with_context(|| {
            format!("BREAKGLASS_TRUSTED_USER_HEADER: {:?} is not a header name", args.trusted_user_header)
        })?;
        let bearer_token = args.api_bearer_token.filter(|t| !t.is_empty());
        let pve_host = args.pve_host.filter(|h| !h.is_empty());
        if let Some(host) = &pve_host {
            validate_ssh_word("BREAKGLASS_PVE_HOST", host)?;
        }
        validate_ssh_word("BREAKGLASS_PVE_USER", &args.pve_user)?;
        Ok(Config {
            listen,
            data_dir: args.data_dir,
            sessions_dir,
            durability: args.durability,
            agent: AgentConfig {
                program: args.claude_bin,
                name: args.agent,
                definition,
                default_model: args.model,
                turn_timeout: positive_seconds("BREAKGLASS_TURN_TIMEOUT_SECONDS", args.turn_timeout_seconds)?,
                kill_grace: Duration::from_secs(3),
            },
            auth: AuthConfig { bearer_token, trusted_proxies, user_header },
            sse_keepalive: positive_seconds("BREAKGLASS_SSE_KEEPALIVE_SECONDS", args.sse_keepalive_seconds)?,
            write_timeout: positive_seconds("BREAKGLASS_WRITE_TIMEOUT_SECONDS", args.write_timeout_seconds)?,
            max_concurrent_turns: match args.max_concurrent_turns {
                0 => bail!("BREAKGLASS_MAX_CONCURRENT_TURNS must be at least 1"),
                n => n,
            },
            power: PowerConfig {
                host: pve_host,
                port: args.pve_port,
                user: args.pve_user,
                known_hosts: args.pve_known_hosts,
                ssh_program: args.ssh_bin,
                timeout: positive_seconds("BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS", args.pve_verb_timeout_seconds)?,
            },
        })
    }
}

fn positive_seconds(name: &str, seconds: u64) -> anyhow::Result<Duration> {
    if seconds == 0 {
        bail!("{name} must be at least 1");
    }
    Ok(Duration::from_secs(seconds))
}

/// A bare address is a single-host network.
fn parse_cidr(s: &str) -> anyhow::Result<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>().map(IpNet::from).with_context(|| format!("{s:?} is neither a CIDR nor an address"))
}

fn validate_agent_name(name: &str) -> anyhow::Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plain {
        bail!("BREAKGLASS_AGENT: {name:?} must be 1-64 letters, digits, '-' or '_', not starting with '-'");
    }
    Ok(())
}

/// A model name reaches the agent's argv, so it is a plain word that cannot be read as an option.
pub fn validate_model(model: &str) -> Result<(), String> {
    let plain = !model.is_empty()
        && model.len() <= 100
        && !model.starts_with('-')
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:[]/@".contains(&b));
    if plain {
        Ok(())
    } else {
        Err(format!("model {model:?} must be 1-100 letters, digits or -_.:[]/@, not starting with '-'"))
    }
}

/// Host and user reach ssh's argv, so neither may look like an option.
fn validate_ssh_word(name: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty() || value.starts_with('-') || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{name}: {value:?} is not a usable host or user name");
    }
    Ok(())
}
