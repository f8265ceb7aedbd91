//! An incident drill, end to end: the real `breakglass` binary runs the
//! real Claude Code CLI as the agent user (README "Security"), against the
//! stand-in model API (tests/it/model_api.rs), whose scripted model asks
//! for `ssh devvm '…'`; the CLI's own Bash tool runs the real ssh client,
//! through the agent user's ssh config and an ssh-agent socket it can
//! reach (README "The SSH key and the agent's two hosts"), into a real sshd
//! on loopback standing in for the target, where a normal login shell runs
//! the commands. The target is not a systemd machine, so the drill asks for
//! `uptime; df -h /` rather than `systemctl --failed`, which fails there.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    AGENT_HOME, AGENT_USER, AGENT_USER_LOCK, BASIC, Frame, Server, agent_user, alive, eventually, kinds,
    real_cli_for_agent_user, wait_until,
};
use crate::model_api::{ModelApi, Reply};
use crate::pve::{Pve, free_port};

/// The account the agent logs in as on the stand-in target ("an
/// unprivileged user" in README's ssh config example).
const TARGET_USER: &str = "breakglass-devvm-test";
const TARGET_HOME: &str = "/var/lib/breakglass-devvm-test";

/// The target's account, created once with a login shell. Its password
/// field is `*` (no password, but not locked): sshd without PAM refuses
/// key logins to a locked account, and `useradd` leaves one locked.
fn target_user() {
    static MADE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        if !Command::new("id").arg("-u").arg(TARGET_USER).output().unwrap().status.success() {
            let made = Command::new("useradd")
                .args(["--system", "--create-home", "--home-dir", TARGET_HOME, "--shell", "/bin/sh", TARGET_USER])
                .output()
                .unwrap();
            assert!(made.status.success(), "useradd: {}", String::from_utf8_lossy(&made.stderr));
        }
        let unlocked = Command::new("usermod").args(["-p", "*", TARGET_USER]).output().unwrap();
        assert!(unlocked.status.success(), "usermod: {}", String::from_utf8_lossy(&unlocked.stderr));
    });
}

/// Forgets what earlier runs left in the agent user's home (the CLI's
/// state and settings, an ssh config pointing at an old port), so each
/// drill starts as a fresh installation would. Call with the agent user's
/// lock held.
fn fresh_agent_home() {
    let (uid, gid) = agent_user();
    for entry in std::fs::read_dir(AGENT_HOME).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".claude") || name == ".ssh" {
            let path = entry.path();
            let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            gone.unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
        }
    }
    crate::harness::agent_state_dir(uid, gid);
}

/// The stand-in target: a real sshd on a loopback port where the target
/// user logs in with a normal shell; a real ssh-agent (run by root, as the
/// deployment's entrypoint runs it) holding the only key; and the relay
/// that makes it reachable by the agent user, since ssh-agent answers
/// nobody but its own user and root.
struct Devvm {
    dir: tempfile::TempDir,
    sshd: Child,
    ssh_agent: Child,
    relay: Child,
    port: u16,
    /// The hypervisor, when the drill has one: a second sshd whose only
    /// key runs the real forced command (deploy/pve/breakglass-pve) with
    /// the stand-in `qm`, as README "Setting up the hypervisor" sets it up.
    pve: Option<(Child, u16, Pve)>,
}

impl Devvm {
    /// Starts it all and writes the agent user's `~/.ssh` (after
    /// [`fresh_agent_home`]).
    fn start() -> Devvm {
        Devvm::start_with(false)
    }

