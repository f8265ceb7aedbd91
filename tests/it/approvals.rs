//! Approvals (README "Approvals"): the fake agent puts its tool calls to the
//! server's `PreToolUse` http hook as the real CLI does (`hook` directive
//! of tests/fake-bin/claude); what the policy does not allow waits for the
//! operator's decision over the API, the timeout, or the end of the turn.

use serde_json::{Value, json};

use crate::harness::{Server, kinds};

async fn session_json(server: &Server, session: &str) -> Value {
    server.get(&format!("/api/session/{session}")).send().await.unwrap().json().await.unwrap()
}

async fn audit(server: &Server) -> Vec<Value> {
    let page: Value = server.get("/api/audit").send().await.unwrap().json().await.unwrap();
    page["records"].as_array().unwrap().iter().filter(|r| r["action"] == "approval").cloned().collect()
}

fn tool_result(events: &[Value]) -> &Value {
    events.iter().find(|e| e["kind"] == "tool_result").expect("a tool_result")
}

#[tokio::test]
async fn a_power_verb_waits_for_the_operator_and_runs_once_allowed() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve reset\nresult").await;
    let before = stream.until_kind("approval").await;
    assert_eq!(kinds(&before), ["user", "tool", "approval"]);
    let approval = before.last().unwrap();
    let tool_use_id = approval["tool_use_id"].as_str().unwrap().to_owned();
    assert_eq!(tool_use_id, before[1]["tool_use_id"], "the card is the call the transcript shows");
    assert_eq!(approval["tool"], "Bash");
    assert_eq!(approval["input"]["command"], "ssh pve reset");
    assert_eq!(approval["effect"], "hard reset of the VM: unsaved guest state is lost");
    assert_eq!(approval["reason"], "a power verb that changes the VM");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let deadline = approval["deadline_ms"].as_i64().unwrap();
    assert!((now_ms + 590_000..=now_ms + 600_000).contains(&deadline), "auto-deny in 600 s: {deadline} vs {now_ms}");
    assert_eq!(session_json(&server, &session).await["pending_approvals"], 1);
    assert!(server.agent_runs()[0]["env_breakglass"].as_array().unwrap().contains(&json!("BREAKGLASS_HOOK_TOKEN")));

    let (status, body) = server.decide(&session, &tool_use_id, json!({"decision": "allow"})).await;
    assert_eq!((status, body), (200, json!({"decision": "allow"})));
    let after = stream.until_turn_end().await;
    assert_eq!(kinds(&after), ["approval_decision", "tool_result", "result", "turn_end"]);
    assert_eq!(after[0]["decision"], "allow");
    assert_eq!(after[0]["by"], "bearer");
    assert_eq!(after[0]["tool_use_id"], tool_use_id.as_str());
    assert_eq!(tool_result(&after)["content"], "ran: ssh pve reset");
    assert_eq!(tool_result(&after)["is_error"], false);
    assert_eq!(session_json(&server, &session).await["pending_approvals"], 0);

    let (status, _) = server.decide(&session, &tool_use_id, json!({"decision": "deny"})).await;
    assert_eq!(status, 409, "decided once");
    let records = audit(&server).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(
        (&records[0]["identity"], &records[0]["outcome"], &records[0]["via"]),
        (&json!("bearer"), &json!("allow"), &json!("bearer"))
    );
    assert!(records[0]["target"].as_str().unwrap().contains("ssh pve reset"), "{records:#?}");
}

#[tokio::test]
async fn a_denied_call_gives_the_agent_the_operators_message_and_the_turn_goes_on() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh devvm systemctl restart nginx\nsay after the refusal\nresult").await;
    let approval = stream.until_kind("approval").await.pop().unwrap();
    let tool_use_id = approval["tool_use_id"].as_str().unwrap();
    assert!(approval.get("effect").is_none(), "the policy does not know what a restart does: {approval}");
    let (status, body) =
        server.decide(&session, tool_use_id, json!({"decision": "deny", "message": "not during the backup"})).await;
    assert_eq!((status, body), (200, json!({"decision": "deny"})));
    let after = stream.until_turn_end().await;
    assert_eq!(kinds(&after), ["approval_decision", "tool_result", "text", "result", "turn_end"]);
    assert_eq!((&after[0]["decision"], &after[0]["message"]), (&json!("deny"), &json!("not during the backup")));
    assert_eq!(tool_result(&after)["is_error"], true);
    assert_eq!(
        tool_result(&after)["content"],
        "PreToolUse:Bash hook error: denied by the operator: not during the backup",
        "the CLI prefixes a Bash deny"
    );
    assert_eq!(audit(&server).await[0]["outcome"], "deny");
}

