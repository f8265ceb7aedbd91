//! Against the real Claude Code CLI, with no credentials: a turn must end
//! with the CLI's own explanation, then `turn_end`, instead of hanging.
//! `scripts/test` installs the pinned CLI under `.cache/claude-cli` and runs
//! these tests (they are ignored by a plain `cargo test`).

use serde_json::Value;

use crate::harness::{Server, kinds};

fn real_cli() -> String {
    crate::harness::real_cli().display().to_string()
}

/// PATH with node on it, and nothing of the fake agent's.
fn node_path() -> String {
    let out = command_path("node");
    format!("{}:/usr/local/bin:/usr/bin:/bin", std::path::Path::new(&out).parent().unwrap().display())
}

fn command_path(program: &str) -> String {
    let out = std::process::Command::new("sh").args(["-c", &format!("command -v {program}")]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn one_turn(server: &Server) -> Vec<Value> {
    let session = server.open_session().await;
    let started = std::time::Instant::now();
    let events = server.run_turn(&session, "Is the VM up?").await;
    eprintln!("real CLI turn took {:?}: {events:#?}", started.elapsed());
    assert_eq!(kinds(&events).last(), Some(&"turn_end"));
    events
}

/// As the server's own user (root in CI, where the CLI refuses
/// `--dangerously-skip-permissions`; elsewhere "Not logged in").
#[tokio::test]
#[ignore = "needs the real claude CLI; scripts/test installs it and runs this"]
async fn without_credentials_the_turn_ends_with_the_clis_own_message() {
    let server = Server::options().env("BREAKGLASS_CLAUDE_BIN", real_cli()).env("PATH", node_path()).start();
    let events = one_turn(&server).await;
    let explanation = events
        .iter()
        .find_map(|e| match e["kind"].as_str() {
            Some("error") => e["error"].as_str(),
            Some("result") if e["is_error"] == true => e["result"].as_str(),
            _ => None,
        })
        .expect("an error or a failed result");
    let known = ["cannot be used with root/sudo privileges", "Not logged in"];
    assert!(known.iter().any(|k| explanation.contains(k)), "{explanation}");
}

/// In a sandboxed deployment the CLI gets as far as the model API: it must
/// find our agent definition, start the session, and say it is not logged in.
#[tokio::test]
#[ignore = "needs the real claude CLI; scripts/test installs it and runs this"]
async fn sandboxed_without_credentials_the_cli_says_not_logged_in() {
    let server = Server::options()
        .env("BREAKGLASS_CLAUDE_BIN", real_cli())
        .env("PATH", node_path())
        .env("IS_SANDBOX", "1")
        .start();
    let events = one_turn(&server).await;
    assert_eq!(kinds(&events)[..2], ["user", "session"], "the CLI accepted --agent breakglass and the session id");
    let result = events.iter().find(|e| e["kind"] == "result").expect("a result event");
    assert_eq!(result["is_error"], true);
    assert!(result["result"].as_str().unwrap().contains("Not logged in"), "{result}");
}
