//! Turns (README "How a turn runs the agent"): the agent's command line, every way a turn ends, and the
//! process group.

use serde_json::{Value, json};

use crate::harness::{BASIC, Server, alive, eventually, kinds};

/// The pid a fake agent's `grandchild` directive reported.
fn grandchild_pid(events: &[Value]) -> Option<u32> {
    events.iter().find_map(|e| e["text"].as_str()?.strip_prefix("grandchild ")?.parse().ok())
}

/// Reads a stream until the agent says `text`.
async fn wait_for_text(stream: &mut crate::harness::Attached, text: &str) {
    loop {
        if let Some(crate::harness::Frame::Event { data, .. }) = stream.next().await
            && data["text"] == text
        {
            return;
        }
    }
}

fn error_of(events: &[Value]) -> String {
    let errors: Vec<_> = events.iter().filter(|e| e["kind"] == "error").collect();
    assert_eq!(errors.len(), 1, "one error event in {events:#?}");
    errors[0]["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn first_turn_uses_session_id_and_later_turns_resume() {
    let server = Server::start();
    let session = server.open_session().await;
    assert_eq!(kinds(&server.run_turn(&session, "replay basic").await).last(), Some(&"turn_end"));
    server.run_turn(&session, "replay basic").await;

    let runs = server.agent_runs();
    assert_eq!(runs.len(), 2);
    // The hook's settings (tests/it/approvals.rs) and the agent's
    // definition stand as placeholders.
    let argv = |i: usize| -> Vec<String> {
        let mut argv: Vec<String> = serde_json::from_value(runs[i]["argv"].clone()).unwrap();
        if let Some(at) = argv.iter().position(|a| a == "--settings") {
            assert!(argv[at + 1].contains("\"PreToolUse\""), "{}", argv[at + 1]);
            argv[at + 1] = "<hook settings>".into();
        }
        if let Some(at) = argv.iter().position(|a| a == "--agents") {
            let agents: Value = serde_json::from_str(&argv[at + 1]).unwrap();
            assert_eq!(agents["breakglass"]["tools"], json!(["Bash", "Read", "Grep", "Glob"]), "{agents}");
            argv[at + 1] = "<definition>".into();
        }
        argv
    };
    let expected = |flag: &str| -> Vec<String> {
        [
            "-p",
            "--agent",
            "breakglass",
            "--dangerously-skip-permissions",
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
            "sonnet",
            flag,
            &session,
            "--agents",
            "<definition>",
            "--setting-sources",
            "",
            "--strict-mcp-config",
            "--include-partial-messages",
            "--settings",
            "<hook settings>",
            "--",
            "replay basic",
        ]
        .map(String::from)
        .to_vec()
    };
    assert_eq!(argv(0), expected("--session-id"));
    assert_eq!(argv(1), expected("--resume"));

    assert_eq!(runs[0]["env_has_token"], false, "the agent never sees the API token");
    let workspace = server.data_dir().join("sessions").join(&session);
    assert_eq!(runs[0]["cwd"], workspace.display().to_string());
    assert!(!workspace.join(".claude").exists(), "nothing is written into the workspace");
}

/// The CLI may know a session the server thinks is new (its first turn
/// started the session but never announced it): the turn resumes it.
#[tokio::test]
async fn a_session_the_agent_already_knows_is_resumed() {
    let server = Server::start();
    let session = server.open_session().await;
    std::fs::create_dir_all(server.dir.path().join(".claude")).unwrap();
    std::fs::write(server.dir.path().join(".claude/fake-sessions"), format!("{session}\n")).unwrap();
    let events = server.run_turn(&session, "replay basic").await;
    assert_eq!(kinds(&events), BASIC);
    let runs = server.agent_runs();
    let flag = |i: usize| runs[i]["argv"][9].as_str().unwrap().to_owned();
    assert_eq!((runs.len(), flag(0), flag(1)), (2, "--session-id".into(), "--resume".into()));
    server.run_turn(&session, "replay basic").await;
    assert_eq!(server.agent_runs()[2]["argv"][9], "--resume");
}

/// The agent is the configured one, whatever definition lies in the
/// workspace (the agent could have written it there).
#[tokio::test]
async fn an_agent_definition_in_the_workspace_is_not_read_and_a_model_can_be_chosen() {
    let server = Server::start();
    let session = server.open_session().await;
    let agents = server.data_dir().join("sessions").join(&session).join(".claude/agents");
    std::fs::create_dir_all(&agents).unwrap();
    std::fs::write(agents.join("breakglass.md"), "---\nname: breakglass\ndescription: custom\n---\ncustom").unwrap();
    let mut stream = server.attach(&session, None).await;
    stream.until_caught_up().await;
    let response = server
        .post(&format!("/api/session/{session}/prompt"))
        .json(&json!({"prompt": "replay basic", "model": "opus"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    stream.until_turn_end().await;
    let argv: Vec<String> = serde_json::from_value(server.agent_runs()[0]["argv"].clone()).unwrap();
    assert_eq!(argv[argv.iter().position(|a| a == "--model").unwrap() + 1], "opus");
    let agents: Value = serde_json::from_str(&argv[argv.iter().position(|a| a == "--agents").unwrap() + 1]).unwrap();
    assert!(agents["breakglass"]["prompt"].as_str().unwrap().starts_with("You are the breakglass recovery agent."));
    assert_eq!(argv[argv.iter().position(|a| a == "--setting-sources").unwrap() + 1], "", "no settings file is read");
}

#[tokio::test]
async fn a_prompt_that_looks_like_an_option_reaches_the_agent_as_the_prompt() {
    let server = Server::start();
    let session = server.open_session().await;
    server.run_turn(&session, "--help").await;
    server.run_turn(&session, "-rf /").await;
    let runs = server.agent_runs();
    assert_eq!(runs[0]["prompt"], "--help");
    assert_eq!(runs[1]["prompt"], "-rf /");
    for run in &runs {
        let argv = run["argv"].as_array().unwrap();
        assert_eq!(argv[argv.len() - 2], "--", "the prompt follows the end of options");
    }
}

#[tokio::test]
async fn a_prompt_too_long_for_one_argument_reaches_the_agent_on_stdin() {
    let server = Server::start();
    let session = server.open_session().await;
    // 99 990 characters, 199 980 bytes of UTF-8: more than one argv string can carry.
    let prompt = format!("echo-prompt\n{}", "é".repeat(99_978));
    assert!(prompt.len() > 128 * 1024 && prompt.chars().count() <= 100_000);
    let events = server.run_turn(&session, &prompt).await;
    let said =
        events.iter().find(|e| e["kind"] == "text").expect("the agent answered")["text"].as_str().unwrap().to_owned();
    assert!(said.contains(&format!("sha256 {}", sha256_hex(prompt.as_bytes()))), "{said}");
    let run = &server.agent_runs()[0];
    assert!(!run["argv"].as_array().unwrap().iter().any(|a| a.as_str().is_some_and(|a| a.contains("éééé"))));
    assert_eq!(run["stdin"].as_str().unwrap().len(), prompt.len());
}

#[tokio::test]
async fn a_second_prompt_while_a_turn_runs_is_409_and_cancel_stops_it() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "say working\nsleep 60").await;
    wait_for_text(&mut stream, "working").await;
    let second = server.prompt(&session, "again").await;
    assert_eq!(second.status(), 409);
    assert_eq!(second.json::<Value>().await.unwrap()["detail"], "a turn is already running");

    assert_eq!(server.cancel(&session).await, json!({"cancelled": true}));
    let events = stream.until_turn_end().await;
    assert_eq!(kinds(&events), ["cancelled", "turn_end"]);
    assert_eq!(server.cancel(&session).await, json!({"cancelled": false}));
    // The session takes a new prompt at once.
    assert_eq!(server.prompt(&session, "replay basic").await.status(), 200);
}

#[tokio::test]
async fn cancel_kills_the_whole_process_group() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    // The agent ignores SIGTERM, so the group needs the SIGKILL that follows.
    server.start_turn(&session, "ignore-term\ngrandchild\nsleep 60").await;
    let mut seen = Vec::new();
    let pid = loop {
        let crate::harness::Frame::Event { data, .. } = stream.next().await.unwrap() else {
            continue;
        };
        seen.push(data);
        if let Some(pid) = grandchild_pid(&seen) {
            break pid;
        }
    };
    let agent = server.agent_runs()[0]["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid) && alive(agent));
    server.cancel(&session).await;
    assert_eq!(kinds(&stream.until_turn_end().await), ["cancelled", "turn_end"]);
    assert!(!alive(agent), "the agent is gone when cancel answers");
    eventually("the grandchild to die", || !alive(pid)).await;
}

#[tokio::test]
async fn a_turn_over_its_time_is_killed() {
    // Long enough for the fake agent to start its grandchild on a loaded machine.
    let server = Server::options().arg("--turn-timeout-seconds").arg("3").start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "grandchild\nsleep 60").await;
    assert_eq!(error_of(&events), "turn timed out after 3s");
    assert_eq!(kinds(&events).last(), Some(&"turn_end"));
    let pid = grandchild_pid(&events).unwrap();
    eventually("the grandchild to die", || !alive(pid)).await;
}

#[tokio::test]
async fn a_failing_agent_reports_its_stderr_or_exit_code() {
    let server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "stderr Error: Session ID is already in use\nexit 1").await;
    assert_eq!(kinds(&events), ["user", "error", "turn_end"]);
    assert_eq!(error_of(&events), "Error: Session ID is already in use");

    let events = server.run_turn(&session, "exit 4").await;
    assert_eq!(error_of(&events), "exit 4");

    let long = "x".repeat(2000);
    let events = server.run_turn(&session, &format!("stderr {long}\nexit 2")).await;
    assert_eq!(error_of(&events).chars().count(), 500);
}

