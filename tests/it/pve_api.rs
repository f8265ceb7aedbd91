//! The Proxmox VE API client against the real fakepve (docs/BACKENDS.md):
//! power states, each action followed to its task's end, PVE's refusals in
//! PVE's words, and TLS pinned by fingerprint or a CA file.

use std::time::Duration;

use breakglass::power::backend_types::{BackendError, PowerState};
use breakglass::power::pve_api::{PveApi, PveApiConfig, Shutdown};
use breakglass::power::{Fingerprint, Trust};
use serde_json::json;

use crate::backend_fakes::{Fake, TOKEN_ID, TOKEN_SECRET, ca_signed, closed_port, fakepve, one_vm, self_signed};

fn client(fake: &Fake, fingerprint: &str, vmid: u32, secret: &str) -> PveApi {
    let trust = Trust::Fingerprint(fingerprint.parse::<Fingerprint>().unwrap());
    let mut config = PveApiConfig::new(&fake.url, "pve1", vmid, TOKEN_ID, secret, Some(trust));
    config.poll_interval = Duration::from_millis(50);
    PveApi::new(config).unwrap()
}

fn guest(status: &str) -> serde_json::Value {
    json!({"vmid": 101, "name": "devvm", "status": status, "config": {"scsi0": "local-lvm:vm-101-disk-0"}})
}

#[tokio::test]
async fn status_reads_running_paused_and_stopped_from_status_and_qmpstatus() {
    let mut scenario = one_vm(guest("running"), 0.0);
    scenario["guests"] = json!([
        guest("running"),
        {"vmid": 102, "name": "paused", "status": "running", "qmpstatus": "paused"},
        {"vmid": 103, "name": "off", "status": "stopped"},
    ]);
    scenario["grants"] = json!([[TOKEN_ID, "/vms", ["VM.Audit"]]]);
    let (fake, cert) = fakepve(scenario);
    let mut seen = Vec::new();
    for vmid in [101, 102, 103] {
        let status = client(&fake, &cert.fingerprint, vmid, TOKEN_SECRET).status().await.unwrap();
        seen.push((status.power, status.raw["qmpstatus"].as_str().unwrap().to_owned()));
    }
    assert_eq!(
        seen,
        [
            (PowerState::Running, "running".to_owned()),
            (PowerState::Paused, "paused".to_owned()),
            (PowerState::Stopped, "stopped".to_owned())
        ]
    );
}

#[tokio::test]
async fn stop_and_start_return_only_when_their_task_has_ended() {
    // 25 PVE seconds at 0.02: each task runs half a real second.
    let mut vm = guest("running");
    vm["stop_secs"] = json!(25);
    vm["start_secs"] = json!(25);
    let (fake, cert) = fakepve(one_vm(vm, 0.02));
    let pve = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET);

    let stopped = pve.stop().await.unwrap();
    assert!(stopped.upid.starts_with("UPID:pve1:") && stopped.upid.contains(":qmstop:101:"), "{}", stopped.upid);
    assert!(stopped.took_ms >= 400, "the stop task was followed for {} ms only", stopped.took_ms);
    assert_eq!(pve.status().await.unwrap().power, PowerState::Stopped);

    let started = pve.start().await.unwrap();
    assert!(started.upid.contains(":qmstart:101:"), "{}", started.upid);
    assert!(started.took_ms >= 400, "the start task was followed for {} ms only", started.took_ms);
    assert_eq!(pve.status().await.unwrap().power, PowerState::Running);
}

#[tokio::test]
async fn reset_follows_its_task_and_leaves_the_vm_running() {
    let (fake, cert) = fakepve(one_vm(guest("running"), 0.01));
    let pve = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET);
    let task = pve.reset().await.unwrap();
    assert!(task.upid.contains(":qmreset:101:breakglass@pve!power:"), "{}", task.upid);
    assert_eq!(pve.status().await.unwrap().power, PowerState::Running);
}

#[tokio::test]
async fn a_shutdown_within_its_timeout_stops_the_vm() {
    let mut vm = guest("running");
    vm["shutdown_secs"] = json!(20);
    let (fake, cert) = fakepve(one_vm(vm, 0.02));
    let pve = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET);
    let outcome = pve.shutdown(Duration::from_secs(60)).await.unwrap();
    assert!(matches!(&outcome, Shutdown::Stopped(task) if task.took_ms >= 300), "{outcome:?}");
    assert_eq!(pve.status().await.unwrap().power, PowerState::Stopped);
}

