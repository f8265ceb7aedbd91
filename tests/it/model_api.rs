//! A stand-in for the model provider's Messages API (`POST /v1/messages`),
//! so the real Claude Code CLI can run whole turns with no account and no
//! network: the CLI reaches it through `ANTHROPIC_BASE_URL` with any
//! `ANTHROPIC_API_KEY`. It speaks the API's wire format (server-sent events
//! `message_start` … `message_stop`, or one JSON message when the request
//! does not ask to stream; errors as `{"type":"error","error":{…}}` with the
//! `x-should-retry` header the CLI obeys), records every request, and
//! answers each request that offers tools with the next reply of its
//! script. A request without tools is a side request (a title, a summary)
//! and gets plain text.
//!
//! The tests below check the stand-in's format on its own, then what the
//! pinned CLI (2.1.329) does against it, run directly as the test agent user.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::harness::{AGENT_USER_LOCK, Background, agent_user, eventually, real_cli_for_agent_user};

/// One reply of a stand-in's script, given to the next request that offers tools.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A text block, then a `Bash` tool call (`stop_reason: tool_use`). The
    /// next reply goes only to a request that carries this call's
    /// `tool_result`; any other request is refused with the API's 400.
    Bash { text: String, command: String, description: String, background: bool },
    /// A final text (`stop_reason: end_turn`).
    Text(String),
    /// An API error: HTTP status, error type and message.
    Error { status: u16, kind: String, message: String },
    /// `message_start` and the start of a text block at once, then nothing
    /// for `stall`, then the text: a model that has gone quiet.
    Stall { stall: Duration, text: String },
    /// `message_start`, then the connection is dropped mid-stream.
    Dropped,
    /// `message_start`, then the stream ends (cleanly, without `message_stop`).
    Truncated,
}

impl Reply {
    pub fn bash(text: &str, command: &str) -> Reply {
        Reply::Bash {
            text: text.into(),
            command: command.into(),
            description: "Check the VM".into(),
            background: false,
        }
    }

    /// A `Bash` call with `run_in_background`: the CLI starts it and asks the
    /// model again while it runs.
    pub fn bash_in_background(text: &str, command: &str) -> Reply {
        Reply::Bash { text: text.into(), command: command.into(), description: "Watch the VM".into(), background: true }
    }

    pub fn text(text: &str) -> Reply {
        Reply::Text(text.into())
    }

    /// What the API answers a key it does not know.
    pub fn unauthorized() -> Reply {
        Reply::Error { status: 401, kind: "authentication_error".into(), message: "invalid x-api-key".into() }
    }

    /// What the API answers when it is overloaded.
    pub fn overloaded() -> Reply {
        Reply::Error { status: 529, kind: "overloaded_error".into(), message: "Overloaded".into() }
    }

