//! Nothing lost on a restart: the event log, sessions and audit trail in
//! SQLite, through the real binary.

use std::process::Command;

use serde_json::Value;

use crate::harness::{BASIC, Frame, Server, alive, assert_flood_unbroken, eventually, ids, kinds, spawn};

#[tokio::test]
async fn a_restart_keeps_sessions_events_and_ids() {
    let mut server = Server::start();
    let session = server.open_session().await;
    let live = server.run_turn(&session, "replay basic").await;
    assert_eq!(kinds(&live), BASIC);

    assert!(server.terminate().success());
    server.restart();

    let mut replay = server.attach(&session, None).await;
    assert_eq!(replay.until_caught_up().await, live, "the same events, ids and timestamps");
    let mut resumed = server.attach(&session, Some("3")).await;
    assert_eq!(ids(&resumed.until_caught_up().await), vec![4, 5, 6, 7]);

    let listed: Value = server.get("/api/sessions").send().await.unwrap().json().await.unwrap();
    let one: Value = server.get(&format!("/api/session/{session}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["sessions"][0], one);
    assert_eq!(one["id"], session);
    assert_eq!(one["title"], "replay basic");
    assert_eq!(one["running"], false);
    assert_eq!(one["event_count"], 8);
    assert!(one["created"].as_str().unwrap().ends_with('Z'));

    // The CLI knows the session: the next turn resumes it.
    server.run_turn(&session, "replay basic").await;
    let runs = server.agent_runs();
    assert_eq!(runs.last().unwrap()["argv"][9], "--resume");
}

/// Killed with SIGKILL at many points of a turn, the server comes back with
/// a log that has no gaps, holds every event a client saw unchanged, closes
/// the interrupted turn, and leaves none of the turn's processes running.
#[tokio::test]
async fn killed_at_any_point_of_a_turn_nothing_is_lost() {
    const ROUNDS: u64 = 50;
    let mut server = Server::start();
    for round in 0..ROUNDS {
        let (session, mut stream) = server.attached().await;
        server.start_turn(&session, "grandchild\nbare-grandchild\nflood 400 200\nsleep 60").await;
        // Kill after a different number of events each round: before the
        // agent said anything, in the middle of the flood, after it.
        let kill_after = (round * 37) % 404; // the turn has 403 events before its sleep
        let mut seen = Vec::new();
        while (seen.len() as u64) < kill_after {
            match stream.next().await.expect("stream ended") {
                Frame::Event { data, .. } => seen.push(data),
                _ => continue,
            }
        }
        server.kill9();
        let leftovers = server.turn_pids(&session, &seen);

        server.restart();
        let mut replay = server.attach(&session, None).await;
        let log = replay.until_caught_up().await;
        let n = log.len() as u64;
        assert_eq!(ids(&log), (0..n).collect::<Vec<_>>(), "round {round}: no gaps");
        assert_eq!(&log[..seen.len()], &seen[..], "round {round}: what the client saw is there, unchanged");
        assert_flood_unbroken(&log);
        assert_eq!(kinds(&log[log.len() - 2..]), ["error", "turn_end"], "round {round}");
        assert_eq!(log[log.len() - 2]["error"], "server stopped during the turn");
        for pid in leftovers {
            eventually("a process of the killed turn to be gone", || !alive(pid)).await;
        }
        if round % 10 == 0 {
            assert_eq!(server.integrity_check(), "ok", "round {round}");
        }
    }
    assert_eq!(server.integrity_check(), "ok");
    let listed: Value = server.get("/api/sessions?limit=500").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["sessions"].as_array().unwrap().len() as u64, ROUNDS);
    assert!(listed["sessions"].as_array().unwrap().iter().all(|s| s["running"] == false));
}

#[tokio::test]
async fn corrupt_foreign_and_newer_databases_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("breakglass.db");
    let options = Server::options();

    let garbage = b"not a database; an incident log someone pasted here\n".repeat(200);
    std::fs::write(&db, &garbage).unwrap();
    let log = spawn(dir.path(), &options).expect_err("a corrupt database must stop the server");
    assert!(log.contains("not a usable SQLite database") && log.contains("refusing to touch it"), "{log}");
    assert_eq!(std::fs::read(&db).unwrap(), garbage);

    std::fs::remove_file(&db).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("CREATE TABLE recipes (name TEXT); INSERT INTO recipes VALUES ('soup');").unwrap();
    drop(conn);
    let log = spawn(dir.path(), &options).expect_err("a foreign database must stop the server");
    assert!(log.contains("not breakglass's"), "{log}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let soup: String = conn.query_row("SELECT name FROM recipes", [], |r| r.get(0)).unwrap();
    assert_eq!(soup, "soup");
    drop(conn);

    std::fs::remove_file(&db).unwrap();
    let (mut child, _) = spawn(dir.path(), &options).expect("a fresh database");
    child.kill().unwrap();
    child.wait().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", 7).unwrap();
    drop(conn);
    let log = spawn(dir.path(), &options).expect_err("a newer schema must stop the server");
    assert!(log.contains("written by a newer breakglass (schema 7"), "{log}");
}

#[tokio::test]
async fn the_audit_trail_records_each_action_and_verify_detects_an_edit() {
    let mut server = Server::start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    assert_eq!(server.cancel(&session).await["cancelled"], false);
    let verb = server.post("/api/pve/status").send().await.unwrap();
    assert_eq!(verb.status(), 503, "no hypervisor configured");

    let page: Value = server.get("/api/audit").send().await.unwrap().json().await.unwrap();
    let records = page["records"].as_array().unwrap();
    let actions: Vec<_> =
        records.iter().rev().map(|r| (r["action"].as_str().unwrap(), r["outcome"].as_str().unwrap())).collect();
    assert_eq!(
        actions,
        [
            ("session.open", "ok"),
            ("prompt", "started"),
            ("cancel", "no turn running"),
            ("verb.status", "requested"),
            ("verb.status", "not run: no hypervisor is configured: set BREAKGLASS_PVE_HOST"),
        ]
    );
    assert!(records.iter().all(|r| r["identity"] == "bearer" && r["peer"] == "127.0.0.1"));
    assert_eq!(records[3]["target"], session, "the prompt names its session");
    assert_eq!(records[0]["prev_hash"], records[1]["hash"], "each record carries the hash of the one before");
    let older: Value = server.get("/api/audit?limit=2&before=3").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        older["records"].as_array().unwrap().iter().map(|r| r["seq"].as_i64().unwrap()).collect::<Vec<_>>(),
        [2, 1]
    );

    let data_dir = server.data_dir();
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_breakglass"))
            .args(["audit", "verify", "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap()
    };
    let intact = verify();
    assert!(intact.status.success());
    assert_eq!(String::from_utf8_lossy(&intact.stdout), "audit trail intact: 5 records\n");

    assert!(server.terminate().success());
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    conn.execute("UPDATE audit SET identity = 'nobody' WHERE seq = 2", []).unwrap();
    drop(conn);
    let broken = verify();
    assert_eq!(broken.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains("audit trail broken at record 2: its contents were changed"), "{stderr}");
}

#[tokio::test]
async fn exports_read_as_a_timeline_and_as_json_lines() {
    let server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "replay basic").await;

    let jsonl = server.get(&format!("/api/session/{session}/export?format=jsonl")).send().await.unwrap();
    assert_eq!(jsonl.headers()["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = jsonl.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines, events);

    let md = server.get(&format!("/api/session/{session}/export?format=md")).send().await.unwrap();
    assert!(md.headers()["content-disposition"].to_str().unwrap().contains(&format!("breakglass-{session}.md")));
    let md = md.text().await.unwrap();
    for expected in [
        "# Incident transcript: replay basic",
        "Prompt from bearer",
        "> replay basic",
        "Tool `Bash`:**",
        "```sh\nssh devvm 'uptime; free -m'\n```",
        "load average: 0.10",
        "Result** (success, 8.1 s, 2 turns, $0.0213):",
        "Load and memory are normal; devvm is healthy.",
    ] {
        assert!(md.contains(expected), "{expected:?} missing from:\n{md}");
    }
    let bad = server.get(&format!("/api/session/{session}/export?format=pdf")).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let missing = server.get(&format!("/api/session/{}/export", uuid_zero())).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}

fn uuid_zero() -> &'static str {
    "00000000-0000-0000-0000-000000000000"
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs to fill, so it runs as root (as CI does)"
        );
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status();
        assert!(status.is_ok_and(|s| s.success()), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }

    /// Writes a file until the filesystem is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("ballast");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let mut small = [0u8; 512];
        while file.write_all(&small).is_ok() {
            small[0] = small[0].wrapping_add(1);
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Disk full while a turn appends: the turn ends visibly, the API says why
/// with 503, mutating verbs are refused unrecorded, what was written stays
/// readable, and writing resumes once there is room again.
#[tokio::test]
async fn a_full_disk_ends_the_turn_visibly_and_writing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&dir.path().join("data"), "4m");
    let tripwire = dir.path().join("ssh-ran");
    let fake_ssh = dir.path().join("ssh");
    std::fs::write(&fake_ssh, format!("#!/bin/sh\ntouch {}\n", tripwire.display())).unwrap();
    Command::new("chmod").arg("755").arg(&fake_ssh).status().unwrap();
    let server = Server::options()
        .env("BREAKGLASS_PVE_HOST", "192.0.2.10")
        .env("BREAKGLASS_SSH_BIN", fake_ssh.display().to_string())
        .start_in(dir);

    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "say before the disk filled\nsleep 1\nflood 3000 2000\nresult").await;
    loop {
        if let Some(Frame::Event { data, .. }) = stream.next().await
            && data["text"] == "before the disk filled"
        {
            break;
        }
    }
    let ballast = tmpfs.fill();

    // The turn ends, and attached clients are told why even though the log
    // could not keep it.
    let (mut saw_error, mut saw_end) = (None, false);
    while !saw_end {
        match stream.next().await.expect("the stream ended") {
            Frame::Event { data, .. } | Frame::Notice(data) => match data["kind"].as_str() {
                Some("error") => saw_error = data["error"].as_str().map(str::to_owned),
                Some("turn_end") => saw_end = true,
                _ => {}
            },
            _ => {}
        }
    }
    let error = saw_error.expect("an error before turn_end");
    assert!(error.contains("full"), "{error}");

    let refused = server.post("/api/session").send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let detail: Value = refused.json().await.unwrap();
    assert!(detail["detail"].as_str().unwrap().contains("full"), "{detail}");
    // Counted (README "Metrics"): the writes the full disk refused, and the
    // turn that ended on them.
    let full = crate::metrics::value(&server, "breakglass_storage_write_failures_total", &[("error", "full")]).await;
    assert!(full >= 1.0, "{full}");
    crate::metrics::reaches(&server, "breakglass_turns_ended_total", &[("how", "log-failed")], 1.0).await;
    let verb = server.post("/api/pve/reset").send().await.unwrap();
    assert_eq!(verb.status(), 503, "a mutating verb is not run unrecorded");
    assert!(!tripwire.exists(), "ssh was never started");

    let mut replay = server.attach(&session, None).await;
    let kept = replay.until_caught_up().await;
    assert_eq!(kept[1]["text"], "before the disk filled", "what was written stays readable");
    assert_flood_unbroken(&kept);
    let listed: Value = server.get(&format!("/api/session/{session}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["running"], false, "no turn runs, whatever the store could not record");

    // A restart while the disk is still full must not keep the console down.
    let mut server = server;
    assert!(server.terminate().success());
    server.restart();
    assert_eq!(server.get("/api/sessions").send().await.unwrap().status(), 200);

    std::fs::remove_file(ballast).unwrap();
    assert_eq!(server.post("/api/session").send().await.unwrap().status(), 200, "writing resumes");
    let mut stream = server.attach(&session, None).await;
    stream.until_caught_up().await;
    server.start_turn(&session, "replay basic").await;
    let mut after = Vec::new();
    while !(after.iter().any(|e: &Value| e["kind"] == "user") && after.last().is_some_and(|e| e["kind"] == "turn_end"))
    {
        if let Some(Frame::Event { data, .. }) = stream.next().await {
            after.push(data);
        }
    }
    assert!(kinds(&after).ends_with(&BASIC), "the new turn ran whole: {:?}", kinds(&after));
    let mut replay = server.attach(&session, None).await;
    let log = replay.until_caught_up().await;
    let n = log.len() as u64;
    assert_eq!(ids(&log), (0..n).collect::<Vec<_>>(), "no gaps");
    // Every prompt follows the end of the turn before it.
    for (i, event) in log.iter().enumerate().skip(1) {
        if event["kind"] == "user" {
            assert_eq!(log[i - 1]["kind"], "turn_end", "event {i} in {log:#?}");
        }
    }
    assert_eq!(server.integrity_check(), "ok");
    drop(server);
    drop(tmpfs);
}

#[tokio::test]
async fn a_second_server_on_the_same_data_is_refused() {
    let server = Server::start();
    let log = spawn(server.dir.path(), &Server::options()).expect_err("two servers on one database");
    assert!(log.contains("another breakglass is using this data directory"), "{log}");
    assert_eq!(server.get("/api/sessions").send().await.unwrap().status(), 200, "the first one is unharmed");
}

#[tokio::test]
async fn the_session_list_pages_without_skipping_or_repeating() {
    let server = Server::start();
    let mut opened = Vec::new();
    for _ in 0..23 {
        opened.push(server.open_session().await);
    }
    let mut listed: Vec<String> = Vec::new();
    let mut created: Vec<String> = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = "/api/sessions?limit=5".to_owned();
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let page: Value = server.get(&url).send().await.unwrap().json().await.unwrap();
        let sessions = page["sessions"].as_array().unwrap();
        let ids: Vec<String> = sessions.iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
        created.extend(sessions.iter().map(|s| s["created"].as_str().unwrap().to_owned()));
        if ids.is_empty() {
            break;
        }
        before = ids.last().cloned();
        listed.extend(ids);
    }
    let mut expected = opened.clone();
    expected.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, expected, "every session once");
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first: {created:?}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Open descriptors of a process on its database files (`breakglass.db*`).
fn database_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.file_name().is_some_and(|n| n.to_string_lossy().starts_with("breakglass.db")))
        .count()
}