#[tokio::test]
async fn an_agent_that_cannot_start_is_named() {
    let server = Server::options().env("BREAKGLASS_CLAUDE_BIN", "/nonexistent/claude").start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "hello").await;
    assert_eq!(kinds(&events), ["user", "error", "turn_end"]);
    let error = error_of(&events);
    assert!(error.starts_with("could not start agent: /nonexistent/claude: "), "{error}");
    assert!(error.contains("No such file"), "{error}");
}

#[tokio::test]
async fn exit_zero_without_a_result_is_an_error() {
    let server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "say partial answer").await;
    assert_eq!(kinds(&events), ["user", "text", "error", "turn_end"]);
    assert_eq!(error_of(&events), "agent ended without a result");
}

#[tokio::test]
async fn garbage_lines_are_skipped_without_ending_the_turn() {
    let server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "garbage\nsay still here\nresult").await;
    assert_eq!(kinds(&events), ["user", "text", "result", "turn_end"]);
    assert_eq!(events[1]["text"], "still here");
}

#[tokio::test]
async fn a_descendant_holding_stdout_does_not_keep_the_turn_open() {
    let server = Server::start();
    let session = server.open_session().await;
    // The agent exits at once; its `sleep 600` child still holds stdout.
    let events = server.run_turn(&session, "grandchild\nresult").await;
    assert_eq!(kinds(&events), ["user", "text", "result", "turn_end"]);
    let pid = grandchild_pid(&events).unwrap();
    eventually("the leftover child to die", || !alive(pid)).await;
}

