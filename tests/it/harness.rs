//! Starting the real binary, talking to it, and reading its attach streams.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

pub const TOKEN: &str = "test-token-0123456789";
/// The kinds of the events of one turn replaying the `basic` transcript.
pub const BASIC: [&str; 8] = ["user", "session", "text", "tool", "tool_result", "text", "result", "turn_end"];
/// Upper bound for anything a test waits for; never a sleep.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The unprivileged user the tests run agents as (README "Security").
pub const AGENT_USER: &str = "breakglass-agent-test";
pub const AGENT_HOME: &str = "/var/lib/breakglass-agent-test";

/// Held by every test that runs something as the agent user: a server
/// sweeps every process of that user when its last turn ends (one server
/// per agent user is the deployment), so such tests take turns.
pub static AGENT_USER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test agent user (created once, as an installation would), with its
/// uid and gid.
pub fn agent_user() -> (u32, u32) {
    static USER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *USER.get_or_init(|| {
        let exists = Command::new("id").arg("-u").arg(AGENT_USER).output().unwrap().status.success();
        if !exists {
            let made = Command::new("useradd")
                .args(["--system", "--create-home", "--home-dir", AGENT_HOME, "--shell", "/usr/sbin/nologin"])
                .arg(AGENT_USER)
                .output()
                .unwrap();
            assert!(made.status.success(), "useradd: {}", String::from_utf8_lossy(&made.stderr));
        }
        let user = nix::unistd::User::from_name(AGENT_USER).unwrap().unwrap();
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        // As README "Running separated" deploys it: the home is root's
        // (the agent must not write what ssh and its shell read there), its
        // `.claude` the user's, for the CLI's state. What `useradd` copied
        // from /etc/skel, or an older run left, goes.
        let home = std::path::Path::new(AGENT_HOME);
        std::os::unix::fs::chown(home, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(home).unwrap().flatten() {
            if entry.file_name() != ".claude" {
                let path = entry.path();
                let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                gone.unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
            }
        }
        agent_state_dir(uid, gid);
        (uid, gid)
    })
}

/// The agent user's `~/.claude`, where the CLI keeps its state: its own.
pub fn agent_state_dir(uid: u32, gid: u32) {
    let state = std::path::Path::new(AGENT_HOME).join(".claude");
    if !state.exists() {
        std::fs::create_dir(&state).unwrap();
    }
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
}

/// The pinned Claude Code CLI that scripts/test installs.
pub fn real_cli() -> PathBuf {
    let cli = repo().join(".cache/claude-cli/node_modules/.bin/claude");
    assert!(cli.exists(), "{} is missing: run scripts/test, which installs it", cli.display());
    cli
}

/// The pinned CLI where the agent user can run it: the checkout may sit
/// in a directory only root can enter, so it is linked (or copied, across
/// file systems) into a directory of its own under the temporary directory,
/// once per test run. The CLI is one self-contained executable.
pub fn real_cli_for_agent_user() -> PathBuf {
    static PLACED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PLACED
        .get_or_init(|| {
            use std::os::unix::fs::PermissionsExt;
            let source = std::fs::canonicalize(real_cli()).expect("the CLI's executable");
            let dir = std::env::temp_dir().join("breakglass-test-cli");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            // Placed under a name of its own, then renamed over the last
            // one: a run still using that one keeps it whole.
            let fresh = dir.join(format!("claude.{}", std::process::id()));
            let _ = std::fs::remove_file(&fresh);
            if std::fs::hard_link(&source, &fresh).is_err() {
                std::fs::copy(&source, &fresh).expect("copy the CLI");
            }
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
            let placed = dir.join("claude");
            std::fs::rename(&fresh, &placed).unwrap();
            placed
        })
        .clone()
}

/// A running `breakglass serve`, killed and reaped on drop.
pub struct Server {
    child: Option<Child>,
    /// The read end of an unread stderr pipe, held open (see `Options::stderr_unread`).
    _stderr: Option<std::process::ChildStderr>,
    /// Every line the server printed on stdout, so far.
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    options: Options,
}

#[derive(Default, Clone)]
pub struct Options {
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// Leave out the bearer token.
    pub no_token: bool,
    /// A program (and its arguments) that runs the server, such as
    /// `prlimit --nofile=256:256 --`.
    pub wrapper: Vec<String>,
    /// Send the server's stderr into a pipe nobody reads.
    pub stderr_unread: bool,
}

impl Options {
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn no_token(mut self) -> Self {
        self.no_token = true;
        self
    }

    pub fn wrapper(mut self, command: &[&str]) -> Self {
        self.wrapper = command.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn stderr_unread(mut self) -> Self {
        self.stderr_unread = true;
        self
    }

    pub fn start(self) -> Server {
        self.start_in(tempfile::tempdir().expect("temp dir"))
    }

    /// Starts on a directory the test has prepared (its `data` inside).
    pub fn start_in(self, dir: tempfile::TempDir) -> Server {
        let (mut child, base, stdout) = spawn_capturing(dir.path(), &self).unwrap_or_else(|log| panic!("{log}"));
        let stderr = child.stderr.take();
        Server { child: Some(child), _stderr: stderr, stdout, base, dir, client: reqwest::Client::new(), options: self }
    }
}

/// Starts the binary on `dir` (its data, log and agent records live there)
/// and returns it with its base URL, or its log if it did not come up.
pub fn spawn(dir: &std::path::Path, options: &Options) -> Result<(Child, String), String> {
    spawn_capturing(dir, options).map(|(child, base, _)| (child, base))
}

type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// The server binary the tests start: the one cargo built, or
/// `BREAKGLASS_SERVER_BIN` when set (the load harness compares two builds
/// with it; docs/PERFORMANCE.md).
pub fn server_binary() -> std::path::PathBuf {
    std::env::var_os("BREAKGLASS_SERVER_BIN").map_or_else(|| env!("CARGO_BIN_EXE_breakglass").into(), Into::into)
}

fn spawn_capturing(dir: &std::path::Path, options: &Options) -> Result<(Child, String, Lines), String> {
    let path = format!("{}:{}", repo().join("tests/fake-bin").display(), std::env::var("PATH").unwrap_or_default());
    let log_path = dir.join("server.log");
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("log file");
    let mut command = match options.wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(server_binary());
            command
        }
        None => Command::new(server_binary()),
    };
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(&options.args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .env("RUST_LOG", "info,breakglass=debug")
        .env("FAKE_CLAUDE_RECORD", dir.join("argv.jsonl"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if options.stderr_unread { Stdio::piped() } else { Stdio::from(log_file) });
    if !options.no_token {
        command.env("API_BEARER_TOKEN", TOKEN);
    }
    for (k, v) in &options.env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start breakglass");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let lines = Lines::default();
    let kept = lines.clone();
    std::thread::spawn(move || {
        // Keep reading after the address is found, so the server's later
        // lines have somewhere to go.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            kept.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    loop {
        let Ok(line) = rx.recv_timeout(DEADLINE) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("breakglass did not say where it listens; its log:\n{log}"));
        };
        if let Some(url) = line.strip_prefix("breakglass listening on ") {
            return Ok((child, url.to_owned(), lines));
        }
    }
}

impl Server {
    pub fn start() -> Server {
        Options::default().start()
    }

    pub fn options() -> Options {
        Options::default()
    }

    /// Kills the server with SIGKILL (no drain at all) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the binary again on the same data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        let (mut child, base, stdout) =
            spawn_capturing(self.dir.path(), &self.options).unwrap_or_else(|log| panic!("{log}"));
        self._stderr = child.stderr.take();
        self.child = Some(child);
        self.base = base;
        self.stdout = stdout;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's pid (the benchmarks read its memory).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir().join("breakglass.db")
    }

    /// SQLite's `PRAGMA integrity_check` on the database, opened read-only: "ok".
    pub fn integrity_check(&self) -> String {
        let conn = rusqlite::Connection::open_with_flags(self.db_path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the database");
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check")
    }

    /// Live processes started by this server's agents, however far down:
    /// every one inherits the fake agent's `FAKE_CLAUDE_RECORD` (the server
    /// itself carries it too, and is left out).
    pub fn agent_processes(&self) -> Vec<u32> {
        let marker = format!("FAKE_CLAUDE_RECORD={}", self.dir.path().join("argv.jsonl").display());
        let server = self.child.as_ref().map(Child::id);
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| Some(*pid) != server && alive(*pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
            })
            .collect()
    }

    /// Every run of the fake agent so far: {argv, cwd, stdin, prompt, pid}.
    pub fn agent_runs(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("argv.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("record line"))
            .collect()
    }

    /// The pids of a session's turns: each run of the fake agent in its
    /// workspace, and each grandchild it announced in `events`.
    pub fn turn_pids(&self, session: &str, events: &[Value]) -> Vec<u32> {
        self.agent_runs()
            .iter()
            .filter(|r| r["cwd"].as_str().is_some_and(|c| c.ends_with(session)))
            .map(|r| r["pid"].as_u64().expect("pid") as u32)
            .chain(events.iter().filter_map(|e| e["text"].as_str()?.strip_prefix("grandchild ")?.parse().ok()))
            .collect()
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(TOKEN)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(TOKEN)
    }

    pub async fn open_session(&self) -> String {
        let response = self.post("/api/session").send().await.expect("POST /api/session");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        body["session_id"].as_str().expect("session_id").to_owned()
    }

    pub async fn prompt(&self, session: &str, prompt: &str) -> reqwest::Response {
        self.post(&format!("/api/session/{session}/prompt"))
            .json(&serde_json::json!({ "prompt": prompt }))
            .send()
            .await
            .expect("POST prompt")
    }

    /// Sends a prompt that must be accepted.
    pub async fn start_turn(&self, session: &str, prompt: &str) {
        let response = self.prompt(session, prompt).await;
        let status = response.status();
        assert_eq!(status, 200, "prompt refused: {}", response.text().await.unwrap_or_default());
    }

    pub async fn attach(&self, session: &str, last_event_id: Option<&str>) -> Attached {
        let mut request = self.get(&format!("/api/session/{session}/stream"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("attach");
        assert_eq!(response.status(), 200, "attach refused");
        Attached::new(response)
    }

    /// Opens a session and attaches to it, past its (empty) backlog.
    pub async fn attached(&self) -> (String, Attached) {
        let session = self.open_session().await;
        let mut stream = self.attach(&session, None).await;
        stream.until_caught_up().await;
        (session, stream)
    }

    /// `POST /api/session/{id}/approvals/{tool_use_id}` (README "Approvals"): status and body.
    pub async fn decide(&self, session: &str, tool_use_id: &str, body: Value) -> (u16, Value) {
        let response = self
            .post(&format!("/api/session/{session}/approvals/{tool_use_id}"))
            .json(&body)
            .send()
            .await
            .expect("POST decision");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `POST /api/session/{id}/cancel`, and its answer.
    pub async fn cancel(&self, session: &str) -> Value {
        let response = self.post(&format!("/api/session/{session}/cancel")).send().await.expect("POST cancel");
        assert_eq!(response.status(), 200);
        response.json().await.expect("json")
    }

    /// Attaches, runs one turn, and returns its events (`user` to `turn_end`).
    pub async fn run_turn(&self, session: &str, prompt: &str) -> Vec<Value> {
        let mut stream = self.attach(session, None).await;
        stream.until_caught_up().await;
        self.start_turn(session, prompt).await;
        stream.until_turn_end().await
    }

    /// SIGTERM, and the exit status once it has drained.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.terminate_within(DEADLINE)
    }

    /// SIGTERM, and the exit status, waiting at most `within`.
    pub fn terminate_within(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        wait_child(&mut child, within).expect("breakglass did not exit after SIGTERM")
    }

    /// SIGTERM without waiting for the exit; `wait` reaps it later.
    pub fn send_sigterm(&self) {
        signal(self.child.as_ref().expect("running").id(), nix::sys::signal::Signal::SIGTERM);
    }

    /// Waits at most `within` for the server to exit, and reaps it.
    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let status = wait_child(self.child.as_mut().expect("running"), within)?;
        self.child = None;
        Some(status)
    }

    /// A client that opens a connection per request and keeps none open
    /// afterwards, so the server is left with no connection at all.
    pub fn one_shot_client() -> reqwest::Client {
        reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client")
    }

    /// The server's CPU time so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        let fields: Vec<&str> = stat.rsplit_once(") ").expect("stat format").1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    /// Descriptors the server has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

pub fn wait_child(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `check` until it holds or the deadline passes.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` (synchronously) until it holds or the deadline passes.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True while a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// One frame of an attach stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Event {
        id: u64,
        data: Value,
    },
    /// An event the log could not keep, sent without an id.
    Notice(Value),
    /// New characters of a text block (`event: delta`), without an id.
    Delta(Value),
    CaughtUp,
    Keepalive,
}

/// An attach stream, read frame by frame.
pub struct Attached {
    pub headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
    pub raw: Vec<u8>,
}

impl Attached {
    pub fn new(response: reqwest::Response) -> Self {
        Attached {
            headers: response.headers().clone(),
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// The next frame, `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = find(&self.buffer, b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Some(parse_frame(&block[..end]));
            }
            let chunk = tokio::time::timeout(DEADLINE, self.body.next()).await.expect("attach stream went silent")?;
            let chunk = chunk.expect("the attach stream broke instead of ending");
            self.raw.extend_from_slice(&chunk);
            self.buffer.extend_from_slice(&chunk);
        }
    }

    /// Events up to the `caught-up` frame.
    pub async fn until_caught_up(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            match self.next().await.expect("stream ended before caught-up") {
                Frame::Event { data, .. } => events.push(data),
                Frame::CaughtUp => return events,
                Frame::Notice(_) | Frame::Delta(_) | Frame::Keepalive => {}
            }
        }
    }

    /// Events up to and including the next one of `kind`.
    pub async fn until_kind(&mut self, kind: &str) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            if let Frame::Event { data, .. } = self.next().await.expect("stream ended") {
                let done = data["kind"] == kind;
                events.push(data);
                if done {
                    return events;
                }
            }
        }
    }

    /// Events up to and including the next `turn_end`.
    pub async fn until_turn_end(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            match self.next().await.expect("stream ended before turn_end") {
                Frame::Event { data, .. } => {
                    let end = data["kind"] == "turn_end";
                    events.push(data);
                    if end {
                        return events;
                    }
                }
                Frame::Notice(_) | Frame::Delta(_) | Frame::CaughtUp | Frame::Keepalive => {}
            }
        }
    }
}

