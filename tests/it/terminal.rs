//! The terminal client (README "The terminal client"), driven as a person
//! would: `breakglass attach` runs in a real terminal (`tmux`, on a socket
//! of each test's own), keys are typed with `send-keys` and the screen is
//! read with `capture-pane`, against the real server with the fake agent.
//! `sessions` and `verb` are run as a script would, for their output and
//! exit status.

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde_json::Value;

use crate::harness::{DEADLINE, Server, TOKEN, kinds, server_binary};
use crate::pve::{Pve, Sshd, free_port};
use crate::targets::{serve, ssh_target, targets_file};

/// `breakglass attach` in a detached tmux session, 120×40; the tmux server
/// (and so the client) is killed on drop.
struct Terminal {
    socket: String,
}

impl Terminal {
    /// Starts `breakglass attach <args>` against `base`.
    fn attach(base: &str, args: &[&str]) -> Terminal {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let socket = format!("breakglass-it-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let terminal = Terminal { socket };
        let mut command = vec![
            "-f".to_owned(),
            "/dev/null".to_owned(),
            "new-session".to_owned(),
            "-d".to_owned(),
            "-x".to_owned(),
            "120".to_owned(),
            "-y".to_owned(),
            "40".to_owned(),
            "-e".to_owned(),
            format!("API_BEARER_TOKEN={TOKEN}"),
            "-e".to_owned(),
            format!("BREAKGLASS_URL={base}"),
            // The client's exit status is printed by the shell that ran it:
            // tmux's own `pane_dead_status` is sometimes never filled in
            // (the pane is dead when the terminal closes, the status comes
            // when the child is reaped). `trap : INT` keeps the shell past a
            // Ctrl-C, and a trapped signal is the default again in the client.
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            r#"trap : INT; "$@"; echo "[exit status $?]""#.to_owned(),
            "sh".to_owned(),
            server_binary().display().to_string(),
            "attach".to_owned(),
        ];
        command.extend(args.iter().map(|a| a.to_string()));
        // The pane stays when the client exits, so its exit status can be read.
        command.extend([";", "set-option", "remain-on-exit", "on"].map(str::to_owned));
        let started = terminal.tmux(&command);
        assert!(
            started.status.success(),
            "tmux (scripts/test installs it): {}",
            String::from_utf8_lossy(&started.stderr)
        );
        terminal
    }

    fn tmux(&self, args: &[String]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("run tmux")
    }

    fn tmux_str(&self, args: &[&str]) -> String {
        let output = self.tmux(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Types `text` and Enter.
    fn type_line(&self, text: &str) {
        self.tmux_str(&["send-keys", "-l", text]);
        self.tmux_str(&["send-keys", "Enter"]);
    }

    /// Presses keys by tmux's names (`C-c`, `C-d`).
    fn keys(&self, keys: &str) {
        self.tmux_str(&["send-keys", keys]);
    }

    /// The whole screen with its scrollback, wrapped lines joined.
    fn screen(&self) -> String {
        self.tmux_str(&["capture-pane", "-p", "-J", "-S", "-"])
    }

    /// Polls the screen until `check` holds; the screen then.
    fn until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}; the screen:\n{screen}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn until_shows(&self, text: &str) -> String {
        self.until(&format!("{text:?} on the screen"), |screen| screen.contains(text))
    }

    /// The client's exit status once it has exited, as the shell that ran
    /// it printed it.
    fn exit_status(&self) -> Option<i32> {
        let screen = self.screen();
        let line = screen.lines().rev().find_map(|line| line.trim().strip_prefix("[exit status "))?;
        line.strip_suffix(']')?.parse().ok()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server".to_owned()]);
    }
}

fn count(screen: &str, text: &str) -> usize {
    screen.matches(text).count()
}

/// Lines of the screen, without the padding on their right.
fn lines(screen: &str) -> Vec<&str> {
    screen.lines().map(str::trim_end).collect()
}

async fn session_json(server: &Server, session: &str) -> Value {
    server.get(&format!("/api/session/{session}")).send().await.unwrap().json().await.unwrap()
}

/// Waits until the session's turn has ended (its `turn_end` follows the result).
async fn turn_ended(server: &Server, session: &str) {
    let start = Instant::now();
    while session_json(server, session).await["running"] != false {
        assert!(start.elapsed() < DEADLINE, "the turn did not end");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn attach_takes_the_newest_session_and_a_typed_prompt_streams_live_then_shows_each_line_once() {
    let server = Server::start();
    let older = server.open_session().await;
    let newest = server.open_session().await;
    let terminal = Terminal::attach(&server.base, &[]);
    let screen = terminal.until_shows("breakglass> ");
    assert!(screen.contains(&format!("attached to session {newest}:")), "{screen}");
    assert!(!screen.contains(&older));

    terminal.type_line("stream 0.25 alpha beta gamma delta epsilon");
    // Live: part of the text is on the screen before the rest is written.
    terminal.until("a live line", |s| lines(s).iter().any(|l| l.starts_with("alpha beta") && !l.ends_with("epsilon")));
    let screen = terminal.until("the whole text", |s| lines(s).contains(&"alpha beta gamma delta epsilon"));
    assert_eq!(count(&screen, "alpha"), 2, "the typed line and the text, once: {screen}");
    turn_ended(&server, &newest).await;

    terminal.type_line("replay partial");
    let screen = terminal.until_shows("✓ done · 2.1 s · 2 turns · $0.0021");
    let shown = lines(&screen);
    let call = shown.iter().position(|l| *l == "  ▸ Bash: ssh devvm uptime").expect("the tool call");
    assert_eq!(shown[call + 1], "    ⎿ up 3 days, load average: 0.10", "its output folded under it");
    assert_eq!(count(&screen, "Checking devvm's load."), 1, "deltas and their text, once: {screen}");
    assert_eq!(count(&screen, "devvm is fine."), 1, "{screen}");
    assert!(!screen.contains("(late)"), "a delta after its text is stale: {screen}");
    let events: Vec<Value> = server.attach(&newest, None).await.until_caught_up().await;
    assert_eq!(kinds(&events).iter().filter(|k| **k == "user").count(), 2, "both prompts went to the newest session");
}

#[tokio::test]
async fn a_line_typed_while_text_streams_leaves_the_text_whole_and_once() {
    let server = Server::start();
    let session = server.open_session().await;
    let terminal = Terminal::attach(&server.base, &[]);
    terminal.until_shows("breakglass> ");
    server.start_turn(&session, "stream 0.3 alpha beta gamma delta epsilon").await;
    terminal.until("a live line", |s| lines(s).iter().any(|l| l.starts_with("alpha beta") && !l.ends_with("epsilon")));
    terminal.type_line("/frob");
    let screen = terminal.until_shows("! agent ended without a result");
    let shown: String =
        lines(&screen).iter().filter(|l| !l.starts_with("bearer> ")).map(|l| format!("{l}\n")).collect();
    for word in ["alpha", "beta", "gamma", "delta", "epsilon"] {
        assert_eq!(count(&shown, word), 1, "{word:?} once, besides the prompt: {screen}");
    }
    assert!(screen.contains("breakglass> /frob"), "the typed line was not written over: {screen}");
    assert!(screen.contains("unknown command /frob"), "{screen}");
}

#[tokio::test]
async fn attach_session_replays_that_session_and_attach_new_opens_one() {
    let server = Server::start();
    let first = server.open_session().await;
    server.run_turn(&first, "hello").await;
    let _later = server.open_session().await;

    let terminal = Terminal::attach(&server.base, &["--session", &first]);
    let screen = terminal.until_shows("✓ done · 8.1 s · 2 turns · $0.0213");
    assert!(screen.contains(&format!("attached to session {first}:")), "{screen}");
    assert!(screen.contains("bearer> hello"), "another client's prompt is shown with who sent it: {screen}");
    assert_eq!(count(&screen, "Load and memory are normal; devvm is healthy."), 1, "{screen}");
    drop(terminal);

    let terminal = Terminal::attach(&server.base, &["--new"]);
    let screen = terminal.until_shows("opened and attached to session ");
    let page: Value = server.get("/api/sessions").send().await.unwrap().json().await.unwrap();
    let sessions = page["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3, "--new opened a session");
    let opened = sessions[0]["id"].as_str().unwrap();
    assert!(screen.contains(&format!("opened and attached to session {opened}:")), "{screen}");
}

#[tokio::test]
async fn ctrl_c_during_a_long_turn_stops_it_and_at_an_idle_prompt_clears_the_line() {
    let server = Server::start();
    let session = server.open_session().await;
    let terminal = Terminal::attach(&server.base, &[]);
    terminal.until_shows("breakglass> ");

    terminal.tmux_str(&["send-keys", "-l", "a draft"]);
    terminal.until_shows("breakglass> a draft");
    terminal.keys("C-c");
    terminal.until("a clear prompt", |s| lines(s).last_line_is("breakglass>"));
    assert!(!server.log().contains("/cancel"), "nothing was running: no cancel was sent");

    terminal.type_line("sleep 60");
    crate::harness::eventually("the turn to run", || server.agent_runs().iter().any(|r| r["prompt"] == "sleep 60"))
        .await;
    terminal.keys("C-c");
    let screen = terminal.until_shows("■ Stopped by the operator");
    assert!(screen.contains("asked the turn to stop…"), "{screen}");
    assert_eq!(session_json(&server, &session).await["running"], false);
    let log = server.log();
    assert!(log.lines().any(|l| l.contains("cancelled=true") && l.contains("cancel")), "{log}");
    let events = server.attach(&session, None).await.until_caught_up().await;
    assert_eq!(kinds(&events)[kinds(&events).len() - 2..], ["cancelled", "turn_end"]);
}

trait LastLine {
    fn last_line_is(&self, line: &str) -> bool;
}

impl LastLine for Vec<&str> {
    fn last_line_is(&self, line: &str) -> bool {
        self.iter().rev().find(|l| !l.is_empty()).is_some_and(|l| *l == line)
    }
}

#[tokio::test]
async fn an_approval_allowed_in_the_terminal_runs_the_tool_and_one_denied_blocks_it() {
    let server = Server::start();
    let session = server.open_session().await;
    let terminal = Terminal::attach(&server.base, &[]);
    terminal.until_shows("breakglass> ");

    server.start_turn(&session, "hook Bash ssh pve reset\nresult").await;
    let screen = terminal.until_shows("answer: /allow or /deny [reason]");
    assert!(screen.contains("? Bash waits for you [toolu_"), "{screen}");
    assert!(screen.contains("hard reset of the VM: unsaved guest state is lost"), "{screen}");
    terminal.type_line("/allow");
    let screen = terminal.until_shows("⎿ ran: ssh pve reset");
    assert!(screen.contains("✓ allowed by bearer [toolu_"), "{screen}");
    terminal.until_shows("✓ done · 1.2 s · 1 turn · $0.0012");
    turn_ended(&server, &session).await;

    server.start_turn(&session, "hook Bash ssh devvm systemctl restart nginx\nresult").await;
    terminal.until("the second card", |s| count(s, "answer: /allow or /deny [reason]") == 2);
    terminal.type_line("/deny not during the backup");
    let screen =
        terminal.until_shows("⎿ error: PreToolUse:Bash hook error: denied by the operator: not during the backup");
    assert!(screen.contains("✗ denied by bearer [toolu_"), "{screen}");
    assert!(!screen.contains("ran: ssh devvm systemctl restart nginx"), "the denied call did not run: {screen}");

    let events = server.attach(&session, None).await.until_caught_up().await;
    let decisions: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["kind"] == "approval_decision")
        .map(|e| (e["decision"].as_str().unwrap(), e["message"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(decisions, [("allow", ""), ("deny", "not during the backup")]);
}

/// A TCP relay between the client and the server that a test can cut:
/// every open connection closed, and new ones refused, until restored.
struct Relay {
    base: String,
    refusing: Arc<AtomicBool>,
    /// New connections are accepted and then held: never answered, never closed.
    holding: Arc<AtomicBool>,
    /// Connections held so far.
    held: Arc<AtomicU64>,
    /// Every request is answered 502 with an HTML page, as a reverse proxy
    /// (ingress-nginx) answers while the server behind it is down.
    bad_gateway: Arc<AtomicBool>,
    /// Where connections are relayed to (`host:port`).
    to: Arc<std::sync::Mutex<String>>,
    cut: tokio::sync::watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(to: &str) -> Relay {
        let to = Arc::new(std::sync::Mutex::new(to.trim_start_matches("http://").to_owned()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let refusing = Arc::new(AtomicBool::new(false));
        let holding = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let bad_gateway = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let (refusing, holding, held, to) = (refusing.clone(), holding.clone(), held.clone(), to.clone());
            let bad_gateway = bad_gateway.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let mut connections = tokio::task::JoinSet::new();
                    let accept = async {
                        loop {
                            let Ok((mut client, _)) = listener.accept().await else { continue };
                            if refusing.load(Ordering::SeqCst) {
                                continue; // dropped: closed at once
                            }
                            if holding.load(Ordering::SeqCst) {
                                held.fetch_add(1, Ordering::SeqCst);
                                connections.spawn(async move {
                                    let _client = client;
                                    std::future::pending::<()>().await;
                                });
                                continue;
                            }
                            if bad_gateway.load(Ordering::SeqCst) {
                                connections.spawn(async move {
                                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                    let mut request = [0u8; 4096];
                                    let _ = client.read(&mut request).await;
                                    let page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
                                    let answer = format!(
                                        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                                        page.len()
                                    );
                                    let _ = client.write_all(answer.as_bytes()).await;
                                    let _ = client.shutdown().await;
                                });
                                continue;
                            }
                            let to = to.lock().unwrap().clone();
                            let mut cuts = cuts.clone();
                            cuts.mark_unchanged();
                            connections.spawn(async move {
                                let Ok(mut server) = tokio::net::TcpStream::connect(&to).await else { return };
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                    _ = cuts.changed() => {}
                                }
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                });
            })
        };
        Relay { base, refusing, holding, held, bad_gateway, to, cut, stop: Some(stop), thread: Some(thread) }
    }

    /// From now on, relays to `to` (an `http://` base).
    fn redirect(&self, to: &str) {
        *self.to.lock().unwrap() = to.trim_start_matches("http://").to_owned();
    }

    /// Cuts every open connection and answers none of the new ones: they
    /// are accepted and held, as a server that hangs would.
    fn hang(&self) {
        self.holding.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Cuts every open connection and answers every new request 502.
    fn bad_gateway(&self) {
        self.bad_gateway.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.refusing.store(false, Ordering::SeqCst);
        self.holding.store(false, Ordering::SeqCst);
        self.bad_gateway.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[tokio::test]
async fn a_cut_link_is_resumed_from_the_last_event_and_every_line_shows_once() {
    let server = Server::start();
    let session = server.open_session().await;
    let relay = Relay::start(&server.base);
    let terminal = Terminal::attach(&relay.base, &[]);
    terminal.until_shows("breakglass> ");
    server.start_turn(&session, "say before the cut one\nsay before the cut two\nresult").await;
    terminal.until_shows("✓ done · 1.2 s · 1 turn · $0.0012");
    turn_ended(&server, &session).await;

    relay.cut();
    terminal.until_shows("link down (");
    // The turn runs while the terminal cannot see it.
    server.run_turn(&session, "say after the cut one\nsay after the cut two\nresult").await;
    relay.restore();
    // Its end, not its prompt: the prompt's line holds the words too, and
    // the replay may be caught half printed.
    let screen = terminal
        .until("the missed turn", |s| s.contains("reattached") && count(s, "✓ done · 1.2 s · 1 turn · $0.0012") == 2);
    for line in ["before the cut one", "before the cut two", "after the cut one", "after the cut two"] {
        assert_eq!(lines(&screen).iter().filter(|l| **l == line).count(), 1, "{line:?} once: {screen}");
    }
    assert_eq!(count(&screen, "link down ("), 1, "said once, however many tries: {screen}");
    assert_eq!(count(&screen, "reattached"), 1, "{screen}");
    assert_eq!(count(&screen, "✓ done · 1.2 s · 1 turn · $0.0012"), 2, "{screen}");
    let shown = lines(&screen);
    let down = shown.iter().position(|l| l.starts_with("link down (")).unwrap();
    let back = shown.iter().position(|l| *l == "reattached").unwrap();
    let missed = shown.iter().position(|l| *l == "after the cut one").unwrap();
    assert!(down < back && back < missed, "down, back, then what was missed: {screen}");
}

#[tokio::test]
async fn ctrl_d_on_an_empty_line_leaves_with_status_zero() {
    let server = Server::start();
    server.open_session().await;
    let terminal = Terminal::attach(&server.base, &[]);
    terminal.until_shows("breakglass> ");
    terminal.keys("C-d");
    let start = Instant::now();
    while terminal.exit_status().is_none() {
        assert!(start.elapsed() < DEADLINE, "the client did not exit; the screen:\n{}", terminal.screen());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(terminal.exit_status(), Some(0));
}

#[tokio::test]
async fn escape_sequences_in_agent_text_are_printed_inert() {
    let server = Server::start();
    let session = server.open_session().await;
    let terminal = Terminal::attach(&server.base, &[]);
    terminal.until_shows("breakglass> ");
    let title_before = terminal.tmux_str(&["display-message", "-p", "#{pane_title}"]);
    server.start_turn(&session, "say \x1b]2;pwned\x07\x1b[2J\x1b[31mred\x1b[0m rm \u{202e}gpj.exe\nresult").await;
    let screen = terminal.until_shows("✓ done");
    assert!(
        screen.contains("⟨U+001B⟩]2;pwned⟨U+0007⟩⟨U+001B⟩[2J⟨U+001B⟩[31mred⟨U+001B⟩[0m rm ⟨U+202E⟩gpj.exe"),
        "{screen}"
    );
    assert!(screen.contains("attached to session"), "the screen was not cleared: {screen}");
    let title_after = terminal.tmux_str(&["display-message", "-p", "#{pane_title}"]);
    assert_eq!(title_after, title_before, "the window title was not changed");
}

/// Runs the client binary with the test's token against `base`.
fn client(base: &str, args: &[&str]) -> Output {
    client_with(base, TOKEN, args)
}

fn client_with(base: &str, token: &str, args: &[&str]) -> Output {
    Command::new(server_binary())
        .args(args)
        .env_clear()
        .env("BREAKGLASS_URL", base)
        .env("API_BEARER_TOKEN", token)
        .output()
        .expect("run breakglass")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn sessions_prints_a_table_newest_first_or_the_apis_json() {
    let server = Server::start();
    let older = server.open_session().await;
    server.run_turn(&older, "hello").await;
    let newest = server.open_session().await;

    let table = client(&server.base, &["sessions"]);
    assert_eq!(table.status.code(), Some(0), "{}", text(&table.stderr));
    let stdout = text(&table.stdout);
    let rows: Vec<&str> = stdout.lines().collect();
    assert!(rows[0].starts_with("ID") && rows[0].ends_with("TITLE"), "{stdout}");
    assert!(rows[1].starts_with(&newest) && rows[1].ends_with("(no prompt yet)"), "{stdout}");
    assert!(rows[2].starts_with(&older) && rows[2].ends_with("  hello"), "the first prompt is the title: {stdout}");
    assert_eq!(rows.len(), 3);

    let json = client(&server.base, &["sessions", "--json"]);
    assert_eq!(json.status.code(), Some(0));
    let printed: Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let api: Value = server.get("/api/sessions?limit=20").send().await.unwrap().json().await.unwrap();
    assert_eq!(printed, api);

    let refused = client_with(&server.base, "wrong-token", &["sessions"]);
    assert_eq!(refused.status.code(), Some(3), "refused credentials");
    assert!(text(&refused.stderr).contains("refused our credentials (401)"), "{}", text(&refused.stderr));
    let nobody = client(&format!("http://127.0.0.1:{}", free_port()), &["sessions"]);
    assert_eq!(nobody.status.code(), Some(3), "no server");
    assert!(text(&nobody.stderr).contains("cannot reach http://127.0.0.1:"), "{}", text(&nobody.stderr));
}

#[tokio::test]
async fn verb_follows_the_operation_to_its_end_and_its_exit_status_says_how_it_ended() {
    let host = Sshd::start(Pve::new());
    let unreachable = free_port(); // nothing listens there: the recovery check never passes
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(
        dir.path(),
        &format!(
            "{}{}",
            ssh_target("vm", &host, ""),
            ssh_target("gone", &host, &format!("check = \"tcp:127.0.0.1:{unreachable}\"\nrecover_timeout_seconds = 2"))
        ),
    );
    let server = serve(&host, &file);

    let status = client(&server.base, &["verb", "--target", "vm", "status"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    assert_eq!(text(&status.stdout), "power: running\n");
    assert!(text(&status.stderr).starts_with("status on vm: operation "), "{}", text(&status.stderr));

    let failed = client(&server.base, &["verb", "--target", "gone", "reset"]);
    assert_eq!(failed.status.code(), Some(1), "a verb that failed: {}", text(&failed.stderr));
    assert!(text(&failed.stdout).ends_with("not reachable within the limit (2 s)\n"), "{}", text(&failed.stdout));
    assert!(
        text(&failed.stderr).contains("breakglass: reset on gone: not reachable within the limit (2 s)"),
        "{}",
        text(&failed.stderr)
    );

    let stop = client(&server.base, &["verb", "--target", "vm", "stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop.stderr));
    let steps = text(&stop.stdout);
    let steps: Vec<&str> = steps.lines().collect();
    assert!(steps[0].starts_with("stop sent") && steps[2].starts_with("stopped after "), "{steps:?}");

    for (args, said) in [
        (&["verb", "--target", "nope", "status"][..], "refused (404): no target named \"nope\""),
        (&["verb", "--target", "vm", "frobnicate"][..], "refused (400): "),
        (&["verb", "frobnicate"][..], "refused (400): "),
    ] {
        let refused = client(&server.base, args);
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {}", text(&refused.stderr));
        assert!(text(&refused.stderr).contains(said), "{args:?}: {}", text(&refused.stderr));
    }

    // Without --target: the default target (the first), through /api/pve.
    let default = client(&server.base, &["verb", "status"]);
    assert_eq!(default.status.code(), Some(0), "{}", text(&default.stderr));
    assert!(!default.stdout.is_empty(), "the host's output");
}

/// A terminal attached through a relay to a server whose token then
/// changes: the stream is refused (401) and the client cannot attach again.
/// The servers and relay are returned so they outlive the terminal.
async fn attach_then_refused() -> (Server, Server, Relay, Terminal) {
    let mut first = Server::start();
    first.open_session().await;
    let relay = Relay::start(&first.base);
    let terminal = Terminal::attach(&relay.base, &[]);
    terminal.until_shows("breakglass> ");
    relay.cut();
    terminal.until_shows("link down (");
    first.kill9();
    let rotated = Server::options().no_token().env("API_BEARER_TOKEN", "a-rotated-token-0123456789").start();
    relay.redirect(&rotated.base);
    relay.restore();
    terminal.until_shows("! cannot attach again: the server refused our credentials (401)");
    (first, rotated, relay, terminal)
}

impl Terminal {
    /// The client's pid: the child of the shell tmux runs.
    fn pid(&self) -> u32 {
        let shell: u32 = self.tmux_str(&["display-message", "-p", "#{pane_pid}"]).trim().parse().expect("pane_pid");
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).expect("children");
        children.split_whitespace().next().expect("the client runs").parse().unwrap()
    }

    /// Waits for the client to exit: its status.
    fn exited(&self) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the client did not exit (tmux: dead, status, signal: {}); the screen:\n{}",
                self.tmux_str(&["display-message", "-p", "#{pane_dead} #{pane_dead_status} #{pane_dead_signal}"])
                    .trim(),
                self.screen()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// CPU time (user + system) a process has used, from /proc.
fn cpu_time(pid: u32) -> std::time::Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("stat format").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    std::time::Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn attach_idles_after_the_server_refuses_it_for_good() {
    let (_first, _rotated, _relay, terminal) = attach_then_refused().await;
    let pid = terminal.pid();
    assert!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().starts_with("breakglass"));
    // A window of a second, polled: a client spinning on a closed channel
    // burns all of it; one waiting for the operator next to nothing.
    let before = cpu_time(pid);
    let start = Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(1) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let used = cpu_time(pid) - before;
    assert!(used < std::time::Duration::from_millis(200), "{used:?} of CPU in a second of waiting");
}

#[tokio::test]
async fn attach_gives_up_on_a_server_that_accepts_but_never_answers_and_reattaches() {
    let server = Server::options().env("BREAKGLASS_SSE_KEEPALIVE_SECONDS", "1").start();
    let session = server.open_session().await;
    let relay = Relay::start(&server.base);
    let terminal = Terminal::attach(&relay.base, &[]);
    terminal.until_shows("breakglass> ");
    relay.hang();
    terminal.until_shows("link down (");
    crate::harness::wait_until("a reconnect to be held unanswered", || relay.held.load(Ordering::SeqCst) > 0);
    server.run_turn(&session, "say while it hung\nresult").await;
    relay.restore();
    // The held request is dropped after the idle limit (2 × 1 s + 5 s) and
    // the next one goes through.
    let screen = terminal.until("the reattach", |s| s.contains("reattached") && s.contains("while it hung"));
    assert_eq!(count(&screen, "link down ("), 1, "{screen}");
}

#[tokio::test]
async fn a_proxys_502_is_a_server_down_and_attach_reconnects_through_it() {
    let server = Server::start();
    let session = server.open_session().await;
    let relay = Relay::start(&server.base);
    let terminal = Terminal::attach(&relay.base, &[]);
    terminal.until_shows("breakglass> ");
    relay.bad_gateway();
    terminal.until_shows("link down (");

    for args in [&["sessions"][..], &["verb", "status"][..], &["verb", "--target", "vm", "status"][..]] {
        let out = client(&relay.base, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: the server is down, no verb ran: {stderr}");
        assert!(stderr.contains("the server failed (502): Bad Gateway"), "{args:?}: {stderr}");
    }

    server.run_turn(&session, "say behind the proxy\nresult").await;
    relay.restore();
    let screen = terminal.until("the reattach", |s| s.contains("reattached") && s.contains("behind the proxy"));
    assert!(!screen.contains("cannot attach again"), "{screen}");
}

/// Runs `breakglass attach <args>` with `input` on its stdin (no terminal).
fn attach_piped(base: &str, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(server_binary())
        .arg("attach")
        .args(args)
        .env_clear()
        .env("BREAKGLASS_URL", base)
        .env("API_BEARER_TOKEN", TOKEN)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run breakglass attach");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().expect("wait for attach")
}

#[tokio::test]
async fn a_prompt_piped_into_attach_reaches_the_server_before_it_leaves() {
    let server = Server::start();
    let session = server.open_session().await;
    let out = attach_piped(&server.base, &[], "say piped in\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events = server.attach(&session, None).await.until_caught_up().await;
    let users: Vec<&str> = events.iter().filter(|e| e["kind"] == "user").filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(users, ["say piped in"], "the prompt was sent, not cancelled by the end of input");
}

#[tokio::test]
async fn attach_leaves_with_status_three_after_the_server_refused_its_token_mid_session() {
    let (_first, _rotated, _relay, terminal) = attach_then_refused().await;
    terminal.keys("C-d");
    assert_eq!(terminal.exited(), 3, "the token was refused: {}", terminal.screen());
}

#[tokio::test]
async fn attach_into_a_pipe_keeps_text_that_streamed_while_a_line_was_typed() {
    use std::io::{BufRead, Write};
    let server = Server::start();
    let session = server.open_session().await;
    let mut child = Command::new(server_binary())
        .arg("attach")
        .env_clear()
        .env("BREAKGLASS_URL", &server.base)
        .env("API_BEARER_TOKEN", TOKEN)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run breakglass attach");
    let printed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let (stdout, printed) = (child.stdout.take().unwrap(), printed.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                printed.lock().unwrap().push(line);
            }
        })
    };
    let shows = |text: &str| printed.lock().unwrap().iter().any(|l| l.contains(text));
    crate::harness::eventually("the banner", || shows("attached to session")).await;

    let mut watch = server.attach(&session, None).await;
    watch.until_caught_up().await;
    server.start_turn(&session, "stream 0.3 alpha beta gamma delta epsilon").await;
    while !matches!(watch.next().await, Some(crate::harness::Frame::Delta(_))) {}
    // A line typed while the text grows (no live line is shown in a pipe).
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"/frob\n").unwrap();
    watch.until_turn_end().await;
    crate::harness::eventually("the turn's end", || shows("! agent ended without a result")).await;
    drop(stdin);
    assert_eq!(crate::harness::wait_child(&mut child, DEADLINE).and_then(|s| s.code()), Some(0));
    reader.join().unwrap();
    let printed = printed.lock().unwrap();
    assert!(printed.iter().any(|l| l.contains("unknown command /frob")), "{printed:#?}");
    assert!(printed.iter().any(|l| l == "alpha beta gamma delta epsilon"), "the text, whole: {printed:#?}");
}

#[tokio::test]
async fn verb_with_a_target_asks_the_servers_keepalive_before_following_the_operation() {
    let host = Sshd::start(Pve::new());
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), &ssh_target("vm", &host, ""));
    let server = serve(&host, &file);
    let status = client(&server.base, &["verb", "--target", "vm", "status"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    let log = server.log();
    let asked = log.find("path=/api/whoami").expect("GET /api/whoami: its stream's silence limit comes from there");
    let started = log.find("path=/api/targets/vm/verbs/status").expect("the verb");
    assert!(asked < started, "{log}");
}