    pub fn stall(stall: Duration, text: &str) -> Reply {
        Reply::Stall { stall, text: text.into() }
    }
}

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path with its query, as sent (`/v1/messages?beta=true`).
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Null` when there was none or it was not JSON).
    pub body: Value,
}

impl Recorded {
    /// A model request that offers tools: one step of the conversation.
    pub fn is_main(&self) -> bool {
        self.path.starts_with("/v1/messages")
            && !self.path.starts_with("/v1/messages/")
            && self.body["tools"].as_array().is_some_and(|t| !t.is_empty())
    }

    /// Every text the request's messages carry (prompts, replies, tool results), in order.
    pub fn texts(&self) -> Vec<String> {
        let mut texts = Vec::new();
        for message in self.body["messages"].as_array().into_iter().flatten() {
            match &message["content"] {
                Value::String(s) => texts.push(s.clone()),
                Value::Array(blocks) => {
                    for block in blocks {
                        match block["type"].as_str() {
                            Some("text") => texts.extend(block["text"].as_str().map(str::to_owned)),
                            Some("tool_result") => texts.push(tool_result_text(&block["content"])),
                            Some("tool_use") => texts.extend(block["input"]["command"].as_str().map(str::to_owned)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        texts
    }

    /// The `tool_result` blocks of the request's last message: (tool_use_id, content).
    pub fn tool_results(&self) -> Vec<(String, String)> {
        let Some(last) = self.body["messages"].as_array().and_then(|m| m.last()) else { return Vec::new() };
        last["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["type"] == "tool_result")
            .map(|b| (b["tool_use_id"].as_str().unwrap_or_default().to_owned(), tool_result_text(&b["content"])))
            .collect()
    }
}

/// A tool result's content is a string or a list of text blocks.
fn tool_result_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect::<Vec<_>>().join(""),
        _ => String::new(),
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    /// The tool call whose result the next main request must carry.
    awaiting: Mutex<Option<String>>,
    /// Numbers the ids of messages, tool calls and requests: the CLI keys
    /// its transcript on them, so they must not repeat within a conversation.
    next_id: AtomicU64,
}

impl Shared {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// The stand-in, serving on a loopback port from a thread of its own (so
/// a test thread that blocks does not stall it); stopped on drop.
pub struct ModelApi {
    /// `http://127.0.0.1:<port>`, for `ANTHROPIC_BASE_URL`.
    pub base_url: String,
    shared: Arc<Shared>,
    _server: Background,
}

impl ModelApi {
    pub fn start(script: Vec<Reply>) -> ModelApi {
        let shared = Arc::new(Shared { script: Mutex::new(script.into()), ..Shared::default() });
        let server = Background::serve(axum::Router::new().fallback(handle).with_state(shared.clone()));
        ModelApi { base_url: server.base_url.clone(), shared, _server: server }
    }

    /// Adds replies at the end of the script.
    pub fn then(&self, replies: Vec<Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// Every request so far, in the order received.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The model requests that offered tools, in order.
    pub fn main_requests(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(Recorded::is_main).collect()
    }

    /// Replies not given yet.
    pub fn replies_left(&self) -> usize {
        self.shared.script.lock().unwrap().len()
    }

    /// Waits until `n` model requests that offer tools have arrived.
    pub async fn until_main_requests(&self, n: usize) {
        eventually(&format!("{n} model requests"), || self.main_requests().len() >= n).await;
    }
}

async fn handle(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let recorded = Recorded {
        method: method.to_string(),
        path: uri.path_and_query().map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: json.clone(),
    };
    shared.requests.lock().unwrap().push(recorded);
    let request_id = format!("req_standin_{:04}", shared.id());
    match (method, uri.path()) {
        (Method::POST, "/v1/messages") => messages(&shared, &json, &request_id),
        (Method::POST, "/v1/messages/count_tokens") => {
            json_response(StatusCode::OK, &request_id, json!({ "input_tokens": estimate_tokens(body.len()) }))
        }
        _ => error(404, "not_found_error", "Not found", &request_id),
    }
}

/// `POST /v1/messages`: a side request, or the next step of the script.
fn messages(shared: &Shared, request: &Value, request_id: &str) -> Response {
    if !request.is_object() {
        return error(400, "invalid_request_error", "The request body is not valid JSON.", request_id);
    }
    let input_tokens = estimate_tokens(request.to_string().len());
    let stream = request["stream"] == true;
    let model = request["model"].as_str().unwrap_or("claude-standin").to_owned();
    let message_id = format!("msg_standin_{:04}", shared.id());
    if request["tools"].as_array().is_none_or(|t| t.is_empty()) {
        let blocks = vec![Block::Text("Stand-in title".into())];
        return reply(Shape { stream, model, message_id, input_tokens, blocks, stall: None }, request_id);
    }
    let mut awaiting = shared.awaiting.lock().unwrap();
    if let Some(id) = awaiting.as_ref() {
        let carried =
            request["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_array()).is_some_and(
                |blocks| blocks.iter().any(|b| b["type"] == "tool_result" && b["tool_use_id"] == id.as_str()),
            );
        if !carried {
            // The API's own words for a tool call left without its result.
            let message = format!(
                "messages: `tool_use` ids were found without `tool_result` blocks immediately after: {id}. \
                 Each `tool_use` block must have a corresponding `tool_result` block in the next message."
            );
            return error(400, "invalid_request_error", &message, request_id);
        }
    }
    let Some(next) = shared.script.lock().unwrap().pop_front() else {
        return error(400, "invalid_request_error", "The stand-in's script has no reply left.", request_id);
    };
    let (blocks, stall) = match next {
        Reply::Error { status, kind, message } => return error(status, &kind, &message, request_id),
        Reply::Dropped => return cut_short(&model, &message_id, input_tokens, request_id, true),
        Reply::Truncated => return cut_short(&model, &message_id, input_tokens, request_id, false),
        Reply::Text(text) => (vec![Block::Text(text)], None),
        Reply::Stall { stall, text } => (vec![Block::Text(text)], Some(stall)),
        Reply::Bash { text, command, description, background } => {
            let id = format!("toolu_standin_{:04}", shared.id());
            let mut input = json!({ "command": command, "description": description });
            if background {
                input["run_in_background"] = json!(true);
            }
            *awaiting = Some(id.clone());
            (vec![Block::Text(text), Block::ToolUse { id, input }], None)
        }
    };
    if !blocks.iter().any(|b| matches!(b, Block::ToolUse { .. })) {
        *awaiting = None;
    }
    reply(Shape { stream, model, message_id, input_tokens, blocks, stall }, request_id)
}

enum Block {
    Text(String),
    ToolUse { id: String, input: Value },
}

struct Shape {
    stream: bool,
    model: String,
    message_id: String,
    input_tokens: u64,
    blocks: Vec<Block>,
    stall: Option<Duration>,
}

/// Roughly four bytes a token: enough for the CLI to count a cost.
fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64 / 4).max(1)
}

