//! Wiring: the listener, the application, and the order of a drain.
//!
//! On shutdown the server stops accepting connections, stops running turns
//! (each logs its end and `turn_end`), then ends attach streams, so attached
//! clients see how their turn ended before the connection closes.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::approval::Approvals;
use crate::config::Config;
use crate::connections::{Limits, Stopping, accept_loop, connection_cap};
use crate::http::login::Logins;
use crate::http::{AppState, router};
use crate::notify::push::Push;
use crate::notify::webhook::Webhook;
use crate::notify::{Notifier, Stats};
use crate::power::Power;
use crate::session::Sessions;
use crate::store::Store;

/// How long open connections get to finish once turns have ended and
/// attach streams are closed (a half-sent request must not hold the exit).
const CONNECTION_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for a power verb in flight.
const VERB_GRACE: Duration = Duration::from_secs(15);
/// How long a verb cut off at shutdown gets to be recorded and answered.
const VERB_CUT_OFF: Duration = Duration::from_secs(2);
/// How long shutdown lets queued notifications go out.
const NOTIFY_GRACE: Duration = Duration::from_secs(5);
/// The whole drain, whatever happens.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// `breakglass serve`: bind, say where and how to authenticate, run until a
/// signal. A second signal during the drain exits at once.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Storage first: a database we must not touch stops us before we listen.
    let store = open_store(&config)?;
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("while binding {}", config.listen))?;
    let addr = listener.local_addr().context("while reading the bound address")?;
    announce(&config, addr);
    let draining = CancellationToken::new();
    let first = {
        let draining = draining.clone();
        async move {
            crate::shutdown::signalled().await;
            draining.cancel();
        }
    };
    tokio::select! {
        served = run(listener, config, store, first) => served,
        () = async { draining.cancelled().await; crate::shutdown::signalled().await } => {
            tracing::warn!("second signal: exiting without finishing the drain");
            Ok(())
        }
    }
}

/// Prints the bound address (tests read it) and how to get in. Stdout may
/// be closed by whoever started us: that is no reason to stop serving.
fn announce(config: &Config, addr: SocketAddr) {
    let auth = &config.auth;
    tracing::info!("listening on http://{addr}");
    let mut lines = vec![format!("breakglass listening on http://{addr}")];
    if auth.bearer_token.is_some() {
        lines.push("auth: send 'Authorization: Bearer <API_BEARER_TOKEN>'".into());
    }
    if !auth.trusted_proxies.is_empty() {
        let nets: Vec<_> = auth.trusted_proxies.iter().map(ToString::to_string).collect();
        lines.push(format!("auth: header '{}' believed from {}", auth.user_header, nets.join(", ")));
    }
    if let Some(token) = &auth.login_token {
        let host = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
        lines.push(format!("login: open http://{host}/login?token={token} (once; no API_BEARER_TOKEN or BREAKGLASS_TRUSTED_PROXIES is set)"));
        tracing::warn!(
            "no API_BEARER_TOKEN or BREAKGLASS_TRUSTED_PROXIES: the console is reached through the one-time login link on stdout"
        );
    }
    match &config.agent.user {
        Some(user) => tracing::info!(user = %user.name, uid = user.uid, "the agent runs as its own user"),
        None => tracing::warn!(
            "BREAKGLASS_AGENT_USER is not set: the agent runs with the server's own rights and can read its \
             database and login key; see README \"Security\""
        ),
    }
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
            break;
        }
    }
}

/// Creates the data directories, private to the server, and opens the
/// database in them.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    crate::agent::user::private_umask();
    for dir in [&config.data_dir, &config.sessions_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("while creating {}", dir.display()))?;
    }
    crate::agent::user::secure_dirs(&config.data_dir, &config.sessions_dir, config.agent.user.as_ref())?;
    Ok(Arc::new(Store::open(&config.data_dir, config.durability)?))
}

