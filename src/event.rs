//! The events of a session's log: the vocabulary of README "API" (events).
//!
//! [`Event`] is the domain type; [`Event::to_json`] is the one place that
//! gives it its JSON form (the `data:` of an SSE frame, and what storage
//! keeps). Fields are added over time; clients ignore what they do not know.

use std::sync::Arc;

use serde_json::{Map, Value, json};

/// Position of an event in its session's log: 0, 1, 2, … with no gaps.
pub type EventId = u64;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A prompt, logged before the turn starts, with the identity that sent it.
    User {
        text: String,
        by: String,
    },
    /// The agent CLI's own session id, from its `system/init` line.
    Session {
        session_id: String,
    },
    /// Progress that is not the agent's words, such as an API retry.
    Status {
        text: String,
    },
    /// A whole text block of the agent's reply. `message_id` (the model
    /// API's message id) and `index` (the block's position in that message)
    /// name the block whose [`Delta`]s it completes, when the agent said so.
    Text {
        text: String,
        message_id: Option<String>,
        index: Option<u64>,
    },
    Tool {
        name: String,
        input: Value,
        tool_use_id: String,
    },
    ToolResult {
        tool_use_id: String,
        is_error: bool,
        content: String,
    },
    Result(TurnResult),
    Error {
        error: String,
    },
    Cancelled,
    /// Always the last event of a turn, however it ended.
    TurnEnd,
    /// A tool call waits for the operator (README "Approvals").
    Approval {
        tool_use_id: String,
        tool: String,
        input: Value,
        reason: String,
        /// What it would do, in plain words, where the policy knows.
        effect: Option<String>,
        /// When it is denied unless decided (ms since the epoch).
        deadline_ms: i64,
    },
    /// The one decision on an [`Event::Approval`].
    ApprovalDecision {
        tool_use_id: String,
        decision: Decision,
        /// The operator's identity, `timeout`, `turn-ended` or `restart`.
        by: String,
        at_ms: i64,
        /// The operator's words to the agent.
        message: Option<String>,
    },
}

/// An approval's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// The agent's summary of a turn (its `result` line).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TurnResult {
    pub is_error: bool,
    pub result: String,
    pub subtype: Option<String>,
    pub duration_ms: Option<u64>,
    pub num_turns: Option<u64>,
    pub total_cost_usd: Option<f64>,
}

impl Event {
    /// The `kind` field, which clients switch on.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::User { .. } => "user",
            Event::Session { .. } => "session",
            Event::Status { .. } => "status",
            Event::Text { .. } => "text",
            Event::Tool { .. } => "tool",
            Event::ToolResult { .. } => "tool_result",
            Event::Result(_) => "result",
            Event::Error { .. } => "error",
            Event::Cancelled => "cancelled",
            Event::TurnEnd => "turn_end",
            Event::Approval { .. } => "approval",
            Event::ApprovalDecision { .. } => "approval_decision",
        }
    }

    /// The JSON object of this event with its log position, as clients see it.
    pub fn to_json(&self, id: EventId) -> Value {
        let mut obj = Map::new();
        obj.insert("kind".into(), self.kind().into());
        let mut put = |key: &str, value: Value| {
            obj.insert(key.into(), value);
        };
        match self {
            Event::User { text, by } => {
                put("text", json!(text));
                put("by", json!(by));
            }
            Event::Session { session_id } => put("session_id", json!(session_id)),
            Event::Status { text } => put("text", json!(text)),
            Event::Text { text, message_id, index } => {
                put("text", json!(text));
                if let Some(message_id) = message_id {
                    put("message_id", json!(message_id));
                }
                if let Some(index) = index {
                    put("index", json!(index));
                }
            }
            Event::Tool { name, input, tool_use_id } => {
                put("name", json!(name));
                put("input", input.clone());
                put("tool_use_id", json!(tool_use_id));
            }
            Event::ToolResult { tool_use_id, is_error, content } => {
                put("tool_use_id", json!(tool_use_id));
                put("is_error", json!(is_error));
                put("content", json!(content));
            }
            Event::Result(r) => {
                put("is_error", json!(r.is_error));
                put("result", json!(r.result));
                put("subtype", json!(r.subtype));
                put("duration_ms", json!(r.duration_ms));
                put("num_turns", json!(r.num_turns));
                put("total_cost_usd", json!(r.total_cost_usd));
            }
            Event::Error { error } => put("error", json!(error)),
            Event::Cancelled | Event::TurnEnd => {}
            Event::Approval { tool_use_id, tool, input, reason, effect, deadline_ms } => {
                put("tool_use_id", json!(tool_use_id));
                put("tool", json!(tool));
                put("input", input.clone());
                put("reason", json!(reason));
                if let Some(effect) = effect {
                    put("effect", json!(effect));
                }
                put("deadline_ms", json!(deadline_ms));
            }
            Event::ApprovalDecision { tool_use_id, decision, by, at_ms, message } => {
                put("tool_use_id", json!(tool_use_id));
                put("decision", json!(decision.as_str()));
                put("by", json!(by));
                put("at_ms", json!(at_ms));
                if let Some(message) = message {
                    put("message", json!(message));
                }
            }
        }
        obj.insert("id".into(), id.into());
        Value::Object(obj)
    }
}