fn reply(shape: Shape, request_id: &str) -> Response {
    let stop_reason =
        if shape.blocks.iter().any(|b| matches!(b, Block::ToolUse { .. })) { "tool_use" } else { "end_turn" };
    let output_tokens = shape
        .blocks
        .iter()
        .map(|b| match b {
            Block::Text(t) => estimate_tokens(t.len()),
            Block::ToolUse { input, .. } => estimate_tokens(input.to_string().len()),
        })
        .sum::<u64>();
    let usage = |output: u64| {
        json!({ "input_tokens": shape.input_tokens, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0, "output_tokens": output })
    };
    let message = |content: Value, stop: Value, output: u64| {
        json!({ "id": shape.message_id, "type": "message", "role": "assistant", "model": shape.model,
                "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage(output) })
    };
    if !shape.stream {
        let content: Vec<Value> = shape
            .blocks
            .iter()
            .map(|b| match b {
                Block::Text(text) => json!({ "type": "text", "text": text }),
                Block::ToolUse { id, input } => json!({ "type": "tool_use", "id": id, "name": "Bash", "input": input }),
            })
            .collect();
        return json_response(StatusCode::OK, request_id, message(json!(content), json!(stop_reason), output_tokens));
    }
    // The streaming form, event by event as the API sends it: the message,
    // a ping, each block's start, deltas and stop, the stop reason, the end.
    let mut frames: Vec<(Duration, String)> = Vec::new();
    let mut push = |delay: Duration, data: Value| {
        frames.push((delay, format!("event: {}\ndata: {data}\n\n", data["type"].as_str().unwrap())));
    };
    push(Duration::ZERO, json!({ "type": "message_start", "message": message(json!([]), Value::Null, 1) }));
    push(Duration::ZERO, json!({ "type": "ping" }));
    for (index, block) in shape.blocks.iter().enumerate() {
        match block {
            Block::Text(text) => {
                push(
                    Duration::ZERO,
                    json!({ "type": "content_block_start", "index": index, "content_block": { "type": "text", "text": "" } }),
                );
                for (n, piece) in text.split_inclusive(' ').enumerate() {
                    let delay = if n == 0 { shape.stall.unwrap_or_default() } else { Duration::ZERO };
                    push(
                        delay,
                        json!({ "type": "content_block_delta", "index": index,
                                "delta": { "type": "text_delta", "text": piece } }),
                    );
                }
            }
            Block::ToolUse { id, input } => {
                push(
                    Duration::ZERO,
                    json!({ "type": "content_block_start", "index": index,
                            "content_block": { "type": "tool_use", "id": id, "name": "Bash", "input": {} } }),
                );
                let json = input.to_string();
                let half = (0..=json.len() / 2).rev().find(|i| json.is_char_boundary(*i)).unwrap_or(0);
                for piece in [&json[..half], &json[half..]] {
                    push(
                        Duration::ZERO,
                        json!({ "type": "content_block_delta", "index": index,
                                "delta": { "type": "input_json_delta", "partial_json": piece } }),
                    );
                }
            }
        }
        push(Duration::ZERO, json!({ "type": "content_block_stop", "index": index }));
    }
    push(
        Duration::ZERO,
        json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason, "stop_sequence": null },
                "usage": { "output_tokens": output_tokens } }),
    );
    push(Duration::ZERO, json!({ "type": "message_stop" }));
    let body = futures_util::stream::iter(frames).then(|(delay, frame)| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<_, Infallible>(Bytes::from(frame))
    });
    sse_response(request_id, Body::from_stream(body))
}

