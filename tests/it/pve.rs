//! The power path (README "Setting up the hypervisor"): the hypervisor-side forced command on its own
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
        self.write_conf(&format!("{}{extra}", self.base_conf()));
    }

    /// The settings every test starts from: everything inside this test's directory.
    pub fn base_conf(&self) -> String {
        let d = self.dir.path();
        format!(
            "VMID=101\nFORENSICS_DIR={}\nSTOP_TIMEOUT=10\nGUEST_PING_TIMEOUT=1\nMONITOR_TIMEOUT=2\nPOLL_INTERVAL=0.05\nLOCK_FILE={}\n",
            d.join("forensics").display(),
            d.join("lock").display()
        )
    }

    pub fn write_conf(&self, conf: &str) {
        std::fs::write(self.conf_path(), conf).unwrap();
    }

    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("pve.conf")
    }

    pub fn qm_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Shapes the fake VM (see tests/fake-pve/qm): e.g. `set("state", "stopped")`.
    pub fn set(&self, file: &str, content: &str) {
        std::fs::write(self.dir.path().join(file), content).unwrap();
    }

    /// What the script needs around it on any host: the fake `qm` first on PATH.
    pub fn tools_env(&self) -> String {
        format!(
            "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin FAKE_QM_DIR={}",
            repo().join("tests/fake-pve").display(),
            self.qm_dir().display()
        )
    }

    /// The `command="…"` of the key's authorized_keys line: the host's admin
    /// names the config on it, since under sshd the environment names nothing.
    pub fn forced_command(&self) -> String {
        format!("{} {} --config {}", self.tools_env(), Self::script().display(), self.conf_path().display())
    }

    pub fn script() -> PathBuf {
        repo().join("deploy/pve/breakglass-pve")
    }

    /// The script as sshd would run it, with `SSH_ORIGINAL_COMMAND`, but by
    /// a plain shell: not under sshd, so the test's config is named by
    /// `BREAKGLASS_PVE_CONF`, whatever session the tests themselves run in.
    pub fn command(&self, original_command: Option<&str>) -> Command {
        self.command_with(original_command, "")
    }

    /// [`Pve::command`] with arguments after the script, as a forced command line has them.
    pub fn command_with(&self, original_command: Option<&str>, args: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!(
            "{} BREAKGLASS_PVE_CONF={} exec sh {} {args}",
            self.tools_env(),
            self.conf_path().display(),
            Self::script().display()
        ));
        for variable in ["SSH_ORIGINAL_COMMAND", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY"] {
            command.env_remove(variable);
        }
        if let Some(original) = original_command {
            command.env("SSH_ORIGINAL_COMMAND", original);
        }
        command
    }

    pub fn run(&self, original_command: Option<&str>) -> Output {
        self.command(original_command).output().unwrap()
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
    let mut child = pve.command(Some("cycle")).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
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

/// The value the script gives `setting` when its config does not: the first
/// `SETTING=value` line of the script (its defaults, before the config is read).
fn script_default(setting: &str) -> String {
    let script = std::fs::read_to_string(Pve::script()).unwrap();
    let prefix = format!("{setting}=");
    script
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {setting}= line in the script"))
        .to_owned()
}

/// The unprivileged user `nobody`, as whom tests act as a local user would.
const NOBODY: u32 = 65534;

/// A value of each kind a setting can be wrong in: zero (`timeout 0` means
/// no limit at all), negative, empty, not whole, octal-looking, beyond the
/// shell's arithmetic, not a number; relative paths.
#[test]
fn each_bad_setting_is_refused_by_name() {
    let pve = Pve::new();
    let bad = [
        ("VMID", "1 2"),
        ("VMID", "0"),
        ("VMID", "-101"),
        ("VMID", ""),
        ("STOP_TIMEOUT", "0"),
        ("STOP_TIMEOUT", "-1"),
        ("STOP_TIMEOUT", ""),
        ("STOP_TIMEOUT", "1.5"),
        ("STOP_TIMEOUT", "010"),
        ("STOP_TIMEOUT", "99999999999999999999"),
        ("STOP_TIMEOUT", "86401"),
        ("QM_TIMEOUT", "0"),
        ("QM_TIMEOUT", " 30"),
        ("MONITOR_TIMEOUT", "ten"),
        ("MONITOR_TIMEOUT", "0"),
        ("GUEST_PING_TIMEOUT", "0"),
        ("GUEST_PING_TIMEOUT", "5s"),
        ("POLL_INTERVAL", "abc"),
        ("POLL_INTERVAL", "0"),
        ("POLL_INTERVAL", "0.0"),
        ("POLL_INTERVAL", "."),
        ("POLL_INTERVAL", "-1"),
        ("POLL_INTERVAL", ""),
        ("POLL_INTERVAL", "1e3"),
        ("POLL_INTERVAL", "1."),
        ("POLL_INTERVAL", ".5"),
        ("POLL_INTERVAL", "01"),
        ("POLL_INTERVAL", "61"),
        ("POLL_INTERVAL", "99999999999999999999.5"),
        ("FORENSICS_DIR", "forensics"),
        ("FORENSICS_DIR", ""),
        ("LOCK_FILE", "lock"),
        ("LOCK_FILE", ""),
    ];
    for (setting, value) in bad {
        pve.configure(&format!("{setting}='{value}'\n"));
        let output = pve.run(Some("status"));
        assert_eq!(output.status.code(), Some(78), "{setting}={value:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(&format!("{setting} must be ")), "{setting}={value:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(&format!("not '{value}'")), "{setting}={value:?}: {}", stderr(&output));
    }
    assert!(pve.calls().is_empty(), "nothing ran on a bad configuration: {:?}", pve.calls());

    for (setting, value) in [
        ("STOP_TIMEOUT", "1"),
        ("QM_TIMEOUT", "86400"),
        ("POLL_INTERVAL", "2"),
        ("POLL_INTERVAL", "0.5"),
        ("POLL_INTERVAL", "60"),
        ("VMID", "999999999"),
    ] {
        pve.configure(&format!("{setting}={value}\n"));
        let output = pve.run(Some("status"));
        assert!(output.status.success(), "{setting}={value}: {}", stderr(&output));
    }
}

/// `--config` on the forced command line is how the host's admin names
/// another config (the client cannot change that line); it wins over
/// `BREAKGLASS_PVE_CONF`, and nothing else is accepted there.
#[test]
fn the_config_is_named_by_one_absolute_path_argument() {
    let pve = Pve::new();
    for args in
        ["--config pve.conf", "--config", "--conf /etc/breakglass-pve.conf", "status", "--config /a --config /b"]
    {
        let output = pve.command_with(Some("status"), args).output().unwrap();
        assert_eq!(output.status.code(), Some(78), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("--config"), "{args:?}: {}", stderr(&output));
    }
    assert!(pve.calls().is_empty(), "{:?}", pve.calls());
    let other = pve.dir.path().join("other.conf");
    std::fs::write(&other, pve.base_conf().replace("VMID=101", "VMID=202")).unwrap();
    let output = pve.command_with(Some("status"), &format!("--config {}", other.display())).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(pve.calls(), ["qm status 202 --verbose"]);
}

/// Under sshd the environment is the client's to shape (a `SetEnv` that
/// `AcceptEnv` lets through, `environment=` with `PermitUserEnvironment`), so
/// there the script reads its settings from the one fixed path.
#[test]
fn under_sshd_the_config_comes_only_from_the_fixed_path() {
    let pve = Pve::new();
    assert!(
        !Path::new("/etc/breakglass-pve.conf").exists(),
        "this test runs on a machine where the script is not installed"
    );
    for (variable, value) in [("SSH_CONNECTION", "192.0.2.9 50000 192.0.2.10 22"), ("SSH_CLIENT", "192.0.2.9 50000 22")]
    {
        let output = pve.command(Some("status")).env(variable, value).output().unwrap();
        assert_eq!(output.status.code(), Some(78), "{variable}: {}", stderr(&output));
        assert!(stderr(&output).contains("cannot read /etc/breakglass-pve.conf"), "{variable}: {}", stderr(&output));
    }
    assert!(pve.calls().is_empty(), "{:?}", pve.calls());
    assert!(pve.run(Some("status")).status.success(), "run by hand, BREAKGLASS_PVE_CONF names the config");
}

/// Regression: the lock lived in /run/lock, where anyone may create files,
/// so a local user could create it first and hold it: every mutating verb
/// was then "busy".
#[test]
fn a_local_user_cannot_hold_the_default_lock() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    let pve = Pve::new();
    let lock_line = format!("LOCK_FILE={}\n", pve.dir.path().join("lock").display());
    pve.write_conf(&pve.base_conf().replace(&lock_line, ""));
    let lock = PathBuf::from(script_default("LOCK_FILE"));
    let mut squatter = Command::new("sh")
        .args(["-c", "exec 9>>\"$1\" && flock -n 9 && echo held && exec sleep 30", "squatter"])
        .arg(&lock)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // "held" once it holds the lock, or nothing once it has given up.
    let mut said = String::new();
    std::io::BufReader::new(squatter.stdout.take().unwrap()).read_line(&mut said).unwrap();
    let output = pve.run(Some("stop"));
    let _ = squatter.kill();
    squatter.wait().unwrap();
    assert_eq!(said, "", "nobody could take {}", lock.display());
    assert!(output.status.success(), "{}", stderr(&output));

    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::symlink_metadata(lock.parent().unwrap()).unwrap();
    assert!(dir.is_dir());
    assert_eq!((dir.uid(), dir.mode() & 0o7777), (0, 0o700), "the lock's directory is root's alone");
}

#[test]
fn a_lock_where_others_can_write_is_refused() {
    use std::os::unix::fs::{PermissionsExt, chown, symlink};

    let set_mode =
        |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    for case in [
        "a directory anyone may write, like /run/lock",
        "a group-writable directory",
        "another user's directory",
        "a link for a lock file",
        "another user's lock file",
    ] {
        let pve = Pve::new();
        let dir = pve.dir.path().join("locks");
        let lock = dir.join("lock");
        std::fs::create_dir(&dir).unwrap();
        set_mode(&dir, 0o700);
        match case {
            "a directory anyone may write, like /run/lock" => set_mode(&dir, 0o1777),
            "a group-writable directory" => set_mode(&dir, 0o770),
            "another user's directory" => chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap(),
            "a link for a lock file" => symlink(pve.dir.path().join("elsewhere"), &lock).unwrap(),
            "another user's lock file" => {
                std::fs::write(&lock, "").unwrap();
                chown(&lock, Some(NOBODY), Some(NOBODY)).unwrap();
            }
            other => panic!("no such case: {other}"),
        }
        pve.configure(&format!("LOCK_FILE={}\n", lock.display()));
        let output = pve.run(Some("stop"));
        assert_eq!(output.status.code(), Some(78), "{case}: {}", stderr(&output));
        assert!(stderr(&output).contains("LOCK_FILE"), "{case}: {}", stderr(&output));
        assert!(pve.calls().is_empty(), "{case}: nothing ran: {:?}", pve.calls());
    }
}

/// Regression: `timeout` sends SIGTERM at the limit and then waits; a `qm`
/// that ignored it kept forensics (and the verb after it) waiting forever.
#[test]
fn a_qm_that_ignores_sigterm_is_killed() {
    let pve = Pve::new();
    pve.set("term-ignored", "");
    let started = Instant::now();
    let mut child = pve.command(Some("forensics")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let finished = crate::harness::wait_child(&mut child, DEADLINE);
    if finished.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    assert!(finished.is_some_and(|s| s.success()), "forensics finished: {}", stderr(&output));
    let kill_after: u64 = script_default("KILL_AFTER").parse().unwrap();
    let ping = stdout(&output).split("## guest agent ping (timeout 1s)\n").nth(1).unwrap_or_default().to_owned();
    assert!(ping.trim_end().ends_with("(exit 137)"), "killed by SIGKILL: {ping}");
    assert!(started.elapsed() >= Duration::from_secs(1 + kill_after));
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
        Sshd::start_with(pve, "", "")
    }

    /// `sshd_config` lines added to the defaults, and options added to the
    /// key's line in authorized_keys after `command="…",restrict` (so each
    /// begins with a comma).
    pub fn start_with(pve: Pve, sshd_config: &str, key_options: &str) -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            crate::harness::ssh_keygen(d, key);
        }
        let client_pub = std::fs::read_to_string(d.join("client_key.pub")).unwrap();
        std::fs::write(
            d.join("authorized_keys"),
            format!("command=\"{}\",restrict{key_options} {client_pub}", pve.forced_command()),
        )
        .unwrap();
        let port = free_port();
        let sshd = crate::harness::spawn_sshd(
            d,
            port,
            &d.join("host_key"),
            &format!("PermitRootLogin prohibit-password\n{sshd_config}"),
        );
        let agent = crate::harness::spawn_ssh_agent(&d.join("agent.sock"));
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
        self.ssh_with(&[], remote)
    }

    /// `ssh` with extra options (`-o SetEnv=…`) before the destination.
    pub fn ssh_with(&self, options: &[&str], remote: &str) -> Output {
        Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(options)
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

pub fn free_port() -> u16 {
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

/// Regression: the script took `BREAKGLASS_PVE_CONF` from its environment,
/// which sshd fills from the client's `SetEnv` (what `AcceptEnv` lets
/// through) and from `environment=` in authorized_keys: a client could point
/// the key at another VM, or at a file of shell code of its choosing.
#[test]
fn settings_sent_through_sshd_are_ignored() {
    let rogue = tempfile::tempdir().unwrap();
    let rogue_conf = rogue.path().join("rogue.conf");
    std::fs::write(
        &rogue_conf,
        format!(
            "VMID=666\nFORENSICS_DIR={0}/forensics\nLOCK_FILE={0}/lock\nPOLL_INTERVAL=0.05\n",
            rogue.path().display()
        ),
    )
    .unwrap();
    let sent = format!("BREAKGLASS_PVE_CONF={}", rogue_conf.display());
    let client_setenv = format!("SetEnv={sent}");
    let key_environment = format!(",environment=\"{sent}\"");
    for (how, sshd_config, key_options, ssh_options) in [
        ("the client's SetEnv", "AcceptEnv LANG LC_* BREAKGLASS_*\n", "", vec!["-o", client_setenv.as_str()]),
        ("environment= in authorized_keys", "PermitUserEnvironment yes\n", key_environment.as_str(), vec![]),
    ] {
        let host = Sshd::start_with(Pve::new(), sshd_config, key_options);
        let output = host.ssh_with(&ssh_options, "status");
        assert!(output.status.success(), "{how}: {}", stderr(&output));
        assert_eq!(host.pve.calls(), ["qm status 101 --verbose"], "{how}: the admin's config, not the client's");
        let reached = std::fs::read_to_string(host.pve.qm_dir().join("env")).unwrap_or_default();
        assert_eq!(reached, format!("{sent}\n"), "{how}: the variable did reach the host");
    }
}

/// The script's own bounds on a `cycle`, from its defaults, must fit in the
/// server's default verb timeout: if they drift apart, the server answers
/// "timed out" while the host is still cycling the VM.
#[test]
fn the_servers_verb_timeout_outlasts_a_cycle_with_the_hosts_defaults() {
    let seconds = |setting: &str| -> u64 {
        script_default(setting).parse().unwrap_or_else(|_| panic!("{setting} is whole seconds"))
    };
    // The example config shows the same defaults the script has.
    let example = std::fs::read_to_string(repo().join("deploy/pve/breakglass-pve.conf.example")).unwrap();
    for (setting, value) in example.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')) {
        if setting != "VMID" {
            assert_eq!(value, script_default(setting), "{setting} in the example config");
        }
    }
    // Every qm call runs under `timeout -k KILL_AFTER <its limit>`.
    let bounded = |limit: &str| seconds(limit) + seconds("KILL_AFTER");
    let forensics = 3 * bounded("QM_TIMEOUT") + bounded("MONITOR_TIMEOUT") + bounded("GUEST_PING_TIMEOUT");
    let stop = bounded("STOP_TIMEOUT");
    // The wait's last clock check comes before STOP_TIMEOUT has passed; one
    // more sleep and one more status query may follow it.
    let poll: f64 = script_default("POLL_INTERVAL").parse().unwrap();
    let wait = seconds("STOP_TIMEOUT") + poll.ceil() as u64 + bounded("QM_TIMEOUT");
    let start = bounded("STOP_TIMEOUT");
    let final_status = bounded("QM_TIMEOUT");
    let cycle = forensics + stop + wait + start + final_status;
    // ssh may take its whole ConnectTimeout before the script even starts.
    let power = std::fs::read_to_string(repo().join("src/power/ssh.rs")).unwrap();
    let connect: u64 = power.split("ConnectTimeout=").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();

    let help = Command::new(env!("CARGO_BIN_EXE_breakglass")).args(["serve", "--help"]).env_clear().output().unwrap();
    let help = stdout(&help);
    let after_flag = help.split("--pve-verb-timeout-seconds").nth(1).expect("the flag in serve --help");
    let default: u64 =
        after_flag.split("[default: ").nth(1).unwrap().split(']').next().unwrap().parse().expect("a default");
    eprintln!(
        "cycle with the host's defaults: at most {cycle} s (+{connect} s to connect); server default {default} s"
    );
    assert!(
        default > cycle + connect,
        "BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS defaults to {default} s; a cycle may take {cycle} s after {connect} s to connect"
    );
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
