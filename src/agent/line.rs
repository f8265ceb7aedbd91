//! One line of the agent CLI's `--output-format stream-json --verbose`
//! output (with `--include-partial-messages`, its `stream_event` lines too),
//! parsed. This is the only module that knows that format.
//!
//! The parse is lenient by design: keys come in any order, fields may be
//! missing or `null`, and a line that is not a JSON object is simply not an
//! [`AgentLine`]. Nothing here can fail the turn.
//!
//! Every line of a flooding agent comes through here, so the usual line is
//! read straight into the few fields it has, its strings borrowed from the
//! line where they hold no escapes ([`fast`]), rather than built into a
//! whole `serde_json::Value` first. A line that does not fit those fields'
//! types (a number where a string was expected, a duplicated key, content
//! that is not a list…) is read again the lenient way ([`lenient`]), so that
//! what a line means never depends on which of the two read it.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
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
    // Checked once here, so that neither reading checks each string again.
    let text = std::str::from_utf8(raw).ok()?;
    fast(text).ok().or_else(|| lenient(text))
}

/// The lenient reading: the whole line as a `Value`, then its fields, each
/// taken only where it has the type expected and ignored otherwise.
fn lenient(text: &str) -> Option<AgentLine> {
    let value: Value = serde_json::from_str(text).ok()?;
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

/// The direct reading: the fields that matter, typed, and nothing else
/// built. An error means "read it the lenient way", not "skip it": where
/// this succeeds it gives what [`lenient`] gives (the tests below hold the
/// two to that), and it fails on everything it cannot say the same about.
fn fast(text: &str) -> serde_json::Result<AgentLine> {
    let line: RawLine<'_> = serde_json::from_str(text)?;
    Ok(match line.kind.as_deref() {
        Some("system") => match line.subtype.as_deref() {
            Some("init") => match line.session_id {
                Some(id) => AgentLine::Init { session_id: id.into_owned() },
                None => AgentLine::OtherSystem,
            },
            Some("api_retry") => AgentLine::ApiRetry {
                attempt: line.attempt,
                max_retries: line.max_retries,
                error: line.error.as_ref().and_then(describe_error),
            },
            _ => AgentLine::OtherSystem,
        },
        Some("assistant") => {
            let (message_id, content) = line.message.map_or((None, None), |m| (m.id, m.content));
            AgentLine::Assistant {
                message_id: message_id.map(Str::into_owned),
                blocks: content.unwrap_or_default().into_iter().map(RawBlock::block).collect(),
            }
        }
        Some("stream_event") => AgentLine::Stream {
            message_id: line.api_message_id.map(Str::into_owned),
            event: line.event.map_or(StreamEvent::Other, RawStreamEvent::event),
        },
        Some("user") => AgentLine::ToolResults {
            results: line
                .message
                .and_then(|m| m.content)
                .unwrap_or_default()
                .into_iter()
                .filter_map(RawBlock::tool_result)
                .collect(),
        },
        Some("result") => AgentLine::Result(ResultLine {
            subtype: line.subtype.map(Str::into_owned),
            is_error: line.is_error.unwrap_or(false),
            result: match line.result {
                Some(Value::String(text)) => text,
                _ => match line.errors {
                    Some(Value::Array(errors)) => errors
                        .iter()
                        .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    _ => String::new(),
                },
            },
            duration_ms: line.duration_ms,
            num_turns: line.num_turns,
            total_cost_usd: line.total_cost_usd,
        }),
        _ => AgentLine::Other,
    })
}

/// A string of the line: borrowed when it holds no escapes.
struct Str<'de>(Cow<'de, str>);

impl Str<'_> {
    fn into_owned(self) -> String {
        self.0.into_owned()
    }
}

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

/// Any JSON value, read and dropped. Read in full (numbers parsed, strings
/// unescaped), not merely skipped: a line the lenient reading refuses (a
/// number out of range, a lone surrogate in an escape) is refused here too,
/// wherever it hides.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SkipVisitor;
        impl<'de> Visitor<'de> for SkipVisitor {
            type Value = Skip;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_unit<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_none<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Skip, D::Error> {
                Skip::deserialize(deserializer)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Skip)
            }
        }
        deserializer.deserialize_any(SkipVisitor)
    }
}

