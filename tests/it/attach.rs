//! Attach (README "API"): backlog, caught-up, live tail, resume, fan-out, stalls.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{BASIC, DEADLINE, Frame, Server, TOKEN, ids, kinds};

#[tokio::test]
async fn replay_sends_every_event_in_order_then_caught_up() {
    let server = Server::start();
    let session = server.open_session().await;
    let live = server.run_turn(&session, "replay basic").await;
    assert_eq!(kinds(&live), BASIC);

    let mut again = server.attach(&session, None).await;
    assert_eq!(again.headers["content-type"], "text/event-stream");
    assert_eq!(again.headers["cache-control"], "no-cache");
    assert_eq!(again.headers["x-accel-buffering"], "no");
    let replay = again.until_caught_up().await;
    assert_eq!(ids(&replay), (0..8).collect::<Vec<_>>());
    assert_eq!(replay, live, "the replay is what was sent live");
    assert_eq!(replay[0]["text"], "replay basic");
    assert_eq!(replay[0]["by"], "bearer");
    assert_eq!(replay[1]["session_id"], session, "the CLI's init names our session id");
    assert!(again.raw.starts_with(b"id: 0\ndata: {"), "{:?}", String::from_utf8_lossy(&again.raw[..40]));
}

#[tokio::test]
async fn last_event_id_resumes_after_that_event() {
    let server = Server::start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    let mut resumed = server.attach(&session, Some("3")).await;
    let rest = resumed.until_caught_up().await;
    assert_eq!(ids(&rest), vec![4, 5, 6, 7]);
    let mut at_end = server.attach(&session, Some("7")).await;
    assert!(at_end.until_caught_up().await.is_empty());
}

#[tokio::test]
async fn malformed_or_impossible_last_event_id_means_full_replay() {
    let server = Server::start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    for bad in ["abc", "-1", "1.5", "", "99999999999999999999999", "8", "500"] {
        let mut stream = server.attach(&session, Some(bad)).await;
        assert_eq!(ids(&stream.until_caught_up().await), (0..8).collect::<Vec<_>>(), "Last-Event-ID {bad:?}");
    }
}

#[tokio::test]
async fn two_clients_see_the_same_live_events() {
    let server = Server::start();
    let session = server.open_session().await;
    let mut a = server.attach(&session, None).await;
    let mut b = server.attach(&session, None).await;
    a.until_caught_up().await;
    b.until_caught_up().await;
    server.start_turn(&session, "replay basic").await;
    let (from_a, from_b) = tokio::join!(a.until_turn_end(), b.until_turn_end());
    assert_eq!(kinds(&from_a), BASIC);
    assert_eq!(from_a, from_b);
}

