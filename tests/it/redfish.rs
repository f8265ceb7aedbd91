//! The Redfish client against the real sushy-emulator's fake driver
//! (docs/BACKENDS.md), whose power changes land 1 to 11 seconds after the
//! reset is answered: the tests poll for them, bounded.

use std::time::Duration;

use breakglass::power::backend_types::{BackendError, PowerState};
use breakglass::power::redfish::{Redfish, RedfishConfig, ResetType};
use breakglass::power::{Fingerprint, Trust};
use serde_json::json;

use crate::backend_fakes::{Fake, closed_port, one_system, self_signed, sushy};
use crate::harness::{DEADLINE, wait_until};

const USER: &str = "breakglass";
const PASSWORD: &str = "correct horse battery staple";

fn client(fake: &Fake, fingerprint: &str, password: &str) -> Redfish {
    let trust = Trust::Fingerprint(fingerprint.parse::<Fingerprint>().unwrap());
    Redfish::new(RedfishConfig::new(&fake.url, USER, password, Some(trust))).unwrap()
}

#[tokio::test]
async fn the_only_system_is_found_with_its_power_and_offered_reset_types() {
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let bmc = client(&fake, &cert.fingerprint, PASSWORD);
    let status = bmc.status().await.unwrap();
    assert_eq!((status.power, status.detail.as_str()), (PowerState::Running, "On"));
    assert_eq!(bmc.system().await.unwrap(), "/redfish/v1/Systems/4c4c4544-0042-3010-8052-b4c04f4d3132");
    // sushy declares no PowerCycle: a cycle has to be composed.
    assert_eq!(
        bmc.reset_types().await.unwrap(),
        [
            ResetType::On,
            ResetType::ForceOn,
            ResetType::ForceOff,
            ResetType::GracefulShutdown,
            ResetType::GracefulRestart,
            ResetType::ForceRestart,
            ResetType::Nmi
        ]
    );
}

#[tokio::test]
async fn force_off_then_on_land_after_the_bmcs_lag() {
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let bmc = client(&fake, &cert.fingerprint, PASSWORD);
    let poll = Duration::from_millis(200);

    bmc.reset(ResetType::ForceOff).await.unwrap();
    let off = bmc.wait_for(PowerState::Stopped, DEADLINE, poll).await.unwrap();
    assert!(off.is_some(), "still {:?} after {DEADLINE:?}", bmc.status().await.unwrap().detail);

    bmc.reset(ResetType::On).await.unwrap();
    let on = bmc.wait_for(PowerState::Running, DEADLINE, poll).await.unwrap();
    assert!(on.is_some(), "still {:?} after {DEADLINE:?}", bmc.status().await.unwrap().detail);
}

#[tokio::test]
async fn a_power_change_that_has_not_landed_yet_is_not_reported_as_done() {
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let bmc = client(&fake, &cert.fingerprint, PASSWORD);
    bmc.reset(ResetType::GracefulShutdown).await.unwrap();
    // The emulator applies the change one second later at the earliest.
    let waited = bmc.wait_for(PowerState::Stopped, Duration::from_millis(300), Duration::from_millis(100)).await;
    assert_eq!(waited.unwrap(), None);
}

#[tokio::test]
async fn a_reset_type_the_bmc_does_not_offer_is_refused_without_being_sent() {
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let bmc = client(&fake, &cert.fingerprint, PASSWORD);
    let err = bmc.reset(ResetType::PowerCycle).await.unwrap_err();
    assert_eq!(
        err,
        BackendError::Refused(
            "the BMC does not offer the reset type PowerCycle (it offers On, ForceOn, ForceOff, GracefulShutdown, \
             GracefulRestart, ForceRestart, Nmi)"
                .into()
        )
    );
    // The emulator logs each request in order: once a later read is
    // logged, a reset sent before it would have been too.
    bmc.status().await.unwrap();
    let reads = |output: &[String]| output.iter().filter(|l| l.contains("\"GET /redfish/v1/Systems/4c4c")).count();
    wait_until("the emulator to log the later read", || reads(&fake.output.lock().unwrap()) >= 2);
    let output = fake.output.lock().unwrap();
    assert!(!output.iter().any(|l| l.contains("ComputerSystem.Reset")), "the reset reached the BMC: {output:?}");
}

