//! The terminal client (README "The terminal client"): `breakglass attach`,
//! `breakglass sessions` and `breakglass verb`. It speaks only the public
//! HTTP API (README "API"), as any script could, and needs nothing of the
//! server's configuration: an address (`--url`, `BREAKGLASS_URL`) and the
//! token (`API_BEARER_TOKEN`, from the environment only).
//!
//! - `api`: one method per route, answers bounded, refusals as [`ClientError`];
//! - `sse`: reading an event stream, every line and frame capped;
//! - `render`: the transcript as text, with the console's folding rules,
//!   everything from the server made inert for the terminal;
//! - `attach`: the interactive loop (line editor, live stream, resume).

mod api;
mod attach;
mod render;
mod sse;

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use api::Api;
use render::sanitize;

/// Why a command failed, and so its exit status (README "The terminal
/// client"): 1 the verb ran and failed, 2 refused or misused, 3 the server
/// could not be reached, refused our credentials, or answered nonsense.
///
/// Shown sanitized: its words come from the server, a proxy, or a TLS or
/// DNS error chain, none of which may drive the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}", sanitize(.0))]
    Usage(String),
    #[error("cannot reach {}", sanitize(.0))]
    Unreachable(String),
    #[error("the server refused our credentials ({status}): {} (set API_BEARER_TOKEN)", sanitize(.detail))]
    Auth { status: u16, detail: String },
    #[error("refused ({status}): {}", sanitize(.detail))]
    Refused { status: u16, detail: String },
    #[error("the server failed ({status}): {}", sanitize(.detail))]
    Server { status: u16, detail: String },
    #[error("{}", sanitize(.0))]
    Failed(String),
    #[error("unexpected answer: {}", sanitize(.0))]
    Protocol(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Failed(_) => 1,
            ClientError::Usage(_) | ClientError::Refused { .. } => 2,
            ClientError::Unreachable(_)
            | ClientError::Auth { .. }
            | ClientError::Server { .. }
            | ClientError::Protocol(_) => 3,
        }
    }

    /// A refusal from the server's answer: its `{"detail"}` (README "API").
    fn from_answer(status: reqwest::StatusCode, body: &Value) -> ClientError {
        let detail = body["detail"].as_str().map_or_else(
            || status.canonical_reason().unwrap_or("no reason given").to_owned(),
            |d| sanitize(d).replace('\n', " "),
        );
        let code = status.as_u16();
        match code {
            401 | 403 => ClientError::Auth { status: code, detail },
            // A 502 says "the verb ran and failed" only from POST
            // /api/pve/{verb} with breakglass's own answer (see
            // `default_verb`); anywhere else it is a proxy in front whose
            // server is down (a pod being recreated): worth trying again.
            400..=499 | 503 => ClientError::Refused { status: code, detail },
            _ => ClientError::Server { status: code, detail },
        }
    }

    /// Worth trying again after a pause: the link, or a server restarting.
    fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable(_) | ClientError::Server { .. } | ClientError::Protocol(_) => true,
            ClientError::Refused { status, .. } => matches!(status, 429 | 503),
            ClientError::Usage(_) | ClientError::Auth { .. } | ClientError::Failed(_) => false,
        }
    }
}

/// Where the server is.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's address (the token comes from API_BEARER_TOKEN).
    #[arg(long, env = "BREAKGLASS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

/// Flags of `breakglass attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Attach to this session [default: the newest].
    #[arg(long, conflicts_with = "new")]
    pub session: Option<String>,
    /// Open a new session and attach to it.
    #[arg(long)]
    pub new: bool,
}

/// Flags of `breakglass sessions`.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// How many, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `breakglass verb`.
#[derive(Debug, Args)]
pub struct VerbArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The target [default: the default target, through /api/pve].
    #[arg(long)]
    pub target: Option<String>,
    /// The verb (`status`, `forensics`, `reset`, `stop`, `start`, `cycle`, …).
    pub verb: String,
}

fn connect(server: &ServerArgs) -> Result<Api, ClientError> {
    Api::new(&server.url, std::env::var("API_BEARER_TOKEN").ok())
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| ClientError::Usage(format!("cannot start the async runtime: {err}")))
}

/// `breakglass attach`.
pub fn attach(args: AttachArgs) -> Result<(), ClientError> {
    let api = connect(&args.server)?;
    let runtime = runtime()?;
    let attached = runtime.block_on(attach::run(api, args.session, args.new));
    runtime.shutdown_timeout(Duration::from_secs(1));
    attached
}

/// `breakglass sessions`: a table, or the API's JSON.
pub fn sessions(args: SessionsArgs) -> Result<(), ClientError> {
    let api = connect(&args.server)?;
    let page = runtime()?.block_on(api.sessions(args.limit.clamp(1, 500)))?;
    if args.json {
        println!("{page}");
        return Ok(());
    }
    let sessions = page["sessions"].as_array().cloned().unwrap_or_default();
    if sessions.is_empty() {
        eprintln!("no sessions yet");
        return Ok(());
    }
    println!("{:<36}  {:<7}  {:<7}  {:<24}  TITLE", "ID", "RUNNING", "WAITING", "LAST ACTIVITY");
    for session in &sessions {
        let text = |key: &str| sanitize(session[key].as_str().unwrap_or("")).replace('\n', " ");
        let title: String = text("title").chars().take(60).collect();
        println!(
            "{:<36}  {:<7}  {:<7}  {:<24}  {}",
            text("id"),
            if session["running"].as_bool() == Some(true) { "yes" } else { "no" },
            session["pending_approvals"].as_u64().unwrap_or(0),
            text("last_activity"),
            if title.is_empty() { "(no prompt yet)".to_owned() } else { title },
        );
    }
    Ok(())
}

