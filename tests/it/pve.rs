//! The power path (SPEC §7): the hypervisor-side forced command on its own
//! (run by a plain shell, fast), then end to end through the real binary,
//! a real OpenSSH server on loopback and the real script, with a stand-in
//! for Proxmox's `qm` (tests/fake-pve/qm) that keeps one VM's state.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{DEADLINE, Server, repo};

/// The script and its fake `qm`, in a directory of their own.
pub struct Pve {
    pub dir: tempfile::TempDir,
}

impl Pve {
    pub fn new() -> Pve {
        let dir = tempfile::tempdir().unwrap();
        let pve = Pve { dir };
        pve.configure("");
        pve
    }

    /// Writes the script's config; `extra` lines override the defaults.
    pub fn configure(&self, extra: &str) {
        let d = self.dir.path();
        let conf = format!(
            "VMID=101\nFORENSICS_DIR={}\nSTOP_TIMEOUT=10\nGUEST_PING_TIMEOUT=1\nMONITOR_TIMEOUT=2\nPOLL_INTERVAL=0.05\nLOCK_FILE={}\n{extra}",
            d.join("forensics").display(),
            d.join("lock").display()
        );
        std::fs::write(d.join("pve.conf"), conf).unwrap();
    }

    pub fn qm_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Shapes the fake VM (see tests/fake-pve/qm): e.g. `set("state", "stopped")`.
    pub fn set(&self, file: &str, content: &str) {
        std::fs::write(self.dir.path().join(file), content).unwrap();
    }

    /// The forced command's environment, as sshd's `command="…"` sets it.
    pub fn env_prefix(&self) -> String {
        format!(
            "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin BREAKGLASS_PVE_CONF={} FAKE_QM_DIR={}",
            repo().join("tests/fake-pve").display(),
            self.dir.path().join("pve.conf").display(),
            self.qm_dir().display()
        )
    }

    pub fn script() -> PathBuf {
        repo().join("deploy/pve/breakglass-pve")
    }

    /// Runs the script as sshd would, with `SSH_ORIGINAL_COMMAND`, by a plain shell.
    pub fn run(&self, original_command: Option<&str>) -> Output {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!("{} exec sh {}", self.env_prefix(), Self::script().display()));
        command.env_remove("SSH_ORIGINAL_COMMAND");
        if let Some(original) = original_command {
            command.env("SSH_ORIGINAL_COMMAND", original);
        }
        command.output().unwrap()
    }

    /// Every `qm` call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.qm_dir().join("calls")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    pub fn forensics_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path().join("forensics"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }
}

/// The `qm` calls of one forensics dump, in order.
const FORENSICS_CALLS: [&str; 5] =
    ["qm status 101 --verbose", "qm config 101", "qm pending 101", "qm monitor 101", "qm guest cmd 101 ping"];

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ---- The script on its own ------------------------------------------------

#[test]
fn the_script_refuses_everything_but_the_six_verbs() {
    let pve = Pve::new();
    let hostile = [
        None,
        Some(""),
        Some("status; rm -rf /"),
        Some("status extra"),
        Some("status\nrm -rf /"),
        Some("status\n"),
        Some(" status"),
        Some("STATUS"),
        Some("reboot"),
        Some("$(id)"),
        Some("`id`"),
        Some("cycle&&start"),
        Some("../status"),
        Some("status\0reset"),
    ];
    for original in hostile {
        let output = match original {
            Some(s) if s.contains('\0') => continue, // the environment cannot carry a NUL
            _ => pve.run(original),
        };
        assert_eq!(output.status.code(), Some(64), "{original:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("refused"), "{original:?}: {}", stderr(&output));
        assert!(stdout(&output).is_empty(), "{original:?}");
    }
    assert!(pve.calls().is_empty(), "no qm call for any refused command: {:?}", pve.calls());
}

#[test]
fn status_asks_qm_and_changes_nothing() {
    let pve = Pve::new();
    let output = pve.run(Some("status"));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).starts_with("status: running\n"));
    assert_eq!(pve.calls(), ["qm status 101 --verbose"]);
    assert!(pve.forensics_files().is_empty());
}

