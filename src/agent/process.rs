//! The agent's process: spawned without a shell in a process group of its
//! own, read line by line with a cap, and always killed as a whole group and
//! reaped.
//!
//! The group id is the leader's pid. It stays reserved while the leader is a
//! zombie, so the group is signalled only before the leader is reaped: exit
//! is observed with `waitid(WNOWAIT)`, which leaves the zombie in place.
//! A descendant that calls `setsid` (or double-forks into a session of its
//! own) leaves the group; it still carries the turn's environment marker,
//! which it inherited, so every kill ends with a sweep of the processes
//! carrying it, repeated until none is left (README "How a turn runs the
//! agent").

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::agent::user::AgentUser;
use crate::capture::Captured;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

/// Longest stdout line read into memory; longer lines are skipped whole.
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// Stderr kept for the error message; the rest is read and dropped.
pub const STDERR_CAP: usize = 64 * 1024;
/// How long to wait for output still in the pipes once the group is dead
/// (bounded in case a descendant that escaped the group holds them open).
pub const DRAIN: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Clone)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// Written to the agent's stdin, which is then closed.
    pub stdin: Option<Vec<u8>>,
    /// `KEY=value` added to the agent's environment (inherited by its children).
    pub marker: String,
    /// Run as this user rather than the server's.
    pub user: Option<AgentUser>,
    /// More of the agent's environment: its turn's hook secret (never
    /// printed: see the `Debug` below).
    pub env: Vec<(String, String)>,
}

/// The environment's values are left out: they hold the hook's secret.
impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("cwd", &self.cwd)
            .field("stdin", &self.stdin.as_ref().map(Vec::len))
            .field("marker", &self.marker)
            .field("user", &self.user)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

/// A running agent process group.
pub struct AgentProcess {
    child: Child,
    pgid: Pid,
    /// The agent's output, line by line.
    pub stdout: LineReader<ChildStdout>,
    /// Resolves once the leader has exited (still unreaped).
    pub exit: ExitWatch,
    /// Stderr read so far; shared with its reader so that what was read is
    /// kept even if the reader never sees the end of the pipe.
    stderr: Arc<Mutex<Captured>>,
    stderr_reader: Option<AbortOnDropHandle<()>>,
    _stdin: Option<AbortOnDropHandle<()>>,
    /// Set once the leader is reaped; until then its group id is ours.
    reaped: bool,
    /// The turn's `KEY=value` environment marker.
    marker: String,
}

/// Watches for the leader's exit without reaping it.
pub struct ExitWatch(Option<JoinHandle<()>>);

impl ExitWatch {
    /// Resolves once the leader has exited. Cancel-safe.
    pub async fn wait(&mut self) {
        if let Some(handle) = &mut self.0 {
            let _ = handle.await;
            self.0 = None;
        }
    }

    fn seen(&self) -> bool {
        self.0.is_none()
    }
}

impl AgentProcess {
    pub fn spawn(spec: &Spec) -> io::Result<Self> {
        let mut command = Command::new(&spec.program);
        // The server's settings, its bearer token among them, are none of
        // the agent's business.
        for (key, _) in std::env::vars_os() {
            if key == "API_BEARER_TOKEN" || key.to_string_lossy().starts_with("BREAKGLASS_") {
                command.env_remove(key);
            }
        }
        if let Some(user) = &spec.user {
            // As root, setting a uid also drops the supplementary groups.
            command
                .uid(user.uid)
                .gid(user.gid)
                .env("HOME", &user.home)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name);
        }
        command
            .args(&spec.args)
            .current_dir(&spec.cwd)
            .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(spec.marker.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .envs(spec.env.iter().cloned())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let pid = child.id().ok_or_else(|| io::Error::other("the agent exited before it could be watched"))?;
        let pid = Pid::from_raw(i32::try_from(pid).map_err(io::Error::other)?);
        let stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let captured = Arc::new(Mutex::new(Captured::default()));
        let stderr = child.stderr.take().ok_or_else(|| io::Error::other("no stderr pipe"))?;
        let stdin = match (child.stdin.take(), spec.stdin.clone()) {
            (Some(mut pipe), Some(bytes)) => Some(AbortOnDropHandle::new(tokio::spawn(async move {
                // The agent may exit without reading it all: a broken pipe is its business.
                let _ = pipe.write_all(&bytes).await;
                let _ = pipe.shutdown().await;
            }))),
            _ => None,
        };
        Ok(AgentProcess {
            child,
            pgid: pid,
            stdout: LineReader::new(stdout, MAX_LINE),
            stderr_reader: Some(AbortOnDropHandle::new(tokio::spawn(read_stderr(stderr, captured.clone())))),
            stderr: captured,
            reaped: false,
            marker: spec.marker.clone(),
            _stdin: stdin,
            exit: ExitWatch(Some(tokio::task::spawn_blocking(move || wait_for_exit(pid)))),
        })
    }