#[tokio::test]
async fn a_shutdown_the_guest_outlasts_times_out_and_leaves_it_running() {
    // The guest needs 600 PVE seconds; PVE gives up after 30 (0.6 s here).
    let mut vm = guest("running");
    vm["shutdown_secs"] = json!(600);
    let (fake, cert) = fakepve(one_vm(vm, 0.02));
    let pve = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET);
    let outcome = pve.shutdown(Duration::from_secs(30)).await.unwrap();
    match outcome {
        Shutdown::TimedOut { upid, message } => {
            assert!(upid.contains(":qmshutdown:101:"), "{upid}");
            assert_eq!(message, "VM quit/powerdown failed - got timeout");
        }
        other => panic!("expected a timed-out shutdown, got {other:?}"),
    }
    assert_eq!(pve.status().await.unwrap().power, PowerState::Running);
}

#[tokio::test]
async fn a_locked_vm_refuses_stop_with_pves_message() {
    let mut vm = guest("running");
    vm["lock"] = json!("backup");
    let (fake, cert) = fakepve(one_vm(vm, 0.0));
    let pve = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET);
    assert_eq!(pve.stop().await.unwrap_err(), BackendError::Refused("VM is locked (backup)".into()));
    assert_eq!(pve.status().await.unwrap().power, PowerState::Running);
}

#[tokio::test]
async fn a_task_that_fails_fails_the_action_with_its_exit_status() {
    let mut vm = guest("stopped");
    vm["start_secs"] = json!(10);
    vm["start_error"] = json!("unable to find configuration file for VM 101 - no such machine");
    let (fake, cert) = fakepve(one_vm(vm, 0.02));
    let pve = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET);
    assert_eq!(
        pve.start().await.unwrap_err(),
        BackendError::Refused("unable to find configuration file for VM 101 - no such machine".into())
    );
}

#[tokio::test]
async fn a_wrong_token_secret_is_an_auth_error_in_pves_words() {
    let (fake, cert) = fakepve(one_vm(guest("running"), 0.0));
    let pve = client(&fake, &cert.fingerprint, 101, "not-the-secret");
    assert_eq!(pve.status().await.unwrap_err(), BackendError::Auth("authentication failure".into()));
    assert_eq!(pve.reset().await.unwrap_err(), BackendError::Auth("authentication failure".into()));
}

#[tokio::test]
async fn a_token_without_vm_power_mgmt_is_refused_power_with_pves_permission_message() {
    let mut scenario = one_vm(guest("running"), 0.0);
    scenario["grants"] = json!([[TOKEN_ID, "/vms/101", ["VM.Audit"]]]);
    let (fake, cert) = fakepve(scenario);
    let pve = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET);
    assert_eq!(pve.status().await.unwrap().power, PowerState::Running);
    assert_eq!(
        pve.reset().await.unwrap_err(),
        BackendError::Auth("Permission check failed (/vms/101, VM.PowerMgmt)".into())
    );
}

#[tokio::test]
async fn forensics_keep_status_config_and_pending_and_note_whether_the_agent_answers() {
    let mut scenario = one_vm(guest("running"), 0.0);
    scenario["guests"] = json!([
        {"vmid": 101, "name": "devvm", "status": "running", "config": {"memory": 2048, "agent": "1"}, "agent": {}},
        {"vmid": 102, "name": "silent", "status": "running", "config": {"memory": 1024}},
    ]);
    scenario["grants"] = json!([[TOKEN_ID, "/vms", ["VM.Audit", "VM.PowerMgmt", "VM.GuestAgent.Audit"]]]);
    let (fake, cert) = fakepve(scenario);

    let answering = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET).forensics().await.unwrap();
    assert_eq!(answering["status"]["status"], "running");
    assert_eq!(answering["config"]["memory"], "2048");
    assert!(answering["pending"].as_array().unwrap().iter().any(|p| p["key"] == "memory"), "{answering}");
    assert_eq!(answering["agent"], json!({"answered": true}));

    let silent = client(&fake, &cert.fingerprint, 102, TOKEN_SECRET).forensics().await.unwrap();
    assert_eq!(silent["agent"]["answered"], false);
    assert!(silent["agent"]["message"].as_str().unwrap().contains("QEMU guest agent is not running"), "{silent}");
}

#[tokio::test]
async fn a_certificate_that_is_not_the_pinned_one_is_refused() {
    let (fake, cert) = fakepve(one_vm(guest("running"), 0.0));
    let other = self_signed(fake.dir.path(), "impostor");
    let err = client(&fake, &other.fingerprint, 101, TOKEN_SECRET).status().await.unwrap_err();
    assert_eq!(
        err,
        BackendError::Tls(format!(
            "the server's certificate is {}, not the pinned {}",
            cert.fingerprint, other.fingerprint
        ))
    );
}

