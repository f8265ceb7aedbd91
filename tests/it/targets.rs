//! Targets and operations (README "Targets", "Operations"): the targets
//! file through the real binary, and the `ssh` backend's verbs as
//! operations against a real sshd and the hypervisor script (with the fake
//! `qm` of tests/fake-pve), watched over SSE, verified by a check, and
//! durable across a killed server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Attached, DEADLINE, Frame, Server, refused_at_start};
use crate::pve::{Pve, Sshd, free_port};

/// Writes a targets file (and a secret beside it) into `dir`.
pub(crate) fn targets_file(dir: &std::path::Path, text: &str) -> PathBuf {
    std::fs::write(dir.join("secret"), "s3cret-token\n").unwrap();
    let file = dir.join("targets.toml");
    std::fs::write(&file, text.replace("$DIR", &dir.display().to_string())).unwrap();
    file
}

/// An `ssh` target on the test's sshd, with `extra` keys.
pub(crate) fn ssh_target(name: &str, host: &Sshd, extra: &str) -> String {
    format!("[[target]]\nname = \"{name}\"\nbackend = \"ssh\"\nhost = \"127.0.0.1\"\nport = {}\n{extra}\n", host.port)
}

/// The server with `file` as its targets, reaching `host`'s ssh-agent.
pub(crate) fn serve(host: &Sshd, file: &std::path::Path) -> Server {
    Server::options()
        .env("BREAKGLASS_TARGETS_FILE", file.display().to_string())
        .env("SSH_AUTH_SOCK", host.auth_sock().display().to_string())
        .start()
}

