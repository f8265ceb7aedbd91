//! Wiring: the listener, the application, and the order of a drain.
//!
//! On shutdown the server stops accepting connections, stops running turns
//! (each logs its end and `turn_end`), then ends attach streams, so attached
//! clients see how their turn ended before the connection closes.

use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::auth::{Logins, Peer, login_key};
use crate::http::{AppState, router};
use crate::power::Power;
use crate::session::Sessions;
use crate::store::Store;

/// How long open connections get to finish once turns have ended and
/// attach streams are closed (a half-sent request must not hold the exit).
const CONNECTION_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for a power verb in flight.
const VERB_GRACE: Duration = Duration::from_secs(15);

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
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
            break;
        }
    }
}

/// Creates the data directories and opens the database in them.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    for dir in [&config.data_dir, &config.sessions_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("while creating {}", dir.display()))?;
    }
    Ok(Arc::new(Store::open(&config.data_dir, config.durability)?))
}

/// Serves on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    config: Config,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let writer_failed = store.writer_failed();
    let sessions = Arc::new(Sessions::new(&config, store));
    let recovered = sessions.recover().await.context("while closing turns interrupted by the last stop")?;
    if recovered > 0 {
        tracing::warn!(recovered, "closed turns that were running when the server last stopped");
    }
    let state = AppState {
        audit_failures: Arc::default(),
        tasks: TaskTracker::new(),
        logins: Arc::new(Logins::new(
            config.auth.login_token.clone(),
            login_key(&config.data_dir).context("while reading the login key")?,
        )),
        power: Arc::new(Power::new(config.power.clone())),
        sessions: sessions.clone(),
        streams_end: CancellationToken::new(),
        config: config.clone(),
    };
    let stop_accepting = CancellationToken::new();
    let drain = {
        let (stop_accepting, streams_end, power, tasks) =
            (stop_accepting.clone(), state.streams_end.clone(), state.power.clone(), state.tasks.clone());
        async move {
            shutdown.await;
            stop_accepting.cancel();
            tasks.close();
            let requests = async {
                if tokio::time::timeout(VERB_GRACE, tasks.wait()).await.is_err() {
                    tracing::warn!("requests still running at shutdown");
                }
            };
            tokio::join!(sessions.shutdown(), power.drain(VERB_GRACE), requests);
            streams_end.cancel();
            tokio::time::sleep(CONNECTION_GRACE).await;
        }
    };
    let app = router(state).into_make_service_with_connect_info::<Peer>();
    let listener = GuardedListener { inner: listener, write_timeout: config.write_timeout };
    let serve = axum::serve(listener, app).with_graceful_shutdown(stop_accepting.cancelled_owned());
    tokio::select! {
        served = serve.into_future() => served.context("while serving")?,
        () = drain => tracing::warn!("connections still open {CONNECTION_GRACE:?} after the drain; closing them"),
        // Storage is closed for good: stop with an error so the supervisor restarts us.
        () = writer_failed.cancelled() => anyhow::bail!("the storage writer died (see the log); stopping so that a restart reopens storage"),
    }
    tracing::info!("drained; bye");
    Ok(())
}

/// Accepts TCP connections whose writes time out: a client that stops
/// reading is cut off once the kernel's buffers are full for
/// `write_timeout`, instead of holding its connection for ever. It
/// reconnects with Last-Event-ID and loses nothing.
struct GuardedListener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl Listener for GuardedListener {
    type Io = Pin<Box<TimeoutStream<TcpStream>>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    return (Box::pin(stream), addr);
                }
                Err(err) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl Connected<IncomingStream<'_, GuardedListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, GuardedListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}