/// Regression: a thousand clients replaying at once each got a database
/// connection of their own, and the server kept about a thousand open
/// handles and hundreds of MiB after they had all gone.
#[tokio::test]
async fn an_attach_storm_leaves_no_database_handles_or_memory_behind() {
    const CLIENTS: usize = 1000;
    let server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "flood 1000 10\nresult").await;
    assert_eq!(events.len(), 1003);
    let pid = server.pid();
    let (idle_rss, idle_fds) = (rss_kib(pid), database_fds(pid));

    let all_caught_up = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let request = server.get(&format!("/api/session/{session}/stream"));
        let all_caught_up = all_caught_up.clone();
        clients.spawn(async move {
            let response = request.send().await.expect("attach");
            assert_eq!(response.status(), 200);
            let mut body = response.bytes_stream();
            let mut tail = Vec::new();
            while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
                tail.extend_from_slice(&chunk.expect("the stream broke"));
                if tail.windows(16).any(|w| w == b"event: caught-up") {
                    break;
                }
                tail.drain(..tail.len().saturating_sub(16));
            }
            // Every client stays attached until all have replayed, then all leave.
            all_caught_up.wait().await;
            drop(body);
        });
    }
    tokio::time::timeout(std::time::Duration::from_secs(300), all_caught_up.wait())
        .await
        .expect("every client replayed the whole log");
    let (peak_rss, peak_fds) = (rss_kib(pid), database_fds(pid));
    while let Some(client) = clients.join_next().await {
        client.unwrap();
    }

    // Bounded by the read pool (4 read connections, each on the database
    // and its WAL, plus the writer's database, WAL and shared memory).
    const FDS: usize = 4 * 3 + 3;
    const MARGIN_KIB: u64 = 64 * 1024;
    let started = std::time::Instant::now();
    let (mut rss, mut fds) = (u64::MAX, usize::MAX);
    while started.elapsed() < crate::harness::DEADLINE {
        (rss, fds) = (rss_kib(pid), database_fds(pid));
        if fds <= FDS && rss <= idle_rss + MARGIN_KIB {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    println!(
        "attach storm: idle {idle_rss} KiB / {idle_fds} fds, peak {peak_rss} KiB / {peak_fds} fds, \
         after {rss} KiB / {fds} fds ({:.1}s later)",
        started.elapsed().as_secs_f64()
    );
    assert!(peak_fds <= FDS, "at most the read pool's connections at once: {peak_fds} database descriptors");
    assert!(fds <= FDS, "{fds} descriptors on the database files remain");
    assert!(rss <= idle_rss + MARGIN_KIB, "resident memory {rss} KiB, idle {idle_rss} KiB");
    let mut replay = server.attach(&session, None).await;
    assert_eq!(replay.until_caught_up().await, events, "the server still replays");
}

/// Reads a stream to the end of the running turn, whether that end was
/// logged (an event) or only told (a notice), keeping both.
async fn until_turn_end_or_notice(stream: &mut crate::harness::Attached) -> (Vec<Value>, Vec<Value>) {
    let (mut events, mut notices) = (Vec::new(), Vec::new());
    loop {
        match stream.next().await.expect("the stream ended before the turn did") {
            Frame::Event { data, .. } => {
                let end = data["kind"] == "turn_end";
                events.push(data);
                if end {
                    return (events, notices);
                }
            }
            Frame::Notice(data) => {
                let end = data["kind"] == "turn_end";
                notices.push(data);
                if end {
                    return (events, notices);
                }
            }
            Frame::Delta(_) | Frame::CaughtUp | Frame::Keepalive => {}
        }
    }
}

/// Regression: the writer commits many sessions' writes in one transaction,
/// and one failing write failed all of them, ending a healthy session's turn
/// because of another session's trouble.
#[tokio::test]
async fn a_failing_write_fails_only_its_own_session() {
    let mut server = Server::start();
    let healthy = server.open_session().await;
    let poisoned = server.open_session().await;
    assert!(server.terminate().success());
    // The poisoned session's writes fail once both sessions are flooding, so
    // that its failures share transactions with the healthy session's writes.
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    conn.execute_batch(&format!(
        "CREATE TRIGGER poison BEFORE INSERT ON events
         WHEN NEW.session = '{poisoned}' AND NEW.id >= 3
              AND (SELECT event_count FROM sessions WHERE id = '{healthy}') >= 1000
         BEGIN SELECT RAISE(ABORT, 'boom'); END;"
    ))
    .unwrap();
    drop(conn);
    server.restart();

    let mut healthy_stream = server.attach(&healthy, None).await;
    healthy_stream.until_caught_up().await;
    let mut poisoned_stream = server.attach(&poisoned, None).await;
    poisoned_stream.until_caught_up().await;
    server.start_turn(&healthy, "flood 20000 10\nresult").await;
    server.start_turn(&poisoned, "flood 20000 10\nresult").await;

    let (events, notices) = until_turn_end_or_notice(&mut poisoned_stream).await;
    assert!(events.len() < 20_000, "the poisoned session's turn was stopped");
    let told: Vec<&str> = events.iter().chain(&notices).filter_map(|e| e["error"].as_str()).collect();
    assert!(told.iter().any(|e| e.contains("boom")), "the poisoned session is told why: {told:?}");

    let (events, notices) = until_turn_end_or_notice(&mut healthy_stream).await;
    assert!(notices.is_empty(), "{notices:?}");
    assert_eq!(events.len(), 20_003, "user, every line, result, turn_end");
    assert_eq!(kinds(&events[events.len() - 2..]), ["result", "turn_end"]);
    assert_flood_unbroken(&events);
    let mut replay = server.attach(&healthy, None).await;
    let log = replay.until_caught_up().await;
    assert_eq!(ids(&log), (0..20_003).collect::<Vec<_>>());
    assert_eq!(log, events, "the log holds what the client saw");
}

/// `breakglass audit verify --data-dir <data>`.
fn verify_audit(data_dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap()
}

/// Regression: deleting the last records of the audit trail left a valid,
/// shorter chain, and `audit verify` called it intact.
#[tokio::test]
async fn removing_the_last_audit_records_is_detected() {
    let mut server = Server::start();
    for _ in 0..4 {
        server.open_session().await; // a `session.open` record each
    }
    assert!(server.terminate().success());
    let intact = verify_audit(&server.data_dir());
    assert_eq!(String::from_utf8_lossy(&intact.stdout), "audit trail intact: 4 records\n");

    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    assert_eq!(conn.execute("DELETE FROM audit WHERE seq > 2", []).unwrap(), 2);
    drop(conn);
    let broken = verify_audit(&server.data_dir());
    assert_eq!(broken.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        stderr.contains(
            "audit trail broken at record 3: the trail was truncated: it ends at record 2, \
             but its head anchor (audit.head) names record 4"
        ),
        "{stderr}"
    );

    // Records written after the truncation do not cover it up.
    server.restart();
    for _ in 0..3 {
        server.open_session().await;
    }
    assert!(server.terminate().success());
    let still = verify_audit(&server.data_dir());
    assert_eq!(still.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&still.stderr);
    assert!(stderr.contains("record 4 is not the one its head anchor (audit.head) names"), "{stderr}");
    crate::harness::eventually("the anchor mismatch in the log", || {
        server.log().contains("the audit trail does not match its head anchor")
    })
    .await;
}

/// A first start makes the database at the latest schema in one commit
/// and does not check the file it has just made; the next start checks it.
#[tokio::test]
async fn a_new_database_is_made_in_one_step_and_checked_from_the_next_start() {
    let mut server = Server::start();
    eventually("the start-up in the log", || server.log().contains("accepting connections")).await;
    let log = server.log();
    let migrated: Vec<_> = log.lines().filter(|l| l.contains("database schema migrated")).collect();
    assert_eq!(migrated.len(), 1, "one migration step:\n{log}");
    assert!(migrated[0].contains("from=0"), "{}", migrated[0]);
    assert!(log.contains("created a new database"), "{log}");
    assert!(!log.contains("quick_check"), "the file just made was checked:\n{log}");
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    let schema: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    let journal: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
    drop(conn);
    assert!(migrated[0].contains(&format!("schema={schema}")), "{}", migrated[0]);
    assert_eq!(journal, "wal");
    assert_eq!(server.integrity_check(), "ok");

    assert!(server.terminate().success());
    server.restart();
    let session = server.open_session().await;
    assert_eq!(kinds(&server.run_turn(&session, "replay basic").await), BASIC);
    eventually("the second start-up in the log", || server.log().matches("accepting connections").count() == 2).await;
    let log = server.log();
    assert_eq!(log.matches("database checked (quick_check): sound").count(), 1, "{log}");
}

/// Regression: an empty `breakglass.db` (a truncated file) was quietly set
/// up as a new, empty database, and the history it had held was forgotten.
#[tokio::test]
async fn an_empty_database_file_is_refused_not_set_up_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("breakglass.db"), b"").unwrap();
    let log = spawn(dir.path(), &Server::options()).expect_err("an empty database file must stop the server");
    assert!(log.contains("the file is empty (0 bytes)"), "{log}");
    assert!(log.contains("To start afresh on purpose, move it aside or delete it"), "{log}");
    assert_eq!(std::fs::metadata(data.join("breakglass.db")).unwrap().len(), 0, "left as it was");
}