/// `message_start`, then the end of the body; when `drop`, the body fails
/// instead, and the connection is dropped mid-stream.
fn cut_short(model: &str, message_id: &str, input_tokens: u64, request_id: &str, drop: bool) -> Response {
    let start = json!({ "type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": { "input_tokens": input_tokens, "output_tokens": 1 } } });
    let mut frames: Vec<Result<Bytes, std::io::Error>> =
        vec![Ok(Bytes::from(format!("event: message_start\ndata: {start}\n\n")))];
    if drop {
        frames.push(Err(std::io::Error::other("the stand-in drops the connection")));
    }
    sse_response(request_id, Body::from_stream(futures_util::stream::iter(frames)))
}

fn sse_response(request_id: &str, body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("request-id"), request_id),
        ],
        body,
    )
        .into_response()
}

fn json_response(status: StatusCode, request_id: &str, body: Value) -> Response {
    (status, [(header::HeaderName::from_static("request-id"), request_id)], axum::Json(body)).into_response()
}

/// The API's error shape. `x-should-retry` says whether a retry can help,
/// as the API's own answers do; the CLI follows it (without it, it retries
/// a 401 ten times over minutes).
fn error(status: u16, kind: &str, message: &str, request_id: &str) -> Response {
    let status = StatusCode::from_u16(status).expect("an HTTP status");
    let retry = matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error() || status.as_u16() == 529;
    let body = json!({ "type": "error", "error": { "type": kind, "message": message }, "request_id": request_id });
    let mut response = json_response(status, request_id, body);
    response.headers_mut().insert("x-should-retry", if retry { "true" } else { "false" }.parse().unwrap());
    response
}

// ---- The stand-in on its own ---------------------------------------------

/// The events of a server-sent event stream: (event name, data JSON).
pub fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let field = |name: &str| {
                block.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("{name} in {block:?}"))
            };
            (field("event: ").to_owned(), serde_json::from_str(field("data: ")).expect("data is JSON"))
        })
        .collect()
}

fn with_tools(messages: Value, stream: bool) -> Value {
    json!({ "model": "claude-sonnet-5-5", "max_tokens": 1024, "stream": stream, "messages": messages,
            "tools": [{ "name": "Bash", "input_schema": { "type": "object" } }] })
}