#[tokio::test]
async fn read_only_diagnosis_and_the_policy_files_rules_run_without_asking() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[[allow]]\nhost = \"devvm\"\ncommand = \"docker ps\"\nreason = \"lists containers\"\n")
        .unwrap();
    let server = Server::options().env("BREAKGLASS_POLICY_FILE", policy.to_str().unwrap()).start();
    let session = server.open_session().await;
    let events = server
        .run_turn(
            &session,
            "hook Bash ssh devvm uptime\nhook Bash ssh devvm docker ps -a\nhook Read /var/log/syslog\nresult",
        )
        .await;
    assert!(!kinds(&events).contains(&"approval"), "{events:#?}");
    let ran: Vec<&str> =
        events.iter().filter(|e| e["kind"] == "tool_result").map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(ran, ["ran: ssh devvm uptime", "ran: ssh devvm docker ps -a", "ran: /var/log/syslog"]);
    assert!(audit(&server).await.is_empty(), "calls the policy allows are not decisions");
}

#[tokio::test]
async fn the_decision_endpoint_answers_each_wrong_request_with_its_status() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve stop\nresult").await;
    let approval = stream.until_kind("approval").await.pop().unwrap();
    let id = approval["tool_use_id"].as_str().unwrap();

    let unknown_session = uuid_like();
    assert_eq!(server.decide(&unknown_session, id, json!({"decision": "allow"})).await.0, 404);
    assert_eq!(server.decide("not-a-session", id, json!({"decision": "allow"})).await.0, 404);
    assert_eq!(server.decide(&session, "toolu_unknown", json!({"decision": "allow"})).await.0, 404);
    let (status, body) = server.decide(&session, id, json!({"decision": "maybe"})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(server.decide(&session, id, json!({"decision": "allow", "message": "x".repeat(2001)})).await.0, 422);
    let not_json = server.post(&format!("/api/session/{session}/approvals/{id}")).body("allow").send().await.unwrap();
    assert_eq!(not_json.status(), 400);
    assert_eq!(session_json(&server, &session).await["pending_approvals"], 1, "none of that decided anything");

    assert_eq!(server.decide(&session, id, json!({"decision": "deny"})).await.0, 200);
    assert_eq!(server.decide(&session, id, json!({"decision": "deny"})).await.0, 409);
    stream.until_turn_end().await;
}