/// `breakglass verb`: the verb's steps on stdout; the exit status says how
/// it ended.
pub fn verb(args: VerbArgs) -> Result<(), ClientError> {
    let api = connect(&args.server)?;
    let runtime = runtime()?;
    let ran = runtime.block_on(async {
        match &args.target {
            Some(target) => operation(&api, target, &args.verb).await,
            None => default_verb(&api, &args.verb).await,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    ran
}

/// A verb on a named target: its operation, followed to `done` over its
/// stream (resumed after a cut with `Last-Event-ID`, README "Operations").
async fn operation(api: &Api, target: &str, verb: &str) -> Result<(), ClientError> {
    // Asked first: the stream's silence limit follows the server's keepalive.
    let idle = sse::idle_for(&api.whoami().await?);
    let id = api.start_verb(target, verb).await?;
    eprintln!("{verb} on {}: operation {}", sanitize(target), sanitize(&id));
    let path = format!("/api/operations/{}/stream", api::segment(&id));
    let mut last: Option<u64> = None;
    let mut done: Option<Value> = None;
    let mut backoff = sse::Backoff::new();
    while done.is_none() {
        let opened = api.stream(&path, last, idle).await;
        let cut = match opened {
            Ok(response) => {
                backoff.reset();
                sse::read(response, idle, |frame| {
                    let Some((id, step)) = sse::event(&frame) else { return true };
                    last = Some(id);
                    match step["kind"].as_str() {
                        Some("step") => {
                            println!("{}", sanitize(step["text"].as_str().unwrap_or("")));
                            true
                        }
                        Some("done") => {
                            done = Some(step);
                            false
                        }
                        _ => true,
                    }
                })
                .await
            }
            Err(err) if err.is_transient() => err.to_string(),
            Err(err) => return Err(err),
        };
        if done.is_none() {
            if backoff.given_up() {
                return Err(ClientError::Unreachable(format!("{} (the operation's stream: {cut})", api.base())));
            }
            eprintln!("link down ({cut}), reconnecting…");
            backoff.wait().await;
        }
    }
    let done = done.unwrap_or_default();
    if done["state"] == "succeeded" {
        return Ok(());
    }
    let why = done["error"].as_str().map_or_else(|| "failed".to_owned(), sanitize);
    Err(ClientError::Failed(format!("{verb} on {}: {why}", sanitize(target))))
}

/// A verb on the default target (`POST /api/pve/{verb}`, answered when it
/// has finished): over ssh the host's output and exit code, on an API
/// backend its operation.
async fn default_verb(api: &Api, verb: &str) -> Result<(), ClientError> {
    let (status, body) = api.default_verb(verb, api::VERB_WAIT).await?;
    // The server's 502 carries the host's answer or the operation with its
    // `detail` (README "API"); a proxy's 502 carries neither.
    let ran = status.as_u16() == 200
        || (status.as_u16() == 502
            && (body.get("exit_code").is_some() || body.get("stdout").is_some() || body["detail"].is_string()));
    if !ran {
        return Err(ClientError::from_answer(status, &body));
    }
    if let Some(steps) = body["steps"].as_array() {
        for step in steps.iter().filter(|s| s["kind"] == "step") {
            println!("{}", sanitize(step["text"].as_str().unwrap_or("")));
        }
    } else {
        print!("{}", sanitize(body["stdout"].as_str().unwrap_or("")));
        eprint!("{}", sanitize(body["stderr"].as_str().unwrap_or("")));
    }
    if status.is_success() {
        return Ok(());
    }
    let why = match (body["detail"].as_str(), body["exit_code"].as_i64()) {
        (Some(detail), _) => sanitize(detail),
        (None, Some(_)) if body["rejected"] == true => "the host refused the verb".to_owned(),
        (None, Some(code)) => format!("the host's exit code was {code}"),
        (None, None) => "ssh did not finish (timed out or killed)".to_owned(),
    };
    Err(ClientError::Failed(format!("{verb}: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_shown_inert_whatever_the_server_or_the_network_put_in_it() {
        let unreachable = ClientError::Unreachable("https://h: invalid peer certificate: \x1b]2;pwned\x07".into());
        assert_eq!(
            unreachable.to_string(),
            "cannot reach https://h: invalid peer certificate: ⟨U+001B⟩]2;pwned⟨U+0007⟩"
        );
        let protocol = ClientError::Protocol("POST /x: no operation_id \u{202e}".into());
        assert_eq!(protocol.to_string(), "unexpected answer: POST /x: no operation_id ⟨U+202E⟩");
    }
}
