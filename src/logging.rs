//! Logging that never blocks the server (README "Logs").
//!
//! Log lines go to stderr through a bounded queue drained by a thread of
//! its own. When stderr stalls (a full disk behind a journal, a pipe nobody
//! reads), lines are dropped and counted rather than stalling the async
//! threads that wrote them; the count is on `GET /metrics`.
//!
//! Lines are text for people, or one JSON object each for log shippers
//! (`BREAKGLASS_LOG_FORMAT`); both go through the same queue.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Longest the exit waits for queued lines to reach stderr.
const FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Lines waiting for stderr; beyond this they are dropped.
const QUEUE_LINES: usize = 8192;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the log thread running; dropping it flushes what is queued, for a
/// bounded time.
pub struct Guard(Option<WorkerGuard>);

impl Drop for Guard {
    fn drop(&mut self) {
        // The flush waits a bounded time, and may print to stdout, which can
        // be closed: on a thread of its own, a failure there stays there.
        if let Some(guard) = self.0.take() {
            let (done, flushed) = std::sync::mpsc::channel();
            let flush = std::thread::Builder::new().name("breakglass-log-flush".into()).spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
            if flush.is_ok() {
                let _ = flushed.recv_timeout(FLUSH_WITHIN);
            }
        }
    }
}

/// How log lines are written (`BREAKGLASS_LOG_FORMAT`, README "Logs").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One line of text per event, for people (and journald).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (the message among them), and the spans it was logged in.
    Json,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => anyhow::bail!("BREAKGLASS_LOG_FORMAT: {other:?} is neither text nor json"),
        }
    }
}

/// Logs go to stderr in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init(format: Format) -> Guard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("breakglass-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let lines = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        Format::Text => lines.with_ansi(ansi).init(),
        Format::Json => lines.json().init(),
    }
    Guard(Some(guard))
}

/// Log lines dropped because stderr could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |counter| counter.dropped_lines() as u64)
}