/// New characters of a text block while the model writes it (README, "API"):
/// sent to the clients attached now, never logged nor replayed. The block's
/// [`Event::Text`] (same `message_id` and `index`) replaces them.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub message_id: String,
    pub index: u64,
    pub text: String,
}

impl Delta {
    /// The `data:` of a `delta` frame.
    pub fn to_json(&self) -> Value {
        json!({"message_id": self.message_id, "index": self.index, "text": self.text})
    }
}

/// An event as appended: its id and its JSON, encoded once and shared by
/// every client it is sent to.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: EventId,
    pub json: Arc<str>,
}

impl Stored {
    /// Encodes an event as appended now: its JSON with its id and `at`, the
    /// time it entered the log (RFC 3339, UTC), which the transcript and its
    /// export read as the incident's timeline.
    pub fn new(id: EventId, event: &Event) -> Self {
        Encoded::new(event).stored(id, Stamp::default().at(crate::util::now_ms()))
    }
}

/// An event's JSON less its `id` and `at`, encoded by its producer: the
/// store's single writer thread (ARCHITECTURE.md, storage) then only splices
/// those two in, so that encoding never holds up the writes of other
/// sessions. The result is byte for byte what [`Event::to_json`] with `at`
/// added gives: the keys in sorted order (serde_json's `Map`), compact. It
/// is written directly, member by member, without building that `Map`.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The `"key":value` members before `at`, between `at` and `id`, and
    /// after `id`, one after the other; each of the three comma-separated.
    members: String,
    /// Where the members between `at` and `id` start in `members`.
    at: usize,
    /// Where the members after `id` start.
    id: usize,
}