#[tokio::test]
async fn a_cross_site_decision_with_the_proxy_header_is_refused() {
    let server = Server::options().env("BREAKGLASS_TRUSTED_PROXIES", "127.0.0.1").start();
    let response = server
        .client
        .post(server.url(&format!("/api/session/{}/approvals/toolu_x", uuid_like())))
        .header("X-authentik-username", "alice")
        .header("Sec-Fetch-Site", "cross-site")
        .json(&json!({"decision": "allow"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn no_decision_within_the_timeout_is_a_deny_by_timeout() {
    let server = Server::options().env("BREAKGLASS_APPROVAL_TIMEOUT_SECONDS", "1").start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "hook Bash ssh pve cycle\nresult").await;
    assert_eq!(kinds(&events), ["user", "tool", "approval", "approval_decision", "tool_result", "result", "turn_end"]);
    assert_eq!((&events[3]["decision"], &events[3]["by"]), (&json!("deny"), &json!("timeout")));
    let said = tool_result(&events)["content"].as_str().unwrap();
    assert!(said.contains("no operator decided within 1 s"), "{said}");
    let record = &audit(&server).await[0];
    assert_eq!(
        (&record["identity"], &record["outcome"], &record["via"]),
        (&json!("timeout"), &json!("deny"), &json!("server"))
    );
}

#[tokio::test]
async fn stop_while_a_call_waits_ends_the_turn_at_once_and_closes_the_card() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve reset\nresult").await;
    let approval = stream.until_kind("approval").await.pop().unwrap();
    assert_eq!(server.cancel(&session).await, json!({"cancelled": true}));
    let after = stream.until_turn_end().await;
    assert_eq!(kinds(&after), ["approval_decision", "cancelled", "turn_end"], "{after:#?}");
    assert_eq!((&after[0]["decision"], &after[0]["by"]), (&json!("deny"), &json!("turn-ended")));
    let id = approval["tool_use_id"].as_str().unwrap();
    assert_eq!(server.decide(&session, id, json!({"decision": "allow"})).await.0, 409, "too late");
}

#[tokio::test]
async fn a_call_waiting_when_the_server_dies_is_denied_as_restart_on_the_next_start() {
    let mut server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve reset\nresult").await;
    let approval = stream.until_kind("approval").await.pop().unwrap();
    let id = approval["tool_use_id"].as_str().unwrap().to_owned();
    server.kill9();
    server.restart();
    let mut stream = server.attach(&session, None).await;
    let events = stream.until_caught_up().await;
    let tail: Vec<&str> = kinds(&events).into_iter().skip_while(|k| *k != "approval").collect();
    assert_eq!(tail, ["approval", "approval_decision", "error", "turn_end"], "{events:#?}");
    let decision = events.iter().find(|e| e["kind"] == "approval_decision").unwrap();
    assert_eq!((&decision["decision"], &decision["by"]), (&json!("deny"), &json!("restart")));
    assert_eq!(server.decide(&session, &id, json!({"decision": "allow"})).await.0, 409);
    assert_eq!(audit(&server).await[0]["identity"], "restart");
}

#[tokio::test]
async fn the_hook_refuses_a_caller_without_a_running_turns_secret() {
    let server = Server::start();
    let call = json!({"hook_event_name": "PreToolUse", "tool_name": "Bash",
                      "tool_input": {"command": "ssh pve reset"}, "tool_use_id": "toolu_forged"});
    for secret in [None, Some("guess"), Some(crate::harness::TOKEN)] {
        let mut request = server.client.post(server.url("/hook/pre-tool-use")).json(&call);
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{secret:?}");
        // A deny in the body too: no reading of the answer lets a call run.
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["hookSpecificOutput"]["permissionDecision"], "deny", "{body}");
    }
    // The secret lives in the agent's environment; its argv only names it.
    let session = server.open_session().await;
    server.run_turn(&session, "hook Bash ssh devvm uptime\nresult").await;
    let argv = server.agent_runs()[0]["argv"].clone();
    let settings = argv.as_array().unwrap().iter().position(|a| a == "--settings").expect("--settings given");
    let settings: Value = serde_json::from_str(argv[settings + 1].as_str().unwrap()).unwrap();
    let hook = &settings["hooks"]["PreToolUse"][0]["hooks"][0];
    assert_eq!(hook["headers"]["Authorization"], "Bearer $BREAKGLASS_HOOK_TOKEN");
    assert_eq!((&hook["type"], &hook["onFailure"], &hook["timeout"]), (&json!("http"), &json!("block"), &json!(630)));
}

#[tokio::test]
async fn with_approvals_off_the_agent_gets_no_hook() {
    let server = Server::options().env("BREAKGLASS_APPROVALS", "off").start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "hook Bash ssh pve reset\nresult").await;
    assert_eq!(tool_result(&events)["content"], "ran: ssh pve reset");
    let run = &server.agent_runs()[0];
    assert!(!run["argv"].as_array().unwrap().contains(&json!("--settings")));
    assert_eq!(run["env_breakglass"], json!(["BREAKGLASS_TURN"]));
}