    fn start_with(with_pve: bool) -> Devvm {
        target_user();
        fresh_agent_home();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
        let keys = d.join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
        for key in ["host_key", "client_key"] {
            crate::harness::ssh_keygen(&keys, key);
        }
        std::fs::copy(keys.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        let sshd = crate::harness::spawn_sshd(
            d,
            port,
            &keys.join("host_key"),
            &format!("PermitRootLogin no\nAllowUsers {TARGET_USER}\n"),
        );
        let ssh_agent = crate::harness::spawn_ssh_agent(&keys.join("agent.sock"));
        wait_until("ssh-agent to listen", || keys.join("agent.sock").exists());
        let added = Command::new("ssh-add")
            .arg(keys.join("client_key"))
            .env("SSH_AUTH_SOCK", keys.join("agent.sock"))
            .output()
            .unwrap();
        assert!(added.status.success(), "ssh-add: {}", String::from_utf8_lossy(&added.stderr));
        std::fs::remove_file(keys.join("client_key")).unwrap(); // the key lives in the agent only
        let relay = Command::new("socat")
            .arg(format!("UNIX-LISTEN:{},fork,user={AGENT_USER},mode=600", d.join("agent-ssh.sock").display()))
            .arg(format!("UNIX-CONNECT:{}", keys.join("agent.sock").display()))
            .stderr(std::fs::File::create(d.join("socat.log")).unwrap())
            .spawn()
            .expect("start socat (scripts/test installs it)");
        let pve = with_pve.then(|| {
            let pve = Pve::new();
            let pd = d.join("pve");
            std::fs::create_dir(&pd).unwrap();
            let client_pub = std::fs::read_to_string(keys.join("client_key.pub")).unwrap();
            std::fs::write(
                pd.join("authorized_keys"),
                format!("command=\"{}\",restrict {client_pub}", pve.forced_command()),
            )
            .unwrap();
            let pve_port = free_port();
            let sshd = crate::harness::spawn_sshd(
                &pd,
                pve_port,
                &keys.join("host_key"),
                "PermitRootLogin prohibit-password\nAllowUsers root\n",
            );
            wait_until("the hypervisor's sshd to greet", || greets(pve_port));
            (sshd, pve_port, pve)
        });
        let devvm = Devvm { dir, sshd, ssh_agent, relay, port, pve };
        wait_until("the relay to listen", || devvm.relay_sock().exists());
        wait_until("sshd to greet", || greets(port));
        devvm.write_agent_ssh_config();
        devvm
    }

    /// The ssh-agent's own socket: the server's `SSH_AUTH_SOCK`.
    fn auth_sock(&self) -> PathBuf {
        self.dir.path().join("keys/agent.sock")
    }

    /// The relay's socket, the agent user's alone.
    fn relay_sock(&self) -> PathBuf {
        self.dir.path().join("agent-ssh.sock")
    }

    fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The agent user's `~/.ssh/config` with README's options for `devvm`,
    /// and its known_hosts with the target's key: root's, readable by the
    /// agent user and not writable by it, as approvals need (README "The
    /// SSH key and the agent's two hosts").
    fn write_agent_ssh_config(&self) {
        let ssh = Path::new(AGENT_HOME).join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
        let host_key = std::fs::read_to_string(self.dir.path().join("keys/host_key.pub")).unwrap();
        let mut host_key = host_key.split_whitespace();
        let (kind, key) = (host_key.next().unwrap(), host_key.next().unwrap());
        let mut known_hosts = format!("[127.0.0.1]:{} {kind} {key}\n", self.port);
        let mut config = format!(
            "Host devvm\n    BatchMode yes\n    ConnectTimeout 10\n    ServerAliveInterval 5\n    ServerAliveCountMax 2\n    \
             StrictHostKeyChecking yes\n    UserKnownHostsFile {AGENT_HOME}/.ssh/known_hosts\n    \
             IdentityAgent {}\n    HostName 127.0.0.1\n    Port {}\n    User {TARGET_USER}\n",
            self.relay_sock().display(),
            self.port
        );
        if let Some((_, pve_port, _)) = &self.pve {
            known_hosts.push_str(&format!("[127.0.0.1]:{pve_port} {kind} {key}\n"));
            config.push_str(&format!(
                "Host pve\n    BatchMode yes\n    ConnectTimeout 10\n    StrictHostKeyChecking yes\n    \
                 UserKnownHostsFile {AGENT_HOME}/.ssh/known_hosts\n    IdentityAgent {}\n    \
                 HostName 127.0.0.1\n    Port {pve_port}\n    User root\n",
                self.relay_sock().display()
            ));
        }
        for (name, content) in [("config", config), ("known_hosts", known_hosts)] {
            std::fs::write(ssh.join(name), content).unwrap();
            std::fs::set_permissions(ssh.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

impl Drop for Devvm {
    fn drop(&mut self) {
        let pve = self.pve.as_mut().map(|(sshd, _, _)| sshd);
        for child in [&mut self.relay, &mut self.ssh_agent, &mut self.sshd].into_iter().chain(pve) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn greets(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut banner = [0u8; 8];
    stream.read_exact(&mut banner).is_ok() && banner.starts_with(b"SSH-2.0")
}

/// breakglass as a deployment runs it: as root, the agent as the agent
/// user, the real CLI, the model API at `api`, and the ssh-agent's socket
/// in `SSH_AUTH_SOCK` (when there is a target). The CLI's nonessential
/// traffic (a reachability check, telemetry, updates) is switched off:
/// the machine has no other network to reach.
fn breakglass(api: &ModelApi, devvm: Option<&Devvm>) -> Server {
    breakglass_with(api, devvm, Server::options())
}

/// [`breakglass`] with more settings.
fn breakglass_with(api: &ModelApi, devvm: Option<&Devvm>, options: crate::harness::Options) -> Server {
    agent_user();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut options = if options.env.iter().any(|(key, _)| key == "BREAKGLASS_CLAUDE_BIN") {
        options
    } else {
        options.env("BREAKGLASS_CLAUDE_BIN", real_cli_for_agent_user().display().to_string())
    };
    options = options
        .env("BREAKGLASS_AGENT_USER", AGENT_USER)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("ANTHROPIC_BASE_URL", &api.base_url)
        .env("ANTHROPIC_API_KEY", "sk-standin")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1");
    if let Some(devvm) = devvm {
        options = options.env("SSH_AUTH_SOCK", devvm.auth_sock().display().to_string());
    }
    options.start_in(dir)
}

/// Live processes whose real uid is `uid`: (pid, command name).
fn processes_of(uid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
            let real_uid: u32 = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
            (real_uid == uid && alive(pid)).then(|| (pid, field("Name:").unwrap_or_default().to_owned()))
        })
        .collect()
}

/// Each event's time after the first one's, in ms, with its kind.
fn offsets(events: &[Value]) -> Vec<(String, u128)> {
    let at = |e: &Value| humantime::parse_rfc3339(e["at"].as_str().expect("at")).expect("RFC 3339");
    let first = at(&events[0]);
    events.iter().map(|e| (text_of(e, "kind"), at(e).duration_since(first).unwrap_or_default().as_millis())).collect()
}

fn text_of(event: &Value, field: &str) -> String {
    event[field].as_str().unwrap_or_else(|| panic!("{field} in {event}")).to_owned()
}

/// Why the relay: ssh-agent answers only its own user and root, so the
/// agent user is refused by the server's ssh-agent even when its socket is
/// open to everyone; through the relay it gets the key.
#[tokio::test]
async fn the_agent_user_reaches_the_servers_ssh_agent_only_through_the_relay() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let devvm = Devvm::start();
    let keys = devvm.auth_sock().parent().unwrap().to_owned();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(devvm.auth_sock(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let list = |socket: PathBuf| {
        use std::os::unix::process::CommandExt;
        let (uid, gid) = agent_user();
        Command::new("ssh-add").arg("-l").uid(uid).gid(gid).env("SSH_AUTH_SOCK", socket).output().unwrap()
    };
    let direct = list(devvm.auth_sock());
    assert!(!direct.status.success(), "the server's own ssh-agent refuses the agent user");
    let relayed = list(devvm.relay_sock());
    assert!(relayed.status.success(), "{}", String::from_utf8_lossy(&relayed.stderr));
    assert!(String::from_utf8_lossy(&relayed.stdout).contains("ED25519"), "the key, through the relay");
}

#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn an_incident_turn_runs_the_models_ssh_on_the_target_and_the_next_turn_resumes_it() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let devvm = Devvm::start();
    let check = "ssh devvm 'uptime; df -h /; id -un'";
    let api =
        ModelApi::start(vec![Reply::bash("Let me look at devvm.", check), Reply::text("devvm is up and / has room.")]);
    // The operator chose to let the agent run unasked (README "Approvals"):
    // the compound check would otherwise wait for a decision.
    let server = breakglass_with(&api, Some(&devvm), Server::options().env("BREAKGLASS_APPROVALS", "off"));
    let session = server.open_session().await;

    let started = Instant::now();
    let events = server.run_turn(&session, "Is devvm healthy?").await;
    let took = started.elapsed();
    assert_eq!(kinds(&events), BASIC, "{events:#?}");
    assert_eq!(events[2]["text"], "Let me look at devvm.");
    assert_eq!((events[3]["name"].as_str(), events[3]["input"]["command"].as_str()), (Some("Bash"), Some(check)));
    let tool_use_id = text_of(&events[3], "tool_use_id");
    assert_eq!(events[4]["tool_use_id"], tool_use_id.as_str());
    assert_eq!(events[4]["is_error"], false, "{:#?}\nsshd: {}", events[4], devvm.sshd_log());
    let output = text_of(&events[4], "content");
    assert!(output.contains("load average:"), "uptime ran: {output}");
    assert!(output.contains("Filesystem") && output.contains("Mounted on"), "df ran: {output}");
    assert_eq!(output.lines().last(), Some(TARGET_USER), "on the target, as its user: {output}");
    assert!(devvm.sshd_log().contains(&format!("Accepted publickey for {TARGET_USER}")), "{}", devvm.sshd_log());
    assert_eq!(events[5]["text"], "devvm is up and / has room.");
    let result = &events[6];
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["result"], "devvm is up and / has room.");
    assert_eq!(result["num_turns"], 2);
    assert!(result["total_cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{result}");
    assert!(result["duration_ms"].as_u64().is_some_and(|d| d > 0), "{result}");
    let asked = api.main_requests();
    assert_eq!(asked.len(), 2, "one model request per step");
    assert_eq!(asked[1].tool_results(), [(tool_use_id, output.clone())], "the model got the real output back");
    eprintln!(
        "drill: prompt to turn_end {} ms (the CLI's duration_ms: {}); events at {:?} ms after the prompt",
        took.as_millis(),
        result["duration_ms"],
        offsets(&events)
    );

    // The next prompt resumes the CLI's session: the model sees the whole
    // incident so far, and ssh still works after the first turn's sweep of
    // the agent user's processes.
    api.then(vec![Reply::bash("And its memory:", "ssh devvm 'free -m'"), Reply::text("Memory is fine too.")]);
    let started = Instant::now();
    let next = server.run_turn(&session, "And its memory?").await;
    let took_next = started.elapsed();
    assert_eq!(kinds(&next), BASIC, "{next:#?}");
    assert_eq!(next[1]["session_id"], events[1]["session_id"], "the same CLI session");
    let resumed = &api.main_requests()[2];
    let seen = resumed.texts();
    for earlier in ["Is devvm healthy?", "Let me look at devvm.", check, output.as_str(), "devvm is up and / has room."]
    {
        assert!(seen.iter().any(|t| t == earlier), "{earlier:?} not in the resumed conversation: {seen:#?}");
    }
    assert_eq!(seen.last().map(String::as_str), Some("And its memory?"));
    assert!(text_of(&next[4], "content").contains("Mem:"), "{:#?}", next[4]);
    assert_eq!(next[6]["result"], "Memory is fine too.");
    eprintln!("drill: the resumed turn took {} ms", took_next.as_millis());
}

/// Cancel while the model has gone quiet, with the ssh it started in the
/// background still connected: the CLI, its shell and ssh are all gone.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn cancel_while_the_model_stalls_leaves_no_process_of_the_turn() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let (uid, _) = agent_user();
    let devvm = Devvm::start();
    let api = ModelApi::start(vec![
        Reply::bash_in_background("I'll keep an eye on it.", "ssh devvm 'sleep 30'"),
        Reply::stall(Duration::from_secs(120), "Never said."),
    ]);
    let server = breakglass_with(&api, Some(&devvm), Server::options().env("BREAKGLASS_APPROVALS", "off"));
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "Watch devvm").await;
    api.until_main_requests(2).await;
    eventually("the CLI, its shell and ssh to run", || {
        let names: Vec<String> = processes_of(uid).into_iter().map(|(_, name)| name).collect();
        ["claude", "bash", "ssh"].iter().all(|n| names.iter().any(|m| m == n))
    })
    .await;
    let turn = processes_of(uid);

    let asked = Instant::now();
    let answer = server.cancel(&session).await;
    assert_eq!(answer["cancelled"], true);
    eprintln!("drill: cancel answered in {} ms", asked.elapsed().as_millis());
    let events = stream.until_turn_end().await;
    assert_eq!(kinds(&events), ["user", "session", "text", "tool", "tool_result", "cancelled", "turn_end"]);
    assert_eq!(events[3]["input"]["run_in_background"], true);
    eventually("every process of the turn to be gone", || turn.iter().all(|(pid, _)| !alive(*pid))).await;
    assert_eq!(processes_of(uid), [], "nothing of the agent user is left (the turn had {turn:?})");
}

/// The CLI gives up at once (the API's `x-should-retry: false`), says why in
/// its own words, and exits 1, which the server reports after the result.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn a_rejected_api_key_ends_the_turn_with_the_clis_own_message() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    fresh_agent_home();
    let api = ModelApi::start(vec![Reply::unauthorized()]);
    let server = breakglass(&api, None);
    let session = server.open_session().await;
    let events = server.run_turn(&session, "Is devvm healthy?").await;
    assert_eq!(kinds(&events), ["user", "session", "text", "result", "error", "turn_end"], "{events:#?}");
    let message = "Invalid API key · Fix external API key";
    assert_eq!(events[2]["text"], message);
    assert_eq!((events[3]["is_error"].as_bool(), events[3]["result"].as_str()), (Some(true), Some(message)));
    assert_eq!(events[4]["error"], "exit 1");
    assert_eq!(api.main_requests().len(), 1, "the API said a retry cannot help");
}

#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn an_overloaded_api_shows_each_retry_as_a_status_then_the_turn_succeeds() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    fresh_agent_home();
    let api = ModelApi::start(vec![Reply::overloaded(), Reply::overloaded(), Reply::text("devvm answered.")]);
    let server = breakglass(&api, None);
    let session = server.open_session().await;
    let started = Instant::now();
    let events = server.run_turn(&session, "Is devvm healthy?").await;
    assert_eq!(kinds(&events), ["user", "session", "status", "status", "text", "result", "turn_end"], "{events:#?}");
    assert_eq!(events[2]["text"], "API retry 1 of 10: overloaded");
    assert_eq!(events[3]["text"], "API retry 2 of 10: overloaded");
    assert_eq!((events[5]["is_error"].as_bool(), events[5]["result"].as_str()), (Some(false), Some("devvm answered.")));
    assert_eq!(api.main_requests().len(), 3);
    eprintln!("drill: two 529s and a reply took {} ms", started.elapsed().as_millis());
}

/// Live text from the real CLI: the model's words reach an attached client
/// as `delta` frames (README, "API") before the logged `text` that
/// completes them, under the message id the API gave.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn the_models_words_arrive_as_deltas_before_the_logged_text() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    fresh_agent_home();
    let answer = "devvm is up, its load is low and / has room to spare.";
    let api = ModelApi::start(vec![Reply::text(answer)]);
    let server = breakglass(&api, None);
    let (session, mut stream) = server.attached().await;
    let asked = Instant::now();
    server.start_turn(&session, "Is devvm healthy?").await;
    let mut frames = Vec::new();
    let mut first_delta = None;
    loop {
        match stream.next().await.expect("stream ended before turn_end") {
            Frame::Event { data, .. } if data["kind"] == "turn_end" => break,
            Frame::Keepalive | Frame::CaughtUp => {}
            frame => {
                if matches!(frame, Frame::Delta(_)) {
                    first_delta.get_or_insert_with(|| asked.elapsed());
                }
                frames.push(frame)
            }
        }
    }
    eprintln!(
        "drill: first delta {} ms after the prompt, turn_end {} ms",
        first_delta.unwrap_or_default().as_millis(),
        asked.elapsed().as_millis()
    );
    let deltas: Vec<&Value> =
        frames.iter().filter_map(|f| if let Frame::Delta(d) = f { Some(d) } else { None }).collect();
    let streamed: String = deltas.iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, answer, "{frames:#?}");
    assert!(deltas.len() > 1, "word by word: {deltas:#?}");
    let text_at = frames
        .iter()
        .position(|f| matches!(f, Frame::Event { data, .. } if data["kind"] == "text"))
        .expect("a text event");
    assert!(frames[text_at..].iter().all(|f| !matches!(f, Frame::Delta(_))), "no delta after the text: {frames:#?}");
    let Frame::Event { data: text, .. } = &frames[text_at] else { unreachable!() };
    assert_eq!(text["text"], answer);
    assert!(text["message_id"].as_str().is_some_and(|id| id.starts_with("msg_")), "{text}");
    for delta in &deltas {
        assert_eq!((&delta["message_id"], &delta["index"]), (&text["message_id"], &text["index"]), "{delta}");
    }
}

