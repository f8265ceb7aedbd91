//! Privilege separation (README "Security"): with `BREAKGLASS_AGENT_USER`
//! the agent runs as that user and cannot reach the server's secrets.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::harness::{AGENT_HOME, AGENT_USER, AGENT_USER_LOCK, Server, agent_user, alive, eventually, kinds, repo};

/// Copies the fake agent and its transcripts where the agent user can run
/// them (the checkout may sit in a directory only root can enter).
fn install_fake_agent(dir: &Path) -> PathBuf {
    let bin = dir.join("tools/tests/fake-bin");
    let fixtures = dir.join("tools/tests/fixtures/transcripts");
    for d in [&bin, &fixtures] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::copy(repo().join("tests/fake-bin/claude"), bin.join("claude")).unwrap();
    for entry in std::fs::read_dir(repo().join("tests/fixtures/transcripts")).unwrap().flatten() {
        std::fs::copy(entry.path(), fixtures.join(entry.file_name())).unwrap();
    }
    for d in
        ["tools", "tools/tests", "tools/tests/fake-bin", "tools/tests/fixtures", "tools/tests/fixtures/transcripts"]
    {
        std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// A server whose agent runs as the test agent user; its fake agent writes
/// its records to `<dir>/records/argv.jsonl`.
fn separated() -> Server {
    agent_user();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let bin = install_fake_agent(dir.path());
    let records = dir.path().join("records");
    std::fs::create_dir(&records).unwrap();
    std::fs::set_permissions(&records, std::fs::Permissions::from_mode(0o777)).unwrap();
    Server::options()
        .env("BREAKGLASS_AGENT_USER", AGENT_USER)
        .env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()))
        .env("FAKE_CLAUDE_RECORD", records.join("argv.jsonl").display().to_string())
        .start_in(dir)
}

