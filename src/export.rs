//! A session's transcript for people and tools outside the console:
//! Markdown that reads as an incident timeline, or the events as JSON Lines.
//! Streamed page by page from the store, so a long transcript costs no more
//! memory than a short one.

use std::sync::Arc;

use axum::body::Bytes;
use futures_util::Stream;
use serde_json::Value;

use crate::event::EventId;
use crate::store::{SessionRow, Store};

/// Events read from the store at a time.
const PAGE: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    JsonLines,
}

struct State {
    store: Arc<Store>,
    row: SessionRow,
    format: Format,
    after: Option<EventId>,
    started: bool,
    done: bool,
}

pub fn export(store: Arc<Store>, row: SessionRow, format: Format) -> impl Stream<Item = Bytes> + Send + 'static {
    let state = State { store, row, format, after: None, started: false, done: false };
    futures_util::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let mut out = String::new();
        if !state.started {
            state.started = true;
            if state.format == Format::Markdown {
                out.push_str(&header(&state.row));
            }
        }
        match state.store.read_after(state.row.id, state.after, PAGE).await {
            Ok(page) if page.is_empty() => state.done = true,
            Ok(page) => {
                for event in &page {
                    match state.format {
                        Format::JsonLines => {
                            out.push_str(&event.json);
                            out.push('\n');
                        }
                        Format::Markdown => {
                            let value: Value = serde_json::from_str(&event.json).unwrap_or(Value::Null);
                            out.push_str(&markdown(&value));
                        }
                    }
                }
                state.after = page.last().map(|e| e.id);
            }
            Err(err) => {
                // The body has started: say so in it, then end.
                out.push_str(&match state.format {
                    Format::JsonLines => {
                        format!("{}\n", serde_json::json!({"kind": "export_error", "error": err.to_string()}))
                    }
                    Format::Markdown => format!("\n**Export stopped: {err}**\n"),
                });
                state.done = true;
            }
        }
        Some((Bytes::from(out), state))
    })
}

fn header(row: &SessionRow) -> String {
    let title = row.title.as_deref().unwrap_or("(no prompt yet)");
    format!(
        "# Incident transcript: {}\n\n- Session: `{}`\n- Opened: {}\n- Last activity: {}\n- Events: {}\n\n",
        one_line(title),
        row.id,
        crate::util::rfc3339(row.created_ms),
        crate::util::rfc3339(row.last_activity_ms),
        row.event_count,
    )
}

/// One event as Markdown.
pub fn markdown(event: &Value) -> String {
    let s = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or_default();
    let at = s("at");
    match s("kind") {
        "user" => format!("## {at} Prompt from {}\n\n{}\n\n", s("by"), quote(s("text"))),
        "session" => format!("_{at} agent session `{}` started_\n\n", s("session_id")),
        "status" => format!("_{at} {}_\n\n", one_line(s("text"))),
        "text" => format!("**{at} Agent:**\n\n{}\n\n", s("text")),
        "tool" => {
            let input = event.get("input").cloned().unwrap_or(Value::Null);
            let body = match input.get("command").and_then(Value::as_str) {
                Some(command) => fenced("sh", command),
                None => fenced("json", &serde_json::to_string_pretty(&input).unwrap_or_default()),
            };
            format!("**{at} Tool `{}`:**\n\n{body}\n", s("name"))
        }
        "tool_result" => {
            let label =
                if event.get("is_error").and_then(Value::as_bool) == Some(true) { "Error output" } else { "Output" };
            format!("{label}:\n\n{}\n", fenced("", s("content")))
        }
        "result" => {
            let mut facts = vec![s("subtype").to_owned()];
            if event.get("is_error").and_then(Value::as_bool) == Some(true) {
                facts.push("error".into());
            }
            if let Some(ms) = event.get("duration_ms").and_then(Value::as_u64) {
                facts.push(format!("{:.1} s", ms as f64 / 1000.0));
            }
            if let Some(turns) = event.get("num_turns").and_then(Value::as_u64) {
                facts.push(format!("{turns} turns"));
            }
            if let Some(cost) = event.get("total_cost_usd").and_then(Value::as_f64) {
                facts.push(format!("${cost:.4}"));
            }
            facts.retain(|f| !f.is_empty());
            format!("**{at} Result** ({}):\n\n{}\n\n", facts.join(", "), s("result"))
        }
        "error" => format!("**{at} Error:** {}\n\n", one_line(s("error"))),
        "cancelled" => format!("**{at} Cancelled by the operator.**\n\n"),
        "turn_end" => "---\n\n".to_owned(),
        "approval" => {
            let what = if event.get("effect").is_some() { s("effect") } else { s("reason") };
            format!("**{at} Waiting for the operator** (`{}`): {}\n\n", s("tool_use_id"), one_line(what))
        }
        "approval_decision" => {
            let verb = if s("decision") == "allow" { "Allowed" } else { "Denied" };
            let said = match event.get("message").and_then(Value::as_str) {
                Some(message) => format!(": {}", one_line(message)),
                None => String::new(),
            };
            format!("**{at} {verb}** by {} (`{}`){said}\n\n", s("by"), s("tool_use_id"))
        }
        other => format!("_{at} {other} event_\n\n"),
    }
}

/// A fenced code block whose fence no content can close early.
fn fenced(lang: &str, content: &str) -> String {
    let longest = content.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}{lang}\n{}\n{fence}\n", content.trim_end_matches('\n'))
}

fn quote(text: &str) -> String {
    text.lines().map(|l| format!("> {l}")).collect::<Vec<_>>().join("\n")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fences_outgrow_the_backticks_inside() {
        assert_eq!(fenced("", "plain"), "```\nplain\n```\n");
        assert_eq!(fenced("sh", "echo ````x````"), "`````sh\necho ````x````\n`````\n");
    }

    #[test]
    fn a_turn_reads_as_a_timeline() {
        let events = [
            json!({"kind": "user", "text": "Is devvm up?\nIt hangs.", "by": "alice", "at": "T1"}),
            json!({"kind": "tool", "name": "Bash", "input": {"command": "ssh devvm uptime"}, "tool_use_id": "t", "at": "T2"}),
            json!({"kind": "tool_result", "tool_use_id": "t", "is_error": false, "content": "up 3 days", "at": "T3"}),
            json!({"kind": "result", "is_error": false, "result": "It is up.", "subtype": "success",
                   "duration_ms": 8123, "num_turns": 2, "total_cost_usd": 0.0213, "at": "T4"}),
            json!({"kind": "turn_end", "at": "T5"}),
        ];
        let md: String = events.iter().map(markdown).collect();
        assert_eq!(
            md,
            "## T1 Prompt from alice\n\n> Is devvm up?\n> It hangs.\n\n\
             **T2 Tool `Bash`:**\n\n```sh\nssh devvm uptime\n```\n\n\
             Output:\n\n```\nup 3 days\n```\n\n\
             **T4 Result** (success, 8.1 s, 2 turns, $0.0213):\n\nIt is up.\n\n\
             ---\n\n"
        );
    }
}