/// The operator in the loop with the real CLI (README "Approvals"): a
/// read-only diagnosis runs unasked; `ssh pve reset` waits until the
/// operator allows it through the API, then the CLI's own Bash tool runs
/// it, over ssh, through the hypervisor's forced command.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn the_operators_allow_lets_the_real_cli_reset_the_vm_and_a_diagnosis_runs_unasked() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let devvm = Devvm::start_with(true);
    let api = ModelApi::start(vec![
        Reply::bash("First, is it up?", "ssh devvm uptime"),
        Reply::bash("It is wedged; resetting.", "ssh pve reset"),
        Reply::text("The VM was reset."),
    ]);
    let server = breakglass(&api, Some(&devvm));
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "devvm hangs; fix it").await;
    let before = stream.until_kind("approval").await;
    let diagnosis = before.iter().find(|e| e["kind"] == "tool_result").expect("the diagnosis ran first");
    assert!(text_of(diagnosis, "content").contains("load average:"), "{diagnosis}");
    assert_eq!(before.iter().filter(|e| e["kind"] == "approval").count(), 1, "only the reset asks: {before:#?}");
    let approval = before.last().unwrap();
    assert_eq!(approval["input"]["command"], "ssh pve reset");
    assert_eq!(approval["effect"], "hard reset of the VM: unsaved guest state is lost");
    let pve = &devvm.pve.as_ref().unwrap().2;
    assert!(!pve.calls().iter().any(|c| c.contains("reset")), "nothing ran before the decision: {:?}", pve.calls());

    let id = text_of(approval, "tool_use_id");
    assert_eq!(server.decide(&session, &id, serde_json::json!({"decision": "allow"})).await.0, 200);
    let after = stream.until_turn_end().await;
    assert_eq!(kinds(&after), ["approval_decision", "tool_result", "text", "result", "turn_end"], "{after:#?}");
    assert_eq!(after[1]["tool_use_id"], id.as_str());
    assert_eq!(after[1]["is_error"], false, "{:#?}", after[1]);
    assert!(pve.calls().iter().any(|c| c.contains("reset")), "qm was asked to reset: {:?}", pve.calls());
    let asked = api.main_requests();
    assert_eq!(asked[2].tool_results()[0].0, id, "the model got the reset's output");
}

