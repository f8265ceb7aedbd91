//! Start-up and shutdown of the real binary.

use std::process::Command;

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Frame, Server, alive, eventually, kinds};
use crate::pve::{Pve, Sshd};

#[tokio::test]
async fn sigterm_closes_running_turns_ends_streams_and_exits_zero() {
    let mut server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "grandchild\nsleep 60").await;
    let pid = loop {
        if let Some(Frame::Event { data, .. }) = stream.next().await
            && let Some(pid) = data["text"].as_str().and_then(|t| t.strip_prefix("grandchild "))
        {
            break pid.parse::<u32>().unwrap();
        }
    };
    // A half-sent request from a flaky client must not hold the exit.
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut half_open = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    half_open.write_all(b"POST /api/session HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").await.unwrap();
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let events = stream.until_turn_end().await;
    assert_eq!(kinds(&events), ["error", "turn_end"]);
    assert_eq!(events[0]["error"], "turn stopped: the server is shutting down");
    assert_eq!(stream.next().await, None, "the stream ended");
    eventually("the agent's child to die", || !alive(pid)).await;
    assert!(server.log().contains("SIGTERM received: draining"));
}

#[test]
fn bad_configuration_is_refused_at_start_with_the_variable_named() {
    let cases = [
        ("BREAKGLASS_TRUSTED_PROXIES", "10.0.0.0/33", "BREAKGLASS_TRUSTED_PROXIES"),
        ("BREAKGLASS_MAX_CONCURRENT_TURNS", "0", "BREAKGLASS_MAX_CONCURRENT_TURNS"),
        ("BREAKGLASS_AGENT", "../evil", "BREAKGLASS_AGENT"),
        ("BREAKGLASS_AGENT_FILE", "/nonexistent/agent.md", "BREAKGLASS_AGENT_FILE"),
        ("BREAKGLASS_LISTEN", "not an address", "BREAKGLASS_LISTEN"),
        ("BREAKGLASS_PVE_HOST", "-oProxyCommand=x", "BREAKGLASS_PVE_HOST"),
    ];
    for (key, value, named) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .arg("serve")
            .env(key, value)
            .env("BREAKGLASS_DATA_DIR", std::env::temp_dir().join("breakglass-never-used"))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{key}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{key}={value}: {stderr}");
    }
}

#[test]
fn help_lists_every_setting_with_its_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_breakglass")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    // Every variable of README's configuration table, so a new setting
    // cannot be documented without being a flag, nor the other way round.
    let readme = std::fs::read_to_string(crate::harness::repo().join("README.md")).unwrap();
    let table = readme.split("## Configuration").nth(1).unwrap().split("\n## ").next().unwrap();
    let vars: Vec<&str> = table
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split('`').next())
        .filter(|var| *var != "RUST_LOG")
        .collect();
    assert!(vars.len() > 30 && vars.contains(&"BREAKGLASS_LOG_FORMAT"), "{vars:?}");
    for var in vars {
        assert!(help.contains(&format!("[env: {var}")), "{var} missing from --help");
    }
}

