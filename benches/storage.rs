//! Storage figures, printed (not asserted): how fast a flooding agent's
//! events are committed, with and without a client attached, and the
//! server's resident memory with a long history compared with none.
//!
//! `cargo bench --bench storage` (release build). Set `BENCH_SESSIONS` and
//! `BENCH_EVENTS` to change the history's size (default 1000 × 1000), and
//! `BENCH_DURABILITY` (`full`, `normal`) to measure the floods under a
//! durability other than the default.

#![allow(clippy::disallowed_methods)]

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::{Duration, Instant};

use harness::Server;
use serde_json::Value;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn wait_idle(server: &Server, session: &str) {
    let start = Instant::now();
    loop {
        let row: Value = server.get(&format!("/api/session/{session}")).send().await.unwrap().json().await.unwrap();
        if row["running"] == false && row["event_count"].as_u64().unwrap_or(0) > 1 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(600), "turn did not end");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Events per second from prompt to the end of a turn of `n` events.
async fn flood(server: &Server, n: usize, attached: bool) -> f64 {
    let session = server.open_session().await;
    let prompt = format!("flood {n} 100\nresult");
    // An attached client that only drains its bytes, so that the figure is
    // the server's, not the client's parsing.
    let reader = if attached {
        let response = server.get(&format!("/api/session/{session}/stream")).send().await.unwrap();
        Some(tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let mut tail = Vec::new();
            while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut body).await {
                tail.extend_from_slice(&chunk);
                if tail.windows(17).any(|w| w == br#""kind":"turn_end""#) {
                    return;
                }
                let keep = tail.len().saturating_sub(64);
                tail.drain(..keep);
            }
        }))
    } else {
        None
    };
    let start = Instant::now();
    server.start_turn(&session, &prompt).await;
    wait_idle(server, &session).await;
    let rate = (n + 3) as f64 / start.elapsed().as_secs_f64();
    if let Some(reader) = reader {
        tokio::time::timeout(Duration::from_secs(60), reader).await.expect("the client got turn_end").unwrap();
    }
    rate
}

/// How fast the fake agent alone prints `n` lines: the ceiling of the figures above.
fn agent_alone(n: usize) -> f64 {
    let start = Instant::now();
    let out = std::process::Command::new(harness::repo().join("tests/fake-bin/claude"))
        .args(["-p", "--", &format!("flood {n} 100\nresult")])
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("fake agent");
    assert!(out.status.success());
    (n + 1) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n = 100_000;
    println!("fake agent alone:          {:>9.0} lines/s", agent_alone(n));
    let mut options = Server::options().arg("--max-concurrent-turns").arg("4");
    if let Ok(durability) = std::env::var("BENCH_DURABILITY") {
        options = options.arg("--durability").arg(durability);
    }
    let server = options.start();
    for attached in [false, true] {
        let rate = flood(&server, n, attached).await;
        let label = if attached { "with a client attached" } else { "with no client" };
        println!("flood of {n} events, {label:<24} {rate:>9.0} events/s");
    }
    drop(server);

    let sessions = env_or("BENCH_SESSIONS", 1000);
    let events = env_or("BENCH_EVENTS", 1000);
    if sessions == 0 {
        return;
    }
    let mut server = Server::options().arg("--max-concurrent-turns").arg("4").start();
    let empty = rss_kib(server.pid());
    let started = Instant::now();
    let mut ids = Vec::with_capacity(sessions);
    for chunk in 0..sessions.div_ceil(4) {
        let mut batch = Vec::new();
        for _ in 0..4.min(sessions - chunk * 4) {
            let session = server.open_session().await;
            // `flood` prints events - 3 texts; with user, result and turn_end: `events` in all.
            server.start_turn(&session, &format!("flood {} 100\nresult", events - 3)).await;
            batch.push(session);
        }
        for session in &batch {
            wait_idle(&server, session).await;
        }
        ids.extend(batch);
    }
    let filled = rss_kib(server.pid());
    let listed: Value = server.get("/api/sessions?limit=1").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["sessions"][0]["event_count"].as_u64(), Some(events as u64));
    println!(
        "history: {sessions} finished sessions x {events} events written in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!("resident memory, empty server:                 {empty:>7} KiB");
    println!("resident memory, after that history:           {filled:>7} KiB");
    assert!(server.terminate().success());
    server.restart();
    let restarted = rss_kib(server.pid());
    println!("resident memory, restarted on that history:    {restarted:>7} KiB");
    // Replaying one old session reads it from the database, not from memory.
    let mut stream = server.attach(&ids[0], None).await;
    assert_eq!(stream.until_caught_up().await.len(), events);
    println!("resident memory, after replaying one session:  {:>7} KiB", rss_kib(server.pid()));
    let db = std::fs::metadata(server.data_dir().join("breakglass.db")).map(|m| m.len()).unwrap_or(0);
    println!("database size: {:.1} MiB", db as f64 / 1048576.0);
}
