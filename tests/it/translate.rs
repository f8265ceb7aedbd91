//! Translation, data-driven: each `tests/fixtures/transcripts/NAME.jsonl` is
//! fed through the same line reader, parser and translator a turn uses, and
//! must give the events in `NAME.expected.jsonl` (one JSON object per line,
//! without ids; a delta, which is not an event, as `{"delta": …}`).

use breakglass::agent::line;
use breakglass::agent::process::{Line, LineReader, MAX_LINE};
use breakglass::agent::translate::{TOOL_RESULT_CAP, Translated, Translator};
use serde_json::Value;

use crate::harness::repo;

/// The events (as JSON, ids stripped) and deltas a transcript's bytes stand for.
async fn events_of(bytes: &[u8]) -> Vec<Value> {
    let mut reader = LineReader::new(bytes, MAX_LINE);
    let mut translator = Translator::default();
    let mut events = Vec::new();
    while let Some(line) = reader.next_line().await.expect("in-memory read") {
        let Line::Complete(raw) = line else { continue };
        for translated in line::parse(&raw).map(|l| translator.line(l)).unwrap_or_default() {
            events.push(match translated {
                Translated::Event(event) => {
                    let mut json = event.to_json(0);
                    json.as_object_mut().unwrap().remove("id");
                    json
                }
                Translated::Delta(delta) => serde_json::json!({ "delta": delta.to_json() }),
            });
        }
    }
    events
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures/transcripts").join(name)).expect(name)
}

fn expected(name: &str) -> Vec<Value> {
    String::from_utf8(fixture(&format!("{name}.expected.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("expected line is JSON"))
        .collect()
}

async fn check(name: &str) {
    let got = events_of(&fixture(&format!("{name}.jsonl"))).await;
    let want = expected(name);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{name}: event {i}");
    }
    assert_eq!(got.len(), want.len(), "{name}: got {got:#?}");
}

#[tokio::test]
async fn basic_turn_with_a_tool_call() {
    check("basic").await;
}

#[tokio::test]
async fn several_blocks_retries_and_error_results() {
    check("multi").await;
}

#[tokio::test]
async fn hostile_lines_are_skipped_and_the_rest_survives() {
    check("hostile").await;
}

#[tokio::test]
async fn recorded_real_tool_call() {
    check("real-tool").await;
}

#[tokio::test]
async fn recorded_real_not_logged_in() {
    check("real-not-logged-in").await;
}

#[tokio::test]
async fn recorded_real_resume_of_an_unknown_session() {
    check("real-resume-unknown").await;
}

#[tokio::test]
async fn partial_messages_give_deltas_then_the_text_and_no_late_delta() {
    check("partial").await;
}

#[tokio::test]
async fn recorded_real_partial_messages_of_a_text_reply() {
    check("real-partial-text").await;
}

#[tokio::test]
async fn recorded_real_partial_messages_of_a_tool_call_and_its_answer() {
    check("real-partial-tool").await;
}

#[tokio::test]
async fn a_multi_megabyte_line_is_skipped_whole() {
    let mut bytes = br#"{"type":"assistant","message":{"content":[{"type":"text","text":"before"}]}}"#.to_vec();
    bytes.push(b'\n');
    // A valid JSON line, too long to keep: 6 MiB of text.
    bytes.extend_from_slice(br#"{"type":"assistant","message":{"content":[{"type":"text","text":""#);
    bytes.extend(std::iter::repeat_n(b'a', 6 * 1024 * 1024));
    bytes.extend_from_slice(b"\"}]}}\n");
    bytes.extend_from_slice(br#"{"type":"assistant","message":{"content":[{"type":"text","text":"after"}]}}"#);
    let texts: Vec<_> = events_of(&bytes).await.into_iter().map(|e| e["text"].clone()).collect();
    assert_eq!(texts, ["before", "after"]);
}

#[tokio::test]
async fn tool_output_is_capped_with_a_note() {
    let output = "é".repeat(100_000); // 200 000 bytes
    let line = serde_json::json!({"type": "user", "message": {"content": [
        {"type": "tool_result", "tool_use_id": "t", "content": output}
    ]}});
    let events = events_of(line.to_string().as_bytes()).await;
    let content = events[0]["content"].as_str().unwrap();
    assert!(content.len() < TOOL_RESULT_CAP + 100, "{}", content.len());
    assert!(content.starts_with("éé"));
    assert!(
        content.ends_with(&format!("[{} more bytes not shown]", 200_000 - TOOL_RESULT_CAP)),
        "{}",
        &content[content.len() - 60..]
    );
}

#[tokio::test]
async fn is_error_on_a_success_subtype_is_kept() {
    // What the real CLI prints without credentials: an error on a `success` subtype.
    let line = r#"{"type":"result","subtype":"success","is_error":true,"duration_ms":12,"num_turns":1,"result":"Not logged in · Please run /login","total_cost_usd":0}"#;
    let events = events_of(line.as_bytes()).await;
    assert_eq!(events[0]["is_error"], true);
    assert_eq!(events[0]["subtype"], "success");
    assert_eq!(events[0]["result"], "Not logged in · Please run /login");
}
