//! One line of the agent CLI's `--output-format stream-json --verbose`
//! output (with `--include-partial-messages`, its `stream_event` lines too),
//! parsed. This is the only module that knows that format.
//!
//! The parse is lenient by design: keys come in any order, fields may be
//! missing or `null`, and a line that is not a JSON object is simply not an
//! [`AgentLine`]. Nothing here can fail the turn.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum AgentLine {
    /// `system` / `init`: the CLI's session id.
    Init {
        session_id: String,
    },
    /// `system` / `api_retry`: the CLI is retrying the model API.
    ApiRetry {
        attempt: Option<u64>,
        max_retries: Option<u64>,
        error: Option<String>,
    },
    /// Any other `system` line (hooks, compaction, the `requesting` status
    /// printed before each API request…).
    OtherSystem,
    /// An `assistant` message's content blocks, in order. With partial
    /// messages the CLI prints one such line per block, after the block's
    /// last delta and before its `content_block_stop`.
    Assistant {
        /// `message.id`: the model API's id of the message.
        message_id: Option<String>,
        blocks: Vec<Block>,
    },
    /// A `stream_event` line: one raw event of the model API's stream.
    Stream {
        /// `api_message_id`, which the CLI adds to some stream events.
        message_id: Option<String>,
        event: StreamEvent,
    },
    /// The `tool_result` blocks of a `user` message (the tools' answers).
    ToolResults {
        results: Vec<ToolResult>,
    },
    Result(ResultLine),
    /// Any type this version does not know.
    Other,
}

/// The model API's stream events that matter here (the Messages API's
/// streaming format).
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// `message_start`: `message.id` names the message the next blocks belong to.
    MessageStart { message_id: Option<String> },
    /// `content_block_start`: block `index` begins.
    BlockStart { index: u64 },
    /// `content_block_delta` with a `text_delta`: characters of text block `index`.
    TextDelta { index: u64, text: String },
    /// Every other event (tool input, thinking, stops, pings…).
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    /// Thinking, images, and blocks of kinds not known here.
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub tool_use_id: String,
    pub is_error: bool,
    /// The result's content flattened to text, uncapped.
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultLine {
    pub subtype: Option<String>,
    pub is_error: bool,
    /// The `result` text, or the `errors` joined by newlines when there is none.
    pub result: String,
    pub duration_ms: Option<u64>,
    pub num_turns: Option<u64>,
    pub total_cost_usd: Option<f64>,
}

/// The CLI's complaint, on stderr, when `--session-id` names a session it
/// already has (it then prints nothing on stdout and exits 1).
pub fn is_session_in_use(stderr: &str) -> bool {
    stderr.contains("Session ID") && stderr.contains("is already in use")
}

/// Parses one line (without its newline). `None` when it is blank, not
/// UTF-8, not JSON, or JSON that is not an object.
pub fn parse(raw: &[u8]) -> Option<AgentLine> {
    let value: Value = serde_json::from_slice(raw).ok()?;
    let Value::Object(obj) = value else {
        return None;
    };
    Some(match str_field(&obj, "type") {
        Some("system") => system(&obj),
        Some("assistant") => AgentLine::Assistant {
            message_id: obj.get("message").and_then(|m| m.get("id")).and_then(Value::as_str).map(str::to_owned),
            blocks: content(&obj).iter().map(block).collect(),
        },
        Some("stream_event") => AgentLine::Stream {
            message_id: str_field(&obj, "api_message_id").map(str::to_owned),
            event: obj.get("event").map_or(StreamEvent::Other, stream_event),
        },
        Some("user") => AgentLine::ToolResults { results: content(&obj).iter().filter_map(tool_result).collect() },
        Some("result") => AgentLine::Result(result(&obj)),
        _ => AgentLine::Other,
    })
}