impl Attached {
    /// Reads what is left of the stream into `raw` until the server ends or
    /// breaks it, as a killed server does: what reached the client.
    pub async fn read_until_broken(&mut self) {
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout(DEADLINE, self.body.next()).await {
            self.raw.extend_from_slice(&chunk);
            self.buffer.extend_from_slice(&chunk);
        }
    }
}

/// The events in an attach stream's bytes as sent: each whole `id:`/`data:`
/// frame's id and its data JSON, byte for byte. A frame cut short is left out.
pub fn event_frames(raw: &[u8]) -> Vec<(u64, String)> {
    let text = String::from_utf8_lossy(raw);
    let mut blocks: Vec<&str> = text.split("\n\n").collect();
    blocks.pop(); // what follows the last blank line: empty, or a frame cut short
    blocks
        .into_iter()
        .filter_map(|block| {
            let (id, data) = block.strip_prefix("id: ")?.split_once("\ndata: ")?;
            Some((id.parse().expect("numeric id"), data.to_owned()))
        })
        .collect()
}

/// A flood's lines in a log are 0, 1, 2, … with none missing in between:
/// ids alone cannot show a hole, since the store numbers what it keeps.
pub fn assert_flood_unbroken(log: &[Value]) {
    let numbers: Vec<u64> = log.iter().filter_map(|e| e["text"].as_str()?.split_once(' ')?.0.parse().ok()).collect();
    assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>(), "the flood has a hole");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_frame(block: &[u8]) -> Frame {
    let text = std::str::from_utf8(block).expect("frames are UTF-8");
    if text == ": keepalive\nevent: keepalive\ndata: {}" {
        return Frame::Keepalive;
    }
    if text == "event: caught-up\ndata: {}" {
        return Frame::CaughtUp;
    }
    if let Some(data) = text.strip_prefix("event: delta\ndata: ") {
        return Frame::Delta(serde_json::from_str(data).expect("delta JSON"));
    }
    if let Some(data) = text.strip_prefix("data: ") {
        return Frame::Notice(serde_json::from_str(data).expect("notice JSON"));
    }
    let (id_line, data_line) = text.split_once('\n').unwrap_or_else(|| panic!("odd frame {text:?}"));
    let id = id_line.strip_prefix("id: ").expect("id field").parse().expect("numeric id");
    let data: Value = serde_json::from_str(data_line.strip_prefix("data: ").expect("data field")).expect("data JSON");
    assert_eq!(data["id"], id, "id field and JSON id agree");
    Frame::Event { id, data }
}