#[test]
fn forensics_is_printed_and_saved() {
    let pve = Pve::new();
    let output = pve.run(Some("forensics"));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(pve.calls(), FORENSICS_CALLS);
    let files = pve.forensics_files();
    assert_eq!(files.len(), 1);
    let saved = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(stdout(&output), saved, "what is printed is what is saved");
    for part in [
        "## qm status --verbose",
        "## qm config",
        "memory: 16384",
        "## qm pending",
        "new memory: 24576",
        "VM status: running",
        "## guest agent ping",
    ] {
        assert!(saved.contains(part), "{part:?} in {saved}");
    }
    let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.starts_with("vm101-") && name.contains("-forensics-") && name.ends_with(".txt"), "{name}");
}

#[test]
fn each_mutating_verb_runs_after_its_forensics() {
    for (verb, state, last_call) in
        [("reset", "running", "qm reset 101"), ("stop", "running", "qm stop 101"), ("start", "stopped", "qm start 101")]
    {
        let pve = Pve::new();
        pve.set("state", state);
        let output = pve.run(Some(verb));
        assert!(output.status.success(), "{verb}: {}", stderr(&output));
        let calls = pve.calls();
        assert_eq!(calls[..5], FORENSICS_CALLS, "{verb}: forensics first");
        assert_eq!(calls[5], last_call, "{verb}");
        let files = pve.forensics_files();
        assert_eq!(files.len(), 1, "{verb}");
        assert!(files[0].to_str().unwrap().contains(&format!("-{verb}-")), "{verb}");
        assert!(
            stdout(&output)
                .ends_with(&format!("{verb} done: VM 101 is {}\n", if verb == "stop" { "stopped" } else { "running" }))
        );
    }
}

#[test]
fn cycle_waits_for_the_stop_before_starting() {
    let pve = Pve::new();
    pve.set("stop-polls", "3");
    let output = pve.run(Some("cycle"));
    assert!(output.status.success(), "{}", stderr(&output));
    let calls = pve.calls();
    assert_eq!(calls[..5], FORENSICS_CALLS);
    // stop, then status until it says stopped (3 polls of "running", then "stopped"), then start.
    assert_eq!(
        calls[5..],
        [
            "qm stop 101",
            "qm status 101",
            "qm status 101",
            "qm status 101",
            "qm status 101",
            "qm start 101",
            "qm status 101"
        ]
    );
    assert!(stdout(&output).contains("VM 101 stopped; starting it"));
}

#[test]
fn cycle_gives_up_when_the_vm_does_not_stop_and_does_not_start_it() {
    let pve = Pve::new();
    pve.configure("STOP_TIMEOUT=1");
    pve.set("stop-polls", "100000");
    let output = pve.run(Some("cycle"));
    assert_eq!(output.status.code(), Some(124), "{}", stderr(&output));
    assert!(stderr(&output).contains("did not stop within 1s; not starting it"));
    assert!(!pve.calls().iter().any(|c| c.starts_with("qm start")));
}

#[test]
fn no_mutating_verb_runs_without_its_forensics_saved() {
    let pve = Pve::new();
    let blocker = pve.dir.path().join("not-a-dir");
    std::fs::write(&blocker, "a file where the forensics directory should be").unwrap();
    pve.configure(&format!("FORENSICS_DIR={}/forensics", blocker.display()));
    let output = pve.run(Some("reset"));
    assert_eq!(output.status.code(), Some(73), "{}", stderr(&output));
    assert!(stderr(&output).contains("reset not run: forensics must be saved first"));
    assert!(!pve.calls().iter().any(|c| c == "qm reset 101"));
}

#[test]
fn a_hung_guest_agent_does_not_hang_forensics() {
    let pve = Pve::new();
    pve.set("guest-hangs", "");
    let started = Instant::now();
    let output = pve.run(Some("forensics"));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("## guest agent ping (timeout 1s)\n(exit 124)"), "{}", stdout(&output));
    assert!(started.elapsed() < DEADLINE);
}

