//! The `serve` settings: their flags and environment variables
//! ([`ServeArgs`]), and the validated configuration built once from them.
//!
//! Everything that can be wrong with the settings is reported here, at
//! start-up, with the name of the variable to fix; nothing later re-parses
//! strings.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::http::HeaderName;
use clap::Args;
use ipnet::IpNet;

use crate::approval::ApprovalConfig;
use crate::power::{PowerConfig, PowerSettings, SshDefaults};
use crate::store::Durability;

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
    /// How long a connection may take to send a request head, or sit idle
    /// between keep-alive requests.
    pub header_timeout: Duration,
    pub max_concurrent_turns: usize,
    pub power: PowerConfig,
    /// The console's one-tap prompts.
    pub presets: Vec<Preset>,
    /// Which tool calls wait for the operator (README "Approvals").
    pub approvals: ApprovalConfig,
    pub notify: NotifyConfig,
}

/// Where notifications go (README "Notifications").
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `BREAKGLASS_NOTIFY_URL`; may carry a token, so never logged whole.
    pub webhook: Option<reqwest::Url>,
    pub format: crate::notify::webhook::Format,
    /// The console as browsers reach it, without a trailing slash.
    pub public_url: Option<String>,
    /// The VAPID `sub` claim.
    pub push_contact: String,
}

/// How turns start the agent CLI (README "How a turn runs the agent").
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub program: PathBuf,
    /// Passed to `--agent`; also the file name of the definition, so it is a plain name.
    pub name: String,
    /// The CLI's `--agents` JSON, built from the Markdown definition
    /// (`BREAKGLASS_AGENT_FILE`) at start-up.
    pub definition: String,
    pub default_model: String,
    pub turn_timeout: Duration,
    /// Between SIGTERM and SIGKILL of the agent's process group.
    pub kill_grace: Duration,
    /// The user every agent process runs as (`BREAKGLASS_AGENT_USER`);
    /// `None`: the server's own.
    pub user: Option<crate::agent::user::AgentUser>,
    /// `--include-partial-messages`, for live text (`BREAKGLASS_PARTIAL_MESSAGES`).
    pub partial_messages: bool,
}

/// Who may call `/api` (README "Authentication").
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub bearer_token: Option<String>,
    /// On a first run, the token of the one-time login link (random).
    pub login_token: Option<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub user_header: HeaderName,
    /// How long a login cookie is good for (README, "The web console").
    pub login_ttl: Duration,
}

impl AuthConfig {
    /// Neither a token nor a proxy: a bare machine's first run. The console
    /// is then reached through a one-time login link (README "The web console") and every
    /// other `/api` request is refused.
    pub fn is_first_run(&self) -> bool {
        self.bearer_token.is_none() && self.trusted_proxies.is_empty()
    }
}

/// A one-tap diagnosis prompt of the console.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Preset {
    pub label: String,
    pub prompt: String,
}

/// The presets when `BREAKGLASS_PRESETS_FILE` names none.
pub fn default_presets() -> Vec<Preset> {
    let p = |label: &str, prompt: &str| Preset { label: label.into(), prompt: prompt.into() };
    vec![
        p(
            "Triage",
            "Triage devvm: is it reachable over SSH? Check uptime and load, memory and swap, disk usage, failed units \
             and the last kernel messages. Report what is wrong in a few lines. Change nothing yet.",
        ),
        p(
            "Memory/OOM",
            "Check devvm for memory pressure: free -m, swap, the biggest processes, and OOM kills in the kernel log. \
             Say what was killed and why, and what you would do about it.",
        ),
        p(
            "Disk",
            "Check devvm's disks: df -h and df -i, and what fills the fullest filesystem (logs, caches, core dumps, \
             container images). Propose what can safely be freed; never user data.",
        ),
        p(
            "Services",
            "List devvm's failed and restarting units and, for the main one, its last errors from the journal. \
             Would a restart fix it?",
        ),
        p(
            "QEMU wedged?",
            "devvm may be wedged below the guest. Without changing anything, run ssh pve status and ssh pve forensics: \
             does QEMU answer, does the guest agent? Tell me whether a cycle is warranted.",
        ),
    ]
}