/// A JSON object read into the named fields of a struct (each an
/// `Option`: missing and `null` are both `None`). Only an object is
/// accepted (serde's derive would also take a list, by position); a key
/// given twice keeps its last value, as `serde_json::Map` does; other keys
/// are read whole and dropped.
macro_rules! object {
    ($(#[$doc:meta])* $name:ident { $($key:literal => $field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Default)]
        struct $name<'de> {
            $($field: Option<$ty>,)*
            _line: PhantomData<&'de str>,
        }

        impl<'de> Deserialize<'de> for $name<'de> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct ObjectVisitor;
                impl<'de> Visitor<'de> for ObjectVisitor {
                    type Value = $name<'de>;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$name<'de>, A::Error> {
                        let mut object = $name::default();
                        while let Some(key) = map.next_key::<Str<'de>>()? {
                            match &*key {
                                $($key => object.$field = map.next_value()?,)*
                                _ => {
                                    map.next_value::<Skip>()?;
                                }
                            }
                        }
                        Ok(object)
                    }
                }
                deserializer.deserialize_map(ObjectVisitor)
            }
        }
    };
}

object! {
    /// A line's top level: the fields of every type it may be.
    RawLine {
        "type" => kind: Str<'de>,
        "subtype" => subtype: Str<'de>,
        "session_id" => session_id: Str<'de>,
        "attempt" => attempt: u64,
        "max_retries" => max_retries: u64,
        "error" => error: Value,
        "message" => message: RawMessage<'de>,
        "api_message_id" => api_message_id: Str<'de>,
        "event" => event: RawStreamEvent<'de>,
        "is_error" => is_error: bool,
        "result" => result: Value,
        "errors" => errors: Value,
        "duration_ms" => duration_ms: u64,
        "num_turns" => num_turns: u64,
        "total_cost_usd" => total_cost_usd: f64,
    }
}

object! {
    /// `message` of an `assistant` or `user` line, or of a `message_start`.
    RawMessage {
        "id" => id: Str<'de>,
        "content" => content: Vec<RawBlock<'de>>,
    }
}

object! {
    /// One content block of a message.
    RawBlock {
        "type" => kind: Str<'de>,
        "text" => text: Str<'de>,
        "id" => id: Str<'de>,
        "name" => name: Str<'de>,
        "input" => input: Value,
        "tool_use_id" => tool_use_id: Str<'de>,
        "is_error" => is_error: bool,
        "content" => content: Value,
    }
}

object! {
    /// `event` of a `stream_event` line.
    RawStreamEvent {
        "type" => kind: Str<'de>,
        "index" => index: u64,
        "message" => message: RawMessage<'de>,
        "delta" => delta: RawDelta<'de>,
    }
}

object! {
    /// `delta` of a `content_block_delta`.
    RawDelta {
        "type" => kind: Str<'de>,
        "text" => text: Str<'de>,
    }
}

fn owned_or_empty(text: Option<Str<'_>>) -> String {
    text.map(Str::into_owned).unwrap_or_default()
}

impl RawBlock<'_> {
    fn block(self) -> Block {
        match self.kind.as_deref() {
            Some("text") => Block::Text(owned_or_empty(self.text)),
            Some("tool_use") => Block::ToolUse {
                id: owned_or_empty(self.id),
                name: owned_or_empty(self.name),
                input: self.input.unwrap_or(Value::Null),
            },
            _ => Block::Other,
        }
    }

    fn tool_result(self) -> Option<ToolResult> {
        if self.kind.as_deref() != Some("tool_result") {
            return None;
        }
        Some(ToolResult {
            tool_use_id: owned_or_empty(self.tool_use_id),
            is_error: self.is_error.unwrap_or(false),
            content: match self.content {
                Some(Value::String(text)) => text,
                other => flatten_content(other.as_ref()),
            },
        })
    }
}