/// Deny: the CLI reports the operator's refusal to the model (with the
/// operator's words) and the turn goes on; nothing reached the hypervisor.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn the_operators_deny_reaches_the_model_with_its_message_and_the_turn_goes_on() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let devvm = Devvm::start_with(true);
    let api = ModelApi::start(vec![
        Reply::bash("Resetting the VM.", "ssh pve reset"),
        Reply::text("Understood: no reset until the backup is done."),
    ]);
    let server = breakglass(&api, Some(&devvm));
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "devvm hangs; fix it").await;
    let approval = stream.until_kind("approval").await.pop().unwrap();
    let id = text_of(&approval, "tool_use_id");
    let denied = serde_json::json!({"decision": "deny", "message": "wait for the backup"});
    assert_eq!(server.decide(&session, &id, denied).await.0, 200);
    let after = stream.until_turn_end().await;
    assert_eq!(kinds(&after), ["approval_decision", "tool_result", "text", "result", "turn_end"], "{after:#?}");
    assert_eq!(after[1]["is_error"], true, "{:#?}", after[1]);
    assert!(text_of(&after[1], "content").contains("wait for the backup"), "{:#?}", after[1]);
    let told = &api.main_requests()[1].tool_results()[0];
    assert_eq!(told.0, id);
    assert!(told.1.contains("wait for the backup"), "the model read the operator's words: {told:?}");
    assert_eq!(after[2]["text"], "Understood: no reset until the backup is done.");
    let pve = &devvm.pve.as_ref().unwrap().2;
    assert!(!pve.calls().iter().any(|c| c.contains("reset")), "{:?}", pve.calls());
}