pub(crate) async fn post_verb(server: &Server, target: &str, verb: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = server.post(&format!("/api/targets/{target}/verbs/{verb}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Starts a verb that must be accepted; its operation id.
pub(crate) async fn start(server: &Server, target: &str, verb: &str) -> String {
    let (status, body) = post_verb(server, target, verb, None).await;
    assert_eq!(status, 202, "{target} {verb}: {body}");
    body["operation_id"].as_str().expect("operation_id").to_owned()
}

pub(crate) async fn operation(server: &Server, id: &str) -> Value {
    let response = server.get(&format!("/api/operations/{id}")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Polls the operation until it is no longer running.
pub(crate) async fn finished(server: &Server, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let op = operation(server, id).await;
        if op["state"] != "running" {
            return op;
        }
        assert!(started.elapsed() < DEADLINE, "operation {id} still running: {op}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn attach(server: &Server, id: &str, last_event_id: Option<&str>) -> Attached {
    let mut request = server.get(&format!("/api/operations/{id}/stream"));
    if let Some(last) = last_event_id {
        request = request.header("Last-Event-ID", last);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    Attached::new(response)
}

pub(crate) fn texts(op: &Value) -> Vec<String> {
    op["steps"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn the_targets_file_loads_and_get_targets_lists_each_with_its_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let fingerprint = ["AB"; 32].join(":");
    let file = targets_file(
        dir.path(),
        &format!(
            r#"
[[target]]
name = "devvm"
backend = "pve-api"
url = "http://127.0.0.1:8006"
node = "pve1"
vmid = 101
token_id = "breakglass@pve!power"
token_secret_file = "$DIR/secret"
check = "tcp:192.0.2.20:22"
recover_timeout_seconds = 300

[[target]]
name = "hypervisor"
backend = "redfish"
url = "https://192.0.2.5"
user = "breakglass"
password_file = "$DIR/secret"
tls_fingerprint = "sha256:{fingerprint}"

[[target]]
name = "vm"
backend = "ssh"
host = "192.0.2.10"
"#
        ),
    );
    let server = Server::options().env("BREAKGLASS_TARGETS_FILE", file.display().to_string()).start();
    let answer: Value = server.get("/api/targets").send().await.unwrap().json().await.unwrap();
    let six = ["cycle", "forensics", "reset", "start", "status", "stop"];
    assert_eq!(
        answer,
        json!({"targets": [
            {"name": "devvm", "backend": "pve-api",
             "verbs": ["cycle", "forensics", "reset", "shutdown", "start", "status", "stop"],
             "mutating": ["cycle", "reset", "shutdown", "start", "stop"]},
            // A BMC that has not answered yet: the catalogue's six.
            {"name": "hypervisor", "backend": "redfish", "verbs": six, "mutating": ["cycle", "reset", "start", "stop"]},
            {"name": "vm", "backend": "ssh", "verbs": six, "mutating": ["cycle", "reset", "start", "stop"]},
        ]})
    );
    assert!(!server.log().contains("s3cret-token"), "the secret is never logged");

    let (status, body) = post_verb(&server, "nosuch", "status", None).await;
    assert_eq!((status, body["detail"].as_str()), (404, Some("no target named \"nosuch\"")));
    let (status, body) = post_verb(&server, "vm", "shutdown", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("does not offer shutdown"), "{body}");
    let (status, _) = post_verb(&server, "vm", "reboot", None).await;
    assert_eq!(status, 400);
    let (status, _) = post_verb(&server, "vm", "status", Some(json!({"session": "not-a-uuid"}))).await;
    assert_eq!(status, 422);
    let whoami: Value = server.get("/api/whoami").send().await.unwrap().json().await.unwrap();
    assert_eq!(whoami["power_configured"], true);

    // The agent learns the targets' names, and that their power is the console's.
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    let argv: Vec<String> = serde_json::from_value(server.agent_runs()[0]["argv"].clone()).unwrap();
    let agents: Value = serde_json::from_str(&argv[argv.iter().position(|a| a == "--agents").unwrap() + 1]).unwrap();
    let prompt = agents["breakglass"]["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("- `devvm` (pve-api): cycle, forensics, reset, shutdown, start, status, stop\n"),
        "{prompt}"
    );
    assert!(prompt.contains("- `vm` (ssh): ") && prompt.contains("through the operator's console"), "{prompt}");
    assert!(!prompt.contains("s3cret"), "no secret reaches the agent");
}

#[tokio::test]
async fn without_a_targets_file_the_pve_settings_make_one_ssh_target_named_vm() {
    let server = Server::options().env("BREAKGLASS_PVE_HOST", "192.0.2.10").start();
    let answer: Value = server.get("/api/targets").send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["targets"].as_array().unwrap().len(), 1);
    assert_eq!(
        (answer["targets"][0]["name"].as_str(), answer["targets"][0]["backend"].as_str()),
        (Some("vm"), Some("ssh"))
    );
    let bare = Server::start();
    let answer: Value = bare.get("/api/targets").send().await.unwrap().json().await.unwrap();
    assert_eq!(answer, json!({"targets": []}));
}

#[test]
fn a_bad_targets_file_is_refused_at_start_naming_the_target_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[target]]\nname = \"devvm\"\nbackend = \"ipmi\"\n", "target \"devvm\": key \"backend\": unknown backend"),
        ("[[target]]\nname = \"devvm\"\nbackend = \"ssh\"\n", "target \"devvm\": key \"host\": missing"),
        (
            "[[target]]\nname = \"devvm\"\nbackend = \"pve-api\"\nurl = \"https://192.0.2.10:8006\"\nnode = \"pve1\"\n\
             vmid = 101\ntoken_id = \"a@pve!b\"\ntoken_secret_file = \"$DIR/no-such-secret\"\ntls_fingerprint = \"x\"\n",
            "target \"devvm\": key \"token_secret_file\": cannot read",
        ),
        (
            "[[target]]\nname = \"vm\"\nbackend = \"ssh\"\nhost = \"a\"\n[[target]]\nname = \"vm\"\nbackend = \"ssh\"\nhost = \"b\"\n",
            "target \"vm\": key \"name\": another target has this name",
        ),
        (
            "[[target]]\nname = \"bmc\"\nbackend = \"redfish\"\nurl = \"https://192.0.2.5\"\nuser = \"u\"\n\
             password_file = \"$DIR/secret\"\n",
            "target \"bmc\": key \"tls_fingerprint\": missing",
        ),
    ];
    for (text, expected) in cases {
        let file = targets_file(dir.path(), text);
        let said = refused_at_start(&["serve"], &[("BREAKGLASS_TARGETS_FILE", file.to_str().unwrap())]);
        assert!(said.contains("BREAKGLASS_TARGETS_FILE"), "{said}");
        assert!(said.contains(expected), "expected {expected:?} in: {said}");
        assert!(!said.contains("s3cret"), "{said}");
    }
}

#[tokio::test]
async fn the_ssh_backends_verbs_run_end_to_end_as_operations() {
    let host = Sshd::start(Pve::new());
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), &ssh_target("vm", &host, ""));
    let server = serve(&host, &file);

    let status = finished(&server, &start(&server, "vm", "status").await).await;
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["result"]["power"], "running");
    assert_eq!(status["result"]["backend"]["exit_code"], 0);
    assert_eq!(texts(&status), ["power: running"]);
    assert!(status["finished"].is_string() && status["started"].is_string(), "{status}");

    let forensics = finished(&server, &start(&server, "vm", "forensics").await).await;
    assert_eq!(forensics["state"], "succeeded", "{forensics}");
    let saved = &texts(&forensics)[0];
    assert!(saved.starts_with("forensics saved (") && saved.contains("-forensics-"), "{saved}");

    let stop = finished(&server, &start(&server, "vm", "stop").await).await;
    assert_eq!(stop["state"], "succeeded", "{stop}");
    assert_eq!(stop["result"]["stop"], "forced");
    let steps = texts(&stop);
    assert!(steps[0].starts_with("stop sent"), "{steps:?}");
    assert!(steps[1].starts_with("forensics saved (") && steps[1].contains("-stop-"), "{steps:?}");
    assert!(steps[2].starts_with("stopped after ") && steps[2].ends_with(" s (forced)"), "{steps:?}");
    assert!(host.pve.calls().iter().any(|c| c == "qm stop 101"));

    let again = finished(&server, &start(&server, "vm", "stop").await).await;
    assert_eq!((again["state"].as_str(), again["result"]["already"].as_bool()), (Some("succeeded"), Some(true)));
    assert_eq!(texts(&again), ["already stopped: nothing to do"]);
    assert_eq!(host.pve.calls().iter().filter(|c| *c == "qm stop 101").count(), 1, "the second stop ran nothing");

    for verb in ["start", "reset", "cycle"] {
        let op = finished(&server, &start(&server, "vm", verb).await).await;
        assert_eq!(op["state"], "succeeded", "{verb}: {op}");
        assert!(op["recovered_after_s"].as_f64().is_some(), "{verb}: {op}");
        assert_eq!(texts(&op).last().map(String::as_str), Some("running"), "{verb}: {op}");
        let call = if verb == "cycle" { "qm start 101".to_owned() } else { format!("qm {verb} 101") };
        assert!(host.pve.calls().contains(&call), "{verb}: {:?}", host.pve.calls());
    }

    let page: Value = server.get("/api/audit?limit=50").send().await.unwrap().json().await.unwrap();
    let records: Vec<String> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|r| {
            format!(
                "{} {} {}",
                r["action"].as_str().unwrap(),
                r["target"].as_str().unwrap(),
                r["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(records[..2], ["verb.status vm requested", "verb.status vm succeeded: power: running"]);
    assert!(records.contains(&"verb.stop vm succeeded: already stopped: nothing to do".to_owned()), "{records:#?}");
    assert_eq!(records.len(), 14, "requested and finished, for each of 7 operations: {records:#?}");
}

#[tokio::test]
async fn recovery_waits_for_a_check_that_passes_after_a_delay() {
    let host = Sshd::start(Pve::new());
    host.pve.set("state", "stopped");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(
        dir.path(),
        &ssh_target("vm", &host, &format!("check = \"tcp:127.0.0.1:{port}\"\nrecover_timeout_seconds = 60")),
    );
    let server = serve(&host, &file);
    let session = server.open_session().await;
    let (status, body) = post_verb(&server, "vm", "start", Some(json!({"session": session}))).await;
    assert_eq!(status, 202, "{body}");
    let id = body["operation_id"].as_str().unwrap().to_owned();
    let mut stream = attach(&server, &id, None).await;
    // Steps until the server waits for the port; only then does anything listen there.
    until_step(&mut stream, &format!("waiting for tcp:127.0.0.1:{port}")).await;
    let opened = Instant::now();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let rest = stream.until_kind("done").await;
    let done = rest.last().unwrap();
    assert_eq!(done["state"], "succeeded", "{rest:?}");
    let after = done["recovered_after_s"].as_f64().unwrap();
    let step = rest[rest.len() - 2]["text"].as_str().unwrap();
    assert!(step.starts_with("reachable again after ") && step.ends_with(" s"), "{step}");
    eprintln!("reachable {} ms after the port opened; recovered_after_s {after}", opened.elapsed().as_millis());
    let op = operation(&server, &id).await;
    assert_eq!(op["recovered_after_s"], done["recovered_after_s"]);
    drop(listener);

    // The session's log shows the power action, start and end (the end's
    // line follows the operation's `done`).
    let mut log = server.attach(&session, None).await;
    let mut lines = Vec::new();
    while lines.len() < 2 {
        let events = log.until_kind("status").await;
        lines.push(events.last().unwrap()["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with(&format!("power: start on vm started by bearer (operation {id})")), "{lines:?}");
    assert!(lines[1].starts_with("power: start on vm: succeeded: reachable again after "), "{lines:?}");
}

#[tokio::test]
async fn a_check_that_never_passes_fails_the_operation_within_the_limit() {
    let host = Sshd::start(Pve::new());
    let port = free_port(); // nothing will listen there
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(
        dir.path(),
        &ssh_target("vm", &host, &format!("check = \"tcp:127.0.0.1:{port}\"\nrecover_timeout_seconds = 2")),
    );
    let server = serve(&host, &file);
    let started = Instant::now();
    let op = finished(&server, &start(&server, "vm", "reset").await).await;
    let took = started.elapsed();
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(op["error"], "not reachable within the limit (2 s)");
    assert!(op.get("recovered_after_s").is_none(), "{op}");
    assert_eq!(texts(&op).last().map(String::as_str), Some("not reachable within the limit (2 s)"));
    assert!(took < Duration::from_secs(12), "gave up within the limit: {took:?}");
    eprintln!("a check that never passes failed the reset after {} ms", took.as_millis());
}

#[tokio::test]
async fn a_second_mutating_operation_on_the_same_target_is_409() {
    let host = Sshd::start(Pve::new());
    host.pve.set("stop-seconds", "3");
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), &ssh_target("vm", &host, ""));
    let server = serve(&host, &file);
    let first = start(&server, "vm", "stop").await;
    crate::harness::eventually("the stop to reach qm", || host.pve.calls().iter().any(|c| c == "qm stop 101")).await;
    let (status, body) = post_verb(&server, "vm", "cycle", None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["detail"], "a mutating operation is already running on this target");
    let (status, _) = verb_on_pve(&server, "reset").await;
    assert_eq!(status, 409, "the default target's /api/pve path shares the lock");
    let status = start(&server, "vm", "status").await;
    assert_eq!(finished(&server, &status).await["state"], "succeeded", "read-only verbs are not held up");
    assert_eq!(finished(&server, &first).await["state"], "succeeded");
    assert_eq!(host.pve.calls().iter().filter(|c| c.starts_with("qm stop")).count(), 1);
}

async fn verb_on_pve(server: &Server, verb: &str) -> (u16, Value) {
    let response = server.post(&format!("/api/pve/{verb}")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_operation_stream_replays_with_caught_up_and_resumes_after_last_event_id() {
    let host = Sshd::start(Pve::new());
    host.pve.set("state", "stopped");
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), &ssh_target("vm", &host, ""));
    let server = serve(&host, &file);
    let id = start(&server, "vm", "start").await;
    let live = attach(&server, &id, None).await.until_kind("done").await;
    let ids: Vec<u64> = live.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..live.len() as u64).collect::<Vec<_>>(), "{live:?}");
    assert_eq!(live.last().unwrap()["kind"], "done");

    let replay = attach(&server, &id, None).await.until_caught_up().await;
    assert_eq!(replay, live, "a full replay is what was sent live");
    let mut resumed = attach(&server, &id, Some("1")).await;
    let after = resumed.until_caught_up().await;
    assert_eq!(after, live[2..], "only the steps after Last-Event-ID");
    // The first step's id is an id like any other: a reconnect after it
    // gets the rest, not the first step again.
    let after_first = attach(&server, &id, Some("0")).await.until_caught_up().await;
    assert_eq!(after_first, live[1..], "only the steps after Last-Event-ID 0");
    let beyond = attach(&server, &id, Some("999")).await.until_caught_up().await;
    assert_eq!(beyond, live, "an id the operation never issued means a full replay");
    let response = server.get("/api/operations/00000000-0000-0000-0000-000000000000/stream").send().await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn a_restart_marks_a_running_operation_failed_interrupted() {
    let host = Sshd::start(Pve::new());
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), &ssh_target("vm", &host, ""));
    let mut server = serve(&host, &file);
    let done = start(&server, "vm", "status").await;
    assert_eq!(finished(&server, &done).await["state"], "succeeded");
    host.pve.set("stop-seconds", "30");
    let running = start(&server, "vm", "stop").await;
    crate::harness::eventually("the stop to reach qm", || host.pve.calls().iter().any(|c| c == "qm stop 101")).await;
    assert_eq!(operation(&server, &running).await["state"], "running");
    server.kill9();
    server.restart();

    let op = operation(&server, &running).await;
    assert_eq!((op["state"].as_str(), op["error"].as_str()), (Some("failed"), Some("interrupted")), "{op}");
    assert!(op["finished"].is_string(), "{op}");
    let kept = operation(&server, &done).await;
    assert_eq!((kept["state"].as_str(), kept["result"]["power"].as_str()), (Some("succeeded"), Some("running")));
    let replay = attach(&server, &running, None).await.until_caught_up().await;
    let last = replay.last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["state"].as_str(), last["error"].as_str()),
        (Some("done"), Some("failed"), Some("interrupted"))
    );
    assert!(server.log().contains("an operation was interrupted by the last stop"));
}

