//! The stand-in agent: the load harness's own executable, run by the server
//! as its agent CLI (`BREAKGLASS_CLAUDE_BIN`), so that a flood is limited by
//! the server and never by a script's interpreter.
//!
//! It takes the CLI's argv as the server passes it (README "How a turn runs
//! the agent": `-p --agent … --output-format stream-json --verbose --model …
//! --session-id|--resume ID [--include-partial-messages] [--settings JSON] --
//! PROMPT`, or the prompt on stdin) and reads its instructions from the
//! prompt, one per line:
//!
//! - `flood N`: N assistant text lines, as fast as the pipe takes them;
//! - `rate R for S`: R lines a second for S seconds (each line written at
//!   its time, so a line's timestamp is when the server could first read it);
//! - `hold`: starts a `sleep` child, says both pids in a text line, and waits
//!   to be killed (the cancel scenario).
//!
//! Every run prints `system/init` first, so that the server marks the
//! session started, and a `result` line at the end, in the CLI's
//! stream-json format (tests/fixtures/transcripts/basic.jsonl). Each text
//! line is [`LINE_BYTES`] long and its text starts with `bgload <seq>
//! <emit µs since the epoch>`, which the harness's clients read back.

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The length of one assistant line, newline included (with a UUID for
/// the session id): about a short text block of the real CLI.
pub const LINE_BYTES: usize = 300;

/// The word that opens every text the stand-in writes, which the clients
/// look for in an event's JSON.
pub const MARK: &[u8] = b"bgload ";

/// The length of a text line for a session id of the server's form (a
/// UUID), which the report gives beside the ingest figures.
pub fn line_bytes() -> usize {
    Lines::new("00000000-0000-4000-8000-000000000000").line(0, 0).len()
}

/// True when the harness's executable was started as the agent CLI.
pub fn invoked_as_agent(args: &[String]) -> bool {
    args.get(1).is_some_and(|a| a == "-p")
}

/// Microseconds since the epoch: the clock the clients compare with.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

enum Step {
    Flood(u64),
    Rate { per_second: f64, seconds: f64 },
    Hold,
}

fn steps(prompt: &str) -> Result<Vec<Step>, String> {
    prompt
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let number = |w: &str| w.parse::<f64>().map_err(|_| format!("not a number in {line:?}"));
            match words.as_slice() {
                ["flood", n] => n.parse().map(Step::Flood).map_err(|_| format!("not a count in {line:?}")),
                ["rate", r, "for", s] => Ok(Step::Rate { per_second: number(r)?, seconds: number(s)? }),
                ["hold"] => Ok(Step::Hold),
                _ => Err(format!("unknown instruction {line:?}")),
            }
        })
        .collect()
}

/// One text line of the flood, in the CLI's format, with its sequence
/// number and emit time filled in.
struct Lines {
    session_id: String,
    pad: String,
}

impl Lines {
    fn new(session_id: &str) -> Self {
        let mut lines = Lines { session_id: session_id.to_owned(), pad: String::new() };
        let bare = lines.line(0, 0).len();
        lines.pad = "x".repeat(LINE_BYTES.saturating_sub(bare));
        lines
    }

    fn line(&self, seq: u64, emit_us: u64) -> String {
        // Fixed-width numbers keep every line the same length.
        format!(
            concat!(
                r#"{{"type":"assistant","message":{{"id":"msg_{seq:012}","type":"message","role":"assistant","#,
                r#""content":[{{"type":"text","text":"bgload {seq:010} {us:016} {pad}"}}]}},"#,
                r#""parent_tool_use_id":null,"session_id":"{session}","uuid":"00000000-0000-4000-8000-{seq:012}"}}"#,
                "\n"
            ),
            seq = seq,
            us = emit_us,
            pad = self.pad,
            session = self.session_id,
        )
    }

    fn text(&self, text: &str) -> String {
        let line = serde_json::json!({"type": "assistant", "message": {"id": "msg_hold", "type": "message",
            "role": "assistant", "content": [{"type": "text", "text": text}]},
            "parent_tool_use_id": null, "session_id": self.session_id});
        format!("{line}\n")
    }
}

/// Runs as the agent CLI; the exit code is the process's.
#[allow(clippy::disallowed_methods)] // a plain synchronous program: no runtime to block
pub fn run(args: &[String]) -> std::process::ExitCode {
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let session_id = flag("--session-id").or_else(|| flag("--resume")).unwrap_or_else(|| "standin".into());
    let prompt = match args.iter().position(|a| a == "--") {
        Some(i) => args.get(i + 1).cloned().unwrap_or_default(),
        None => {
            let mut stdin = String::new();
            let _ = std::io::stdin().read_to_string(&mut stdin);
            stdin
        }
    };
    let steps = match steps(&prompt) {
        Ok(steps) => steps,
        Err(err) => {
            eprintln!("stand-in agent: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let lines = Lines::new(&session_id);
    let stdout = std::io::stdout();
    // Large writes: the line-buffered stdout passes a whole buffer in one
    // write, so a flood costs the stand-in few system calls.
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let init = serde_json::json!({"type": "system", "subtype": "init", "cwd": std::env::current_dir().ok(),
        "session_id": session_id, "tools": [], "mcp_servers": [], "model": "claude-sonnet-4-5",
        "permissionMode": "bypassPermissions", "apiKeySource": "none", "claude_code_version": "stand-in"});
    let mut seq = 0u64;
    let written = (|| -> std::io::Result<()> {
        writeln!(out, "{init}")?;
        out.flush()?;
        for step in &steps {
            match *step {
                Step::Flood(n) => {
                    for _ in 0..n {
                        out.write_all(lines.line(seq, now_us()).as_bytes())?;
                        seq += 1;
                    }
                    out.flush()?;
                }
                Step::Rate { per_second, seconds } => {
                    let count = (per_second * seconds).round() as u64;
                    let start = Instant::now();
                    for i in 0..count {
                        // On an absolute schedule, so a late line does not
                        // push every later one back.
                        let due = start + Duration::from_secs_f64(i as f64 / per_second);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        out.write_all(lines.line(seq, now_us()).as_bytes())?;
                        out.flush()?;
                        seq += 1;
                    }
                }
                Step::Hold => {
                    let child = std::process::Command::new("sleep").arg("600").spawn()?;
                    out.write_all(
                        lines.text(&format!("hold pid {} child {}", std::process::id(), child.id())).as_bytes(),
                    )?;
                    out.flush()?;
                    std::thread::sleep(Duration::from_secs(600));
                }
            }
        }
        let result = serde_json::json!({"type": "result", "subtype": "success", "is_error": false,
            "duration_ms": 1, "num_turns": 1, "result": format!("{seq} lines"), "session_id": session_id,
            "total_cost_usd": 0.0});
        writeln!(out, "{result}")?;
        out.flush()
    })();
    match written {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stand-in agent: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