/// Regression: a database damaged in the middle (a page of the events
/// b-tree overwritten) was opened as if sound.
#[tokio::test]
async fn a_database_damaged_in_the_middle_is_refused_at_start_up() {
    let mut server = Server::start();
    let session = server.open_session().await;
    server.run_turn(&session, "flood 3000 100\nresult").await;
    assert!(server.terminate().success(), "a clean stop leaves everything in the database file");

    // A leaf page of the events table (an index b-tree, page type 0x0a,
    // whose keys start with the session id) in the middle of the file: its
    // header and cell pointers are overwritten, as a bad sector would.
    let db = server.db_path();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    drop(conn);
    let mut bytes = std::fs::read(&db).unwrap();
    let page_size = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
    let pages = bytes.len() / page_size;
    let page = (pages / 2..pages)
        .find(|&p| {
            let page = &bytes[p * page_size..(p + 1) * page_size];
            page[0] == 0x0a && page.windows(session.len()).any(|w| w == session.as_bytes())
        })
        .expect("a leaf page of the events table");
    bytes[page * page_size + 1..page * page_size + 64].fill(0xa5);
    std::fs::write(&db, &bytes).unwrap();

    let log = spawn(server.dir.path(), &Server::options()).expect_err("a damaged database must stop the server");
    assert!(log.contains("the database is damaged (SQLite's quick_check:"), "{log}");
    assert!(log.contains("sqlite3 breakglass.db .recover | sqlite3 recovered.db"), "{log}");
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "the damaged file is left as it was");
}