impl RawStreamEvent<'_> {
    fn event(self) -> StreamEvent {
        match (self.kind.as_deref(), self.index) {
            (Some("message_start"), _) => {
                StreamEvent::MessageStart { message_id: self.message.and_then(|m| m.id).map(Str::into_owned) }
            }
            (Some("content_block_start"), Some(index)) => StreamEvent::BlockStart { index },
            (Some("content_block_delta"), Some(index)) => match self.delta {
                Some(RawDelta { kind: Some(kind), text: Some(text), .. }) if &*kind == "text_delta" => {
                    StreamEvent::TextDelta { index, text: text.into_owned() }
                }
                _ => StreamEvent::Other,
            },
            _ => StreamEvent::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both readings of a line: the direct one where it succeeds, and the
    /// lenient one, which defines what the line means.
    fn both(line: &str) -> (Option<AgentLine>, Option<AgentLine>) {
        (fast(line).ok(), lenient(line))
    }

    /// Where the direct reading succeeds it says what the lenient one says,
    /// and `parse` always says what the lenient one says.
    fn agrees(line: &str) -> Option<AgentLine> {
        let (fast, lenient) = both(line);
        if let Some(fast) = &fast {
            assert_eq!(Some(fast), lenient.as_ref(), "the two readings differ on {line}");
        }
        assert_eq!(parse(line.as_bytes()), lenient, "{line}");
        lenient
    }

    fn transcripts() -> Vec<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/transcripts");
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".jsonl") && !name.ends_with(".expected.jsonl") {
                let bytes = std::fs::read(&path).unwrap();
                lines.extend(bytes.split(|b| *b == b'\n').map(|l| String::from_utf8_lossy(l).into_owned()));
            }
        }
        assert!(lines.len() > 50, "{}", lines.len());
        lines
    }

    #[test]
    fn both_readings_agree_on_every_recorded_line() {
        for line in transcripts() {
            agrees(&line);
        }
    }

    /// The lines an agent prints most take the direct road.
    #[test]
    fn the_usual_lines_are_read_directly() {
        let usual = transcripts()
            .into_iter()
            .filter(|l| l.starts_with('{') && !l.contains("\"content\":\"") && l.ends_with('}'))
            .collect::<Vec<_>>();
        assert!(usual.len() > 40, "{}", usual.len());
        for line in usual {
            assert!(fast(&line).is_ok(), "{line}: {:?}", fast(&line).err());
        }
    }

    #[test]
    fn keys_in_any_order_and_strings_with_escapes() {
        let line = r#"{"message":{"content":[{"text":"a \"quoted\"\nline \u00e9\ud83d\ude00","type":"text"}],"id":"m\u0031"},"type":"assistant"}"#;
        assert!(fast(line).is_ok());
        assert_eq!(
            agrees(line),
            Some(AgentLine::Assistant {
                message_id: Some("m1".into()),
                blocks: vec![Block::Text("a \"quoted\"\nline é😀".into())]
            })
        );
        // An escaped key means the same key.
        assert_eq!(
            agrees(r#"{"typ\u0065":"result","result":"ok"}"#).map(|l| matches!(l, AgentLine::Result(_))),
            Some(true)
        );
    }

    /// A key given twice keeps its last value (serde_json's `Map` does so),
    /// whichever reading reads it.
    #[test]
    fn a_duplicated_key_keeps_its_last_value() {
        assert_eq!(
            agrees(r#"{"type":"system","subtype":"init","session_id":"first","session_id":"last"}"#),
            Some(AgentLine::Init { session_id: "last".into() })
        );
        assert_eq!(
            agrees(r#"{"type":"user","type":"result","result":"r"}"#).map(|l| matches!(l, AgentLine::Result(_))),
            Some(true)
        );
        // The earlier value of the wrong type is forgotten too.
        assert_eq!(
            agrees(r#"{"type":"system","subtype":"init","session_id":5,"session_id":"s"}"#),
            Some(AgentLine::Init { session_id: "s".into() })
        );
        assert_eq!(
            agrees(r#"{"type":"system","subtype":"init","session_id":"s","session_id":5}"#),
            Some(AgentLine::OtherSystem)
        );
    }

    /// A field that is missing, `null` or of another type is as if absent,
    /// and the rest of the line is still read.
    #[test]
    fn missing_null_and_mistyped_fields_do_not_fail_the_line() {
        let text = |t: &str| Some(AgentLine::Assistant { message_id: None, blocks: vec![Block::Text(t.into())] });
        assert_eq!(
            agrees(r#"{"type":"assistant","message":{"id":null,"content":[{"type":"text","text":"a"}]}}"#),
            text("a")
        );
        assert_eq!(
            agrees(r#"{"type":"assistant","message":{"id":7,"content":[{"type":"text","text":"a"}]}}"#),
            text("a")
        );
        assert_eq!(agrees(r#"{"type":"assistant","message":{"content":[{"type":"text","text":null}]}}"#), text(""));
        assert_eq!(agrees(r#"{"type":"assistant","message":{"content":[{"type":"text","text":{"x":1}}]}}"#), text(""));
        assert_eq!(
            agrees(r#"{"type":"assistant","message":{"content":[{"type":"text","text":"a"},"not a block",7,null]}}"#),
            Some(AgentLine::Assistant {
                message_id: None,
                blocks: vec![Block::Text("a".into()), Block::Other, Block::Other, Block::Other]
            })
        );
        assert_eq!(
            agrees(r#"{"type":"assistant","message":{"content":"a string"}}"#),
            Some(AgentLine::Assistant { message_id: None, blocks: vec![] })
        );
        assert_eq!(
            agrees(r#"{"type":"assistant","message":["id","content"]}"#),
            Some(AgentLine::Assistant { message_id: None, blocks: vec![] })
        );
        assert_eq!(
            agrees(
                r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":null,"is_error":"yes","content":[{"type":"text","text":"out"},{"type":"image"},{"x":1},5]}]}}"#
            ),
            Some(AgentLine::ToolResults {
                results: vec![ToolResult {
                    tool_use_id: String::new(),
                    is_error: false,
                    content: "out\n[image]\n{\"x\":1}\n5".into()
                }]
            })
        );
        assert_eq!(
            agrees(
                r#"{"type":"system","subtype":"api_retry","attempt":-1,"max_retries":2.5,"error":{"message":"overloaded"}}"#
            ),
            Some(AgentLine::ApiRetry { attempt: None, max_retries: None, error: Some("overloaded".into()) })
        );
        assert_eq!(
            agrees(
                r#"{"type":"result","subtype":null,"is_error":null,"result":7,"errors":["a",{"b":1}],"duration_ms":"1","total_cost_usd":3}"#
            ),
            Some(AgentLine::Result(ResultLine {
                result: "a\n{\"b\":1}".into(),
                total_cost_usd: Some(3.0),
                ..ResultLine::default()
            }))
        );
        assert_eq!(
            agrees(
                r#"{"type":"stream_event","api_message_id":null,"event":{"type":"content_block_delta","index":"0","delta":{"type":"text_delta","text":"x"}}}"#
            ),
            Some(AgentLine::Stream { message_id: None, event: StreamEvent::Other })
        );
        assert_eq!(agrees(r#"{"type":null}"#), Some(AgentLine::Other));
        assert_eq!(agrees(r#"{"type":7,"subtype":"init"}"#), Some(AgentLine::Other));
        assert_eq!(agrees(r#"{}"#), Some(AgentLine::Other));
    }

    /// What is not one JSON object is no line, whichever reading sees it:
    /// lists (which a derived reader would take by position), other values,
    /// bad JSON, and values the lenient reading refuses even where nothing
    /// reads them (numbers out of range, lone surrogates).
    #[test]
    fn what_is_not_an_object_is_no_line() {
        for line in [
            "",
            "   ",
            "null",
            "\"assistant\"",
            r#"["assistant",null]"#,
            r#"[{"type":"assistant"}]"#,
            r#"{"type":"assistant"} trailing"#,
            r#"{"type":"assistant","#,
            r#"{"type":"assistant","x":1e400}"#,
            r#"{"type":"assistant","x":[{"y":"\ud800"}]}"#,
            r#"{"type":"assistant","x":"\ud800"}"#,
        ] {
            assert_eq!(both(line), (None, None), "{line}");
            assert_eq!(parse(line.as_bytes()), None, "{line}");
        }
        assert_eq!(parse(b"{\"type\":\"assistant\",\"x\":\"\xff\"}"), None, "not UTF-8");
    }

    #[test]
    fn stream_events_and_tool_use_input() {
        assert_eq!(
            agrees(r#"{"type":"stream_event","event":{"type":"message_start","message":{"id":"msg_1","content":[]}}}"#),
            Some(AgentLine::Stream {
                message_id: None,
                event: StreamEvent::MessageStart { message_id: Some("msg_1".into()) }
            })
        );
        assert_eq!(
            agrees(
                r#"{"type":"stream_event","api_message_id":"m","event":{"index":3,"type":"content_block_delta","delta":{"text":"hé","type":"text_delta"}}}"#
            ),
            Some(AgentLine::Stream {
                message_id: Some("m".into()),
                event: StreamEvent::TextDelta { index: 3, text: "hé".into() }
            })
        );
        let input = serde_json::json!({"command": "df -h", "b": [1, {"z": null, "a": 2.5}]});
        let line = format!(
            r#"{{"type":"assistant","message":{{"content":[{{"type":"tool_use","id":"t","name":"Bash","input":{input}}},{{"type":"tool_use","input":null}}]}}}}"#
        );
        assert!(fast(&line).is_ok());
        assert_eq!(
            agrees(&line),
            Some(AgentLine::Assistant {
                message_id: None,
                blocks: vec![
                    Block::ToolUse { id: "t".into(), name: "Bash".into(), input },
                    Block::ToolUse { id: String::new(), name: String::new(), input: Value::Null }
                ]
            })
        );
    }
}