#[test]
fn one_mutating_verb_at_a_time_on_the_host() {
    let pve = Pve::new();
    let lock = pve.dir.path().join("lock");
    // Another verb holds the lock (as flock(1) would for breakglass-pve itself).
    let mut holder =
        Command::new("sh").args(["-c", "exec 9>>\"$1\"; flock 9; exec sleep 30", "holder"]).arg(&lock).spawn().unwrap();
    crate::harness::wait_until("the lock to be held", || {
        Command::new("flock").args(["-n"]).arg(&lock).arg("true").status().is_ok_and(|s| !s.success())
    });
    let output = pve.run(Some("stop"));
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(output.status.code(), Some(75), "{}", stderr(&output));
    assert!(stderr(&output).contains("busy"));
    assert!(pve.calls().is_empty(), "nothing ran: {:?}", pve.calls());
    assert!(pve.run(Some("status")).status.success(), "read-only verbs need no lock");
}

/// Regression: QEMU, daemonized by `qm start`, inherited the lock's
/// descriptor and held the lock for as long as the VM ran.
#[test]
fn a_daemon_started_by_qm_does_not_keep_the_lock() {
    let pve = Pve::new();
    pve.set("state", "stopped");
    pve.set("start-daemon", "");
    let started = pve.run(Some("start"));
    assert!(started.status.success(), "{}", stderr(&started));
    let stopped = pve.run(Some("stop"));
    let daemon = std::fs::read_to_string(pve.qm_dir().join("daemon.pid")).unwrap();
    let _ = Command::new("kill").arg(daemon.trim()).status();
    assert!(stopped.status.success(), "the lock is free again: {}", stderr(&stopped));
}

/// Regression: a client that went away mid-`cycle` (timeout, lost network)
/// killed the script at its next write, after the stop and before the start.
#[test]
fn a_cycle_finishes_when_its_client_goes_away() {
    let pve = Pve::new();
    pve.set("stop-polls", "5");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{} exec sh {}", pve.env_prefix(), Pve::script().display()))
        .env("SSH_ORIGINAL_COMMAND", "cycle")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // nobody reads what it prints any more
    let status = child.wait().unwrap();
    assert!(pve.calls().iter().any(|c| c == "qm start 101"), "the VM was started again: {:?} ({status})", pve.calls());
    assert_eq!(std::fs::read_to_string(pve.qm_dir().join("state")).unwrap().trim(), "running");
}

#[test]
fn a_failing_qm_is_reported_with_its_message() {
    let pve = Pve::new();
    pve.set("fail-reset", "VM is locked (backup)");
    let output = pve.run(Some("reset"));
    assert_eq!(output.status.code(), Some(69));
    assert!(stderr(&output).contains("reset failed: VM is locked (backup)"), "{}", stderr(&output));
}

#[test]
fn a_bad_configuration_is_refused() {
    let pve = Pve::new();
    pve.configure("VMID='1 2'");
    let output = pve.run(Some("status"));
    assert_eq!(output.status.code(), Some(78), "{}", stderr(&output));
    assert!(pve.calls().is_empty());
}

// ---- End to end through sshd ---------------------------------------------

/// A real OpenSSH server on a free loopback port whose only key runs the
/// forced command, and an ssh-agent holding that key (as a deployment
/// provides it: never on disk for the server).
pub struct Sshd {
    dir: tempfile::TempDir,
    sshd: Child,
    agent: Child,
    pub port: u16,
    pub pve: Pve,
}