/// One member's value, as [`Encoded::new`] writes it.
#[derive(Debug, Clone, Copy)]
enum Member<'a> {
    Str(&'a str),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Null,
    Json(&'a Value),
    /// Where `at` goes.
    At,
    /// Where `id` goes.
    Id,
}

/// The most members an event has, `kind`, `at` and `id` included.
const MEMBERS: usize = 10;

impl Event {
    /// Every member of this event's JSON, `kind` first, then as
    /// [`Event::to_json`] puts them (their order is sorted later).
    fn members<'a>(&'a self) -> ([(&'static str, Member<'a>); MEMBERS], usize) {
        fn opt_str(value: &Option<String>) -> Member<'_> {
            value.as_deref().map_or(Member::Null, Member::Str)
        }
        fn opt_u64<'a>(value: Option<u64>) -> Member<'a> {
            value.map_or(Member::Null, Member::U64)
        }
        let mut list = [("", Member::Null); MEMBERS];
        let mut len = 0;
        let mut put = |key: &'static str, value: Member<'a>| {
            list[len] = (key, value);
            len += 1;
        };
        put("at", Member::At);
        put("id", Member::Id);
        put("kind", Member::Str(self.kind()));
        match self {
            Event::User { text, by } => {
                put("text", Member::Str(text));
                put("by", Member::Str(by));
            }
            Event::Session { session_id } => put("session_id", Member::Str(session_id)),
            Event::Status { text } => put("text", Member::Str(text)),
            Event::Text { text, message_id, index } => {
                put("text", Member::Str(text));
                if let Some(message_id) = message_id {
                    put("message_id", Member::Str(message_id));
                }
                if let Some(index) = index {
                    put("index", Member::U64(*index));
                }
            }
            Event::Tool { name, input, tool_use_id } => {
                put("name", Member::Str(name));
                put("input", Member::Json(input));
                put("tool_use_id", Member::Str(tool_use_id));
            }
            Event::ToolResult { tool_use_id, is_error, content } => {
                put("tool_use_id", Member::Str(tool_use_id));
                put("is_error", Member::Bool(*is_error));
                put("content", Member::Str(content));
            }
            Event::Result(r) => {
                put("is_error", Member::Bool(r.is_error));
                put("result", Member::Str(&r.result));
                put("subtype", opt_str(&r.subtype));
                put("duration_ms", opt_u64(r.duration_ms));
                put("num_turns", opt_u64(r.num_turns));
                put("total_cost_usd", r.total_cost_usd.map_or(Member::Null, Member::F64));
            }
            Event::Error { error } => put("error", Member::Str(error)),
            Event::Cancelled | Event::TurnEnd => {}
            Event::Approval { tool_use_id, tool, input, reason, effect, deadline_ms } => {
                put("tool_use_id", Member::Str(tool_use_id));
                put("tool", Member::Str(tool));
                put("input", Member::Json(input));
                put("reason", Member::Str(reason));
                if let Some(effect) = effect {
                    put("effect", Member::Str(effect));
                }
                put("deadline_ms", Member::I64(*deadline_ms));
            }
            Event::ApprovalDecision { tool_use_id, decision, by, at_ms, message } => {
                put("tool_use_id", Member::Str(tool_use_id));
                put("decision", Member::Str(decision.as_str()));
                put("by", Member::Str(by));
                put("at_ms", Member::I64(*at_ms));
                if let Some(message) = message {
                    put("message", Member::Str(message));
                }
            }
        }
        (list, len)
    }
}

impl Encoded {
    pub fn new(event: &Event) -> Self {
        let (mut list, len) = event.members();
        let list = &mut list[..len];
        // The order serde_json's `Map` (a `BTreeMap` of `String`s) gives.
        list.sort_unstable_by_key(|(key, _)| *key);
        let mut out: Vec<u8> = Vec::with_capacity(128);
        let (mut at, mut id, mut first) = (0, 0, true);
        for (key, value) in list.iter() {
            match value {
                Member::At => (at, first) = (out.len(), true),
                Member::Id => (id, first) = (out.len(), true),
                value => {
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    write_json(&mut out, key);
                    out.push(b':');
                    match *value {
                        Member::Str(text) => write_json(&mut out, text),
                        Member::U64(n) => write_json(&mut out, &n),
                        Member::I64(n) => write_json(&mut out, &n),
                        Member::F64(n) => write_json(&mut out, &n),
                        Member::Bool(b) => write_json(&mut out, &b),
                        Member::Null | Member::At | Member::Id => out.extend_from_slice(b"null"),
                        Member::Json(value) => write_json(&mut out, value),
                    }
                }
            }
        }
        // serde_json writes UTF-8 only; the fallback is never taken.
        let members = String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Encoded { members, at, id }
    }

    /// The stored JSON with `id` and `at` (already RFC 3339) in their places.
    pub fn stored(&self, id: EventId, at: &str) -> Stored {
        use std::fmt::Write;
        let (before, middle, after) =
            (&self.members[..self.at], &self.members[self.at..self.id], &self.members[self.id..]);
        let mut json = String::with_capacity(self.members.len() + at.len() + 40);
        json.push('{');
        if !before.is_empty() {
            json.push_str(before);
            json.push(',');
        }
        json.push_str("\"at\":\"");
        json.push_str(at);
        json.push('"');
        if !middle.is_empty() {
            json.push(',');
            json.push_str(middle);
        }
        // Writing to a String cannot fail.
        let _ = write!(json, ",\"id\":{id}");
        if !after.is_empty() {
            json.push(',');
            json.push_str(after);
        }
        json.push('}');
        Stored { id, json: json.into() }
    }
}

/// Appends `value` as serde_json encodes it (compact).
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing to a Vec cannot fail, nor can encoding a string, a number or
    // a `Value` (its keys are strings).
    let _ = serde_json::to_writer(out, value);
}

/// The RFC 3339 text of the last millisecond asked for: the writer thread
/// stamps thousands of events a second, most within the same millisecond.
#[derive(Debug, Default)]
pub struct Stamp {
    ms: Option<i64>,
    text: String,
}

