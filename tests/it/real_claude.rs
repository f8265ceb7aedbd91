//! Against the real Claude Code CLI, with no credentials: a turn must end
//! quickly with the CLI's own explanation, then `turn_end`. `scripts/test`
//! installs the pinned CLI under `.cache/claude-cli` and runs this test.

use crate::harness::{Server, kinds, repo};

#[tokio::test]
#[ignore = "needs the real claude CLI; scripts/test installs it and runs this"]
async fn without_credentials_the_cli_explains_itself() {
    let cli = repo().join(".cache/claude-cli/node_modules/.bin/claude");
    assert!(
        cli.exists(),
        "{} is missing: run scripts/test, which installs it",
        cli.display()
    );
    let node_dir = which_node();
    let server = Server::options()
        .env("BREAKGLASS_CLAUDE_BIN", cli.display().to_string())
        .env("PATH", format!("{node_dir}:/usr/bin:/bin"))
        .start();
    let session = server.open_session().await;
    let started = std::time::Instant::now();
    let events = server.run_turn(&session, "Is the VM up?").await;
    let elapsed = started.elapsed();
    eprintln!("real CLI turn took {elapsed:?}: {events:#?}");
    assert_eq!(kinds(&events).last(), Some(&"turn_end"));
    let explanation = events
        .iter()
        .find_map(|e| match e["kind"].as_str() {
            Some("error") => e["error"].as_str(),
            Some("result") if e["is_error"] == true => e["result"].as_str(),
            _ => None,
        })
        .expect("an error or a failed result");
    assert!(!explanation.trim().is_empty());
}

fn which_node() -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v node"])
        .output()
        .expect("sh");
    let node = String::from_utf8(out.stdout).unwrap();
    std::path::Path::new(node.trim())
        .parent()
        .expect("node on PATH")
        .display()
        .to_string()
}
