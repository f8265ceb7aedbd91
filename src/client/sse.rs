//! Reading a `text/event-stream` body on the client side, as the HTML Living
//! Standard (§9.2.6, "Interpreting an event stream") says: lines end in CR,
//! LF or CRLF, anywhere in a chunk; `data` lines accumulate, `event` names
//! the frame, `id` sets the last event id, a line starting with `:` is a
//! comment, a blank line dispatches.
//!
//! The server is not trusted with the operator's memory: a line longer
//! than [`MAX_LINE`] or a frame whose data exceeds [`MAX_FRAME`] is skipped
//! whole (its id still counts, so a resume does not ask for it again), never
//! buffered without bound.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

/// Longest line kept, in bytes: the largest event the server logs (a text
/// block; tool output is capped at 64 KiB, README "API") fits many times.
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// Most data one frame may carry, in bytes.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// A stream silent this long is taken for a dead link: two of the server's
/// default keepalive periods (README "Configuration") and some slack.
pub const IDLE_DEFAULT: Duration = Duration::from_secs(35);

/// The silence after which a stream of this server counts as dead: two of
/// its keepalive periods (`keepalive_seconds` in its `/api/whoami` answer)
/// and some slack, or [`IDLE_DEFAULT`] when it does not say.
pub fn idle_for(whoami: &Value) -> Duration {
    whoami["keepalive_seconds"]
        .as_u64()
        .filter(|s| (1..=3600).contains(s))
        .map_or(IDLE_DEFAULT, |s| Duration::from_secs(2 * s + 5))
}

/// One dispatched frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The `event` field; empty for an unnamed frame (a plain event or a notice).
    pub name: String,
    pub data: String,
    /// The `id` field of this frame, if it had one.
    pub id: Option<String>,
}

/// What the parser yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Frame(Frame),
    /// A frame too large to keep, dropped; its id, if it had one.
    Skipped {
        id: Option<String>,
    },
}

/// An incremental parser: feed it the body's chunks as they come.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The current line has grown past [`MAX_LINE`]: drop the rest of it.
    line_too_long: bool,
    /// The last byte seen was a CR, so an LF right after it ends nothing.
    after_cr: bool,
    name: String,
    data: String,
    id: Option<String>,
    /// The frame being read has lost a line or outgrown [`MAX_FRAME`].
    frame_too_large: bool,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Parses `chunk` and returns the frames it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    self.end_line(&mut out);
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() < MAX_LINE {
                        self.line.push(byte);
                    } else {
                        self.line_too_long = true;
                    }
                }
            }
        }
        out
    }

    fn end_line(&mut self, out: &mut Vec<Parsed>) {
        let line = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.line_too_long) {
            self.frame_too_large = true;
            return;
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let (field, value) = match text.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > MAX_FRAME {
                    self.frame_too_large = true;
                } else {
                    self.data.push_str(value);
                    self.data.push('\n');
                }
            }
            "event" => self.name = value.to_owned(),
            // The standard ignores an id holding NUL.
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Parsed>) {
        let name = std::mem::take(&mut self.name);
        let mut data = std::mem::take(&mut self.data);
        let id = self.id.take();
        if std::mem::take(&mut self.frame_too_large) {
            out.push(Parsed::Skipped { id });
            return;
        }
        if data.is_empty() {
            // Nothing to dispatch; an id alone still moves the last event id.
            if id.is_some() {
                out.push(Parsed::Skipped { id });
            }
            return;
        }
        data.pop();
        out.push(Parsed::Frame(Frame { name, data, id }));
    }
}

/// The event id a frame carries (or a skipped frame carried), if it is one.
pub fn id_of(parsed: &Parsed) -> Option<u64> {
    let id = match parsed {
        Parsed::Frame(frame) => frame.id.as_deref(),
        Parsed::Skipped { id } => id.as_deref(),
    }?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

/// A logged event: its id and JSON (an unnamed frame with an id).
pub fn event(parsed: &Parsed) -> Option<(u64, Value)> {
    let Parsed::Frame(frame) = parsed else { return None };
    if !frame.name.is_empty() {
        return None;
    }
    Some((id_of(parsed)?, serde_json::from_str(&frame.data).ok()?))
}

/// Reads an open stream, handing each frame to `each` until it answers
/// false, the server ends the stream, the link breaks, or nothing (not even
/// a keepalive) arrives for `idle`. Says which.
pub async fn read(response: reqwest::Response, idle: Duration, mut each: impl FnMut(Parsed) -> bool) -> String {
    let mut parser = Parser::new();
    let mut body = response.bytes_stream();
    loop {
        match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return format!("silent for {} s", idle.as_secs()),
            Ok(None) => return "the server ended the stream".to_owned(),
            Ok(Some(Err(err))) => return format!("the link broke: {err}"),
            Ok(Some(Ok(chunk))) => {
                for parsed in parser.feed(&chunk) {
                    if !each(parsed) {
                        return "stopped reading".to_owned();
                    }
                }
            }
        }
    }
}