fn system(obj: &Map<String, Value>) -> AgentLine {
    match str_field(obj, "subtype") {
        Some("init") => match str_field(obj, "session_id") {
            Some(id) => AgentLine::Init { session_id: id.to_owned() },
            None => AgentLine::OtherSystem,
        },
        Some("api_retry") => AgentLine::ApiRetry {
            attempt: obj.get("attempt").and_then(Value::as_u64),
            max_retries: obj.get("max_retries").and_then(Value::as_u64),
            error: obj.get("error").and_then(describe_error),
        },
        _ => AgentLine::OtherSystem,
    }
}

fn stream_event(event: &Value) -> StreamEvent {
    let index = event.get("index").and_then(Value::as_u64);
    match (event.get("type").and_then(Value::as_str), index) {
        (Some("message_start"), _) => StreamEvent::MessageStart {
            message_id: event.get("message").and_then(|m| m.get("id")).and_then(Value::as_str).map(str::to_owned),
        },
        (Some("content_block_start"), Some(index)) => StreamEvent::BlockStart { index },
        (Some("content_block_delta"), Some(index)) => {
            let delta = event.get("delta");
            match (
                delta.and_then(|d| d.get("type")).and_then(Value::as_str),
                delta.and_then(|d| d.get("text")).and_then(Value::as_str),
            ) {
                (Some("text_delta"), Some(text)) => StreamEvent::TextDelta { index, text: text.to_owned() },
                _ => StreamEvent::Other,
            }
        }
        _ => StreamEvent::Other,
    }
}

/// `message.content` of an `assistant` or `user` line, or nothing.
fn content(obj: &Map<String, Value>) -> &[Value] {
    obj.get("message").and_then(|m| m.get("content")).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn block(value: &Value) -> Block {
    match value.get("type").and_then(Value::as_str) {
        Some("text") => Block::Text(value.get("text").and_then(Value::as_str).unwrap_or_default().to_owned()),
        Some("tool_use") => Block::ToolUse {
            id: string_or_empty(value.get("id")),
            name: string_or_empty(value.get("name")),
            input: value.get("input").cloned().unwrap_or(Value::Null),
        },
        _ => Block::Other,
    }
}

fn tool_result(value: &Value) -> Option<ToolResult> {
    if value.get("type").and_then(Value::as_str) != Some("tool_result") {
        return None;
    }
    Some(ToolResult {
        tool_use_id: string_or_empty(value.get("tool_use_id")),
        is_error: value.get("is_error").and_then(Value::as_bool).unwrap_or(false),
        content: flatten_content(value.get("content")),
    })
}

/// Tool output is a string or a list of blocks; text blocks are kept, other
/// blocks are named so the reader knows something was there.
fn flatten_content(content: Option<&Value>) -> String {
    match content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|b| match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                (_, Some(text)) => text.to_owned(),
                (Some(kind), None) => format!("[{kind}]"),
                (None, None) => b.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.to_string(),
    }
}

fn result(obj: &Map<String, Value>) -> ResultLine {
    let text = match obj.get("result") {
        Some(Value::String(s)) => s.clone(),
        _ => obj
            .get("errors")
            .and_then(Value::as_array)
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
    };
    ResultLine {
        subtype: str_field(obj, "subtype").map(str::to_owned),
        is_error: obj.get("is_error").and_then(Value::as_bool).unwrap_or(false),
        result: text,
        duration_ms: obj.get("duration_ms").and_then(Value::as_u64),
        num_turns: obj.get("num_turns").and_then(Value::as_u64),
        total_cost_usd: obj.get("total_cost_usd").and_then(Value::as_f64),
    }
}

/// An API error is a string, or an object with a type or message.
fn describe_error(error: &Value) -> Option<String> {
    match error {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => ["type", "message"]
            .iter()
            .find_map(|k| o.get(*k).and_then(Value::as_str).map(str::to_owned))
            .or_else(|| Some(error.to_string())),
        other => Some(other.to_string()),
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

fn string_or_empty(value: Option<&Value>) -> String {
    value.and_then(Value::as_str).unwrap_or_default().to_owned()
}
