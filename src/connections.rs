//! Accepting and bounding HTTP connections (README "Connections").
//!
//! A peer can hold a connection open without finishing a request, or open
//! many; either must not starve the server of file descriptors, which the
//! agent's pipes, ssh and SQLite need too. So:
//!
//! - a connection whose request headers are not complete within the header
//!   timeout is closed, and so is a keep-alive connection that sends no new
//!   request within it (hyper's `header_read_timeout` runs whenever a
//!   connection waits for a request head); a request body that stops
//!   arriving for as long is refused (408);
//! - a connection that accepts none of our bytes for the write timeout is
//!   closed (a stalled attach client reconnects and loses nothing);
//! - connections are capped below the descriptor limit, with a reserve for
//!   the server's own files and children. At the cap, the connection idle
//!   the longest (no request in flight) is closed to make room; when every
//!   connection has a request in flight, the newcomer is answered 503 at once;
//! - accept errors (out of descriptors) pause the loop instead of spinning.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::http::auth::Peer;

/// Descriptors kept back from connections: the database and its readers,
/// the agents' pipes, ssh, the login files.
const RESERVE_MIN: u64 = 64;

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max: usize,
    /// Longest wait for a complete request head, new or keep-alive.
    pub header_timeout: Duration,
    /// Longest a connection may refuse our bytes.
    pub write_timeout: Duration,
}

/// Raises the soft descriptor limit to the hard one and returns how many
/// connections fit below it with the reserve kept back.
pub fn connection_cap() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let soft = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() { hard } else { soft };
    let reserve = RESERVE_MIN.max(soft / 8);
    usize::try_from(soft.saturating_sub(reserve).max(8)).unwrap_or(usize::MAX)
}

/// What the accept loop knows of one open connection.
#[derive(Debug)]
struct Conn {
    /// Requests whose responses (bodies included) are not finished.
    in_flight: AtomicUsize,
    /// When the last request finished (ms since the registry began).
    idle_since: AtomicU64,
    /// Fired to close the connection at once.
    evict: CancellationToken,
}

/// Every open connection, for the cap and for eviction.
#[derive(Debug, Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Registry {
    fn now(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for one more connection: true when there is room (closing
    /// the longest-idle connection if the cap is reached), false when every
    /// connection is busy.
    fn make_room(&self, max: usize) -> bool {
        let conns = self.lock();
        if conns.len() < max {
            return true;
        }
        let mut idle: Vec<&Arc<Conn>> = conns.values().filter(|c| c.in_flight.load(Ordering::SeqCst) == 0).collect();
        idle.sort_by_key(|c| c.idle_since.load(Ordering::SeqCst));
        // Claimed atomically: a request that arrives on it meanwhile either
        // counted itself first (the connection is busy, try the next) or
        // sees it closing and is answered 503.
        for conn in idle {
            if conn.in_flight.compare_exchange(0, EVICTING, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                conn.evict.cancel();
                return true;
            }
        }
        false
    }

    fn register(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now()),
            evict: CancellationToken::new(),
        });
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Counts a request as in flight until its response body is dropped.
struct InFlight {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

/// `in_flight` of a connection claimed for eviction.
const EVICTING: usize = usize::MAX;

impl InFlight {
    /// None when the connection is being closed to make room.
    fn new(conn: Arc<Conn>, registry: Arc<Registry>) -> Option<Self> {
        let counted =
            conn.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n != EVICTING).then(|| n + 1));
        counted.is_ok().then_some(InFlight { conn, registry })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.idle_since.store(self.registry.now(), Ordering::SeqCst);
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request that arrived on a connection just claimed for
/// eviction.
fn closing() -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response =
        crate::http::error::ApiError::Unavailable("too many connections; try again shortly".into()).into_response();
    response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    response
}

/// The canned answer over the cap: written without waiting, then closed.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 52\r\n\r\n\
{\"detail\":\"too many connections; try again shortly\"}";

/// Connections over the cap being answered at once.
const REFUSING: usize = 16;
/// Longest a refused connection is kept: for its request to arrive (HTTP
/// clients treat an answer before their request as an error), and for the
/// answer to leave.
const REFUSE_WITHIN: Duration = Duration::from_secs(1);

/// Reads what the client sent (up to a bound), answers 503 and closes; a
/// client that sends nothing within [`REFUSE_WITHIN`] is just closed.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answered = async {
        let mut request = [0u8; 8192];
        let _ = stream.read(&mut request).await?;
        stream.write_all(OVER_CAP).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSE_WITHIN, answered).await;
}

/// How the accept loop is stopped.
#[derive(Debug, Clone, Default)]
pub struct Stopping {
    /// Stop accepting; open connections go on.
    pub accept: CancellationToken,
    /// Finish the request in flight on each connection, then close it.
    pub graceful: CancellationToken,
    /// Close every connection now.
    pub now: CancellationToken,
}

/// Accepts connections until `stop.accept` fires; each is served on a task
/// of `tracker`.
pub async fn accept_loop(listener: TcpListener, app: Router, limits: Limits, stop: Stopping, tracker: TaskTracker) {
    let registry = Arc::new(Registry::default());
    let refusing = Arc::new(tokio::sync::Semaphore::new(REFUSING));
    loop {
        let accepted = tokio::select! {
            () = stop.accept.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(%err, open = registry.len(), "accept failed");
                tokio::select! {
                    () = stop.accept.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => continue,
                }
            }
        };
        if !registry.make_room(limits.max) {
            tracing::warn!(%addr, max = limits.max, "connection refused: every connection is busy");
            // Answered by a few short-lived tasks at most; beyond them the
            // connection is simply closed.
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                tracker.spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        }
        let (id, conn) = registry.register();
        let (app, stop, registry) = (app.clone(), stop.clone(), registry.clone());
        tracker.spawn(async move {
            serve_connection(stream, addr, app, limits, &stop, conn, registry.clone()).await;
            registry.remove(id);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    addr: SocketAddr,
    app: Router,
    limits: Limits,
    stop: &Stopping,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
) {
    let _ = stream.set_nodelay(true);
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(limits.write_timeout));
    let io = TokioIo::new(Box::pin(stream));
    let evict = conn.evict.clone();
    let header_timeout = limits.header_timeout;
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let in_flight = InFlight::new(conn.clone(), registry.clone());
        request.extensions_mut().insert(ConnectInfo(Peer(addr)));
        let app = app.clone();
        async move {
            let Some(in_flight) = in_flight else {
                return Ok(closing());
            };
            // A body that stops arriving is cut off like a head that does.
            let request = request.map(|body| Body::new(TimeoutBody::new(header_timeout, body)));
            let response = app.oneshot(request).await.unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(response.map(|inner| Body::new(Tracked { inner, _in_flight: in_flight })))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    // This connection's own tokens, cancelled with the server's: the select
    // below polls them whenever the connection's task wakes (every frame an
    // attach stream sends), and the server's tokens are one lock shared by
    // every connection.
    let (graceful, now) = (stop.graceful.child_token(), stop.now.child_token());
    let mut graceful_sent = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%addr, %err, "connection ended");
                }
                return;
            }
            () = graceful.cancelled(), if !graceful_sent => {
                graceful_sent = true;
                connection.as_mut().graceful_shutdown();
            }
            () = evict.cancelled() => {
                tracing::debug!(%addr, "idle connection closed to make room");
                return;
            }
            () = now.cancelled() => return,
        }
    }
}
