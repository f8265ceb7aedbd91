//! The command line: `breakglass [serve] [flags]`.
//!
//! Every flag is mirrored by an environment variable (README "Configuration"); the flag wins.
//! `serve` is the default subcommand, so `breakglass --listen …` and
//! `breakglass serve --listen …` mean the same.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::store::{AuditCheck, Durability};

#[derive(Debug, Parser)]
#[command(name = "breakglass", version, about = "Emergency-recovery console for a wedged machine")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start-up: the size of the `serve` flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the console and its API (the default).
    Serve(ServeArgs),
    /// Work with the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a one-time login link for the running server's web console
    /// (any auth mode), or sign every browser out.
    Login(LoginArgs),
}

/// Flags of `breakglass login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The running server's data directory.
    #[arg(long, env = "BREAKGLASS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The console's address as browsers reach it, behind a proxy say
    /// [default: the address the server listens on].
    #[arg(long, env = "BREAKGLASS_PUBLIC_URL")]
    pub url: Option<String>,

    /// Sign every browser out and void links not yet opened, instead.
    #[arg(long, conflicts_with = "url")]
    pub revoke_all: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check that no audit record was changed, removed or reordered.
    Verify {
        /// Directory holding breakglass.db.
        #[arg(long, env = "BREAKGLASS_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

/// Flags of `breakglass serve`.
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

    /// Contact (mailto: or https:) that Web Push messages carry for the push services
    /// [default: the public URL when it is https].
    #[arg(long, env = "BREAKGLASS_PUSH_CONTACT")]
    pub push_contact: Option<String>,
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    // Any local user (the agent's among them) can read a process's argv.
    if std::env::args_os().any(|a| a.to_string_lossy().starts_with("--api-bearer-token")) {
        anyhow::bail!(
            "API_BEARER_TOKEN: pass the token in the environment, not as --api-bearer-token (argv is readable by every local user)"
        );
    }
    if std::env::args_os().any(|a| a.to_string_lossy().starts_with("--notify-url")) {
        anyhow::bail!(
            "BREAKGLASS_NOTIFY_URL: pass the URL in the environment, not as --notify-url (it may carry a token, and argv is readable by every local user)"
        );
    }
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Audit(AuditCommand::Verify { data_dir })) => return verify_audit(&data_dir),
        Some(Command::Login(args)) => return login(&args),
        None => cli.serve,
    };
    let config = Config::from_args(args)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("while starting the async runtime")?;
    let served = runtime.block_on(crate::server::serve(config));
    // Blocking tasks stuck on a frozen disk must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// `breakglass audit verify`: exit 0 when the chain is intact, 1 otherwise.
fn verify_audit(data_dir: &std::path::Path) -> anyhow::Result<()> {
    match crate::store::verify_audit(data_dir)? {
        AuditCheck::Intact { records } => {
            println!("audit trail intact: {records} records");
            Ok(())
        }
        AuditCheck::Broken { seq, why } => anyhow::bail!("audit trail broken at record {seq}: {why}"),
    }
}

/// `breakglass login`: the link on stdout (alone, for scripts), the rest on
/// stderr. The token is made here and reaches the server only as a hash in
/// the data directory, never through its argv or logs.
fn login(args: &LoginArgs) -> anyhow::Result<()> {
    use crate::http::login::{LINK_TTL, listening_url, mint_link, revoke_all};
    if !args.data_dir.is_dir() {
        anyhow::bail!("no directory {}: give the server's --data-dir", args.data_dir.display());
    }
    if args.revoke_all {
        revoke_all(&args.data_dir)?;
        eprintln!("every browser is signed out, and links not yet opened are void");
        return Ok(());
    }
    let base = match &args.url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => listening_url(&args.data_dir)?,
    };
    let token = mint_link(&args.data_dir)?;
    println!("{base}/login?token={token}");
    eprintln!("open it within {} minutes; it works once", LINK_TTL.as_secs() / 60);
    Ok(())
}