#[tokio::test]
async fn a_ca_file_trusts_the_certificates_it_signed_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let signed = ca_signed(dir.path());
    let mut scenario = one_vm(guest("running"), 0.0);
    scenario["cert"] = json!(signed.cert);
    scenario["key"] = json!(signed.key);
    let (fake, _) = fakepve(scenario);
    let with_ca = |ca: std::path::PathBuf| {
        let config = PveApiConfig::new(&fake.url, "pve1", 101, TOKEN_ID, TOKEN_SECRET, Some(Trust::CaFile(ca)));
        PveApi::new(config).unwrap()
    };
    assert_eq!(with_ca(signed.ca.clone().unwrap()).status().await.unwrap().power, PowerState::Running);

    let stranger = self_signed(dir.path(), "stranger-ca");
    let err = with_ca(stranger.cert).status().await.unwrap_err();
    assert!(matches!(&err, BackendError::Tls(m) if m.contains("UnknownIssuer")), "{err:?}");
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_unreachable() {
    let url = format!("https://{}", closed_port());
    let trust = Trust::Fingerprint(self_signed(tempfile::tempdir().unwrap().path(), "x").fingerprint.parse().unwrap());
    let pve = PveApi::new(PveApiConfig::new(&url, "pve1", 101, TOKEN_ID, TOKEN_SECRET, Some(trust))).unwrap();
    let err = pve.status().await.unwrap_err();
    assert!(matches!(&err, BackendError::Unreachable(m) if m.contains("onnection refused")), "{err:?}");
}

/// The task-status reads fakepve received.
fn task_reads(fake: &Fake) -> usize {
    let output = fake.output.lock().unwrap();
    output
        .iter()
        .filter(|l| l.starts_with("fakepve saw GET ") && l.contains("/tasks/") && l.ends_with("/status"))
        .count()
}

/// A scenario whose task-status reads fail `times` times (for ever with
/// `None`) with `status` and `message`.
fn failing_task_reads(status: u16, message: &str, times: Option<u32>) -> serde_json::Value {
    let mut scenario = one_vm(guest("running"), 0.0);
    scenario["failures"] = json!([{"method": "GET", "suffix": "/status", "status": status, "message": message,
        "times": times}]);
    scenario
}

#[tokio::test]
async fn a_task_status_read_that_fails_is_asked_again_until_the_task_is_seen_to_end() {
    let (fake, cert) = fakepve(failing_task_reads(503, "proxy restarting", Some(3)));
    let task = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET).reset().await.unwrap();
    assert!(task.upid.contains(":qmreset:101:"), "{}", task.upid);
    assert_eq!(task_reads(&fake), 4, "three failed reads, then the one that saw the task's end");
}

#[tokio::test]
async fn a_task_status_that_cannot_be_read_within_the_limit_fails_naming_the_last_error() {
    let (fake, cert) = fakepve(failing_task_reads(503, "proxy restarting", None));
    let trust = Trust::Fingerprint(cert.fingerprint.parse::<Fingerprint>().unwrap());
    let mut config = PveApiConfig::new(&fake.url, "pve1", 101, TOKEN_ID, TOKEN_SECRET, Some(trust));
    config.poll_interval = Duration::from_millis(50);
    config.task_timeout = Duration::from_secs(1);
    let err = PveApi::new(config).unwrap().reset().await.unwrap_err();
    let BackendError::Refused(message) = &err else { panic!("{err:?}") };
    assert!(message.starts_with("task UPID:pve1:") && message.contains(":qmreset:101:"), "{message}");
    assert!(
        message.ends_with(
            " was not seen to end within 1s; the last status read failed: the backend refused: proxy restarting"
        ),
        "{message}"
    );
    assert!(task_reads(&fake) >= 3, "asked again: {}", task_reads(&fake));
}

#[tokio::test]
async fn a_refused_login_while_a_task_is_followed_ends_the_follow_at_once() {
    let (fake, cert) = fakepve(failing_task_reads(401, "authentication failure", None));
    let err = client(&fake, &cert.fingerprint, 101, TOKEN_SECRET).reset().await.unwrap_err();
    assert_eq!(err, BackendError::Auth("authentication failure".into()));
    assert_eq!(task_reads(&fake), 1, "not asked again");
}