/// The kinds of a list of events, for compact assertions.
pub fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap_or("?")).collect()
}

/// The ids of a list of events.
pub fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["id"].as_u64().expect("id")).collect()
}

/// Makes an ed25519 key pair `<dir>/<name>` (and `.pub`) with ssh-keygen.
pub fn ssh_keygen(dir: &std::path::Path, name: &str) {
    let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(name)).status();
    assert!(made.is_ok_and(|s| s.success()), "ssh-keygen (scripts/test installs openssh-server and openssh-client)");
}

/// A real sshd on loopback, in the foreground, logging to `<dir>/sshd.log`:
/// public keys only, no PAM, and `extra` config lines after these.
pub fn spawn_sshd(dir: &std::path::Path, port: u16, host_key: &std::path::Path, extra: &str) -> Child {
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nLogLevel VERBOSE\n{extra}",
            host_key.display(),
            dir.join("authorized_keys").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap(); // sshd's privilege-separation directory
    Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("start sshd")
}

/// A real ssh-agent listening on `socket`, in the foreground.
pub fn spawn_ssh_agent(socket: &std::path::Path) -> Child {
    Command::new("ssh-agent").arg("-D").arg("-a").arg(socket).stdout(Stdio::null()).spawn().expect("start ssh-agent")
}

/// Starts the binary with `args` and `env` on a fresh data directory,
/// expects it to refuse to start (exit 1, within the deadline, killed
/// otherwise) and returns what it said on stderr.
pub fn refused_at_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .env("BREAKGLASS_DATA_DIR", dir.path().join("data"))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start breakglass");
    let status = wait_child(&mut child, DEADLINE);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{args:?} {env:?} was not refused at start: {said}");
    said
}

/// An axum app on a loopback port, served from a thread of its own (so a
/// test thread that blocks does not stall it); stopped on drop, which ends
/// every connection, a stalled stream included.
pub struct Background {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn serve(app: axum::Router) -> Background {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
        });
        Background { base_url, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