    /// The process group id, which is also the leader's pid.
    pub fn pgid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Kills whatever is left of the group. `grace` > 0 asks politely first
    /// (SIGTERM to the group) and waits that long for the leader before
    /// SIGKILL. The leader is not reaped yet, so its group id cannot have been
    /// reused by another process.
    /// Then kills every process that carries the turn's marker, in the
    /// group or not.
    pub async fn kill_group(&mut self, grace: Duration) {
        if !grace.is_zero() && !self.exit.seen() {
            self.signal(Signal::SIGTERM);
            let marker = self.marker.clone();
            let _ = tokio::task::spawn_blocking(move || signal_marked(&marker, Signal::SIGTERM)).await;
            let _ = tokio::time::timeout(grace, self.exit.wait()).await;
        }
        self.signal(Signal::SIGKILL);
        let marker = self.marker.clone();
        let killed = tokio::task::spawn_blocking(move || kill_marked(&marker)).await.unwrap_or(0);
        if killed > 0 {
            tracing::info!(pgid = self.pgid.as_raw(), killed, "killed processes of the turn outside its group");
        }
    }

    /// Reaps the leader (after [`kill_group`](Self::kill_group)) and returns
    /// its status with the captured stderr.
    pub async fn reap(mut self) -> Finished {
        let status = self.child.wait().await;
        self.reaped = true;
        if let Some(reader) = self.stderr_reader.take() {
            let _ = tokio::time::timeout(DRAIN, reader).await;
        }
        let stderr = std::mem::take(&mut self.stderr.lock().unwrap_or_else(|p| p.into_inner()).kept);
        Finished { status, stderr }
    }

    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(err) => {
                tracing::warn!(pgid = self.pgid.as_raw(), %err, ?signal, "could not signal the agent's process group")
            }
        }
    }
}

/// A turn dropped mid-way (its task aborted at shutdown) still takes its
/// whole group with it, while the group id is still ours.
impl Drop for AgentProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(Signal::SIGKILL);
            // The sweep reads /proc: off the async threads when there are any.
            let marker = std::mem::take(&mut self.marker);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || kill_marked(&marker))),
                Err(_) => {
                    kill_marked(&marker);
                }
            }
        }
    }
}

async fn read_stderr(mut pipe: ChildStderr, into: Arc<Mutex<Captured>>) {
    let mut chunk = vec![0u8; 8192];
    while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
        into.lock().unwrap_or_else(|p| p.into_inner()).keep(&chunk[..n], STDERR_CAP);
    }
}

/// Kills, with SIGKILL, what a turn left running when the server died: its
/// whole process group, if a member of it still carries the turn's `marker`
/// (`KEY=value`, in its environment; a group id reused by someone else's
/// processes carries none), and every process elsewhere that carries the
/// marker (one that left the group). Returns how many processes were found.
pub fn kill_leftovers(pgid: Option<i32>, marker: &str) -> usize {
    let mut killed = 0;
    if let Some(pgid) = pgid
        && marked(marker).iter().any(|(_, group)| *group == Some(pgid))
    {
        killed += processes().iter().filter(|(_, group)| *group == Some(pgid)).count();
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    killed + kill_marked(marker)
}

/// Most sweeps before giving up on a process that keeps forking.
const SWEEPS: usize = 100;

/// SIGKILLs every process carrying `marker`, sweeping again until a sweep
/// finds none: a child forked between two sweeps inherits the marker and is
/// found by the next one; a killed process forks no more. Returns how many
/// were killed.
pub fn kill_marked(marker: &str) -> usize {
    let mut killed = 0;
    for _ in 0..SWEEPS {
        let found = signal_marked(marker, Signal::SIGKILL);
        if found == 0 {
            return killed;
        }
        killed += found;
    }
    tracing::error!(marker, killed, "processes of a turn kept appearing; gave up killing them");
    killed
}

/// Sends `signal` to every process carrying `marker`; returns how many.
fn signal_marked(marker: &str, signal: Signal) -> usize {
    let found = marked(marker);
    for (pid, _) in &found {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), signal);
    }
    found.len()
}

/// Processes (not this one, not zombies) carrying `marker`, with their groups.
fn marked(marker: &str) -> Vec<(i32, Option<i32>)> {
    let me = std::process::id() as i32;
    processes().into_iter().filter(|(pid, _)| *pid != me && carries(*pid, marker)).collect()
}

/// Every process with its process group, from /proc.
fn processes() -> Vec<(i32, Option<i32>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .map(|pid| {
            let group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat.rsplit_once(") ")?.1.split_whitespace().nth(2)?.parse().ok());
            (pid, group)
        })
        .collect()
}

fn carries(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
}

/// How the leader ended, and what it said on stderr.
#[derive(Debug)]
pub struct Finished {
    pub status: io::Result<ExitStatus>,
    pub stderr: Vec<u8>,
}