/// A hook that cannot reach the server blocks the call: the settings
/// breakglass gives the CLI, run by the real CLI with the hook's address
/// pointing where nothing listens (a wrapper rewrites the port), leave the
/// reset unrun and tell the model it was blocked.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn a_hook_that_cannot_reach_the_server_fails_closed() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let devvm = Devvm::start_with(true);
    let api = ModelApi::start(vec![Reply::bash("Resetting the VM.", "ssh pve reset"), Reply::text("It was blocked.")]);
    let wrapper = devvm.dir.path().join("claude-unreachable-hook");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# The hook's address, moved to a port where nothing listens.\n\
             for a; do shift; set -- \"$@\" \"$(printf '%s' \"$a\" | sed 's#http://127.0.0.1:[0-9]*/hook#http://127.0.0.1:9/hook#')\"; done\n\
             exec {} \"$@\"\n",
            real_cli_for_agent_user().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = breakglass_with(
        &api,
        Some(&devvm),
        Server::options().env("BREAKGLASS_CLAUDE_BIN", wrapper.display().to_string()),
    );
    let session = server.open_session().await;
    let events = server.run_turn(&session, "devvm hangs; fix it").await;
    assert!(!kinds(&events).contains(&"approval"), "the server was never asked: {events:#?}");
    let result = events.iter().find(|e| e["kind"] == "tool_result").expect("a tool_result");
    assert_eq!(result["is_error"], true, "{result}");
    let told = &api.main_requests()[1].tool_results()[0];
    assert!(!told.1.is_empty(), "the model was told: {told:?}");
    let pve = &devvm.pve.as_ref().unwrap().2;
    assert!(!pve.calls().iter().any(|c| c.contains("reset")), "blocked: {:?}", pve.calls());
    eprintln!("drill: an unreachable hook: the model was told {:?}", told.1);
}

