//! Connections: the header timeout, idle keep-alive connections, and the
//! cap below the descriptor limit (README "Connections").

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{DEADLINE, Server, kinds};

fn addr(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection; how long that took.
async fn closed_by_server(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept a silent connection open for {DEADLINE:?}"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    let server = Server::options().env("BREAKGLASS_HEADER_TIMEOUT_SECONDS", "1").start();
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    closed_by_server(&mut stream).await;

    // Connected and silent from the start.
    let mut silent = TcpStream::connect(addr(&server)).await.unwrap();
    closed_by_server(&mut silent).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let server = Server::options().env("BREAKGLASS_HEADER_TIMEOUT_SECONDS", "1").start();
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    while !answer.windows(4).any(|w| w == b"\"ok\"") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    closed_by_server(&mut stream).await;
}

/// Hundreds of idle connections against a server limited to 256
/// descriptors: `/health` keeps answering, an attached stream keeps
/// receiving, a turn still starts its agent (pipes need descriptors), and
/// the server does not spin.
#[tokio::test]
async fn idle_connections_beyond_the_descriptor_limit_starve_nothing() {
    let server = Server::options().wrapper(&["prlimit", "--nofile=256:256", "--"]).start();
    let (session, mut stream) = server.attached().await;
    let mut idle = Vec::new();
    for i in 0..400 {
        let mut conn = TcpStream::connect(addr(&server)).await.unwrap();
        if i % 2 == 0 {
            // Half a request head; the others say nothing at all.
            conn.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        }
        idle.push(conn);
    }
    assert!(server.open_fds() <= 256, "{} descriptors open", server.open_fds());

    let fresh = Server::one_shot_client();
    for _ in 0..20 {
        let response = tokio::time::timeout(DEADLINE, fresh.get(server.url("/health")).send())
            .await
            .expect("/health answered in time")
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    server.start_turn(&session, "say still here\nresult").await;
    let events = stream.until_turn_end().await;
    assert_eq!(kinds(&events), ["user", "text", "result", "turn_end"]);

    // With the idle connections still open, the server is quiet.
    let before = server.cpu_time();
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let used = server.cpu_time() - before;
    eprintln!("400 idle connections, limit 256: {} descriptors open, {used:?} of CPU in 2 s", server.open_fds());
    assert!(used < Duration::from_millis(500), "the server used {used:?} of CPU in 2 s while idle");
    drop(idle);
}

/// Every connection busy with a request in flight (attach streams): a
/// newcomer is told 503 at once rather than left hanging.
#[tokio::test]
async fn over_the_cap_with_every_connection_busy_the_answer_is_503() {
    // 128 descriptors: 64 kept back, so at most 64 connections.
    let server = Server::options().wrapper(&["prlimit", "--nofile=128:128", "--"]).start();
    let session = server.open_session().await;
    let mut streams = Vec::new();
    let mut refused = None;
    for _ in 0..100 {
        let client = Server::one_shot_client();
        let response = client
            .get(server.url(&format!("/api/session/{session}/stream")))
            .bearer_auth(crate::harness::TOKEN)
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    let refused = refused.expect("a connection over the cap is refused");
    assert!(streams.len() >= 32, "only {} streams were accepted", streams.len());
    assert_eq!(refused.headers()["content-type"], "application/json");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["detail"], "too many connections; try again shortly");
}

/// A body that stops arriving holds its connection no longer than a head
/// that does: 408, JSON, and the connection goes.
#[tokio::test]
async fn a_request_body_that_stops_arriving_is_refused() {
    let server = Server::options().env("BREAKGLASS_HEADER_TIMEOUT_SECONDS", "1").start();
    let session = server.open_session().await;
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    let head = format!(
        "POST /api/session/{session}/prompt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\":",
        crate::harness::TOKEN
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await.expect("answered in time") {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#"{"detail":"the request body stopped arriving"}"#), "{answer}");
}
