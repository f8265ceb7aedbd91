//! The server killed with SIGKILL at random points of a flooding turn while
//! three clients are attached, over and over: after every restart the log
//! must hold exactly what the clients were sent (ARCHITECTURE.md: an event
//! is appended to the log before it is published), with no gap, the turn
//! closed, no agent process left, and an intact database.
//!
//! The points are drawn from a seeded generator; a failure prints the seed,
//! and `CRASH_SEED=<seed>` replays the same rounds.

use std::time::Instant;

use serde_json::Value;

use crate::harness::{Attached, Frame, Server, alive, assert_flood_unbroken, event_frames, eventually, ids, kinds};

const ROUNDS: usize = 60;

/// xorshift64*: small, seedable, and good enough to pick kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// Prints the seed if the test fails, so that the failing rounds can be replayed.
struct Seed(u64);

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("crash loop failed; replay it with CRASH_SEED={}", self.0);
        }
    }
}

fn seed() -> u64 {
    std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        now.as_nanos() as u64 | 1 // xorshift must not start from 0
    })
}

/// Reads the streams marked `reading` side by side until `clients[leader]`
/// has received `target` events. A stream not read falls behind the turn
/// (the server then feeds it from the log) until the kill.
async fn read_until(clients: &mut [Attached; 3], reading: [bool; 3], leader: usize, target: usize) {
    let mut received = [0usize; 3];
    while received[leader] < target {
        let [a, b, c] = clients;
        let (i, frame) = tokio::select! {
            frame = a.next(), if reading[0] => (0, frame),
            frame = b.next(), if reading[1] => (1, frame),
            frame = c.next(), if reading[2] => (2, frame),
        };
        match frame.expect("a stream ended while the turn ran") {
            Frame::Event { .. } => received[i] += 1,
            Frame::Notice(_) | Frame::Delta(_) | Frame::CaughtUp | Frame::Keepalive => {}
        }
    }
}

#[tokio::test]
async fn killed_at_random_points_with_three_clients_the_log_keeps_what_they_were_sent() {
    let seed = Seed(seed());
    eprintln!("crash loop seed {}", seed.0);
    let mut rng = Rng(seed.0);
    let started = Instant::now();
    let mut server = Server::start();
    let mut sent_before_kill = 0;
    for round in 0..ROUNDS {
        let flood = rng.between(50, 600);
        let bytes = rng.between(10, 2000);
        // The turn: `user`, the grandchild's pid, the flood, then a sleep
        // that outlasts the round, so the kill always lands inside the turn.
        let events_before_sleep = flood + 2;
        let leader = rng.between(0, 2) as usize;
        let target = rng.between(0, events_before_sleep) as usize;
        // Each other client is read along, or left behind, one time in three.
        let reading: [bool; 3] = std::array::from_fn(|i| i == leader || rng.between(0, 2) > 0);
        let at = format!(
            "round {round} (flood {flood}x{bytes}, kill after client {leader}'s event {target}, reading {reading:?})"
        );

        let (session, first) = server.attached().await;
        let mut second = server.attach(&session, None).await;
        second.until_caught_up().await;
        let mut third = server.attach(&session, None).await;
        third.until_caught_up().await;
        let mut clients = [first, second, third];
        server.start_turn(&session, &format!("grandchild\nflood {flood} {bytes}\nsleep 60")).await;
        read_until(&mut clients, reading, leader, target).await;
        server.kill9();
        // What the server had sent before it died, as each client got it.
        let mut sent = Vec::new();
        for client in &mut clients {
            client.read_until_broken().await;
            sent.push(event_frames(&client.raw));
        }
        sent_before_kill += sent.iter().map(Vec::len).max().unwrap_or(0);

        server.restart();
        let mut replay = server.attach(&session, None).await;
        let log = replay.until_caught_up().await;
        let logged = event_frames(&replay.raw);
        let n = log.len() as u64;
        assert_eq!(ids(&log), (0..n).collect::<Vec<_>>(), "{at}: ids are 0..{n} with no gap or repeat");
        assert_eq!(logged.len(), log.len(), "{at}");
        for (client, frames) in sent.iter().enumerate() {
            let ids: Vec<u64> = frames.iter().map(|(id, _)| *id).collect();
            assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>(), "{at}: client {client} was sent no gap");
            for (id, json) in frames {
                let kept = logged.get(*id as usize).map(|(_, json)| json.as_str());
                assert_eq!(kept, Some(json.as_str()), "{at}: client {client}'s event {id}, byte for byte");
            }
        }
        assert_flood_unbroken(&log);
        assert_eq!(kinds(&log[log.len().saturating_sub(2)..]), ["error", "turn_end"], "{at}: the turn is closed");
        assert_eq!(log[log.len() - 2]["error"], "server stopped during the turn", "{at}");

        for pid in server.turn_pids(&session, &log) {
            eventually(&format!("{at}: process {pid} of the killed turn to be gone"), || !alive(pid)).await;
        }
        eventually(&format!("{at}: no process of any agent left"), || server.agent_processes().is_empty()).await;
        assert_eq!(server.integrity_check(), "ok", "{at}");
    }
    let listed: Value = server.get("/api/sessions?limit=500").send().await.unwrap().json().await.unwrap();
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), ROUNDS);
    assert!(sessions.iter().all(|s| s["running"] == false));
    eprintln!(
        "crash loop: {ROUNDS} kills, {sent_before_kill} events sent before them, all kept; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