/// Serves on `listener` until `shutdown` resolves, then drains, within
/// [`DRAIN_LIMIT`] whatever is connected and whatever the disk does.
pub async fn run(
    listener: TcpListener,
    config: Config,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let writer_failed = store.writer_failed();
    let addr = listener.local_addr().context("while reading the bound address")?;
    let audit_failures: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    // The login key, the `listen` file and the VAPID key are each written
    // and synced on a first start: made side by side (and beside the
    // recovery), off the runtime's threads, they cost the start one sync's
    // wait instead of three.
    let logins = tokio::task::spawn_blocking({
        let config = config.clone();
        move || Logins::open(&config, addr)
    });
    let stats = Arc::new(Stats::default());
    let push = tokio::task::spawn_blocking({
        let (config, stats) = (config.clone(), stats.clone());
        move || open_push(&config, stats)
    });
    let push = push.await.context("while reading the VAPID key")??;
    let notifier = Arc::new(start_notifier(&config, push, stats));
    let approvals = Arc::new(Approvals::new(config.approvals.clone(), addr, audit_failures.clone(), notifier.clone()));
    let sessions = Arc::new(Sessions::new(&config, store, approvals, notifier.clone()));
    let recovered = sessions.recover().await.context("while closing turns interrupted by the last stop")?;
    if recovered > 0 {
        tracing::warn!(recovered, "closed turns that were running when the server last stopped");
    }
    let power = Arc::new(Power::new(config.power.clone(), sessions.store().clone()));
    let interrupted = power.recover().await.context("while closing operations interrupted by the last stop")?;
    if interrupted > 0 {
        tracing::warn!(interrupted, "marked operations that were running when the server last stopped as failed");
    }
    power.probe();
    let logins = logins.await.context("while reading the login key")??;
    let state = AppState {
        audit_failures,
        tasks: TaskTracker::new(),
        logins: Arc::new(logins),
        power,
        sessions: sessions.clone(),
        streams_end: CancellationToken::new(),
        config: config.clone(),
        notifier,
        streams: Default::default(),
    };
    let limits =
        Limits { max: connection_cap(), header_timeout: config.header_timeout, write_timeout: config.write_timeout };
    tracing::info!(max_connections = limits.max, "accepting connections");
    let stopping = Stopping::default();
    let connections = TaskTracker::new();
    let accepting =
        tokio::spawn(accept_loop(listener, router(state.clone()), limits, stopping.clone(), connections.clone()));

    // Storage closed for good: drain (agents are killed; nothing more can
    // be logged) and stop with an error so the supervisor restarts us.
    let writer_died = tokio::select! {
        () = shutdown => false,
        () = writer_failed.cancelled() => true,
    };
    // Bounded as a whole: a frozen disk or a verb that never returns must
    // not keep the process from exiting (README "Stopping").
    if tokio::time::timeout(DRAIN_LIMIT, drain(&state, &stopping, &connections)).await.is_err() {
        tracing::error!("the drain did not finish within {DRAIN_LIMIT:?}; exiting anyway");
    }
    stopping.now.cancel();
    let _ = accepting.await;
    if writer_died {
        anyhow::bail!("the storage writer died (see the log); stopping so that a restart reopens storage");
    }
    tracing::info!("drained; bye");
    Ok(())
}

/// The Web Push channel: its key is made on first run (with no browser
/// subscribed it sends nothing). Reads and may write files: run it off the
/// runtime's threads.
fn open_push(config: &Config, stats: Arc<Stats>) -> anyhow::Result<Push> {
    let notify = &config.notify;
    let client = crate::notify::HttpClient::default();
    Push::open(&config.data_dir, client, notify.push_contact.clone(), notify.public_url.clone(), stats)
}

/// The notification channels (README "Notifications"): the webhook when
/// `BREAKGLASS_NOTIFY_URL` is set, and Web Push always, sharing one client.
fn start_notifier(config: &Config, push: Push, stats: Arc<Stats>) -> Notifier {
    let notify = &config.notify;
    let webhook = notify.webhook.clone().map(|url| {
        tracing::info!(to = %crate::notify::origin(&url), format = ?notify.format, "notifications go to a webhook");
        Webhook::new(url, notify.format, notify.public_url.clone(), push.client())
    });
    Notifier::start(webhook, Some(Arc::new(push)), stats)
}

/// The order of a drain: no new connections; turns stopped and their ends
/// logged, verbs in flight finished (or cut off and answered); then attach
/// streams end after sending what the log holds; then each connection
/// finishes its request and closes.
async fn drain(state: &AppState, stopping: &Stopping, connections: &TaskTracker) {
    stopping.accept.cancel();
    state.tasks.close();
    let requests = async {
        if tokio::time::timeout(VERB_GRACE + VERB_CUT_OFF, state.tasks.wait()).await.is_err() {
            tracing::warn!("requests still running at shutdown");
        }
    };
    tokio::join!(state.sessions.shutdown(), state.power.drain(VERB_GRACE, VERB_CUT_OFF), requests);
    state.streams_end.cancel();
    stopping.graceful.cancel();
    connections.close();
    // The notes of the turns and verbs just ended go out while connections close.
    let connections_closed = async {
        if tokio::time::timeout(CONNECTION_GRACE, connections.wait()).await.is_err() {
            tracing::warn!("connections still open {CONNECTION_GRACE:?} after the drain; closing them");
        }
    };
    tokio::join!(connections_closed, state.notifier.drain(NOTIFY_GRACE));
}
