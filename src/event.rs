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
        let mut json = event.to_json(id);
        if let Some(obj) = json.as_object_mut() {
            obj.insert("at".into(), humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string().into());
        }
        Stored { id, json: json.to_string().into() }
    }
}
