//! Start-up and shutdown of the real binary.

use std::process::Command;

use crate::harness::{Frame, Server, alive, eventually, kinds};

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
    for var in [
        "BREAKGLASS_LISTEN",
        "BREAKGLASS_DATA_DIR",
        "BREAKGLASS_SESSIONS_DIR",
        "BREAKGLASS_AGENT",
        "BREAKGLASS_AGENT_FILE",
        "BREAKGLASS_MODEL",
        "BREAKGLASS_CLAUDE_BIN",
        "BREAKGLASS_TURN_TIMEOUT_SECONDS",
        "BREAKGLASS_SSE_KEEPALIVE_SECONDS",
        "BREAKGLASS_MAX_CONCURRENT_TURNS",
        "API_BEARER_TOKEN",
        "BREAKGLASS_TRUSTED_PROXIES",
        "BREAKGLASS_TRUSTED_USER_HEADER",
        "BREAKGLASS_PVE_HOST",
        "BREAKGLASS_PVE_USER",
        "BREAKGLASS_PVE_KNOWN_HOSTS",
        "BREAKGLASS_SSH_BIN",
        "BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS",
        "BREAKGLASS_PVE_PORT",
        "BREAKGLASS_DURABILITY",
        "BREAKGLASS_PRESETS_FILE",
        "BREAKGLASS_WRITE_TIMEOUT_SECONDS",
    ] {
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