async fn post(api: &ModelApi, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", api.base_url))
        .header("x-api-key", "sk-standin")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_stand_in_streams_text_and_a_bash_call_then_answers_its_result() {
    let api = ModelApi::start(vec![Reply::bash("Let me look.", "ssh devvm uptime"), Reply::text("It is up.")]);
    let prompt = json!([{ "role": "user", "content": "Is devvm up?" }]);
    let response = post(&api, "/v1/messages?beta=true", &with_tools(prompt.clone(), true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream; charset=utf-8");
    let events = sse_events(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "each event names its data's type");
    }
    let text: String = events.iter().filter_map(|(_, d)| d["delta"]["text"].as_str()).collect();
    assert_eq!(text, "Let me look.");
    let tool = &events[7].1["content_block"];
    assert_eq!((tool["type"].as_str(), tool["name"].as_str()), (Some("tool_use"), Some("Bash")));
    let input: String = events.iter().filter_map(|(_, d)| d["delta"]["partial_json"].as_str()).collect();
    let input: Value = serde_json::from_str(&input).unwrap();
    assert_eq!(input["command"], "ssh devvm uptime");
    assert_eq!(events[11].1["delta"]["stop_reason"], "tool_use");
    let tool_id = tool["id"].as_str().unwrap().to_owned();

    // Asked again without the tool's result: refused, and the script waits.
    let again = post(&api, "/v1/messages", &with_tools(prompt.clone(), true)).await;
    assert_eq!(again.status(), 400);
    assert_eq!(again.headers()["x-should-retry"], "false");
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains(&tool_id), "{body}");

    // With it, the final text, here as one JSON message (no `stream`).
    let mut conversation = prompt.as_array().unwrap().clone();
    conversation.push(json!({ "role": "assistant", "content": [
        { "type": "text", "text": "Let me look." },
        { "type": "tool_use", "id": tool_id, "name": "Bash", "input": input } ] }));
    conversation.push(json!({ "role": "user", "content": [
        { "type": "tool_result", "tool_use_id": tool_id, "content": " 10:00:00 up 3 days", "is_error": false } ] }));
    let done = post(&api, "/v1/messages", &with_tools(json!(conversation), false)).await;
    assert_eq!(done.status(), 200);
    let message: Value = done.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["content"], json!([{ "type": "text", "text": "It is up." }]));
    assert_eq!(message["stop_reason"], "end_turn");
    assert!(message["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let requests = api.main_requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].headers["x-api-key"], "sk-standin");
    assert_eq!(requests[2].tool_results(), [(tool_id, " 10:00:00 up 3 days".to_owned())]);
    assert_eq!(api.replies_left(), 0);
}

#[tokio::test]
async fn the_stand_in_answers_errors_side_requests_and_other_paths_as_the_api_does() {
    let api = ModelApi::start(vec![Reply::unauthorized(), Reply::overloaded()]);
    let prompt = json!([{ "role": "user", "content": "Is devvm up?" }]);
    for (status, kind, retry) in [(401, "authentication_error", "false"), (529, "overloaded_error", "true")] {
        let response = post(&api, "/v1/messages", &with_tools(prompt.clone(), true)).await;
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["x-should-retry"], retry, "{status}");
        let request_id = response.headers()["request-id"].to_str().unwrap().to_owned();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], kind);
        assert_eq!(body["request_id"], request_id.as_str());
    }
    let none_left = post(&api, "/v1/messages", &with_tools(prompt.clone(), true)).await;
    assert_eq!(none_left.status(), 400, "a script run dry is refused, not improvised");

    let title = json!({ "model": "claude-haiku", "max_tokens": 32, "messages": prompt });
    let side: Value = post(&api, "/v1/messages", &title).await.json().await.unwrap();
    assert_eq!(side["content"][0]["text"], "Stand-in title");
    let counted: Value = post(&api, "/v1/messages/count_tokens", &title).await.json().await.unwrap();
    assert!(counted["input_tokens"].as_u64().unwrap() > 0, "{counted}");
    let unknown = reqwest::get(format!("{}/api/hello", api.base_url)).await.unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.json::<Value>().await.unwrap()["error"]["type"], "not_found_error");
    assert_eq!(api.requests().len(), 6, "every request is recorded");
}