fn records(server: &Server) -> Vec<Value> {
    std::fs::read_to_string(server.dir.path().join("records/argv.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn texts(events: &[Value]) -> Vec<String> {
    events.iter().filter(|e| e["kind"] == "text").filter_map(|e| e["text"].as_str()).map(str::to_owned).collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn the_agent_runs_as_its_own_user_and_cannot_reach_the_servers_secrets() {
    let (uid, gid) = agent_user();
    let _turn = AGENT_USER_LOCK.lock().await;
    let server = separated();
    let session = server.open_session().await;
    let data = server.data_dir();
    let workspace = data.join("sessions").join(&session);
    let d = data.display();
    let w = workspace.display();
    let prompt = format!(
        "whoami\ntry-read {d}/login.key\ntry-read {d}/breakglass.db\ntry-read {d}/breakglass.db-wal\n\
         try-write {d}/breakglass.db\ntry-write {d}/planted\ntry-write {w}/notes.txt\nresult"
    );
    let events = server.run_turn(&session, &prompt).await;
    assert_eq!(kinds(&events).last(), Some(&"turn_end"));
    let said = texts(&events);
    assert_eq!(said[0], format!("uid {uid} gid {gid} groups [] home {AGENT_HOME}"), "{said:#?}");
    for denied in [
        format!("read {d}/login.key: denied"),
        format!("read {d}/breakglass.db: denied"),
        format!("read {d}/breakglass.db-wal: denied"),
        format!("write {d}/breakglass.db: denied"),
        format!("write {d}/planted: denied"),
    ] {
        assert!(said.contains(&denied), "{denied:?} not in {said:#?}");
    }
    assert!(said.contains(&format!("write {w}/notes.txt: ok")), "{said:#?}");

    let runs = records(&server);
    assert_eq!(
        runs.len(),
        1,
        "{:?}",
        std::fs::read_dir(server.dir.path().join("records")).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    let run = &runs[0];
    assert_eq!(run["env_has_token"], false);
    assert_eq!(
        run["env_breakglass"],
        serde_json::json!(["BREAKGLASS_HOOK_TOKEN", "BREAKGLASS_TURN"]),
        "no server setting reaches the agent: only its turn's marker and hook secret"
    );
    let meta = std::fs::metadata(&workspace).unwrap();
    assert_eq!((meta.uid(), meta.gid(), mode(&workspace)), (uid, gid, 0o700), "the workspace is the agent's");
    assert_eq!(mode(&data), 0o711, "the data directory can be passed through, not listed");
    for secret in ["login.key", "breakglass.db"] {
        assert_eq!(mode(&data.join(secret)) & 0o077, 0, "{secret} is private");
    }
}

/// Files an older start left world-readable are made private.
#[tokio::test]
async fn secrets_left_readable_by_an_earlier_start_are_made_private() {
    let mut server = Server::start();
    server.open_session().await;
    server.kill9();
    let key = server.data_dir().join("login.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    server.restart();
    assert_eq!(mode(&key), 0o600);
}

/// A process that left its group and scrubbed its environment carries no
/// marker; it is still the agent user's, and goes when the last turn ends.
#[tokio::test]
async fn the_last_turn_to_end_kills_what_the_agent_user_left_however_hidden() {
    let _turn = AGENT_USER_LOCK.lock().await;
    let server = separated();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "hidden-daemon\nresult").await;
    let pid: u32 = texts(&events).iter().find_map(|t| t.strip_prefix("grandchild ")?.parse().ok()).unwrap();
    eventually("the hidden daemon to die", || !alive(pid)).await;
}

#[tokio::test]
async fn without_an_agent_user_the_server_warns_that_the_agent_shares_its_rights() {
    let server = Server::start();
    eventually("the warning", || server.log().contains("BREAKGLASS_AGENT_USER is not set")).await;
}

#[test]
fn an_unusable_agent_user_is_refused_at_start() {
    agent_user();
    for user in ["root", "no-such-user-here"] {
        let stderr = crate::harness::refused_at_start(&["serve"], &[("BREAKGLASS_AGENT_USER", user)]);
        assert!(stderr.contains("BREAKGLASS_AGENT_USER"), "{user}: {stderr}");
    }
}

/// Regression: before every turn root chowned the agent definition by its
/// path inside the workspace, which the agent owns; a symlink planted there
/// handed root's files to the agent user at the next turn.
#[tokio::test]
async fn links_the_agent_plants_in_its_workspace_never_hand_it_the_servers_files() {
    let _turn = AGENT_USER_LOCK.lock().await;
    let (uid, _) = agent_user();
    let server = separated();
    let session = server.open_session().await;
    let data = server.data_dir();
    let (d, w) = (data.display(), data.join("sessions").join(&session));
    let w = w.display();
    let plant = format!("symlink {d}/login.key {w}/breakglass.md\nsymlink {d} {w}/planted-dir\nresult");
    let events = server.run_turn(&session, &plant).await;
    assert!(texts(&events).contains(&format!("symlink {w}/breakglass.md: ok")), "{events:#?}");
    let events = server.run_turn(&session, &format!("try-read {d}/login.key\nresult")).await;
    assert!(texts(&events).contains(&format!("read {d}/login.key: denied")), "{events:#?}");
    for secret in ["login.key", "breakglass.db", "."] {
        let meta = std::fs::metadata(data.join(secret)).unwrap();
        assert_ne!(meta.uid(), uid, "{secret} was handed to the agent user");
    }
    assert_eq!(mode(&data.join("login.key")), 0o600);
}

/// The agent user's home as the harness deploys it: root's, nothing but
/// `.claude` in it. Done on creation and again on drop, whatever the test
/// (or a drill before it) left there.
struct HomeRestored;

impl HomeRestored {
    fn new() -> HomeRestored {
        HomeRestored::restore();
        HomeRestored
    }

    fn restore() {
        let home = Path::new(AGENT_HOME);
        let _ = std::os::unix::fs::chown(home, Some(0), Some(0));
        let _ = std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755));
        for entry in std::fs::read_dir(home).unwrap().flatten() {
            if entry.file_name() != ".claude" {
                let path = entry.path();
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            }
        }
    }
}

impl Drop for HomeRestored {
    fn drop(&mut self) {
        HomeRestored::restore();
    }
}

/// With approvals on, an agent user that can write what its own `ssh` and
/// shell read as configuration is refused at start, the path named: one
/// allowed write could otherwise plant `ProxyCommand` in `~/.ssh/config`
/// (or an `ssh` function in `~/.bashrc`, which the CLI sources into every
/// Bash command) and every later `ssh devvm uptime`, run unasked, would run
/// it (README "The SSH key and the agent's two hosts"). A root-owned home,
/// `~/.ssh` and config start; so does any home with approvals off.
#[tokio::test]
async fn an_agent_user_that_can_write_its_ssh_config_or_shell_startup_is_refused_with_approvals_on() {
    let _turn = AGENT_USER_LOCK.lock().await;
    let (uid, gid) = agent_user();
    let _restored = HomeRestored::new();
    let home = Path::new(AGENT_HOME);
    let ssh = home.join(".ssh");
    std::fs::create_dir(&ssh).unwrap();
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(ssh.join("config"), "Host devvm\n    HostName 192.0.2.20\n").unwrap();
    std::fs::set_permissions(ssh.join("config"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(home.join(".bashrc"), "# root's\n").unwrap();
    // Deployed as README says: it starts, approvals on.
    let starts = |approvals: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        Server::options().env("BREAKGLASS_AGENT_USER", AGENT_USER).env("BREAKGLASS_APPROVALS", approvals).start_in(dir)
    };
    drop(starts("on"));
    let refused = |path: &Path| {
        let said = crate::harness::refused_at_start(&["serve"], &[("BREAKGLASS_AGENT_USER", AGENT_USER)]);
        let named = format!("{AGENT_USER} can write {}", path.display());
        assert!(said.contains(&named), "{named:?} not in {said}");
    };
    let give = |path: &Path| std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    let take = |path: &Path| std::os::unix::fs::chown(path, Some(0), Some(0)).unwrap();
    for path in [ssh.join("config"), ssh.clone(), home.join(".bashrc"), home.to_owned()] {
        give(&path);
        refused(&path);
        drop(starts("off"));
        take(&path);
    }
    // Writable through its group, or by anyone, is writable too.
    std::fs::set_permissions(ssh.join("config"), std::fs::Permissions::from_mode(0o664)).unwrap();
    std::os::unix::fs::chown(ssh.join("config"), Some(0), Some(gid)).unwrap();
    refused(&ssh.join("config"));
    std::os::unix::fs::chown(ssh.join("config"), Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o757)).unwrap();
    refused(&ssh);
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A link to a file the agent user owns counts as that file.
    let elsewhere = home.join(".claude/ssh_config");
    std::fs::write(&elsewhere, "Host devvm\n").unwrap();
    give(&elsewhere);
    std::fs::remove_file(ssh.join("config")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, ssh.join("config")).unwrap();
    refused(&ssh.join("config"));
    std::fs::remove_file(&elsewhere).unwrap();
}
