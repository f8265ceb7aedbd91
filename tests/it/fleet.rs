//! The API backends' verbs end to end through the real binary (README
//! "Targets", "Operations", "Power backends"): a targets file naming
//! fakepve and sushy-emulator targets on loopback, pinned by the
//! fingerprints of the certificates the tests make, each verb run as an
//! operation and watched to its end. The fakes are docs/BACKENDS.md's.
//!
//! sushy applies a power change 1 to 11 s after it answers, so the Redfish
//! tests take that long; each test has its own fakes and server, and the
//! tests run side by side.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend_fakes::{Cert, Fake, TOKEN_ID, TOKEN_SECRET, closed_port, fakepve, one_system, one_vm, sushy};
use crate::bmc::{Behaviour, Bmc, Glitch};
use crate::harness::{Server, refused_at_start};
use crate::pve::free_port;
use crate::targets::{attach, finished, operation, post_verb, start, texts, until_step};

const BMC_USER: &str = "breakglass";
const BMC_PASSWORD: &str = "correct horse battery staple";

/// A `pve-api` target for VM `vmid` on `fake`, pinned to `fingerprint`,
/// its token secret in a file of `dir`; `extra` keys follow.
fn pve_target(dir: &Path, name: &str, url: &str, fingerprint: &str, vmid: u32, secret: &str, extra: &str) -> String {
    let file = dir.join(format!("{name}.token"));
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    format!(
        "[[target]]\nname = \"{name}\"\nbackend = \"pve-api\"\nurl = \"{url}\"\nnode = \"pve1\"\nvmid = {vmid}\n\
         token_id = \"{TOKEN_ID}\"\ntoken_secret_file = \"{}\"\ntls_fingerprint = \"{fingerprint}\"\n{extra}\n",
        file.display()
    )
}

