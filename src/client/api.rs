//! The server's HTTP API (README "API") as the terminal client calls it:
//! one method per route it uses, every answer bounded in size, every
//! refusal turned into a [`ClientError`] carrying the server's `detail`.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

use super::ClientError;

/// Largest JSON answer read, in bytes: a page of sessions or an operation
/// with its steps is far smaller; a hostile server gets no further.
const MAX_ANSWER: usize = 8 * 1024 * 1024;
/// A request other than a stream or a verb waited for gets this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a verb on the default target is waited for: the server's
/// default verb timeout (`BREAKGLASS_PVE_VERB_TIMEOUT_SECONDS`, README
/// "Configuration") and a margin for ssh and the answer.
pub const VERB_WAIT: Duration = Duration::from_secs(660 + 30);

/// A client of one server.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    /// `API_BEARER_TOKEN`, from the environment only (argv is readable by
    /// every local user, README "Configuration").
    token: Option<String>,
}

impl Api {
    pub fn new(url: &str, token: Option<String>) -> Result<Api, ClientError> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Usage(format!("--url {url:?}: give an http:// or https:// address")));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| ClientError::Usage(format!("cannot make an HTTP client: {err}")))?;
        Ok(Api { http, base, token: token.filter(|t| !t.is_empty()) })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; the JSON answer of a 2xx, or the refusal.
    async fn call(&self, request: RequestBuilder) -> Result<Value, ClientError> {
        let (status, body) = self.send(request).await?;
        if status.is_success() {
            return Ok(body);
        }
        Err(ClientError::from_answer(status, &body))
    }

    /// Sends `request`: the status and the JSON body (`Null` when none).
    async fn send(&self, request: RequestBuilder) -> Result<(StatusCode, Value), ClientError> {
        let response = request.send().await.map_err(|err| self.unreachable(&err))?;
        let status = response.status();
        let body = self.json_body(response).await?;
        if status.is_success() && body.is_null() {
            return Err(ClientError::Protocol(format!("{}: the answer ({status}) is not JSON", self.base)));
        }
        Ok((status, body))
    }

    /// The answer's body as JSON (`Null` when empty or not JSON), read no
    /// further than [`MAX_ANSWER`].
    async fn json_body(&self, response: reqwest::Response) -> Result<Value, ClientError> {
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|err| self.unreachable(&err))?;
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(ClientError::Protocol(format!("the answer is larger than {MAX_ANSWER} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) })
    }

    /// A server that accepted the connection but has not answered within
    /// `limit`: as unreachable as one that refused it.
    fn silent(&self, limit: Duration) -> ClientError {
        ClientError::Unreachable(format!("{}: no answer within {} s", self.base, limit.as_secs_f32()))
    }

    pub fn unreachable(&self, err: &reqwest::Error) -> ClientError {
        // reqwest's Display names only the outermost layer ("error sending request").
        let mut why = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(inner) = source {
            why = format!("{why}: {inner}");
            source = inner.source();
        }
        ClientError::Unreachable(format!("{}: {why}", self.base))
    }

    pub async fn whoami(&self) -> Result<Value, ClientError> {
        self.call(self.request(Method::GET, "/api/whoami").timeout(REQUEST_TIMEOUT)).await
    }

    pub async fn sessions(&self, limit: usize) -> Result<Value, ClientError> {
        self.call(self.request(Method::GET, &format!("/api/sessions?limit={limit}")).timeout(REQUEST_TIMEOUT)).await
    }

    pub async fn session(&self, id: &str) -> Result<Value, ClientError> {
        self.call(self.request(Method::GET, &format!("/api/session/{}", segment(id))).timeout(REQUEST_TIMEOUT)).await
    }

    /// Opens a session: its id.
    pub async fn open_session(&self) -> Result<String, ClientError> {
        let body = self.call(self.request(Method::POST, "/api/session").timeout(REQUEST_TIMEOUT)).await?;
        body["session_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Protocol("POST /api/session: no session_id".into()))
    }

    pub async fn prompt(&self, session: &str, prompt: &str) -> Result<Value, ClientError> {
        let request = self.request(Method::POST, &format!("/api/session/{}/prompt", segment(session)));
        self.call(request.json(&json!({ "prompt": prompt })).timeout(REQUEST_TIMEOUT)).await
    }

    /// Stops the running turn: whether one was running. The server answers
    /// once the turn's end is logged (within 10 s, README "Data").
    pub async fn cancel(&self, session: &str) -> Result<bool, ClientError> {
        let request = self.request(Method::POST, &format!("/api/session/{}/cancel", segment(session)));
        let body = self.call(request.timeout(REQUEST_TIMEOUT)).await?;
        Ok(body["cancelled"].as_bool().unwrap_or(false))
    }

    /// Decides a waiting tool call (README "Approvals").
    pub async fn decide(
        &self,
        session: &str,
        tool_use_id: &str,
        allow: bool,
        message: Option<&str>,
    ) -> Result<Value, ClientError> {
        let path = format!("/api/session/{}/approvals/{}", segment(session), segment(tool_use_id));
        let mut body = json!({ "decision": if allow { "allow" } else { "deny" } });
        if let Some(message) = message {
            body["message"] = json!(message);
        }
        self.call(self.request(Method::POST, &path).json(&body).timeout(REQUEST_TIMEOUT)).await
    }

    /// Starts a verb on a target as an operation: its id.
    pub async fn start_verb(&self, target: &str, verb: &str) -> Result<String, ClientError> {
        let path = format!("/api/targets/{}/verbs/{}", segment(target), segment(verb));
        let body = self.call(self.request(Method::POST, &path).timeout(REQUEST_TIMEOUT)).await?;
        body["operation_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Protocol(format!("POST {path}: no operation_id")))
    }

    /// Runs a verb on the default target, answered when it has finished
    /// (as long as the verb takes, waited for up to `limit`): status and body.
    pub async fn default_verb(&self, verb: &str, limit: Duration) -> Result<(StatusCode, Value), ClientError> {
        let request = self.request(Method::POST, &format!("/api/pve/{}", segment(verb)));
        tokio::time::timeout(limit, self.send(request)).await.map_err(|_| self.silent(limit))?
    }

    /// Opens an SSE stream at `path`, after `last_event_id`. The answer's
    /// headers (or a refusal's body) must come within `idle`, the silence
    /// after which an open stream counts as dead: a server that accepts and
    /// never answers (a hung pod, a proxy holding the request) is a link
    /// down like any other, not a wait without end.
    pub async fn stream(
        &self,
        path: &str,
        last_event_id: Option<u64>,
        idle: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.request(Method::GET, path).header("accept", "text/event-stream");
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last.to_string());
        }
        let response = tokio::time::timeout(idle, request.send())
            .await
            .map_err(|_| self.silent(idle))?
            .map_err(|err| self.unreachable(&err))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = tokio::time::timeout(idle, self.json_body(response)).await.map_err(|_| self.silent(idle))??;
        Err(ClientError::from_answer(status, &body))
    }
}

/// A path segment: ids and names are words, anything else is escaped so it
/// cannot reach another route. A segment of dots alone would be read as
/// "this" or "up" (even escaped, by the URL standard), so its dots are sent
/// as the literal text `%2E`, which names nothing.
pub fn segment(text: &str) -> String {
    if text.bytes().all(|b| b == b'.') {
        return "%252E".repeat(text.len());
    }
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback port that accepts connections, reads nothing and answers
    /// `answer` (maybe nothing), holding each connection open.
    async fn holding(answer: &'static [u8]) -> String {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.write_all(answer).await;
                held.push(socket);
            }
        });
        base
    }

    #[tokio::test]
    async fn a_verb_on_the_default_target_is_not_waited_for_beyond_its_limit() {
        let api = Api::new(&holding(b"").await, None).unwrap();
        let started = std::time::Instant::now();
        let err = api.default_verb("status", Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable(ref why) if why.ends_with("no answer within 0.3 s")), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_refused_stream_whose_body_never_comes_is_a_link_down_within_the_idle_limit() {
        let api = Api::new(&holding(b"HTTP/1.1 404 Not Found\r\ncontent-length: 100\r\n\r\n{").await, None).unwrap();
        let started = std::time::Instant::now();
        let err = api.stream("/api/session/x/stream", None, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_path_segment_cannot_climb_or_add_a_query() {
        assert_eq!(segment("../../api/pve/reset?x=1"), "..%2F..%2Fapi%2Fpve%2Freset%3Fx%3D1");
        assert_eq!(segment("toolu_01AbC-x"), "toolu_01AbC-x");
        assert_eq!(segment(".."), "%252E%252E");
    }
}
