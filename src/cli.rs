//! The command line: `breakglass [serve] [flags]`, and the commands beside
//! it (`audit verify`, `login`, `backup`, `restore`, and the terminal client's
//! `attach`, `sessions`, `verb`).
//!
//! Every flag is mirrored by an environment variable (README "Configuration"); the flag wins.
//! `serve` is the default subcommand, so `breakglass --listen …` and
//! `breakglass serve --listen …` mean the same.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ServeArgs};
use crate::store::AuditCheck;

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
    /// Copy the live database to FILE (safe while the server runs), check
    /// the copy, and keep it only if it is sound.
    Backup(BackupArgs),
    /// Replace the data directory's database with a backup; refused while a
    /// server runs there. The replaced database is kept beside it.
    Restore(RestoreArgs),
    /// Print a one-time login link for the running server's web console
    /// (any auth mode), or sign every browser out.
    Login(LoginArgs),
    /// Attach this terminal to a session: its transcript live, prompts from
    /// a line editor (README "The terminal client").
    Attach(crate::client::AttachArgs),
    /// List the sessions, newest first.
    Sessions(crate::client::SessionsArgs),
    /// Run a power verb and follow it to its end; the exit status says how
    /// it ended (0 succeeded, 1 failed, 2 refused, 3 server unreachable).
    Verb(crate::client::VerbArgs),
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

/// Flags of `breakglass backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Where to write the backup (one file: the database with its audit
    /// anchor; mode 0600).
    pub file: PathBuf,

    /// The server's data directory.
    #[arg(long, env = "BREAKGLASS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `breakglass restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A file made by `breakglass backup`.
    pub file: PathBuf,

    /// The data directory to restore into; its server must be stopped.
    #[arg(long, env = "BREAKGLASS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Create the data directory if it does not exist.
    #[arg(long)]
    pub create: bool,
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

impl Cli {
    /// How `serve` logs (`BREAKGLASS_LOG_FORMAT`), known before logging
    /// starts; the other commands log as text.
    pub fn log_format(&self) -> anyhow::Result<crate::logging::Format> {
        match &self.command {
            Some(Command::Serve(args)) => args.log_format.parse(),
            None => self.serve.log_format.parse(),
            Some(
                Command::Audit(_)
                | Command::Login(_)
                | Command::Backup(_)
                | Command::Restore(_)
                | Command::Attach(_)
                | Command::Sessions(_)
                | Command::Verb(_),
            ) => Ok(crate::logging::Format::Text),
        }
    }
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
        Some(Command::Backup(args)) => return backup(&args),
        Some(Command::Restore(args)) => return restore(&args),
        Some(Command::Attach(args)) => return Ok(crate::client::attach(args)?),
        Some(Command::Sessions(args)) => return Ok(crate::client::sessions(args)?),
        Some(Command::Verb(args)) => return Ok(crate::client::verb(args)?),
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

/// `breakglass backup`: what was copied, on stdout.
fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let copied = crate::store::backup(&args.data_dir, &args.file, args.force)?;
    println!(
        "backed up {} to {} in {:.2} s: {copied}",
        args.data_dir.join("breakglass.db").display(),
        args.file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `breakglass restore`: what was restored and where the replaced database
/// was kept, on stdout.
fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let restored = crate::store::restore(&args.data_dir, &args.file, args.create)?;
    println!("restored {} into {}: {}", args.file.display(), args.data_dir.display(), restored.copied);
    if let Some(kept) = restored.kept {
        println!("the database it replaced is kept as {}", kept.display());
    }
    Ok(())
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