#[test]
fn a_policy_file_that_does_not_parse_or_is_unsafe_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("typo.toml", "[[allow]]\nhots = \"devvm\"\ncommand = \"uptime\"\nreason = \"r\"\n"),
        ("chain.toml", "[[allow]]\nhost = \"devvm\"\ncommand = \"uptime; reboot\"\nreason = \"r\"\n"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let stderr =
            crate::harness::refused_at_start(&["serve"], &[("BREAKGLASS_POLICY_FILE", path.to_str().unwrap())]);
        assert!(stderr.contains("BREAKGLASS_POLICY_FILE"), "{name}: {stderr}");
    }
}

fn uuid_like() -> String {
    "0b6b6a43-6f5e-4c1a-9d8e-3f1f0c2a9b11".to_owned()
}

#[tokio::test]
async fn the_lamp_count_follows_waiting_calls() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve start\nresult").await;
    stream.until_kind("approval").await;
    let listed: Value = server.get("/api/sessions").send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["sessions"][0]["pending_approvals"], 1);
    server.cancel(&session).await;
    stream.until_turn_end().await;
    assert_eq!(session_json(&server, &session).await["pending_approvals"], 0);
}

#[tokio::test]
async fn a_phone_that_slept_through_the_request_finds_the_card_waiting_and_decides_it() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve reset\nresult").await;
    stream.until_kind("user").await;
    drop(stream); // the phone sleeps before the call is even asked
    // Wakes up now and then, and attaches again from what it last saw.
    let deadline = std::time::Instant::now() + crate::harness::DEADLINE;
    let (mut stream, replayed) = loop {
        let mut stream = server.attach(&session, Some("0")).await;
        let replayed = stream.until_caught_up().await;
        if kinds(&replayed).contains(&"approval") {
            break (stream, replayed);
        }
        assert!(std::time::Instant::now() < deadline, "the call never waited: {replayed:#?}");
    };
    assert_eq!(kinds(&replayed), ["tool", "approval"], "the backlog after the prompt");
    assert_eq!(session_json(&server, &session).await["pending_approvals"], 1);
    let id = replayed[1]["tool_use_id"].as_str().unwrap();
    assert_eq!(server.decide(&session, id, json!({"decision": "allow"})).await.0, 200);
    let after = stream.until_turn_end().await;
    assert_eq!(tool_result(&after)["content"], "ran: ssh pve reset");
}

/// The CLI prints a call before it asks its hook, but stdout and the hook's
/// request race to the server: the approval still comes after its `tool`.
#[tokio::test]
async fn an_approval_is_logged_after_its_tool_even_when_the_hook_wins_the_race() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook-late Bash ssh pve reset\nresult").await;
    let before = stream.until_kind("approval").await;
    assert_eq!(kinds(&before), ["user", "tool", "approval"]);
    let id = before[2]["tool_use_id"].as_str().unwrap();
    assert_eq!(server.decide(&session, id, json!({"decision": "deny"})).await.0, 200);
    stream.until_turn_end().await;
}

/// Stop lands while a hook request waits for its `tool` line (which a
/// stopped turn never reads): the turn's end decides what waits, and no
/// call may start waiting after it, so no card outlives its turn.
#[tokio::test]
async fn no_call_starts_waiting_after_its_turn_has_ended() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    // The agent ignores SIGTERM, so it lives out the 3 s kill grace and asks
    // its hook 1.5 s in; the ask then waits up to 2 s for a `tool` line that
    // never comes, which is after the turn has ended.
    server.start_turn(&session, "ignore-term\nsay asking\nsleep 1.5\nhook-silent Bash ssh pve reset\nresult").await;
    stream.until_kind("text").await;
    assert_eq!(server.cancel(&session).await, json!({"cancelled": true}));
    let ended = stream.until_turn_end().await;
    assert!(!kinds(&ended).contains(&"approval"), "{ended:#?}");
    // Past the longest the ask could still wait: nothing more was logged.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut replay = server.attach(&session, None).await;
    let all = replay.until_caught_up().await;
    assert_eq!(kinds(&all).last(), Some(&"turn_end"), "{all:#?}");
    assert!(!kinds(&all).contains(&"approval"), "{all:#?}");
    assert_eq!(session_json(&server, &session).await["pending_approvals"], 0);
}