/// Presets from a TOML (`[[preset]]` tables) or JSON (a list, or
/// `{"presets": [...]}`) file, by its extension.
pub fn load_presets(path: &std::path::Path) -> anyhow::Result<Vec<Preset>> {
    #[derive(serde::Deserialize)]
    struct TomlFile {
        preset: Vec<Preset>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum JsonFile {
        List(Vec<Preset>),
        Object { presets: Vec<Preset> },
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let presets = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => toml::from_str::<TomlFile>(&text).with_context(|| format!("{}", path.display()))?.preset,
        Some("json") => match serde_json::from_str::<JsonFile>(&text).with_context(|| format!("{}", path.display()))? {
            JsonFile::List(list) | JsonFile::Object { presets: list } => list,
        },
        _ => bail!("{}: name a .toml or .json file", path.display()),
    };
    if presets.is_empty() || presets.len() > 20 {
        bail!("{}: give between 1 and 20 presets", path.display());
    }
    for preset in &presets {
        if preset.label.trim().is_empty() || preset.prompt.trim().is_empty() || preset.label.chars().count() > 40 {
            bail!("{}: every preset needs a label (at most 40 characters) and a prompt", path.display());
        }
    }
    Ok(presets)
}

/// Flags of `breakglass serve` (the command line is [`crate::cli`]); each
/// is checked by [`Config::from_args`] below.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "BREAKGLASS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Directory for the server's own state.
    #[arg(long, env = "BREAKGLASS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Directory holding one working directory per session [default: <data-dir>/sessions].
    #[arg(long, env = "BREAKGLASS_SESSIONS_DIR")]
    pub sessions_dir: Option<PathBuf>,

    /// full: every event is on disk before any client sees it, so its id survives power loss;
    /// normal: survives a killed process, but after power loss ids may be re-minted.
    #[arg(long, env = "BREAKGLASS_DURABILITY", value_enum, default_value = "full")]
    pub durability: Durability,

    /// Name of the agent definition passed to `claude --agent`.
    #[arg(long, env = "BREAKGLASS_AGENT", default_value = "breakglass")]
    pub agent: String,

    /// Run every agent process as this unprivileged user (the server must
    /// start as root); without it the agent shares the server's rights.
    #[arg(long, env = "BREAKGLASS_AGENT_USER")]
    pub agent_user: Option<String>,

    /// Markdown file with the agent definition [default: the built-in recovery agent].
    #[arg(long, env = "BREAKGLASS_AGENT_FILE")]
    pub agent_file: Option<PathBuf>,

    /// The console's one-tap prompts, a .toml or .json file [default: built-in].
    #[arg(long, env = "BREAKGLASS_PRESETS_FILE")]
    pub presets_file: Option<PathBuf>,

    /// Model used when a prompt names none.
    #[arg(long, env = "BREAKGLASS_MODEL", default_value = "sonnet")]
    pub model: String,

    /// The agent CLI to run, looked up on PATH unless it contains a slash.
    #[arg(long, env = "BREAKGLASS_CLAUDE_BIN", default_value = "claude")]
    pub claude_bin: PathBuf,

    /// A turn running longer than this in all is killed.
    #[arg(long, env = "BREAKGLASS_TURN_TIMEOUT_SECONDS", default_value_t = 1800)]
    pub turn_timeout_seconds: u64,

    /// Pass `--include-partial-messages` to the agent CLI, so attached
    /// clients see text as the model writes it (`false` turns it off).
    #[arg(long, env = "BREAKGLASS_PARTIAL_MESSAGES", default_value_t = true, action = clap::ArgAction::Set)]
    pub partial_messages: bool,

    /// `on`: every tool call of the agent is checked by the policy, and what
    /// it does not allow waits for the operator; `off`: the agent runs
    /// every tool call unasked (README "Approvals").
    #[arg(long, env = "BREAKGLASS_APPROVALS", default_value = "on", value_parser = ["on", "off"])]
    pub approvals: String,

    /// A tool call nobody decides on within this many seconds is denied.
    #[arg(long, env = "BREAKGLASS_APPROVAL_TIMEOUT_SECONDS", default_value_t = 600)]
    pub approval_timeout_seconds: u64,

    /// A TOML file of commands the agent may run without asking, with
    /// reasons (README "Approvals").
    #[arg(long, env = "BREAKGLASS_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// An idle attach stream gets a keepalive comment this often.
    #[arg(long, env = "BREAKGLASS_SSE_KEEPALIVE_SECONDS", default_value_t = 15)]
    pub sse_keepalive_seconds: u64,

    /// A client whose connection accepts no bytes for this long is cut off
    /// (it reconnects with Last-Event-ID and loses nothing).
    #[arg(long, env = "BREAKGLASS_WRITE_TIMEOUT_SECONDS", default_value_t = 30)]
    pub write_timeout_seconds: u64,

    /// A connection that has not sent complete request headers this long
    /// after connecting, or after its last response, is closed.
    #[arg(long, env = "BREAKGLASS_HEADER_TIMEOUT_SECONDS", default_value_t = 10)]
    pub header_timeout_seconds: u64,

    /// Turns running at once across all sessions; more wait for a slot.
    #[arg(long, env = "BREAKGLASS_MAX_CONCURRENT_TURNS", default_value_t = 2)]
    pub max_concurrent_turns: usize,

    /// Bearer token for scripts and terminals: from the environment only
    /// (the flag is refused, since argv is readable by every local user).
    #[arg(long, env = "API_BEARER_TOKEN", hide_env_values = true)]
    pub api_bearer_token: Option<String>,

    /// Comma-separated CIDRs of the edge proxies whose user header is believed.
    #[arg(long, env = "BREAKGLASS_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Header carrying the user name set by a trusted proxy.
    #[arg(long, env = "BREAKGLASS_TRUSTED_USER_HEADER", default_value = "X-authentik-username")]
    pub trusted_user_header: String,

    /// How long a browser stays signed in after opening a login link.
    #[arg(long, env = "BREAKGLASS_LOGIN_TTL_SECONDS", default_value_t = 43200)]
    pub login_ttl_seconds: u64,

    /// The power targets, a TOML file of [[target]] tables (README "Targets");
    /// when set, it alone defines them [default: BREAKGLASS_PVE_HOST's one target].
    #[arg(long, env = "BREAKGLASS_TARGETS_FILE")]
    pub targets_file: Option<PathBuf>,

    /// Hypervisor address for the power verbs (unset: verbs answer 503).
    #[arg(long, env = "BREAKGLASS_PVE_HOST")]
    pub pve_host: Option<String>,

    /// SSH port of the hypervisor.
    #[arg(long, env = "BREAKGLASS_PVE_PORT", default_value_t = 22)]
    pub pve_port: u16,

    /// User on the hypervisor whose authorized_keys holds the forced command.
    #[arg(long, env = "BREAKGLASS_PVE_USER", default_value = "root")]
    pub pve_user: String,

    /// known_hosts file to check the hypervisor's host key against
    /// [default: no check, so a re-keyed host stays reachable in an incident].
    #[arg(long, env = "BREAKGLASS_PVE_KNOWN_HOSTS")]
    pub pve_known_hosts: Option<PathBuf>,

    /// The ssh client, looked up on PATH unless it contains a slash.
    #[arg(long, env = "BREAKGLASS_SSH_BIN", default_value = "ssh")]
    pub ssh_bin: PathBuf,

    /// A power verb taking longer than this is killed.
    #[arg(long, env = "BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS", default_value_t = 660)]
    pub pve_verb_timeout_seconds: u64,

    /// Webhook for notifications (ntfy topic URL or any receiver): from the
    /// environment only, since it may carry a token (README "Notifications").
    #[arg(long, env = "BREAKGLASS_NOTIFY_URL", hide_env_values = true)]
    pub notify_url: Option<String>,

    /// Body of the webhook's POST: ntfy (message body, Title/Priority/Tags/Click headers) or json.
    #[arg(long, env = "BREAKGLASS_NOTIFY_FORMAT", value_enum, default_value = "ntfy")]
    pub notify_format: crate::notify::webhook::Format,

    /// The console's address as browsers reach it, for links in notifications [default: no link].
    #[arg(long, env = "BREAKGLASS_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Log lines as text, or as one JSON object each for log shippers
    /// (text or json; README "Logs").
    #[arg(long, env = "BREAKGLASS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Contact (mailto: or https:) that Web Push messages carry for the push services
    /// [default: the public URL when it is https].
    #[arg(long, env = "BREAKGLASS_PUSH_CONTACT")]
    pub push_contact: Option<String>,
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
            None => crate::agent::definition::DEFAULT.to_owned(),
        };
        let power = PowerConfig::load(PowerSettings {
            targets_file: args.targets_file,
            pve_host: args.pve_host,
            pve_port: args.pve_port,
            pve_user: args.pve_user,
            pve_known_hosts: args.pve_known_hosts,
            ssh: SshDefaults {
                program: args.ssh_bin,
                timeout: positive_seconds("BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS", args.pve_verb_timeout_seconds)?,
            },
        })?;
        let definition = crate::agent::definition::agents_json(&args.agent, &definition, &power.agent_notes())
            .map_err(|e| anyhow::anyhow!("BREAKGLASS_AGENT_FILE: {e}"))?;
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
        let presets = match &args.presets_file {
            Some(path) => load_presets(path).context("BREAKGLASS_PRESETS_FILE")?,
            None => default_presets(),
        };
        let policy = match &args.policy_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("BREAKGLASS_POLICY_FILE: cannot read {}", path.display()))?;
                crate::approval::policy::Policy::from_toml(&text)
                    .map_err(|e| anyhow::anyhow!("BREAKGLASS_POLICY_FILE: {}: {e}", path.display()))?
            }
            None => crate::approval::policy::Policy::default(),
        };
        let approval_timeout = positive_seconds("BREAKGLASS_APPROVAL_TIMEOUT_SECONDS", args.approval_timeout_seconds)?;
        if approval_timeout > MAX_APPROVAL_TIMEOUT {
            bail!("BREAKGLASS_APPROVAL_TIMEOUT_SECONDS must be at most {}", MAX_APPROVAL_TIMEOUT.as_secs());
        }
        let notify = notify_config(args.notify_url, args.notify_format, args.public_url, args.push_contact)?;
        Ok(Config {
            approvals: ApprovalConfig { enabled: args.approvals == "on", timeout: approval_timeout, policy },
            notify,
            presets,
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
                user: match args.agent_user.as_deref().filter(|u| !u.is_empty()) {
                    Some(name) => {
                        let user = crate::agent::user::AgentUser::lookup(name)?;
                        if args.approvals == "on" {
                            crate::agent::user::check_config_is_not_its_own(&user)?;
                        }
                        Some(user)
                    }
                    None => None,
                },
                partial_messages: args.partial_messages,
            },
            auth: {
                let first_run = bearer_token.is_none() && trusted_proxies.is_empty();
                AuthConfig {
                    login_token: first_run.then(crate::util::random_token),
                    bearer_token,
                    trusted_proxies,
                    user_header,
                    login_ttl: login_ttl(args.login_ttl_seconds)?,
                }
            },
            sse_keepalive: positive_seconds("BREAKGLASS_SSE_KEEPALIVE_SECONDS", args.sse_keepalive_seconds)?,
            write_timeout: positive_seconds("BREAKGLASS_WRITE_TIMEOUT_SECONDS", args.write_timeout_seconds)?,
            header_timeout: positive_seconds("BREAKGLASS_HEADER_TIMEOUT_SECONDS", args.header_timeout_seconds)?,
            max_concurrent_turns: match args.max_concurrent_turns {
                0 => bail!("BREAKGLASS_MAX_CONCURRENT_TURNS must be at least 1"),
                n => n,
            },
            power,
        })
    }
}