impl Sshd {
    pub fn start(pve: Pve) -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            let ok = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(d.join(key)).status();
            assert!(
                ok.is_ok_and(|s| s.success()),
                "ssh-keygen (scripts/test installs openssh-server and openssh-client)"
            );
        }
        let client_pub = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
        std::fs::write(
            d.join("authorized_keys"),
            format!("command=\"{} {}\",restrict {client_pub}", pve.env_prefix(), Pve::script().display()),
        )
        .unwrap();
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nStrictModes no\n\
                 UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nLogLevel VERBOSE\n",
                d.join("host_key").display(),
                d.join("authorized_keys").display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap(); // sshd's privilege-separation directory
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd");
        let agent = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(d.join("agent.sock"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start ssh-agent");
        let mut server = Sshd { dir, sshd, agent, port, pve };
        crate::harness::wait_until("sshd to greet", || server.greets());
        crate::harness::wait_until("ssh-agent to listen", || server.auth_sock().exists());
        let added = Command::new("ssh-add")
            .arg(server.dir.path().join("client_key"))
            .env("SSH_AUTH_SOCK", server.auth_sock())
            .output()
            .unwrap();
        assert!(added.status.success(), "ssh-add: {}", String::from_utf8_lossy(&added.stderr));
        std::fs::remove_file(server.dir.path().join("client_key")).unwrap(); // the key lives in the agent only
        server.sshd_alive();
        server
    }

    fn greets(&self) -> bool {
        use std::io::Read;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut banner = [0u8; 8];
        stream.read_exact(&mut banner).is_ok() && banner.starts_with(b"SSH-2.0")
    }

    fn sshd_alive(&mut self) {
        if let Ok(Some(status)) = self.sshd.try_wait() {
            panic!(
                "sshd exited ({status}): {}",
                std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
            );
        }
    }

    pub fn auth_sock(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// `[127.0.0.1]:port <host key>`, as a known_hosts line.
    pub fn known_hosts_line(&self) -> String {
        let key = std::fs::read_to_string(self.dir.path().join("host_key.pub")).unwrap();
        let mut parts = key.split_whitespace();
        format!("[127.0.0.1]:{} {} {}\n", self.port, parts.next().unwrap(), parts.next().unwrap())
    }

    /// The breakglass server, pointed at this host.
    pub fn breakglass(&self, options: crate::harness::Options) -> Server {
        options
            .env("BREAKGLASS_PVE_HOST", "127.0.0.1")
            .env("BREAKGLASS_PVE_PORT", self.port.to_string())
            .env("SSH_AUTH_SOCK", self.auth_sock().display().to_string())
            .start()
    }

    /// Runs the real ssh client against the forced command, as the agent would.
    pub fn ssh(&self, remote: &str) -> Output {
        Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "LogLevel=ERROR", "-p", &self.port.to_string(), "root@127.0.0.1", remote])
            .env("SSH_AUTH_SOCK", self.auth_sock())
            .output()
            .unwrap()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        for child in [&mut self.sshd, &mut self.agent] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn verb(server: &Server, verb: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let response = server.post(&format!("/api/pve/{verb}")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap(), started.elapsed())
}

#[tokio::test]
async fn every_verb_end_to_end_through_sshd() {
    let host = Sshd::start(Pve::new());
    let server = host.breakglass(Server::options());
    let mut timings = Vec::new();
    let mut seen = 0;
    for (name, state) in [
        ("status", "running"),
        ("forensics", "running"),
        ("reset", "running"),
        ("stop", "running"),
        ("start", "stopped"),
        ("cycle", "running"),
    ] {
        host.pve.set("state", state);
        let (status, body, took) = verb(&server, name).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["verb"], name);
        assert_eq!(body["exit_code"], 0);
        assert_eq!(body["rejected"], false);
        let calls = host.pve.calls();
        let ran = calls[seen..].to_vec();
        seen = calls.len();
        if name != "status" {
            assert_eq!(ran[..5], FORENSICS_CALLS, "{name}: forensics first");
        }
        let verb_call = match name {
            "status" => "qm status 101 --verbose",
            "forensics" => "qm guest cmd 101 ping",
            "cycle" => "qm start 101",
            other => &format!("qm {other} 101"),
        };
        assert!(ran.iter().any(|c| c == verb_call), "{name} ran {verb_call}: {ran:?}");
        timings.push(format!("{name}: {} ({} ms)", ran.join(", "), took.as_millis()));
    }
    eprintln!("verbs end to end:\n  {}", timings.join("\n  "));
    assert_eq!(host.pve.forensics_files().len(), 5, "one dump per verb but status");

    let page: Value = server.get("/api/audit?limit=20").send().await.unwrap().json().await.unwrap();
    let outcomes: Vec<_> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|r| format!("{} {}", r["action"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes[..4],
        ["verb.status requested", "verb.status exit 0", "verb.forensics requested", "verb.forensics exit 0"]
    );
    assert_eq!(outcomes.len(), 12);
}

#[tokio::test]
async fn the_host_refuses_non_verbs_sent_over_ssh() {
    let host = Sshd::start(Pve::new());
    for remote in ["status; rm -rf /", "status extra", "reboot", "", "sh -c id"] {
        let output = host.ssh(remote);
        assert_eq!(output.status.code(), Some(64), "{remote:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("refused"), "{remote:?}");
    }
    assert!(host.pve.calls().is_empty());
    let ok = host.ssh("status");
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[tokio::test]
async fn a_failing_verb_answers_502_with_the_hosts_words() {
    let host = Sshd::start(Pve::new());
    host.pve.set("fail-reset", "VM is locked (backup)");
    let server = host.breakglass(Server::options());
    let (status, body, _) = verb(&server, "reset").await;
    assert_eq!(status, 502);
    assert_eq!(body["exit_code"], 69);
    assert_eq!(body["rejected"], false);
    assert!(body["stderr"].as_str().unwrap().contains("VM is locked (backup)"), "{body}");
}

#[tokio::test]
async fn an_unreachable_host_is_502_with_sshs_message() {
    let server = Server::options()
        .env("BREAKGLASS_PVE_HOST", "127.0.0.1")
        .env("BREAKGLASS_PVE_PORT", free_port().to_string())
        .start();
    let (status, body, _) = verb(&server, "status").await;
    assert_eq!(status, 502);
    assert_eq!(body["exit_code"], 255);
    assert!(body["stderr"].as_str().unwrap().contains("Connection refused"), "{body}");
}

#[tokio::test]
async fn a_hanging_host_times_out_and_leaves_no_ssh_behind() {
    // Accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let server = Server::options()
        .env("BREAKGLASS_PVE_HOST", "127.0.0.1")
        .env("BREAKGLASS_PVE_PORT", port.to_string())
        .env("BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS", "1")
        .start();
    let (status, body, _) = verb(&server, "status").await;
    assert_eq!(status, 502);
    assert_eq!(body["exit_code"], Value::Null);
    assert_eq!(body["stderr"], "timed out after 1s; ssh was killed");
    let ours = format!("-p {port} ");
    crate::harness::eventually("the ssh process to be gone", || {
        !std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&ours))
        })
    })
    .await;
    drop(silent);
}