impl Stamp {
    /// `ms` (since the epoch) as `at` gives it: RFC 3339, UTC, milliseconds.
    pub fn at(&mut self, ms: i64) -> &str {
        if self.ms != Some(ms) {
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            self.text = humantime::format_rfc3339_millis(time).to_string();
            self.ms = Some(ms);
        }
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON as it was encoded before the producer did it: the whole
    /// object with `at` inserted, serialized at once.
    fn whole(id: EventId, event: &Event, at: &str) -> String {
        let mut json = event.to_json(id);
        json.as_object_mut().unwrap().insert("at".into(), at.into());
        json.to_string()
    }

    #[test]
    fn an_encoded_event_with_its_id_and_at_is_byte_identical_to_its_whole_json_for_every_kind() {
        let input = json!({"command": "df -h", "quote\"": "a\nb"});
        let events = [
            Event::User { text: "disk \"full\"\n".into(), by: "alice".into() },
            Event::Session { session_id: "s-1".into() },
            Event::Status { text: "retrying".into() },
            Event::Text { text: "é ✓ \u{1}".into(), message_id: Some("m".into()), index: Some(2) },
            Event::Text { text: String::new(), message_id: None, index: None },
            Event::Tool { name: "Bash".into(), input: input.clone(), tool_use_id: "t".into() },
            Event::ToolResult { tool_use_id: "t".into(), is_error: true, content: "no".into() },
            Event::Result(TurnResult { result: "done".into(), total_cost_usd: Some(0.5), ..TurnResult::default() }),
            Event::Error { error: "boom".into() },
            Event::Cancelled,
            Event::TurnEnd,
            Event::Approval {
                tool_use_id: "t".into(),
                tool: "Bash".into(),
                input,
                reason: "writes".into(),
                effect: Some("deletes".into()),
                deadline_ms: 7,
            },
            Event::ApprovalDecision {
                tool_use_id: "t".into(),
                decision: Decision::Deny,
                by: "timeout".into(),
                at_ms: 9,
                message: Some("no".into()),
            },
            // Every character serde_json escapes, and some it does not.
            Event::Text { text: (0u8..0x80).map(char::from).collect(), message_id: None, index: Some(0) },
            Event::Text {
                text: "\\ / \u{7f} \u{80} \u{2028} \u{fffd} 😀".into(),
                message_id: Some("\"".into()),
                index: None,
            },
            Event::Tool {
                name: "Edit".into(),
                input: json!({"z": [1, -2, 2.5, 1e300, null, true], "a\u{1}\"": {"y": "é", "b": {}}, "": []}),
                tool_use_id: String::new(),
            },
            Event::Tool { name: "Bash".into(), input: Value::Null, tool_use_id: "t".into() },
            Event::ToolResult { tool_use_id: "t".into(), is_error: false, content: "\t\r\n\u{8}\u{c}".into() },
            Event::Result(TurnResult::default()),
            Event::Result(TurnResult {
                is_error: true,
                result: "r".into(),
                subtype: Some("error_max_turns".into()),
                duration_ms: Some(u64::MAX),
                num_turns: Some(0),
                total_cost_usd: Some(f64::NAN),
            }),
            Event::Result(TurnResult { total_cost_usd: Some(1e-7), ..TurnResult::default() }),
            Event::Result(TurnResult { total_cost_usd: Some(3.0), ..TurnResult::default() }),
            Event::Approval {
                tool_use_id: "t".into(),
                tool: "Bash".into(),
                input: json!("just a string"),
                reason: String::new(),
                effect: None,
                deadline_ms: -5,
            },
            Event::ApprovalDecision {
                tool_use_id: "t".into(),
                decision: Decision::Allow,
                by: "alice".into(),
                at_ms: i64::MIN,
                message: None,
            },
        ];
        let at = Stamp::default().at(1_700_000_000_123).to_owned();
        assert_eq!(at, "2023-11-14T22:13:20.123Z");
        for event in &events {
            for id in [0, 41_234, u64::MAX] {
                let stored = Encoded::new(event).stored(id, &at);
                assert_eq!(&*stored.json, whole(id, event, &at), "{event:?}");
                assert_eq!(stored.id, id);
            }
        }
    }
}
