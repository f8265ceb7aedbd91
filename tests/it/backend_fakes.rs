//! The fake power backends (docs/BACKENDS.md), started by the test itself
//! on loopback: fakepve for the Proxmox VE API, sushy-emulator for Redfish,
//! from the venv `scripts/backends-venv` installs. Certificates are made
//! with `openssl`, as an operator would.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use serde_json::{Value, json};

use crate::harness::{DEADLINE, repo};

/// The venv with fakepve and sushy-tools; a test that needs it fails, not
/// skips, without it.
pub fn venv() -> PathBuf {
    let venv = repo().join(".cache/venv-backends");
    for tool in ["bin/python", "bin/sushy-emulator"] {
        assert!(
            venv.join(tool).exists(),
            "{} is missing: run scripts/backends-venv (scripts/test does), which installs fakepve and sushy-tools",
            venv.join(tool).display()
        );
    }
    venv
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A server certificate and its key, with its fingerprint as `openssl`
/// prints it (`sha256:AB:…`).
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: String,
    /// The CA that signed it, when one did.
    pub ca: Option<PathBuf>,
}

fn fingerprint(cert: &Path) -> String {
    let printed = run(Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(cert));
    // "sha256 Fingerprint=AB:CD:…"
    let hex = printed.trim().rsplit('=').next().unwrap();
    format!("sha256:{hex}")
}

/// A self-signed certificate for 127.0.0.1, as a BMC or a fresh PVE node has.
pub fn self_signed(dir: &Path, name: &str) -> Cert {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={name}"), "-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null()));
    let fingerprint = fingerprint(&cert);
    Cert { cert, key, fingerprint, ca: None }
}

/// A CA, and a certificate for 127.0.0.1 it signed.
pub fn ca_signed(dir: &Path) -> Cert {
    let ca = self_signed(dir, "ca");
    let (cert, key, csr) = (dir.join("leaf.pem"), dir.join("leaf.key"), dir.join("leaf.csr"));
    run(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=pve1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .stderr(Stdio::null()));
    let ext = dir.join("leaf.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca.cert)
        .arg("-CAkey")
        .arg(&ca.key)
        .args(["-CAcreateserial", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null()));
    let fingerprint = fingerprint(&cert);
    Cert { cert, key, fingerprint, ca: Some(ca.cert) }
}

/// A fake backend process, killed and reaped on drop; its output is kept
/// for the failure message.
pub struct Fake {
    child: Child,
    pub url: String,
    pub output: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Fake {
    /// Starts `command` and waits (bounded) for the line that names its URL.
    fn start(mut command: Command, dir: tempfile::TempDir, url_after: &str) -> Fake {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        // Both pipes are read to their end, so a chatty fake never blocks
        // on a full pipe.
        let pipes: [Box<dyn Read + Send>; 2] =
            [Box::new(child.stdout.take().unwrap()), Box::new(child.stderr.take().unwrap())];
        for pipe in pipes {
            let (output, tx, marker) = (output.clone(), tx.clone(), url_after.to_owned());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(at) = line.find(&marker) {
                        let url = line[at + marker.len()..].split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send(url);
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        let started = Instant::now();
        let url = loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(url) => break url,
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("{command:?} exited with {status}: {:?}", output.lock().unwrap());
                    }
                    assert!(started.elapsed() < DEADLINE, "{command:?} never said where it listens: {output:?}");
                }
            }
        };
        Fake { child, url, output, dir }
    }
}

/// The API token the fakepve tests use.
pub const TOKEN_ID: &str = "breakglass@pve!power";
pub const TOKEN_SECRET: &str = "5e2c4a4e-0d1b-4f7e-9a8e-3f0c1d2b3a4c";

/// fakepve with `scenario` (see tests/backends/fakepve_scenario.py) over TLS
/// with a self-signed certificate, unless the scenario names its own.
pub fn fakepve(mut scenario: Value) -> (Fake, Cert) {
    let python = venv().join("bin/python");
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "pve1");
    if scenario.get("cert").is_none() {
        scenario["cert"] = json!(cert.cert);
        scenario["key"] = json!(cert.key);
    }
    let file = dir.path().join("scenario.json");
    std::fs::write(&file, scenario.to_string()).unwrap();
    let mut command = Command::new(python);
    command.arg(repo().join("tests/backends/fakepve_scenario.py")).arg(&file);
    (Fake::start(command, dir, "fakepve listening on "), cert)
}

/// One VM, its token allowed exactly what README asks of the PVE role
/// (VM.PowerMgmt and VM.Audit on the VM), time running at `time_scale`.
pub fn one_vm(guest: Value, time_scale: f64) -> Value {
    json!({
        "time_scale": time_scale,
        "tokens": {TOKEN_ID: TOKEN_SECRET},
        "grants": [[TOKEN_ID, "/vms/101", ["VM.PowerMgmt", "VM.Audit"]]],
        "guests": [guest],
    })
}

/// sushy-emulator's fake driver over TLS with a self-signed certificate,
/// HTTP basic auth for `user`/`password`, and `systems` (its
/// SUSHY_EMULATOR_FAKE_SYSTEMS). Its state lives in its own directory:
/// by default the fake driver shares one file under /tmp between runs.
pub fn sushy(systems: Value, user: &str, password: &str) -> (Fake, Cert) {
    let venv = venv();
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "bmc");
    let htpasswd = dir.path().join("htpasswd");
    let hash = run(Command::new(venv.join("bin/python")).args([
        "-c",
        "import bcrypt, sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())",
        password,
    ]));
    std::fs::write(&htpasswd, format!("{user}:{}", hash.trim())).unwrap();
    let config = dir.path().join("emulator.conf");
    std::fs::write(
        &config,
        format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = 0\nSUSHY_EMULATOR_AUTH_FILE = {}\n\
             SUSHY_EMULATOR_STATE_DIR = {}\nSUSHY_EMULATOR_SSL_CERT = {}\nSUSHY_EMULATOR_SSL_KEY = {}\n\
             SUSHY_EMULATOR_FAKE_SYSTEMS = {}\n",
            json!(htpasswd),
            json!(dir.path().join("state")),
            json!(cert.cert),
            json!(cert.key),
            systems,
        ),
    )
    .unwrap();
    let mut command = Command::new(venv.join("bin/sushy-emulator"));
    command.args(["--fake", "--config"]).arg(&config);
    (Fake::start(command, dir, "Running on "), cert)
}

/// One fake system, `power_state` "On" or "Off".
pub fn one_system(power_state: &str) -> Value {
    json!([{"uuid": "4c4c4544-0042-3010-8052-b4c04f4d3132", "name": "hypervisor", "power_state": power_state, "nics": []}])
}

/// An address nothing listens on: a port the system handed out and took back.
pub fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("127.0.0.1:{port}")
}