/// Blocks until the child has exited, leaving it unreaped.
fn wait_for_exit(pid: Pid) {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(nix::errno::Errno::EINTR) => continue,
            // ECHILD: already reaped, which only `reap` does, after this.
            _ => return,
        }
    }
}

/// One line of output.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line without its newline (the last line may have had none).
    Complete(Vec<u8>),
    /// A line longer than the cap, skipped without being kept; `len` is its length.
    TooLong { len: usize },
}

/// Splits a byte stream into lines without ever holding more than `max`
/// bytes of one line.
pub struct LineReader<R> {
    inner: BufReader<R>,
    max: usize,
    line: Vec<u8>,
    /// Bytes of an over-long line seen so far, while skipping to its end.
    skipping: Option<usize>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(reader: R, max: usize) -> Self {
        // As much as a pipe holds (Linux's default): a flooding agent's
        // lines come in with one read per pipeful.
        LineReader { inner: BufReader::with_capacity(64 * 1024, reader), max, line: Vec::new(), skipping: None }
    }

    /// The next line if the bytes already read hold its end; never reads,
    /// so it needs no waiting: the lines that came in with one read are
    /// taken one after the other without going back to the runtime.
    pub fn buffered_line(&mut self) -> Option<Line> {
        let available = self.inner.buffer();
        let end = memchr::memchr(b'\n', available)?;
        let line = Self::take(&mut self.line, &mut self.skipping, self.max, &available[..end], true);
        self.inner.consume(end + 1);
        line
    }

    /// Cancel-safe: all state lives in `self` between awaits.
    pub async fn next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                return Ok(match self.skipping.take() {
                    Some(len) => Some(Line::TooLong { len }),
                    None if self.line.is_empty() => None,
                    None => Some(Line::Complete(std::mem::take(&mut self.line))),
                });
            }
            let (piece, consumed, ends) = match memchr::memchr(b'\n', available) {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            let line = Self::take(&mut self.line, &mut self.skipping, self.max, piece, ends);
            self.inner.consume(consumed);
            if line.is_some() {
                return Ok(line);
            }
        }
    }

    /// Adds `piece` to the line being read (or to the length of the one
    /// being skipped) and gives the line if `piece` ends it.
    fn take(line: &mut Vec<u8>, skipping: &mut Option<usize>, max: usize, piece: &[u8], ends: bool) -> Option<Line> {
        match *skipping {
            Some(len) => *skipping = Some(len + piece.len()),
            None if line.len() + piece.len() > max => {
                *skipping = Some(line.len() + piece.len());
                *line = Vec::new();
            }
            None => line.extend_from_slice(piece),
        }
        if !ends {
            return None;
        }
        Some(match skipping.take() {
            Some(len) => Line::TooLong { len },
            None => Line::Complete(std::mem::take(line)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }

    fn complete(s: &str) -> Line {
        Line::Complete(s.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_an_unterminated_last_line() {
        assert_eq!(lines(b"a\n\nbc\nd", 10).await, vec![complete("a"), complete(""), complete("bc"), complete("d")]);
        assert_eq!(lines(b"", 10).await, vec![]);
    }

    #[tokio::test]
    async fn skips_an_over_long_line_whole_and_goes_on() {
        let mut input = b"ok\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend_from_slice(b"\nafter\n");
        assert_eq!(lines(&input, 1000).await, vec![complete("ok"), Line::TooLong { len: 100_000 }, complete("after")]);
    }

    #[tokio::test]
    async fn an_over_long_last_line_is_reported_too() {
        assert_eq!(lines(&[b'y'; 50], 10).await, vec![Line::TooLong { len: 50 }]);
    }

    /// Lines already read in are given without a read; a line whose end
    /// has not been read yet is left for `next_line`, and so is what follows
    /// an over-long line.
    #[tokio::test]
    async fn buffered_lines_are_given_without_reading_and_keep_the_order() {
        let mut input = b"a\nbc\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 30));
        input.extend_from_slice(b"\nd\npartial");
        let mut reader = LineReader::new(&input[..], 10);
        assert_eq!(reader.buffered_line(), None, "nothing read yet");
        assert_eq!(reader.next_line().await.unwrap(), Some(complete("a")));
        assert_eq!(reader.buffered_line(), Some(complete("bc")));
        assert_eq!(reader.buffered_line(), Some(Line::TooLong { len: 30 }));
        assert_eq!(reader.buffered_line(), Some(complete("d")));
        assert_eq!(reader.buffered_line(), None, "no newline after it");
        assert_eq!(reader.next_line().await.unwrap(), Some(complete("partial")));
        assert_eq!(reader.next_line().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_line_exactly_at_the_cap_is_kept() {
        assert_eq!(lines(b"0123456789\n", 10).await, vec![complete("0123456789")]);
    }
}