/// Reads an operation's stream until a step that starts with `prefix`;
/// every event before it must be a step.
pub async fn until_step(stream: &mut Attached, prefix: &str) {
    loop {
        let Some(Frame::Event { data, .. }) = stream.next().await else { continue };
        assert_eq!(data["kind"], "step", "{data}");
        if data["text"].as_str().unwrap().starts_with(prefix) {
            return;
        }
    }
}

/// A host with no CA certificates (a stripped-down recovery image) still
/// runs operations: the recovery checks' HTTP client is made without the
/// system's roots there, so a plain-http check works, where making it
/// used to panic the operation's task and leave it "running" for ever.
#[tokio::test]
async fn an_http_check_works_on_a_host_without_ca_certificates() {
    let host = Sshd::start(Pve::new());
    host.pve.set("state", "stopped");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let check = format!("check = \"http://127.0.0.1:{port}/health\"\nrecover_timeout_seconds = 30");
    let file = targets_file(dir.path(), &ssh_target("vm", &host, &check));
    let server = Server::options()
        .env("BREAKGLASS_TARGETS_FILE", file.display().to_string())
        .env("SSH_AUTH_SOCK", host.auth_sock().display().to_string())
        .env("SSL_CERT_FILE", dir.path().join("no-such-bundle.pem").display().to_string())
        .env("SSL_CERT_DIR", dir.path().join("no-such-dir").display().to_string())
        .start();
    let (status, body) = post_verb(&server, "vm", "start", None).await;
    assert_eq!(status, 202, "{body}");
    let id = body["operation_id"].as_str().unwrap().to_owned();
    let mut stream = attach(&server, &id, None).await;
    let rest = tokio::time::timeout(std::time::Duration::from_secs(60), stream.until_kind("done"))
        .await
        .expect("the operation ends");
    let done = rest.last().unwrap();
    assert_eq!(done["state"], "succeeded", "{rest:?}");
    assert!(
        rest.iter().any(|e| e["text"].as_str().is_some_and(|t| t.starts_with("reachable again after "))),
        "{rest:?}"
    );
}