#[tokio::test]
async fn turns_beyond_the_server_limit_wait_for_a_slot() {
    let server = Server::options().arg("--max-concurrent-turns").arg("1").start();
    let (a, b) = (server.open_session().await, server.open_session().await);
    let mut stream_a = server.attach(&a, None).await;
    let mut stream_b = server.attach(&b, None).await;
    stream_a.until_caught_up().await;
    stream_b.until_caught_up().await;
    server.start_turn(&a, "say first\nsleep 60").await;
    wait_for_text(&mut stream_a, "first").await;
    server.start_turn(&b, "replay basic").await;
    let mut waiting = Vec::new();
    while waiting.len() < 2 {
        if let crate::harness::Frame::Event { data, .. } = stream_b.next().await.unwrap() {
            waiting.push(data);
        }
    }
    assert_eq!(kinds(&waiting), ["user", "status"]);
    assert_eq!(waiting[1]["text"], "waiting for a free agent slot");
    assert_eq!(server.agent_runs().len(), 1, "the second agent has not started");
    server.cancel(&a).await;
    let rest = stream_b.until_turn_end().await;
    assert_eq!(kinds(&rest).last(), Some(&"turn_end"));
    assert!(kinds(&rest).contains(&"result"));
    assert_eq!(server.agent_runs().len(), 2);
}