/// The frames of a stream until the server ends it, or up to `caught-up`
/// (after which a live stream goes on for ever).
async fn frames_to_the_end(mut stream: crate::harness::Attached) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(frame) = stream.next().await {
        let caught_up = frame == Frame::CaughtUp;
        frames.push(frame);
        if caught_up {
            break;
        }
    }
    frames
}

/// Regression: a log with rows missing in the middle replayed short and
/// still said `caught-up`, so the client took part of the history for all
/// of it.
#[tokio::test]
async fn a_log_with_missing_rows_ends_the_replay_with_an_error_not_caught_up() {
    let mut server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "replay basic").await;
    assert_eq!(events.len(), 8);
    let sound = server.open_session().await;
    server.run_turn(&sound, "replay basic").await;
    assert!(server.terminate().success());
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    conn.execute("DELETE FROM events WHERE session = ?1 AND id IN (3, 4)", [&session]).unwrap();
    drop(conn);
    server.restart();

    let damaged = serde_json::json!({
        "kind": "error",
        "error": "the log of this session is damaged: replay stopped at id 3 of 8",
    });
    for (last_event_id, first) in [(None, 0), (Some("1"), 2)] {
        let frames = frames_to_the_end(server.attach(&session, last_event_id).await).await;
        let mut expected: Vec<Frame> =
            events[first..3].iter().map(|e| Frame::Event { id: e["id"].as_u64().unwrap(), data: e.clone() }).collect();
        expected.push(Frame::Notice(damaged.clone()));
        assert_eq!(frames, expected, "the stream ends after saying where the replay stopped");
    }
    crate::harness::eventually("the damage in the log", || server.log().contains("the log of this session is damaged"))
        .await;

    // Rows missing at the end: the replay is short of the session's count.
    server.terminate();
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    conn.execute("DELETE FROM events WHERE session = ?1 AND id >= 6", [&sound]).unwrap();
    drop(conn);
    server.restart();
    let frames = frames_to_the_end(server.attach(&sound, None).await).await;
    assert_eq!(
        frames.last(),
        Some(&Frame::Notice(serde_json::json!({
            "kind": "error",
            "error": "the log of this session is damaged: replay stopped at id 6 of 8",
        })))
    );
    // A sound log still replays to caught-up.
    let other = server.open_session().await;
    server.run_turn(&other, "replay basic").await;
    assert_eq!(server.attach(&other, None).await.until_caught_up().await.len(), 8);
}