/// Pauses between reconnects: 0.5 s, doubling up to 5 s, reset by a link
/// that comes back.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    failing_since: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MOST: Duration = Duration::from_secs(5);
    /// How long a command that must finish keeps trying.
    const GIVE_UP: Duration = Duration::from_secs(60);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST, failing_since: None }
    }

    pub fn reset(&mut self) {
        *self = Backoff::new();
    }

    pub async fn wait(&mut self) {
        self.failing_since.get_or_insert_with(Instant::now);
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MOST);
    }

    /// The link has been down for a minute.
    pub fn given_up(&self) -> bool {
        self.failing_since.is_some_and(|since| since.elapsed() > Self::GIVE_UP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, data: &str, id: Option<&str>) -> Parsed {
        Parsed::Frame(Frame { name: name.into(), data: data.into(), id: id.map(Into::into) })
    }

    #[test]
    fn a_stream_is_given_up_after_two_of_the_servers_keepalive_periods() {
        assert_eq!(idle_for(&serde_json::json!({"keepalive_seconds": 40})), Duration::from_secs(85));
        assert_eq!(idle_for(&serde_json::json!({"keepalive_seconds": 1})), Duration::from_secs(7));
        assert_eq!(idle_for(&serde_json::json!({"keepalive_seconds": 0})), IDLE_DEFAULT);
        assert_eq!(idle_for(&Value::Null), IDLE_DEFAULT);
    }

    #[test]
    fn frames_cut_anywhere_by_the_network_come_out_whole() {
        let body = b"id: 7\ndata: {\"a\":1}\n\n: keepalive\nevent: keepalive\ndata: {}\n\nevent: delta\ndata: x\n\n";
        for cut in 0..body.len() {
            let mut parser = Parser::new();
            let mut got = parser.feed(&body[..cut]);
            got.extend(parser.feed(&body[cut..]));
            assert_eq!(
                got,
                [frame("", "{\"a\":1}", Some("7")), frame("keepalive", "{}", None), frame("delta", "x", None)],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn cr_lf_and_crlf_each_end_a_line_and_crlf_split_across_chunks_is_one() {
        let mut parser = Parser::new();
        let mut got = parser.feed(b"data: a\r");
        got.extend(parser.feed(b"\ndata: b\rdata: c\n\r\n"));
        assert_eq!(got, [frame("", "a\nb\nc", None)]);
    }

    #[test]
    fn a_line_over_the_cap_drops_its_frame_but_keeps_its_id_and_the_next_frame() {
        let mut parser = Parser::new();
        let mut got = parser.feed(b"id: 3\ndata: ");
        let big = vec![b'x'; MAX_LINE + 10];
        got.extend(parser.feed(&big));
        got.extend(parser.feed(b"\n\nid: 4\ndata: ok\n\n"));
        assert_eq!(got, [Parsed::Skipped { id: Some("3".into()) }, frame("", "ok", Some("4"))]);
        assert!(parser.line.capacity() <= MAX_LINE + 1024, "the long line was not kept");
    }

    #[test]
    fn many_data_lines_over_the_frame_cap_drop_the_frame() {
        let mut parser = Parser::new();
        let line = format!("data: {}\n", "y".repeat(1024 * 1024));
        let mut got = Vec::new();
        for _ in 0..5 {
            got.extend(parser.feed(line.as_bytes()));
        }
        got.extend(parser.feed(b"\ndata: next\n\n"));
        assert_eq!(got, [Parsed::Skipped { id: None }, frame("", "next", None)]);
    }

    #[test]
    fn comments_unknown_fields_and_a_field_without_colon_are_read_as_the_standard_says() {
        let mut parser = Parser::new();
        let got = parser.feed(b": hi\nretry: 10\nfoo: bar\ndata\ndata:x\n\n");
        assert_eq!(got, [frame("", "\nx", None)]);
    }
}