/// Regression: once the operator allowed one write, the agent could plant
/// `.claude/settings.local.json` with `"disableAllHooks": true` in its
/// workspace, and the CLI read it next to the server's `--settings`: every
/// later tool call ran unasked. The CLI now reads no settings file the agent
/// user can write (README "Approvals"), so the next turn's `ssh pve reset`
/// still waits for the operator, and the agent still runs as its definition
/// says.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn settings_the_agent_plants_after_an_allowed_write_do_not_switch_approvals_off() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let devvm = Devvm::start_with(true);
    let plant = "mkdir -p .claude && printf '{\"disableAllHooks\": true}' > .claude/settings.local.json \
                 && mkdir -p ~/.claude && cp .claude/settings.local.json ~/.claude/settings.json";
    let api = ModelApi::start(vec![Reply::bash("Saving my settings.", plant), Reply::text("Saved.")]);
    let server = breakglass(&api, Some(&devvm));
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "remember your settings").await;
    let approval = stream.until_kind("approval").await.pop().unwrap();
    assert_eq!(approval["input"]["command"], plant);
    let id = text_of(&approval, "tool_use_id");
    assert_eq!(server.decide(&session, &id, serde_json::json!({"decision": "allow"})).await.0, 200);
    let first = stream.until_turn_end().await;
    assert_eq!(first.iter().find(|e| e["kind"] == "tool_result").unwrap()["is_error"], false, "{first:#?}");
    let workspace = server.data_dir().join("sessions").join(&session);
    assert!(workspace.join(".claude/settings.local.json").exists(), "the write ran");

    api.then(vec![Reply::bash("Resetting the VM.", "ssh pve reset"), Reply::text("Asked.")]);
    server.start_turn(&session, "devvm hangs; fix it").await;
    let mut second = Vec::new();
    while let Some(frame) = stream.next().await {
        if let Frame::Event { data, .. } = frame {
            let kind = text_of(&data, "kind");
            second.push(data);
            if kind == "approval" || kind == "turn_end" {
                break;
            }
        }
    }
    let asked = second.last().expect("events of the next turn");
    assert_eq!(asked["kind"], "approval", "the reset ran unasked: {second:#?}");
    assert_eq!(asked["input"]["command"], "ssh pve reset");
    let pve = &devvm.pve.as_ref().unwrap().2;
    assert!(!pve.calls().iter().any(|c| c.contains("reset")), "nothing ran before a decision: {:?}", pve.calls());
    let id = text_of(asked, "tool_use_id");
    assert_eq!(server.decide(&session, &id, serde_json::json!({"decision": "deny"})).await.0, 200);
    stream.until_turn_end().await;
    assert!(!pve.calls().iter().any(|c| c.contains("reset")), "denied: {:?}", pve.calls());
    let system = api.main_requests().last().unwrap().body["system"].to_string();
    assert!(system.contains("You are the breakglass recovery agent"), "the agent's definition is its prompt");
}