/// Regression: when the storage writer's thread died, the server went on
/// serving with storage closed for good. It now logs why and exits with an
/// error, so that its supervisor restarts it.
#[tokio::test]
async fn the_server_stops_with_an_error_when_its_storage_writer_dies() {
    let dir = tempfile::tempdir().unwrap();
    // A test hook of debug builds: the writer panics on its fourth command.
    let options = Server::options().env("BREAKGLASS_FAULT_WRITER_PANIC_AFTER", "4");
    let (mut child, base) = spawn(dir.path(), &options).expect("the server starts");
    let client = reqwest::Client::new();
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("\nbreakglass_storage_writer_failures_total 0\n"), "{metrics}");
    // Each opened session is two commands (the session, its audit record).
    for _ in 0..2 {
        let _ = client.post(format!("{base}/api/session")).bearer_auth(crate::harness::TOKEN).send().await;
    }
    let status = crate::harness::wait_child(&mut child, crate::harness::DEADLINE)
        .unwrap_or_else(|| panic!("the server kept running without its storage writer"));
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("the storage writer died: storage is closed, the server stops"), "{log}");
    assert!(log.contains("injected fault"), "{log}");
    assert!(log.contains("breakglass: the storage writer died"), "{log}");
}

/// `strace` attached to a running server, recording its disk syncs, its
/// writes to the database's WAL and to sockets, with file names (`-yy`).
struct Strace {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Strace {
    fn attach(pid: u32, out: std::path::PathBuf) -> Strace {
        let child = Command::new("strace")
            .args(["-f", "-yy", "-s", "8192", "-o"])
            .arg(&out)
            .args(["-e", "trace=pwrite64,fdatasync,fsync,write,writev,sendto,sendmsg", "-p"])
            .arg(pid.to_string())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("strace (scripts/test installs it)");
        Strace { child, out }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Detaches (SIGTERM) and returns every line it wrote.
    fn finish(mut self) -> Vec<String> {
        crate::harness::signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        self.text().lines().map(str::to_owned).collect()
    }
}

/// Runs a turn under strace; true when the WAL was synced after the turn's
/// text event was written to it and before that event was written to the
/// attached client's socket.
async fn wal_synced_before_the_client_saw_it(server: &Server) -> bool {
    let (session, mut stream) = server.attached().await;
    let strace = Strace::attach(server.pid(), server.dir.path().join("strace.txt"));
    // Attached once strace sees the server answer.
    let started = std::time::Instant::now();
    while !strace.text().contains("HTTP/1.1 200") {
        assert!(started.elapsed() < crate::harness::DEADLINE, "strace never attached");
        server.client.get(server.url("/health")).send().await.unwrap();
    }
    server.start_turn(&session, "echo-prompt").await;
    let events = stream.until_turn_end().await;
    let lines = strace.finish();
    // The event's text holds the prompt's SHA-256, which nothing else does.
    let text = events.iter().find(|e| e["kind"] == "text").expect("the agent's text")["text"].as_str().unwrap();
    let marker = text.split(' ').nth(4).expect("the digest").to_owned();
    let wal = |l: &String| l.contains("breakglass.db-wal>");
    let written =
        lines.iter().position(|l| l.contains("pwrite64(") && wal(l) && l.contains(&marker)).expect("the WAL write");
    let sent = lines
        .iter()
        .position(|l| l.contains("TCP:[") && l.contains(&marker) && !l.contains("pwrite64("))
        .expect("the write to the client");
    assert!(written < sent, "an event is committed before a client sees it");
    // A sync of the WAL that began after the write and returned before the
    // send (strace splits a call that other threads interrupt into an
    // `<unfinished ...>` line and a `resumed` line of the same thread).
    lines[written..sent].iter().enumerate().any(|(i, line)| {
        let is_sync = (line.contains("fdatasync(") || line.contains("fsync(")) && wal(line);
        if !is_sync || line.contains("resumed>") {
            return false;
        }
        if line.contains(") = 0") {
            return true;
        }
        let thread = line.split(' ').next().unwrap_or_default();
        // strace pads a resumed call's result: `<... fsync resumed>)      = 0`.
        lines[written + i + 1..sent]
            .iter()
            .any(|l| l.starts_with(thread) && l.contains("sync resumed>)") && l.trim_end().ends_with("= 0"))
    })
}

/// Regression: with the default settings a commit was not synced to disk
/// (synchronous=NORMAL), so after a power loss the last events could vanish
/// and their ids be given to other events, under a client that had seen
/// them. By default the WAL is now synced before an event is published.
#[tokio::test]
async fn by_default_an_event_is_on_disk_before_a_client_sees_it() {
    let server = Server::start();
    // Logging is asynchronous: the line may reach the file a moment later.
    crate::harness::eventually("the durability in the log", || {
        server.log().contains("database durability: synchronous=FULL in WAL mode")
    })
    .await;
    assert!(wal_synced_before_the_client_saw_it(&server).await, "the WAL is synced before the event is sent");

    // `normal` is the opt-in that does not sync a commit (the test tells the two apart).
    let normal = Server::options().arg("--durability").arg("normal").start();
    crate::harness::eventually("the durability in the log", || {
        normal.log().contains("database durability: synchronous=NORMAL in WAL mode")
    })
    .await;
    assert!(!wal_synced_before_the_client_saw_it(&normal).await, "normal commits without a sync");
}

/// Regression: an audit record named the caller but not how it had
/// authenticated, so a proxy user literally named `bearer` could not be
/// told apart from the bearer token.
#[tokio::test]
async fn audit_records_say_how_the_caller_authenticated() {
    let mut server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1/32").start();
    let by_proxy =
        server.client.post(server.url("/api/session")).header("X-authentik-username", "bearer").send().await.unwrap();
    assert_eq!(by_proxy.status(), 200);
    server.open_session().await; // with the bearer token

    let page: Value = server.get("/api/audit").send().await.unwrap().json().await.unwrap();
    let records = page["records"].as_array().unwrap();
    let who: Vec<(&str, &str, &str)> = records
        .iter()
        .rev()
        .map(|r| (r["action"].as_str().unwrap(), r["identity"].as_str().unwrap(), r["via"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(who, [("session.open", "bearer", "proxy"), ("session.open", "bearer", "bearer")]);

    assert!(server.terminate().success());
    let intact = verify_audit(&server.data_dir());
    assert_eq!(String::from_utf8_lossy(&intact.stdout), "audit trail intact: 2 records\n");
    // The method is part of what the chain protects.
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    conn.execute("UPDATE audit SET via = 'bearer' WHERE seq = 1", []).unwrap();
    drop(conn);
    let stderr = String::from_utf8_lossy(&verify_audit(&server.data_dir()).stderr).into_owned();
    assert!(stderr.contains("audit trail broken at record 1: its contents were changed"), "{stderr}");
}