// ---- The real CLI against the stand-in ------------------------------------

/// Runs the pinned CLI once, as the test agent user in a fresh home and
/// working directory (no state from earlier runs), against `api`.
fn run_cli(api: &ModelApi, extra_env: &[(&str, &str)], args: &[&str], prompt: &str) -> (Output, Vec<Value>) {
    let sandbox = CliSandbox::new(&[]);
    let output = sandbox
        .command(api)
        .envs(extra_env.iter().copied())
        .args(["-p", "--dangerously-skip-permissions", "--output-format", "stream-json", "--verbose"])
        .args(["--model", "sonnet"])
        .args(args)
        .arg("--")
        .arg(prompt)
        .output()
        .unwrap();
    let lines = stream_json_lines(&output);
    (output, lines)
}

/// A fresh home and working directory for the test agent user, in which
/// to run the pinned CLI by hand (without the server).
pub struct CliSandbox {
    pub home: PathBuf,
    pub cwd: PathBuf,
    _dir: tempfile::TempDir,
}

impl CliSandbox {
    /// Files in `plants` (paths under `home/` or `cwd/`, with their
    /// contents) are written first and owned by the agent user, as an
    /// allowed write of its own would leave them.
    pub fn new(plants: &[(&str, &str)]) -> Self {
        let (uid, gid) = agent_user();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
        let (home, cwd) = (dir.path().join("home"), dir.path().join("cwd"));
        for d in [&home, &cwd] {
            std::fs::create_dir(d).unwrap();
        }
        for (path, content) in plants {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
        }
        for d in [&home, &cwd] {
            let given = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(d).status().unwrap();
            assert!(given.success());
        }
        CliSandbox { home, cwd, _dir: dir }
    }

    /// The pinned CLI as the agent user in this sandbox, against `api`,
    /// with a clean environment.
    pub fn command(&self, api: &ModelApi) -> Command {
        use std::os::unix::process::CommandExt;
        let (uid, gid) = agent_user();
        let mut command = Command::new(real_cli_for_agent_user());
        command
            .uid(uid)
            .gid(gid)
            .current_dir(&self.cwd)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("ANTHROPIC_BASE_URL", &api.base_url)
            .env("ANTHROPIC_API_KEY", "sk-standin")
            .stdin(Stdio::null());
        command
    }
}

/// The CLI's stdout as stream-json lines, each of which must parse.
pub fn stream_json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a stream-json line: {l}")))
        .collect()
}

fn of_type<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == kind).collect()
}