/// The longest an agent's tool call may wait for the operator: a day.
const MAX_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn notify_config(
    url: Option<String>,
    format: crate::notify::webhook::Format,
    public_url: Option<String>,
    contact: Option<String>,
) -> anyhow::Result<NotifyConfig> {
    let webhook = match url.filter(|u| !u.is_empty()) {
        // The URL itself is never repeated: it may hold a token.
        Some(url) => match reqwest::Url::parse(&url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Some(url),
            _ => bail!("BREAKGLASS_NOTIFY_URL: not an http:// or https:// URL"),
        },
        None => None,
    };
    let public_url = match public_url.filter(|u| !u.is_empty()) {
        Some(text) => match reqwest::Url::parse(&text) {
            Ok(url)
                if matches!(url.scheme(), "http" | "https")
                    && url.has_host()
                    && url.query().is_none()
                    && url.fragment().is_none() =>
            {
                Some(url.as_str().trim_end_matches('/').to_owned())
            }
            _ => bail!("BREAKGLASS_PUBLIC_URL: {text:?} is not an http(s) URL without query or fragment"),
        },
        None => None,
    };
    let push_contact = match contact.filter(|c| !c.is_empty()) {
        Some(c) if (c.starts_with("mailto:") || c.starts_with("https://")) && !c.chars().any(char::is_control) => c,
        Some(c) => bail!("BREAKGLASS_PUSH_CONTACT: {c:?} must be a mailto: or https:// URI"),
        None => match &public_url {
            Some(url) if url.starts_with("https://") => url.clone(),
            _ => "mailto:breakglass@localhost".to_owned(),
        },
    };
    Ok(NotifyConfig { webhook, format, public_url, push_contact })
}

fn positive_seconds(name: &str, seconds: u64) -> anyhow::Result<Duration> {
    if seconds == 0 {
        bail!("{name} must be at least 1");
    }
    Ok(Duration::from_secs(seconds))
}

/// Browsers keep a cookie at most 400 days (RFC 6265bis); a longer TTL
/// would promise what they do not keep.
fn login_ttl(seconds: u64) -> anyhow::Result<Duration> {
    const MAX: u64 = 400 * 24 * 3600;
    if seconds > MAX {
        bail!("BREAKGLASS_LOGIN_TTL_SECONDS must be at most {MAX} (400 days)");
    }
    positive_seconds("BREAKGLASS_LOGIN_TTL_SECONDS", seconds)
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
