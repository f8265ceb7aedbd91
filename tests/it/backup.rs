//! `breakglass backup` and `breakglass restore` (README "Data, durability
//! and backups"), run as commands against the real binary's data.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use crate::harness::{BASIC, Frame, Server, kinds};

/// `breakglass <command> FILE --data-dir DATA [extra]`, run to its end.
fn breakglass(command: &str, file: &Path, data: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .arg(command)
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env_remove("BREAKGLASS_DATA_DIR")
        .output()
        .expect("run breakglass")
}

fn backup(data: &Path, file: &Path, extra: &[&str]) -> Output {
    breakglass("backup", file, data, extra)
}

fn restore(data: &Path, file: &Path, extra: &[&str]) -> Output {
    breakglass("restore", file, data, extra)
}

fn said(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn succeeded(output: &Output, what: &str) {
    assert!(output.status.success(), "{what} failed: {}", said(output));
}

/// Exit status 1 and what the command said.
fn refused(output: &Output, what: &str) -> String {
    assert_eq!(output.status.code(), Some(1), "{what} was not refused: {}", said(output));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn read_only(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open read-only")
}

/// A session's events as a file holds them: (id, JSON).
fn events_in(path: &Path, session: &str) -> Vec<(u64, Value)> {
    let conn = read_only(path);
    let mut stmt = conn.prepare("SELECT id, json FROM events WHERE session = ?1 ORDER BY id").unwrap();
    stmt.query_map([session], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))
        .unwrap()
        .map(|row| {
            let (id, json) = row.unwrap();
            (id, serde_json::from_str(&json).unwrap())
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The names in a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Every event of a session as a client replays it: (id, data).
async fn replayed(server: &Server, session: &str) -> Vec<(u64, Value)> {
    let mut stream = server.attach(session, None).await;
    let mut events = Vec::new();
    loop {
        match stream.next().await.expect("stream ended before caught-up") {
            Frame::Event { id, data } => events.push((id, data)),
            Frame::CaughtUp => return events,
            _ => {}
        }
    }
}

/// `breakglass audit verify --data-dir DATA`.
fn audit_verify(data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_breakglass"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data)
        .output()
        .expect("run breakglass")
}

/// A backup taken while a turn floods its log is a consistent snapshot: it
/// passes `integrity_check`, holds at least the events a client had seen
/// when it began, with ids 0..n and no gap, each the same as the log's, and
/// its session row counts exactly those events. The file is the operator's
/// alone (0600).
#[tokio::test]
async fn a_backup_during_a_flooding_turn_holds_every_event_up_to_a_point_with_no_gap() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "flood 4000 300\nsleep 60").await;
    let mut seen = 0;
    while seen < 300 {
        if let Frame::Event { .. } = stream.next().await.expect("stream ended") {
            seen += 1;
        }
    }
    let file = server.dir.path().join("copy.db");
    let output = backup(&server.data_dir(), &file, &[]);
    succeeded(&output, "backup");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(report.contains("sessions: 1,"), "{report}");
    assert_eq!(mode(&file), 0o600);

    let conn = read_only(&file);
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let (count, running): (i64, bool) = conn
        .query_row("SELECT event_count, turn_running FROM sessions WHERE id = ?1", [&session], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    drop(conn);
    let copied = events_in(&file, &session);
    assert!(copied.len() >= seen, "the copy holds {} events, a client had seen {seen}", copied.len());
    assert_eq!(copied.len() as i64, count, "the session row and its events are of one moment");
    assert!(running, "the copy was taken during the turn");
    assert!(report.contains(&format!("events: {count},")), "{report}");
    assert_eq!(copied.iter().map(|(id, _)| *id).collect::<Vec<_>>(), (0..copied.len() as u64).collect::<Vec<_>>());

    server.cancel(&session).await;
    let log = replayed(&server, &session).await;
    assert!(log.len() > copied.len());
    assert_eq!(copied, log[..copied.len()], "each copied event is the log's, unchanged");
}

/// A server started on data restored from a backup serves the sessions and
/// events the backup held (same ids and timestamps), and its audit trail
/// verifies with the backup's records.
#[tokio::test]
async fn a_server_on_restored_data_serves_the_same_sessions_and_events() {
    let mut original = Server::start();
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let session = original.open_session().await;
        assert_eq!(kinds(&original.run_turn(&session, "replay basic").await), BASIC);
        sessions.push(session);
    }
    let file = original.dir.path().join("copy.db");
    succeeded(&backup(&original.data_dir(), &file, &[]), "backup");
    let listed: Value = original.get("/api/sessions").send().await.unwrap().json().await.unwrap();
    let mut logs = Vec::new();
    for session in &sessions {
        logs.push(replayed(&original, session).await);
    }
    assert!(original.terminate().success());
    let records = String::from_utf8_lossy(&audit_verify(&original.data_dir()).stdout).into_owned();

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    succeeded(&restore(&data, &file, &[]), "restore");
    assert_eq!(mode(&data.join("breakglass.db")), 0o600);
    let verified = audit_verify(&data);
    assert!(verified.status.success(), "{}", said(&verified));
    assert_eq!(String::from_utf8_lossy(&verified.stdout), records, "the same audit records");

    let restored = Server::options().start_in(dir);
    let relisted: Value = restored.get("/api/sessions").send().await.unwrap().json().await.unwrap();
    assert_eq!(relisted, listed);
    for (session, log) in sessions.iter().zip(&logs) {
        assert_eq!(&replayed(&restored, session).await, log, "the same events, ids and timestamps");
    }
}

/// Restoring over a data directory keeps the database it replaces (with its
/// WAL) beside it, leaves no `-wal` or `-shm` of it under the live name, and
/// rolls the server back to the backup.
#[tokio::test]
async fn restore_keeps_the_replaced_database_aside_and_rolls_back() {
    let mut server = Server::start();
    let before = server.open_session().await;
    server.run_turn(&before, "replay basic").await;
    let file = server.dir.path().join("copy.db");
    succeeded(&backup(&server.data_dir(), &file, &[]), "backup");
    let after = server.open_session().await;
    server.run_turn(&after, "replay basic").await;
    server.kill9(); // its WAL is left behind, holding commits

    let data = server.data_dir();
    succeeded(&restore(&data, &file, &[]), "restore");
    let names = listing(&data);
    assert!(!names.iter().any(|n| n == "breakglass.db-wal" || n == "breakglass.db-shm"), "{names:?}");
    let aside = names.iter().find(|n| n.starts_with("breakglass.db.before-restore-") && !n.contains("-wal"));
    let aside = data.join(aside.unwrap_or_else(|| panic!("nothing kept aside: {names:?}")));
    assert_eq!(events_in(&aside, &after).len(), 8, "the replaced database, with its WAL, is whole");
    assert!(audit_verify(&data).status.success());

    server.restart();
    let listed: Value = server.get("/api/sessions").send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = listed["sessions"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![before.as_str()]);
}

/// While a server holds the data directory, restore is refused, names the
/// server's pid, and changes nothing there.
#[tokio::test]
async fn restore_is_refused_while_a_server_runs_and_changes_nothing() {
    let server = Server::start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    let file = server.dir.path().join("copy.db");
    succeeded(&backup(&server.data_dir(), &file, &[]), "backup");
    let data = server.data_dir();
    let (bytes, modified, names) = (
        std::fs::read(server.db_path()).unwrap(),
        std::fs::metadata(server.db_path()).unwrap().modified().unwrap(),
        listing(&data),
    );

    let stderr = refused(&restore(&data, &file, &[]), "restore beside a running server");
    assert!(stderr.contains("is using this data directory"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", server.pid())), "{stderr}");
    assert_eq!(std::fs::read(server.db_path()).unwrap(), bytes);
    assert_eq!(std::fs::metadata(server.db_path()).unwrap().modified().unwrap(), modified);
    assert_eq!(listing(&data), names);
    assert_eq!(server.get("/api/sessions").send().await.unwrap().status(), 200, "the server is unharmed");
}

/// Files that are not a sound breakglass backup are refused, each with its
/// reason, and the data directory is left as it was.
#[tokio::test]
async fn restore_refuses_corrupt_foreign_and_unanchored_files() {
    let mut server = Server::start();
    for _ in 0..3 {
        let session = server.open_session().await;
        server.run_turn(&session, "replay basic").await;
    }
    let good = server.dir.path().join("good.db");
    succeeded(&backup(&server.data_dir(), &good, &[]), "backup");
    assert!(server.terminate().success());
    let data = server.data_dir();
    let bytes = std::fs::read(server.db_path()).unwrap();
    let names = listing(&data);
    let scratch = server.dir.path();

    let garbage = scratch.join("garbage.db");
    std::fs::write(&garbage, b"this is not a database, it is a grocery list\n".repeat(100)).unwrap();
    let foreign = scratch.join("foreign.db");
    Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE photos (id INTEGER)").unwrap();
    // A page in the middle overwritten: SQLite's integrity_check finds it.
    let damaged = scratch.join("damaged.db");
    let mut pages = std::fs::read(&good).unwrap();
    let page_size = u16::from_be_bytes([pages[16], pages[17]]) as usize;
    assert!(pages.len() >= 4 * page_size, "the backup has pages to damage");
    pages[2 * page_size..3 * page_size].fill(0x5a);
    std::fs::write(&damaged, pages).unwrap();
    // The database file itself, copied by hand: no anchor travels with it.
    let raw = scratch.join("raw.db");
    std::fs::copy(server.db_path(), &raw).unwrap();
    // A backup whose last audit records were removed afterwards.
    let truncated = scratch.join("truncated.db");
    std::fs::copy(&good, &truncated).unwrap();
    assert!(Connection::open(&truncated).unwrap().execute("DELETE FROM audit WHERE seq > 1", []).unwrap() > 0);

    for (file, reason) in [
        (&garbage, "not a usable SQLite database"),
        (&foreign, "not breakglass's"),
        (&damaged, "integrity_check"),
        (&raw, "not a breakglass backup"),
        (&truncated, "the trail was truncated"),
    ] {
        let stderr = refused(&restore(&data, file, &[]), &file.display().to_string());
        assert!(stderr.contains(reason), "{}: {stderr}", file.display());
        assert_eq!(std::fs::read(data.join("breakglass.db")).unwrap(), bytes, "{}", file.display());
        assert_eq!(listing(&data), names, "{}", file.display());
    }
}

/// An existing file is never replaced without `--force`, and no temporary
/// file is left beside it; with `--force` it is replaced by a sound backup.
#[tokio::test]
async fn backup_refuses_to_overwrite_a_file_without_force() {
    let server = Server::start();
    server.open_session().await;
    let backups = tempfile::tempdir().unwrap();
    let file = backups.path().join("copy.db");
    std::fs::write(&file, "last week's backup").unwrap();

    let stderr = refused(&backup(&server.data_dir(), &file, &[]), "backup over a file");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "last week's backup");
    assert_eq!(listing(backups.path()), vec!["copy.db"]);

    succeeded(&backup(&server.data_dir(), &file, &["--force"]), "backup --force");
    assert_eq!(listing(backups.path()), vec!["copy.db"]);
    assert_eq!(mode(&file), 0o600);
    let sessions: i64 = read_only(&file).query_row("SELECT count(*) FROM sessions", [], |r| r.get(0)).unwrap();
    assert_eq!(sessions, 1);
}

/// A data directory that does not exist is created only when asked.
#[tokio::test]
async fn restore_creates_a_missing_data_dir_only_when_asked() {
    let server = Server::start();
    server.open_session().await;
    let file = server.dir.path().join("copy.db");
    succeeded(&backup(&server.data_dir(), &file, &[]), "backup");
    let missing: PathBuf = server.dir.path().join("elsewhere/data");

    let stderr = refused(&restore(&missing, &file, &[]), "restore into a missing directory");
    assert!(stderr.contains("--create"), "{stderr}");
    assert!(!missing.exists());

    succeeded(&restore(&missing, &file, &["--create"]), "restore --create");
    assert_eq!(mode(&missing), 0o700);
    assert!(audit_verify(&missing).status.success());
}