/// What the CLI asks of the API, and the deltas it relays with
/// `--include-partial-messages` (what live text in the console would use).
/// Run without `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`, so the other
/// endpoints it tries show up too.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn the_real_cli_runs_a_bash_call_through_the_stand_in_and_relays_each_delta() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let api = ModelApi::start(vec![Reply::bash("Let me look at it.", "echo up"), Reply::text("It says: up.")]);
    let (output, lines) = run_cli(&api, &[], &["--include-partial-messages"], "Is devvm up?");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let asked: Vec<String> = api.requests().iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    let mut sorted = asked.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["HEAD /api/hello", "POST /v1/messages?beta=true", "POST /v1/messages?beta=true"],
        "a reachability check (answered 404), and one model request per step: {asked:?}"
    );
    let requests = api.main_requests();
    let first = &requests[0];
    assert_eq!(first.headers["x-api-key"], "sk-standin");
    assert_eq!(first.headers["anthropic-version"], "2023-06-01");
    assert!(first.headers["user-agent"].starts_with("claude-cli/2.1.329 "), "{:?}", first.headers);
    assert!(first.headers["anthropic-beta"].contains("claude-code-20250219"), "{:?}", first.headers);
    assert_eq!(first.body["stream"], true);
    assert_eq!(first.body["model"], "claude-sonnet-5-5", "`sonnet` is an alias the CLI resolves");
    let tools: Vec<&str> = first.body["tools"].as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
    assert!(tools.contains(&"Bash"), "{tools:?}");
    assert!(first.texts().contains(&"Is devvm up?".to_owned()));
    assert_eq!(requests[1].tool_results().len(), 1);
    assert_eq!(requests[1].tool_results()[0].1, "up");

    // Each delta the stand-in sent comes out as a `stream_event` line, in order,
    // before the whole block arrives as an `assistant` line.
    let deltas: Vec<&str> = of_type(&lines, "stream_event")
        .iter()
        .filter_map(|l| l["event"]["delta"]["text"].as_str().or(l["event"]["delta"]["partial_json"].as_str()))
        .collect();
    assert_eq!(deltas[..5], ["Let ", "me ", "look ", "at ", "it."], "{deltas:?}");
    assert_eq!(deltas[7..], ["It ", "says: ", "up."], "{deltas:?}");
    let partial_json: String = deltas[5..7].concat();
    assert_eq!(serde_json::from_str::<Value>(&partial_json).unwrap()["command"], "echo up");
    let first_text = lines.iter().position(|l| l["type"] == "assistant").unwrap();
    let first_delta = lines.iter().position(|l| l["event"]["delta"]["type"] == "text_delta").unwrap();
    assert!(first_delta < first_text);
    let starts: Vec<&str> =
        of_type(&lines, "stream_event").iter().filter_map(|l| l["event"]["type"].as_str()).take(3).collect();
    assert_eq!(starts, ["message_start", "content_block_start", "content_block_delta"]);
    let result = of_type(&lines, "result")[0];
    assert_eq!((result["is_error"].as_bool(), result["result"].as_str()), (Some(false), Some("It says: up.")));
    assert!(result["total_cost_usd"].as_f64().unwrap() > 0.0, "{result}");
}

/// A connection dropped mid-stream is retried as it was, and reported as
/// an `api_retry`; a stream that ends before `message_stop` is asked again
/// at once without streaming, and the stand-in's plain JSON message carries
/// the turn on.
#[tokio::test]
#[ignore = "needs the real Claude Code CLI (scripts/test installs it)"]
async fn a_stream_cut_short_is_retried_and_one_left_unfinished_is_asked_again_without_streaming() {
    let _agent_user = AGENT_USER_LOCK.lock().await;
    let api = ModelApi::start(vec![
        Reply::Dropped,
        Reply::Truncated,
        Reply::bash("Looking.", "echo fine"),
        Reply::text("It is fine."),
    ]);
    let (output, lines) = run_cli(&api, &[("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")], &[], "How is devvm?");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let streamed: Vec<bool> = api.main_requests().iter().map(|r| r.body["stream"] == true).collect();
    assert_eq!(streamed, [true, true, false, true], "only the request after the unfinished stream goes without it");
    assert!(api.requests().iter().all(Recorded::is_main), "nothing but model requests with the traffic switch");
    let retries: Vec<&Value> = lines.iter().filter(|l| l["subtype"] == "api_retry").collect();
    assert_eq!(retries.len(), 1, "{retries:?}");
    assert_eq!((retries[0]["attempt"].as_u64(), retries[0]["error"].as_str()), (Some(1), Some("unknown")));
    let result = of_type(&lines, "result")[0];
    assert_eq!(result["result"], "It is fine.");
    let said: Vec<&Value> = of_type(&lines, "user");
    assert_eq!(said[0]["message"]["content"][0]["content"], "fine");
}
