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
/// added gives: the keys in sorted order (serde_json's `Map`), compact.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The `"key":value` members before `at`, between `at` and `id`, and
    /// after `id`, each comma-separated.
    parts: [String; 3],
}

impl Encoded {
    pub fn new(event: &Event) -> Self {
        let mut parts: [String; 3] = Default::default();
        if let Value::Object(obj) = event.to_json(0) {
            for (key, value) in obj.iter().filter(|(key, _)| key.as_str() != "id") {
                let part = &mut parts[usize::from(key.as_str() > "at") + usize::from(key.as_str() > "id")];
                if !part.is_empty() {
                    part.push(',');
                }
                // Writing to a String cannot fail, nor can encoding a Value.
                part.push_str(&Value::String(key.clone()).to_string());
                part.push(':');
                part.push_str(&value.to_string());
            }
        }
        Encoded { parts }
    }

    /// The stored JSON with `id` and `at` (already RFC 3339) in their places.
    pub fn stored(&self, id: EventId, at: &str) -> Stored {
        let [before, middle, after] = &self.parts;
        let at = format!("\"at\":\"{at}\"");
        let id_member = format!("\"id\":{id}");
        let mut json =
            String::with_capacity(before.len() + middle.len() + after.len() + at.len() + id_member.len() + 6);
        json.push('{');
        for member in [before, &at, middle, &id_member, after].into_iter().filter(|m| !m.is_empty()) {
            if json.len() > 1 {
                json.push(',');
            }
            json.push_str(member);
        }
        json.push('}');
        Stored { id, json: json.into() }
    }
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
    fn an_encoded_event_with_its_id_and_at_is_byte_identical_to_its_whole_json() {
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