#[tokio::test]
async fn a_reset_the_bmc_fails_carries_the_bmcs_message() {
    // sushy's fake driver declares Nmi but cannot do it.
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let bmc = client(&fake, &cert.fingerprint, PASSWORD);
    assert_eq!(
        bmc.reset(ResetType::Nmi).await.unwrap_err(),
        BackendError::Refused("Power state Nmi is not supported".into())
    );
    let sent =
        |output: &[String]| output.iter().any(|l| l.contains("POST /redfish/v1/Systems/4c4c") && l.contains("Reset"));
    wait_until("the emulator to log the reset it refused", || sent(&fake.output.lock().unwrap()));
}

#[tokio::test]
async fn a_wrong_password_is_an_auth_error_in_the_bmcs_words() {
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let bmc = client(&fake, &cert.fingerprint, "wrong");
    assert_eq!(bmc.status().await.unwrap_err(), BackendError::Auth("Incorrect username or password".into()));
}

#[tokio::test]
async fn a_certificate_that_is_not_the_pinned_one_is_refused() {
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let other = self_signed(fake.dir.path(), "impostor");
    let err = client(&fake, &other.fingerprint, PASSWORD).status().await.unwrap_err();
    assert_eq!(
        err,
        BackendError::Tls(format!(
            "the server's certificate is {}, not the pinned {}",
            cert.fingerprint, other.fingerprint
        ))
    );
}

#[tokio::test]
async fn several_systems_need_one_named_and_then_it_is_used() {
    let systems = json!([
        {"uuid": "11111111-0000-0000-0000-000000000001", "name": "node-a", "power_state": "On", "nics": []},
        {"uuid": "11111111-0000-0000-0000-000000000002", "name": "node-b", "power_state": "Off", "nics": []},
    ]);
    let (fake, cert) = sushy(systems, USER, PASSWORD);
    let err = client(&fake, &cert.fingerprint, PASSWORD).status().await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Protocol(m) if m.contains("has 2 systems") && m.contains("set `system`")),
        "{err:?}"
    );

    let mut config =
        RedfishConfig::new(&fake.url, USER, PASSWORD, Some(Trust::Fingerprint(cert.fingerprint.parse().unwrap())));
    config.system = Some("/redfish/v1/Systems/11111111-0000-0000-0000-000000000002".into());
    let status = Redfish::new(config).unwrap().status().await.unwrap();
    assert_eq!((status.power, status.raw["Name"].as_str()), (PowerState::Stopped, Some("node-b")));
}

#[tokio::test]
async fn forensics_keep_the_system_resource_and_say_when_there_is_no_log_service() {
    let (fake, cert) = sushy(one_system("On"), USER, PASSWORD);
    let forensics = client(&fake, &cert.fingerprint, PASSWORD).forensics().await.unwrap();
    assert_eq!(forensics["system"]["PowerState"], "On");
    assert_eq!(forensics["system"]["Name"], "hypervisor");
    assert_eq!(forensics["logs"], json!([]));
    assert_eq!(forensics["logs_note"], "the BMC offers no log service for this system");
}

#[tokio::test]
async fn a_bmc_nobody_answers_for_is_unreachable() {
    let url = format!("https://{}", closed_port());
    let trust = Trust::Fingerprint(self_signed(tempfile::tempdir().unwrap().path(), "x").fingerprint.parse().unwrap());
    let bmc = Redfish::new(RedfishConfig::new(&url, USER, PASSWORD, Some(trust))).unwrap();
    let err = bmc.status().await.unwrap_err();
    assert!(matches!(&err, BackendError::Unreachable(m) if m.contains("onnection refused")), "{err:?}");
}