/// A `redfish` target on `fake` (its only system), pinned to `cert`.
fn redfish_target(dir: &Path, name: &str, fake: &Fake, cert: &Cert, password: &str, extra: &str) -> String {
    let file = dir.join(format!("{name}.password"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    format!(
        "[[target]]\nname = \"{name}\"\nbackend = \"redfish\"\nurl = \"{}\"\nuser = \"{BMC_USER}\"\n\
         password_file = \"{}\"\ntls_fingerprint = \"{}\"\n{extra}\n",
        fake.url,
        file.display(),
        cert.fingerprint
    )
}

/// The server with these targets (the first is the default).
fn serve(dir: &Path, targets: &[String]) -> Server {
    let file = dir.join("targets.toml");
    std::fs::write(&file, targets.concat()).unwrap();
    Server::options().env("BREAKGLASS_TARGETS_FILE", file.display().to_string()).start()
}

/// What fakepve received, as `METHOD PATH` (tests/backends/fakepve_scenario.py).
fn pve_saw(fake: &Fake) -> Vec<String> {
    let output = fake.output.lock().unwrap();
    output.iter().filter_map(|l| l.strip_prefix("fakepve saw ")).map(str::to_owned).collect()
}

fn guest(vmid: u32, status: &str) -> Value {
    json!({"vmid": vmid, "name": format!("vm{vmid}"), "status": status, "config": {"memory": 2048}})
}

/// Runs `verb` on `target` and waits for its end.
async fn run(server: &Server, target: &str, verb: &str) -> Value {
    finished(server, &start(server, target, verb).await).await
}

/// The verbs `GET /api/targets` lists for `name`.
async fn listed_verbs(server: &Server, name: &str) -> Vec<String> {
    let answer: Value = server.get("/api/targets").send().await.unwrap().json().await.unwrap();
    let target = answer["targets"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap().clone();
    serde_json::from_value(target["verbs"].clone()).unwrap()
}

/// Waits until the server has asked the BMC behind `name` which reset
/// types it offers (at start-up, in the background), as the listing shows.
/// sushy's fake driver keeps its systems in SQLite and may answer two
/// requests at once with "database is locked", so the tests let that
/// question end before they send their own.
async fn asked(server: &Server, name: &str) {
    let all = ["cycle", "forensics", "nmi", "reset", "shutdown", "start", "status", "stop"];
    let started = Instant::now();
    while listed_verbs(server, name).await != all {
        assert!(started.elapsed() < crate::harness::DEADLINE, "{:?}", listed_verbs(server, name).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn pve_api_status_answers_the_common_power_word_and_pves_own() {
    let mut scenario = one_vm(guest(101, "running"), 0.0);
    scenario["guests"] = json!([guest(101, "running"), {"vmid": 102, "name": "off", "status": "stopped"}]);
    scenario["grants"] = json!([[TOKEN_ID, "/vms", ["VM.PowerMgmt", "VM.Audit"]]]);
    let (fake, cert) = fakepve(scenario);
    let dir = tempfile::tempdir().unwrap();
    let server = serve(
        dir.path(),
        &[
            pve_target(dir.path(), "devvm", &fake.url, &cert.fingerprint, 101, TOKEN_SECRET, ""),
            pve_target(dir.path(), "offvm", &fake.url, &cert.fingerprint, 102, TOKEN_SECRET, ""),
        ],
    );
    let running = run(&server, "devvm", "status").await;
    assert_eq!(running["state"], "succeeded", "{running}");
    assert_eq!(running["result"]["power"], "running");
    assert_eq!(running["result"]["backend"]["qmpstatus"], "running", "PVE's own answer is kept: {running}");
    assert_eq!(texts(&running), ["power: running"]);
    let stopped = run(&server, "offvm", "status").await;
    assert_eq!((stopped["state"].as_str(), stopped["result"]["power"].as_str()), (Some("succeeded"), Some("stopped")));

    // The default target's synchronous route answers from the same client.
    let response = server.post("/api/pve/status").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["state"].as_str(), body["result"]["power"].as_str()), (Some("succeeded"), Some("running")));
}

#[tokio::test]
async fn pve_api_reset_takes_forensics_follows_its_task_and_verifies_the_vm_is_running() {
    let (fake, cert) = fakepve(one_vm(guest(101, "running"), 0.01));
    let dir = tempfile::tempdir().unwrap();
    let server =
        serve(dir.path(), &[pve_target(dir.path(), "devvm", &fake.url, &cert.fingerprint, 101, TOKEN_SECRET, "")]);
    let op = run(&server, "devvm", "reset").await;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(texts(&op), ["forensics saved (in this operation's result)", "reset sent", "running"]);
    assert_eq!(op["result"]["forensics"]["config"]["memory"], "2048", "{op}");
    assert!(op["result"]["reset"]["upid"].as_str().unwrap().contains(":qmreset:101:"), "{op}");
    assert!(op["recovered_after_s"].as_f64().is_some(), "{op}");
    let resets = pve_saw(&fake).iter().filter(|r| r.ends_with("/qemu/101/status/reset")).count();
    assert_eq!(resets, 1);
}

#[tokio::test]
async fn pve_api_stop_escalates_to_forced_when_the_guest_ignores_shutdown_and_is_graceful_when_it_obeys() {
    let mut ignores = guest(101, "running");
    ignores["acpi"] = json!(false);
    let mut obeys = guest(102, "running");
    obeys["shutdown_secs"] = json!(1);
    let mut scenario = one_vm(ignores, 0.01);
    scenario["guests"].as_array_mut().unwrap().push(obeys);
    scenario["grants"] = json!([[TOKEN_ID, "/vms", ["VM.PowerMgmt", "VM.Audit"]]]);
    let (fake, cert) = fakepve(scenario);
    let dir = tempfile::tempdir().unwrap();
    let limits = "stop_timeout_seconds = 2";
    let server = serve(
        dir.path(),
        &[
            pve_target(dir.path(), "deaf", &fake.url, &cert.fingerprint, 101, TOKEN_SECRET, limits),
            pve_target(dir.path(), "polite", &fake.url, &cert.fingerprint, 102, TOKEN_SECRET, limits),
        ],
    );
    let started = Instant::now();
    let forced = run(&server, "deaf", "stop").await;
    let took = started.elapsed();
    assert_eq!(forced["state"], "succeeded", "{forced}");
    assert_eq!(forced["result"]["stop"], "forced");
    assert_eq!(forced["result"]["shutdown"]["outcome"], "timed_out", "{forced}");
    let steps = texts(&forced);
    assert_eq!(
        steps[..3],
        [
            "forensics saved (in this operation's result)",
            "graceful shutdown sent",
            "still running after 2 s: forced stop sent"
        ]
    );
    assert!(steps[3].starts_with("stopped after ") && steps[3].ends_with(" (forced)"), "{steps:?}");
    let sent: Vec<String> =
        pve_saw(&fake).into_iter().filter(|r| r.starts_with("POST") && r.contains("/101/status/")).collect();
    assert_eq!(
        sent,
        ["POST /api2/json/nodes/pve1/qemu/101/status/shutdown", "POST /api2/json/nodes/pve1/qemu/101/status/stop"]
    );
    assert!(took < Duration::from_secs(10), "escalated within the stop timeout: {took:?}");

    let graceful = run(&server, "polite", "stop").await;
    assert_eq!(
        (graceful["state"].as_str(), graceful["result"]["stop"].as_str()),
        (Some("succeeded"), Some("graceful")),
        "{graceful}"
    );
    assert!(!pve_saw(&fake).iter().any(|r| r.ends_with("/102/status/stop")), "no forced stop after a graceful one");
    eprintln!("a stop the guest ignored was forced after {} ms", took.as_millis());
}

#[tokio::test]
async fn pve_api_start_is_verified_by_a_check_the_test_opens_late() {
    let (fake, cert) = fakepve(one_vm(guest(101, "stopped"), 0.01));
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let check = format!("check = \"tcp:127.0.0.1:{port}\"\nrecover_timeout_seconds = 30");
    let server =
        serve(dir.path(), &[pve_target(dir.path(), "devvm", &fake.url, &cert.fingerprint, 101, TOKEN_SECRET, &check)]);
    let id = start(&server, "devvm", "start").await;
    let mut stream = attach(&server, &id, None).await;
    until_step(&mut stream, &format!("waiting for tcp:127.0.0.1:{port}")).await;
    assert_eq!(pve_saw(&fake).iter().filter(|r| r.ends_with("/101/status/start")).count(), 1);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let rest = stream.until_kind("done").await;
    let done = rest.last().unwrap();
    assert_eq!(done["state"], "succeeded", "{rest:?}");
    let step = rest[rest.len() - 2]["text"].as_str().unwrap();
    assert!(step.starts_with("reachable again after ") && step.ends_with(" s"), "{step}");
    assert_eq!(operation(&server, &id).await["recovered_after_s"], done["recovered_after_s"]);
    drop(listener);
}

#[tokio::test]
async fn pve_api_a_locked_vm_fails_the_operation_with_pves_lock_message() {
    let mut vm = guest(101, "running");
    vm["lock"] = json!("backup");
    let (fake, cert) = fakepve(one_vm(vm, 0.0));
    let dir = tempfile::tempdir().unwrap();
    let server =
        serve(dir.path(), &[pve_target(dir.path(), "devvm", &fake.url, &cert.fingerprint, 101, TOKEN_SECRET, "")]);
    let op = run(&server, "devvm", "reset").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(op["error"], "the backend refused: VM is locked (backup)");
    assert!(op.get("recovered_after_s").is_none(), "{op}");
}

#[tokio::test]
async fn pve_api_a_task_error_fails_the_operation_with_the_tasks_exit_status() {
    let mut vm = guest(101, "stopped");
    vm["start_secs"] = json!(5);
    vm["start_error"] = json!("unable to find configuration file for VM 101 - no such machine");
    let (fake, cert) = fakepve(one_vm(vm, 0.01));
    let dir = tempfile::tempdir().unwrap();
    let server =
        serve(dir.path(), &[pve_target(dir.path(), "devvm", &fake.url, &cert.fingerprint, 101, TOKEN_SECRET, "")]);
    let op = run(&server, "devvm", "start").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(op["error"], "the backend refused: unable to find configuration file for VM 101 - no such machine");
}

#[tokio::test]
async fn pve_api_a_wrong_token_fails_with_pves_message_and_nothing_is_retried() {
    let (fake, cert) = fakepve(one_vm(guest(101, "running"), 0.0));
    let dir = tempfile::tempdir().unwrap();
    let server =
        serve(dir.path(), &[pve_target(dir.path(), "devvm", &fake.url, &cert.fingerprint, 101, "not-the-secret", "")]);
    let op = run(&server, "devvm", "reset").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(op["error"], "the backend refused our credentials: authentication failure");
    assert_eq!(pve_saw(&fake), ["GET /api2/json/nodes/pve1/qemu/101/status/current"], "one refused read, nothing more");

    // The default target's synchronous route: a 502 in PVE's words.
    let response = server.post("/api/pve/stop").send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"], "the backend refused our credentials: authentication failure", "{body}");
    assert_eq!(pve_saw(&fake).len(), 2, "{:?}", pve_saw(&fake));
}

#[tokio::test]
async fn pve_api_a_certificate_that_is_not_the_pinned_one_is_refused() {
    let (fake, cert) = fakepve(one_vm(guest(101, "running"), 0.0));
    let dir = tempfile::tempdir().unwrap();
    let impostor = crate::backend_fakes::self_signed(dir.path(), "impostor");
    let server =
        serve(dir.path(), &[pve_target(dir.path(), "devvm", &fake.url, &impostor.fingerprint, 101, TOKEN_SECRET, "")]);
    let op = run(&server, "devvm", "stop").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(
        op["error"].as_str().unwrap(),
        format!("TLS: the server's certificate is {}, not the pinned {}", cert.fingerprint, impostor.fingerprint)
    );
    assert_eq!(pve_saw(&fake), Vec::<String>::new(), "no request went through");
}

#[tokio::test]
async fn pve_api_an_unreachable_endpoint_fails_the_operation_unreachable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fingerprint = crate::backend_fakes::self_signed(dir.path(), "x").fingerprint;
    let url = format!("https://{}", closed_port());
    let server = serve(dir.path(), &[pve_target(dir.path(), "devvm", &url, &fingerprint, 101, TOKEN_SECRET, "")]);
    let started = Instant::now();
    for verb in ["status", "reset", "stop"] {
        let op = run(&server, "devvm", verb).await;
        assert_eq!(op["state"], "failed", "{verb}: {op}");
        let error = op["error"].as_str().unwrap();
        assert!(error.starts_with("unreachable: ") && error.contains("onnection refused"), "{verb}: {error}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "no polling: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_check_that_never_passes_fails_an_api_backends_reset_within_the_limit() {
    let (fake, cert) = fakepve(one_vm(guest(101, "running"), 0.0));
    let port = free_port(); // nothing will listen there
    let dir = tempfile::tempdir().unwrap();
    let check = format!("check = \"tcp:127.0.0.1:{port}\"\nrecover_timeout_seconds = 2");
    let server =
        serve(dir.path(), &[pve_target(dir.path(), "devvm", &fake.url, &cert.fingerprint, 101, TOKEN_SECRET, &check)]);
    let op = run(&server, "devvm", "reset").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(op["error"], "not reachable within the limit (2 s)");
    assert_eq!(
        texts(&op)[texts(&op).len() - 3..],
        ["running", &format!("waiting for tcp:127.0.0.1:{port} (at most 2 s)"), "not reachable within the limit (2 s)"]
    );
}

#[test]
fn a_ca_file_the_client_cannot_use_stops_the_server_naming_the_target_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n").unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    let file = dir.path().join("targets.toml");
    std::fs::write(
        &file,
        format!(
            "[[target]]\nname = \"devvm\"\nbackend = \"pve-api\"\nurl = \"https://192.0.2.10:8006\"\nnode = \"pve1\"\n\
             vmid = 101\ntoken_id = \"{TOKEN_ID}\"\ntoken_secret_file = \"{}\"\nca_file = \"{}\"\n",
            dir.path().join("secret").display(),
            ca.display()
        ),
    )
    .unwrap();
    let said = refused_at_start(&["serve"], &[("BREAKGLASS_TARGETS_FILE", file.to_str().unwrap())]);
    assert!(said.contains("target \"devvm\": key \"ca_file\":"), "{said}");
    assert!(!said.contains("s3cret"), "{said}");
}

#[tokio::test]
async fn redfish_lists_shutdown_and_nmi_as_the_bmc_offers_them_and_reports_status() {
    let (fake, cert) = sushy(one_system("On"), BMC_USER, BMC_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[redfish_target(dir.path(), "hypervisor", &fake, &cert, BMC_PASSWORD, "")]);
    // The BMC is asked at start-up, in the background.
    asked(&server, "hypervisor").await;
    let status = run(&server, "hypervisor", "status").await;
    assert_eq!((status["state"].as_str(), status["result"]["power"].as_str()), (Some("succeeded"), Some("running")));
    assert_eq!(status["result"]["backend"]["PowerState"], "On", "{status}");

    // sushy declares Nmi but cannot do it: its refusal, in its words.
    let nmi = run(&server, "hypervisor", "nmi").await;
    assert_eq!(nmi["state"], "failed", "{nmi}");
    assert_eq!(nmi["error"], "the backend refused: Power state Nmi is not supported");
}

#[tokio::test]
async fn redfish_cycle_is_composed_off_wait_on_and_watched_until_reachable_again() {
    let (fake, cert) = sushy(one_system("On"), BMC_USER, BMC_PASSWORD);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let limits = format!("check = \"tcp:127.0.0.1:{port}\"\nstop_timeout_seconds = 20\nrecover_timeout_seconds = 40");
    let server = serve(dir.path(), &[redfish_target(dir.path(), "hypervisor", &fake, &cert, BMC_PASSWORD, &limits)]);
    asked(&server, "hypervisor").await;
    let started = Instant::now();
    let id = start(&server, "hypervisor", "cycle").await;
    let events = attach(&server, &id, None).await.until_kind("done").await;
    let done = events.last().unwrap();
    assert_eq!(done["state"], "succeeded", "{events:?}");
    let steps: Vec<&str> = events.iter().filter(|e| e["kind"] == "step").map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(steps[..2], ["forensics saved (in this operation's result)", "stop sent"], "{steps:?}");
    assert!(steps[2].starts_with("stopped after "), "{steps:?}");
    assert_eq!(steps[3..6], ["start sent", "running", &format!("waiting for tcp:127.0.0.1:{port} (at most 40 s)")]);
    assert!(steps[6].starts_with("reachable again after "), "{steps:?}");
    assert!(done["recovered_after_s"].as_f64().unwrap() > 0.0, "{done}");
    let op = operation(&server, &id).await;
    assert_eq!(
        (op["result"]["force_off"]["reset_type"].as_str(), op["result"]["start"]["reset_type"].as_str()),
        (Some("ForceOff"), Some("On"))
    );
    eprintln!("a composed Redfish cycle took {} ms", started.elapsed().as_millis());
    drop(listener);
}

#[tokio::test]
async fn redfish_stop_is_graceful_when_the_system_powers_off_in_time() {
    let (fake, cert) = sushy(one_system("On"), BMC_USER, BMC_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let server = serve(
        dir.path(),
        &[redfish_target(dir.path(), "hypervisor", &fake, &cert, BMC_PASSWORD, "stop_timeout_seconds = 20")],
    );
    asked(&server, "hypervisor").await;
    let op = run(&server, "hypervisor", "stop").await;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(
        (op["result"]["stop"].as_str(), op["result"]["shutdown"]["reset_type"].as_str()),
        (Some("graceful"), Some("GracefulShutdown"))
    );
    let steps = texts(&op);
    assert_eq!(steps[..2], ["forensics saved (in this operation's result)", "graceful shutdown sent"]);
    assert!(steps[2].starts_with("stopped after ") && steps[2].ends_with(" (graceful)"), "{steps:?}");
    let again = run(&server, "hypervisor", "status").await;
    assert_eq!(again["result"]["power"], "stopped");
}

#[tokio::test]
async fn redfish_a_wrong_password_fails_with_the_bmcs_message() {
    let (fake, cert) = sushy(one_system("On"), BMC_USER, BMC_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[redfish_target(dir.path(), "hypervisor", &fake, &cert, "wrong", "")]);
    for verb in ["status", "cycle"] {
        let op = run(&server, "hypervisor", verb).await;
        assert_eq!(op["state"], "failed", "{verb}: {op}");
        assert_eq!(op["error"], "the backend refused our credentials: Incorrect username or password", "{verb}");
    }
    assert!(
        !fake.output.lock().unwrap().iter().any(|l| l.contains("ComputerSystem.Reset")),
        "no reset reached the BMC"
    );
    // Until the BMC has said which reset types it offers: the six verbs.
    assert_eq!(listed_verbs(&server, "hypervisor").await, ["cycle", "forensics", "reset", "start", "status", "stop"]);
}

#[tokio::test]
async fn redfish_an_unreachable_bmc_lets_the_server_start_and_fails_its_verbs_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let fingerprint = crate::backend_fakes::self_signed(dir.path(), "bmc").fingerprint;
    std::fs::write(dir.path().join("bmc.password"), "pw\n").unwrap();
    let target = format!(
        "[[target]]\nname = \"bmc\"\nbackend = \"redfish\"\nurl = \"https://{}\"\nuser = \"u\"\npassword_file = \"{}\"\n\
         tls_fingerprint = \"{fingerprint}\"\n",
        closed_port(),
        dir.path().join("bmc.password").display()
    );
    let server = serve(dir.path(), &[target]);
    assert_eq!(listed_verbs(&server, "bmc").await, ["cycle", "forensics", "reset", "start", "status", "stop"]);
    let (status, body) = post_verb(&server, "bmc", "nmi", None).await;
    assert_eq!(status, 202, "a verb the BMC may offer is tried: {body}");
    let nmi = finished(&server, body["operation_id"].as_str().unwrap()).await;
    assert!(nmi["error"].as_str().unwrap().starts_with("unreachable: "), "{nmi}");
    let op = run(&server, "bmc", "status").await;
    assert!(op["error"].as_str().unwrap().starts_with("unreachable: "), "{op}");
}

/// A `redfish` target on the test's own plain-HTTP BMC.
fn small_bmc_target(dir: &Path, bmc: &Bmc, extra: &str) -> String {
    let file = dir.join("bmc.password");
    std::fs::write(&file, format!("{BMC_PASSWORD}\n")).unwrap();
    format!(
        "[[target]]\nname = \"bmc\"\nbackend = \"redfish\"\nurl = \"{}\"\nuser = \"{BMC_USER}\"\n\
         password_file = \"{}\"\n{extra}\n",
        bmc.url,
        file.display()
    )
}

#[tokio::test]
async fn a_bmc_that_answers_503_or_garbage_while_it_reboots_is_polled_until_it_says_on() {
    let glitches = vec![Glitch::Unavailable, Glitch::Unavailable, Glitch::Garbage, Glitch::Unavailable];
    let bmc = Bmc::serve(Behaviour { after_reset: glitches, ..Behaviour::default() });
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[small_bmc_target(dir.path(), &bmc, "recover_timeout_seconds = 30")]);
    let op = run(&server, "bmc", "reset").await;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(texts(&op), ["forensics saved (in this operation's result)", "reset sent", "running"]);
    assert_eq!((bmc.resets(), bmc.glitched()), (vec!["ForceRestart".to_owned()], 4), "every glitch was read");
    assert!(op["recovered_after_s"].as_f64().is_some(), "{op}");
}

#[tokio::test]
async fn a_bmc_that_never_recovers_fails_at_the_limit_naming_its_last_error() {
    let bmc = Bmc::serve(Behaviour {
        after_reset: vec![Glitch::Garbage, Glitch::Unavailable],
        glitch_for_ever: true,
        ..Behaviour::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[small_bmc_target(dir.path(), &bmc, "recover_timeout_seconds = 2")]);
    let started = Instant::now();
    let op = run(&server, "bmc", "reset").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(
        op["error"],
        "not running within the limit (2 s); the last power read failed: the backend refused: The service is \
         temporarily unavailable"
    );
    assert!(started.elapsed() >= Duration::from_secs(2), "waited until the limit: {:?}", started.elapsed());
    assert!(bmc.glitched() >= 3, "polled again after each error: {}", bmc.glitched());
}

#[tokio::test]
async fn a_bmc_that_refuses_the_login_while_it_reboots_fails_the_wait_at_once() {
    let bmc = Bmc::serve(Behaviour { after_reset: vec![Glitch::Unauthorized], ..Behaviour::default() });
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[small_bmc_target(dir.path(), &bmc, "recover_timeout_seconds = 30")]);
    let started = Instant::now();
    let op = run(&server, "bmc", "reset").await;
    assert_eq!(op["state"], "failed", "{op}");
    assert_eq!(op["error"], "the backend refused our credentials: Invalid credentials");
    assert_eq!(bmc.glitched(), 1, "not asked again");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test]
async fn recovered_after_counts_from_the_reset_not_from_before_slow_forensics() {
    let slow = Duration::from_millis(1500);
    let bmc = Bmc::serve(Behaviour { log_delay: slow, ..Behaviour::default() });
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[small_bmc_target(dir.path(), &bmc, "recover_timeout_seconds = 30")]);
    let started = Instant::now();
    let op = run(&server, "bmc", "reset").await;
    let took = started.elapsed();
    assert_eq!(op["state"], "succeeded", "{op}");
    assert!(took >= slow, "the forensics were slow: {took:?}");
    let after = op["recovered_after_s"].as_f64().unwrap();
    assert!(after < slow.as_secs_f64(), "recovered_after_s {after} includes the forensics ({took:?} in all)");
    eprintln!("an operation of {} ms with 1500 ms of forensics recovered after {after} s", took.as_millis());
}

#[tokio::test]
async fn recover_timeout_counts_from_the_reset_not_from_before_slow_forensics() {
    // 1.5 s of forensics against a 1 s limit; one 503 after the reset, then
    // "On" at the next poll, half a second later: within the limit.
    let bmc = Bmc::serve(Behaviour {
        after_reset: vec![Glitch::Unavailable],
        log_delay: Duration::from_millis(1500),
        ..Behaviour::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[small_bmc_target(dir.path(), &bmc, "recover_timeout_seconds = 1")]);
    let op = run(&server, "bmc", "reset").await;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(bmc.glitched(), 1);
    assert_eq!(texts(&op)[2], "running", "{op}");
}