#[tokio::test]
async fn a_second_mutating_verb_while_one_runs_is_409() {
    let host = Sshd::start(Pve::new());
    host.pve.set("stop-seconds", "3");
    let server = host.breakglass(Server::options());
    let first = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/api/pve/stop"));
        async move { client.post(url).bearer_auth(crate::harness::TOKEN).send().await.unwrap().status().as_u16() }
    });
    crate::harness::eventually("the first stop to reach qm", || host.pve.calls().iter().any(|c| c == "qm stop 101"))
        .await;
    let (status, body, _) = verb(&server, "cycle").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["detail"], "another power verb is running");
    let (status, _, _) = verb(&server, "status").await;
    assert_eq!(status, 200, "read-only verbs are not held up");
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(host.pve.calls().iter().filter(|c| c.starts_with("qm stop")).count(), 1);
}

#[tokio::test]
async fn the_pinned_host_key_accepts_the_right_key_and_refuses_a_wrong_one() {
    let host = Sshd::start(Pve::new());
    let pinned = host.dir.path().join("known_hosts");
    std::fs::write(&pinned, host.known_hosts_line()).unwrap();
    let server = host.breakglass(Server::options().env("BREAKGLASS_PVE_KNOWN_HOSTS", pinned.display().to_string()));
    let (status, body, _) = verb(&server, "status").await;
    assert_eq!(status, 200, "{body}");

    // Another host's key under this address: a man in the middle, or a re-keyed host.
    let other = host.dir.path().join("other_key");
    Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&other).status().unwrap();
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut parts = other_pub.split_whitespace();
    std::fs::write(&pinned, format!("[127.0.0.1]:{} {} {}\n", host.port, parts.next().unwrap(), parts.next().unwrap()))
        .unwrap();
    let calls_before = host.pve.calls().len();
    let (status, body, _) = verb(&server, "status").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["exit_code"], 255);
    assert!(body["stderr"].as_str().unwrap().contains("Host key verification failed"), "{body}");
    assert_eq!(host.pve.calls().len(), calls_before, "nothing ran on a host we could not verify");
}