#[tokio::test]
async fn serve_is_the_default_subcommand() {
    // Same harness, without the word `serve`: it must still listen.
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(crate::harness::DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();
    let url = first.strip_prefix("breakglass listening on ").expect(&first).to_owned();
    let auth = tokio::time::timeout(crate::harness::DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(auth.starts_with("login: open http://127.0.0.1:") && auth.contains("/login?token="), "{auth}");
    let health = reqwest::get(format!("{url}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    child.kill().await.unwrap();
}

/// Regression: the server printed its start-up lines with `println!`, which
/// panics when stdout is gone; a supervisor that stopped reading took the
/// server down. Here stdout is a pipe nobody reads from at all.
#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("API_BEARER_TOKEN", "t")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(crate::harness::DEADLINE, lines.next_line()).await.unwrap().unwrap();
        let line = line.expect("the server logged where it listens before exiting");
        if let Some((_, url)) = line.split_once("listening on ") {
            break url.trim().to_owned();
        }
    };
    let health = reqwest::get(format!("{url}/health")).await.expect("still serving");
    assert_eq!(health.status(), 200);
    assert!(child.try_wait().unwrap().is_none(), "still running");
    child.kill().await.unwrap();
}

/// The pids a fake agent reported with `grandchild <pid>`, in order.
pub fn grandchild_pids(events: &[Value]) -> Vec<u32> {
    events.iter().filter_map(|e| e["text"].as_str()?.strip_prefix("grandchild ")?.parse().ok()).collect()
}

/// A session's events so far, read over a connection that is closed after.
pub async fn events_of(server: &Server, session: &str) -> Vec<Value> {
    let text = Server::one_shot_client()
        .get(server.url(&format!("/api/session/{session}/export?format=jsonl")))
        .bearer_auth(crate::harness::TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Starts a turn whose agent ignores SIGTERM and leaves two descendants
/// outside its process group (`setsid`, and a double fork that ignores
/// SIGTERM too); returns their pids and the agent's, all alive.
pub async fn start_escaping_turn(server: &Server, session: &str) -> Vec<u32> {
    let client = Server::one_shot_client();
    let response = client
        .post(server.url(&format!("/api/session/{session}/prompt")))
        .bearer_auth(crate::harness::TOKEN)
        .json(&serde_json::json!({ "prompt": "ignore-term\nsetsid-child\ndouble-fork\nsleep 60" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(client);
    let started = std::time::Instant::now();
    let mut pids = loop {
        let pids = grandchild_pids(&events_of(server, session).await);
        if pids.len() == 2 {
            break pids;
        }
        assert!(started.elapsed() < crate::harness::DEADLINE, "the descendants were never reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eventually("the agent to be recorded", || !server.agent_runs().is_empty()).await;
    pids.push(server.agent_runs()[0]["pid"].as_u64().unwrap() as u32);
    assert!(pids.iter().all(|pid| alive(*pid)), "{pids:?} alive before the stop");
    pids
}

/// Regression: with no connection open, SIGTERM exited at once: the turn
/// was never closed by the drain (the restart closed it instead, as
/// "server stopped during the turn"), and what the agent started was left.
#[tokio::test]
async fn sigterm_with_no_connection_open_still_drains_and_kills_every_descendant() {
    let mut server = Server::start();
    let session = server.open_session().await;
    let pids = start_escaping_turn(&server, &session).await;
    server.client = reqwest::Client::new(); // drop the pooled connection
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    for pid in &pids {
        eventually("every process of the turn to die", || !alive(*pid)).await;
    }
    server.restart();
    let mut stream = server.attach(&session, None).await;
    let events = stream.until_caught_up().await;
    let tail: Vec<&str> = kinds(&events).into_iter().rev().take(2).collect();
    assert_eq!(tail, ["turn_end", "error"], "{events:#?}");
    assert_eq!(events[events.len() - 2]["error"], "turn stopped: the server is shutting down");
}

/// A verb whose client has gone away is still running when SIGTERM comes
/// with no connection open: it finishes within the grace and its result is
/// in the audit trail.
#[tokio::test]
async fn sigterm_lets_a_verb_in_flight_finish_and_record_its_result() {
    let host = Sshd::start(Pve::new());
    host.pve.set("stop-seconds", "3");
    let mut server = host.breakglass(Server::options());
    let request = tokio::spawn({
        let (client, url) = (Server::one_shot_client(), server.url("/api/pve/stop"));
        async move { client.post(url).bearer_auth(crate::harness::TOKEN).send().await }
    });
    eventually("the stop to reach qm", || host.pve.calls().iter().any(|c| c == "qm stop 101")).await;
    request.abort(); // the phone lost its signal
    let _ = request.await;
    server.client = reqwest::Client::new();
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    server.restart();
    let audit: Value = server.get("/api/audit").send().await.unwrap().json().await.unwrap();
    let outcomes: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "verb.stop")
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["exit 0", "requested"], "newest first");
}

/// A verb still running when shutdown can wait no longer is cut off, and
/// its caller is answered (503, saying so) rather than left without a word.
#[tokio::test]
async fn a_verb_cut_off_by_shutdown_still_answers_its_caller() {
    let host = Sshd::start(Pve::new());
    host.pve.configure("STOP_TIMEOUT=60\n");
    host.pve.set("stop-seconds", "40");
    let mut server = host.breakglass(Server::options());
    let request = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/api/pve/stop"));
        async move { client.post(url).bearer_auth(crate::harness::TOKEN).send().await.unwrap() }
    });
    eventually("the stop to reach qm", || host.pve.calls().iter().any(|c| c == "qm stop 101")).await;
    server.send_sigterm();
    let response = tokio::time::timeout(Duration::from_secs(40), request).await.expect("answered").unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("shutting down"), "{body}");
    let status = server.wait(Duration::from_secs(40)).expect("exits");
    assert!(status.success(), "exit status {status:?}");
    server.restart();
    let audit: Value = server.get("/api/audit").send().await.unwrap().json().await.unwrap();
    let last = &audit["records"][0];
    assert_eq!((last["action"].as_str(), last["outcome"].as_str()), (Some("verb.stop"), Some("cut off by shutdown")));
}

/// Regression: log lines were written to stderr synchronously from the
/// async threads; a stderr nobody reads (a full pipe, a stalled journal)
/// stalled every request once its buffer filled.
#[tokio::test]
async fn a_stalled_log_sink_does_not_stall_the_server() {
    let server = Server::options().stderr_unread().start();
    // Each request logs a line: far more than a pipe's 64 KiB, and more
    // than the log queue holds.
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (client, url) = (reqwest::Client::new(), server.url("/health"));
        clients.push(tokio::spawn(async move {
            for _ in 0..1000 {
                let response = tokio::time::timeout(crate::harness::DEADLINE, client.get(&url).send()).await;
                assert_eq!(response.expect("answered while stderr is stalled").unwrap().status(), 200);
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let metrics = server.get("/metrics").send().await.unwrap().text().await.unwrap();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("breakglass_log_lines_dropped_total "))
        .expect("the dropped-lines counter")
        .parse()
        .unwrap();
    assert!(dropped > 0, "{metrics}");
}

/// Any local user, the agent's among them, can read a process's argv: the
/// bearer token is taken from the environment only.
#[test]
fn a_bearer_token_on_the_command_line_is_refused() {
    for args in [&["serve", "--api-bearer-token", "s3cret"][..], &["--api-bearer-token=s3cret"]] {
        let stderr = crate::harness::refused_at_start(args, &[]);
        assert!(stderr.contains("pass the token in the environment"), "{args:?}: {stderr}");
        assert!(!stderr.contains("s3cret"), "the token is not echoed");
    }
}