#[tokio::test]
async fn a_flood_of_events_arrives_complete_and_in_order() {
    let server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "flood 5000 200\nresult").await;
    assert_eq!(events.len(), 5003);
    for (i, event) in events[1..5001].iter().enumerate() {
        assert!(event["text"].as_str().unwrap().starts_with(&format!("{i:08} ")), "event {i}");
    }
}

/// The SHA-256 of `data` from coreutils' `sha256sum`, to compare with what
/// the fake agent hashed.
fn sha256_hex(data: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(data)?;
            child.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// Regression: cancel killed the agent's process group only; a descendant
/// that called `setsid`, or double-forked, survived every Stop.
#[tokio::test]
async fn cancel_kills_descendants_that_left_the_process_group() {
    let server = Server::start();
    let session = server.open_session().await;
    let pids = crate::lifecycle::start_escaping_turn(&server, &session).await;
    assert_eq!(server.cancel(&session).await["cancelled"], true);
    for pid in pids {
        eventually("every process of the turn to die", || !alive(pid)).await;
    }
}

#[tokio::test]
async fn the_turn_timeout_kills_descendants_that_left_the_process_group() {
    let server = Server::options().arg("--turn-timeout-seconds").arg("6").start();
    let (session, mut stream) = server.attached().await;
    let pids = crate::lifecycle::start_escaping_turn(&server, &session).await;
    let events = stream.until_turn_end().await;
    assert_eq!(error_of(&events), "turn timed out after 6s");
    for pid in pids {
        eventually("every process of the turn to die", || !alive(pid)).await;
    }
}

/// An agent that exits normally and leaves a daemon behind outside its
/// group: the daemon goes with the turn.
#[tokio::test]
async fn a_turn_that_ends_normally_leaves_no_daemon_behind() {
    let server = Server::start();
    let session = server.open_session().await;
    let events = server.run_turn(&session, "double-fork\nresult").await;
    assert_eq!(kinds(&events).last(), Some(&"turn_end"));
    let pid = grandchild_pid(&events).unwrap();
    eventually("the daemon to die", || !alive(pid)).await;
}

/// A session polled while its turn ends is never seen stopped with its
/// `turn_end` not yet counted: "running" is read before the row (a turn
/// logs its end, then stops running). Reading it after the row let a poll
/// that straddled the end see `running: false` one event short.
#[tokio::test]
async fn a_session_seen_not_running_has_its_whole_turn_counted() {
    let server = Server::start();
    let session = server.open_session().await;
    for round in 0..40 {
        let mut stream = server.attach(&session, None).await;
        stream.until_caught_up().await;
        server.start_turn(&session, "replay basic").await;
        let (one, list) = (format!("/api/session/{session}"), "/api/sessions".to_owned());
        // Poll both views back to back until each says the turn is over.
        let mut seen = Vec::new();
        for path in [&one, &list].into_iter().cycle() {
            let body: Value = server.get(path).send().await.unwrap().json().await.unwrap();
            let row = if path == &list {
                body["sessions"].as_array().unwrap().iter().find(|s| s["id"] == session.as_str()).unwrap().clone()
            } else {
                body
            };
            if row["running"] == false {
                seen.push((path.clone(), row["event_count"].as_u64().unwrap()));
                if seen.len() == 2 {
                    break;
                }
            }
        }
        let end = stream.until_turn_end().await;
        let count = end.last().unwrap()["id"].as_u64().unwrap() + 1;
        for (path, event_count) in seen {
            assert_eq!(
                event_count, count,
                "round {round}: {path} said not running with {event_count} of {count} events"
            );
        }
    }
}