/// Clients attaching while a flood is appended each get every id exactly
/// once, across the seam between backlog and live.
#[tokio::test]
async fn attaching_during_a_flood_neither_skips_nor_doubles() {
    let server = Server::start();
    let session = server.open_session().await;
    server.start_turn(&session, "flood 3000 100\nresult").await;
    let mut readers = Vec::new();
    for i in 0..12 {
        let stream = server.attach(&session, None).await;
        readers.push(tokio::spawn(async move {
            let mut stream = stream;
            let mut seen = Vec::new();
            loop {
                match stream.next().await.expect("stream ended early") {
                    Frame::Event { id, data } => {
                        seen.push(id);
                        if data["kind"] == "turn_end" {
                            return (i, seen);
                        }
                    }
                    Frame::Notice(_) | Frame::Delta(_) | Frame::CaughtUp | Frame::Keepalive => {}
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(15)).await; // stagger attaches across the flood
    }
    for reader in readers {
        let (i, seen) = reader.await.unwrap();
        let last = *seen.last().unwrap();
        assert_eq!(seen, (0..=last).collect::<Vec<_>>(), "client {i}");
        assert_eq!(last, 3001 + 1, "client {i}: user, 3000 texts, result, turn_end");
    }
}

/// Opens an attach stream on a raw socket with a tiny receive buffer and
/// never reads from it.
async fn stalled_client(server: &Server, session: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = server.base.trim_start_matches("http://").parse().unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    let request =
        format!("GET /api/session/{session}/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    stalled.write_all(request.as_bytes()).await.unwrap();
    stalled
}

/// ~24 MiB of events: far more than the kernel buffers of one connection.
const FLOOD: &str = "flood 400 60000";

/// A client that stops reading does not delay another: the reader gets the
/// whole flood while the stalled connection is still open (its write
/// timeout is far longer than the test).
#[tokio::test]
async fn a_stalled_client_does_not_delay_another() {
    let server = Server::options().arg("--write-timeout-seconds").arg("600").start();
    let session = server.open_session().await;
    let stalled = stalled_client(&server, &session).await;
    let mut reader = server.attach(&session, None).await;
    reader.until_caught_up().await;
    server.start_turn(&session, &format!("{FLOOD}\nresult")).await;
    assert_eq!(reader.until_turn_end().await.len(), 403);
    // The stalled connection is still open: it has unread data waiting.
    let mut byte = [0u8; 1];
    assert_eq!(stalled.peek(&mut byte).await.unwrap(), 1);
}

/// A client that stops reading is cut off once its connection stays full
/// for the write timeout, and loses nothing when it reconnects with
/// Last-Event-ID.
#[tokio::test]
async fn a_stalled_client_is_cut_off_and_resumes_without_loss() {
    let server = Server::options().arg("--write-timeout-seconds").arg("2").start();
    let session = server.open_session().await;
    let mut stalled = stalled_client(&server, &session).await;
    let mut reader = server.attach(&session, None).await;
    reader.until_caught_up().await;
    // The pause is longer than the write timeout, with the stalled client
    // still reading nothing.
    server.start_turn(&session, &format!("{FLOOD}\nsleep 5\nresult")).await;
    let events = reader.until_turn_end().await;
    assert_eq!(events.len(), 403);
    let last = events.last().unwrap()["id"].as_u64().unwrap();

    // The server must have closed the stalled connection: reading it now
    // reaches the end instead of tailing live for ever.
    let mut got = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stalled.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the stalled connection was never closed; read {} bytes", got.len());
    let text = String::from_utf8_lossy(&got);
    let received: Vec<u64> = text
        .split("\n\n")
        .filter_map(|frame| {
            let (id, data) = frame.rsplit_once("id: ")?.1.split_once("\ndata: ")?;
            serde_json::from_str::<Value>(data).ok()?;
            id.parse().ok()
        })
        .collect();
    let upto = *received.last().expect("the stalled client got some events");
    assert!(upto < last, "it was cut off before the end ({upto} of {last})");
    assert_eq!(received, (0..=upto).collect::<Vec<_>>());

    let mut resumed = server.attach(&session, Some(&upto.to_string())).await;
    let rest = resumed.until_caught_up().await;
    assert_eq!(ids(&rest), (upto + 1..=last).collect::<Vec<_>>());
    let all: BTreeSet<u64> = received.into_iter().chain(ids(&rest)).collect();
    assert_eq!(all.len() as u64, last + 1);
}

#[tokio::test]
async fn an_idle_stream_gets_keepalive_comments() {
    let server = Server::options().arg("--sse-keepalive-seconds").arg("1").start();
    let session = server.open_session().await;
    let mut stream = server.attach(&session, None).await;
    assert!(stream.until_caught_up().await.is_empty());
    assert_eq!(stream.next().await, Some(Frame::Keepalive));
    assert_eq!(stream.next().await, Some(Frame::Keepalive));
    // A comment (README "API") that also names a `keepalive` event for EventSource pages.
    let keepalive = ": keepalive\nevent: keepalive\ndata: {}\n\n";
    let raw = String::from_utf8_lossy(&stream.raw).into_owned();
    assert!(raw.ends_with(&format!("event: caught-up\ndata: {{}}\n\n{keepalive}{keepalive}")), "{raw:?}");
}

#[tokio::test]
async fn unknown_sessions_are_404_json() {
    let server = Server::start();
    for id in ["00000000-0000-0000-0000-000000000000", "not-a-uuid"] {
        for (method, path) in [("GET", "stream"), ("POST", "prompt"), ("POST", "cancel")] {
            let url = format!("/api/session/{id}/{path}");
            let request = if method == "GET" { server.get(&url) } else { server.post(&url) };
            let response = request.json(&serde_json::json!({"prompt": "hi"})).send().await.unwrap();
            assert_eq!(response.status(), 404, "{method} {url}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["detail"], "session not found");
        }
    }
}

/// Each request is logged once its response head is ready, with its path
/// and status, in the request's span; an attach stream's is logged when it
/// starts, not when it ends hours later.
#[tokio::test]
async fn an_attach_request_is_logged_with_its_status_when_the_stream_starts() {
    let server = Server::start();
    let session = server.open_session().await;
    let mut stream = server.attach(&session, None).await;
    assert!(stream.until_caught_up().await.is_empty());
    let path = format!("/api/session/{session}/stream");
    crate::harness::eventually("the attach request's log line", || {
        server.log().lines().any(|line| {
            line.contains("finished processing request") && line.contains(&path) && line.contains("status=200")
        })
    })
    .await;
}
