//! A cheap attach client: a raw TCP connection, one HTTP/1.1 request, the
//! chunked body undone and cut into SSE frames (the HTML Living Standard's
//! `text/event-stream`, as README "API" describes the attach stream).
//!
//! Thousands of these run in the harness beside the server on the same
//! cores, so a frame is never parsed as JSON: the client reads the `id:`
//! line, and finds the stand-in agent's `bgload <seq> <emit µs>` in the data
//! by a substring search. Every stream checks that ids come contiguous (no
//! gap, no duplicate) and that the stand-in's sequence numbers do too, and
//! records each live event's latency (µs from the agent's write to the
//! client's read) in an HDR histogram.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::agent::{MARK, now_us};

/// Latencies are recorded in µs up to a minute, to three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Where to stop reading a stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Until {
    /// The `caught-up` frame: the backlog is in.
    CaughtUp,
    /// The `turn_end` event.
    TurnEnd,
}

/// What one stream saw.
pub struct Seen {
    /// Events received (frames with an id).
    pub events: u64,
    /// Ids that skipped ahead of the next expected one.
    pub gaps: u64,
    /// Ids at or below one already received.
    pub duplicates: u64,
    /// Stand-in sequence numbers out of order (a line lost or repeated
    /// between the agent and the client, which ids alone cannot show).
    pub seq_breaks: u64,
    /// Body bytes received (after de-chunking).
    pub bytes: u64,
    /// Latency of each stand-in event, when recorded.
    pub latency: Histogram<u64>,
    /// The last id received.
    pub last_id: Option<u64>,
    /// The stream said `caught-up`.
    pub caught_up: bool,
    /// The stream ended before `Until` was met.
    pub ended_early: bool,
}

/// One attach stream being read (from a TCP connection, or from bytes in
/// the harness's self-check).
pub struct Stream<S = TcpStream> {
    tcp: S,
    raw: Vec<u8>,
    body: Vec<u8>,
    /// Bytes left in the current chunk; `None` while reading a size line.
    chunk_left: Option<usize>,
    /// The body's end (the zero-size chunk) was read.
    done: bool,
    pub seen: Seen,
    expected_id: u64,
    expected_seq: Option<u64>,
    /// Record latencies (live events), or not (a replay of old ones).
    record: bool,
}

/// The request line and headers of an attach.
fn request(session: &str, token: &str, last_event_id: Option<u64>) -> Vec<u8> {
    let mut request = format!(
        "GET /api/session/{session}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Accept: text/event-stream\r\n"
    );
    if let Some(id) = last_event_id {
        request.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

impl Stream<TcpStream> {
    /// Connects, sends the attach request and reads the response's head.
    pub async fn attach(
        addr: SocketAddr,
        token: &str,
        session: &str,
        last_event_id: Option<u64>,
        record: bool,
    ) -> std::io::Result<Stream> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(&request(session, token, last_event_id)).await?;
        let mut stream = Stream::over(tcp, last_event_id, record);
        stream.read_head().await?;
        Ok(stream)
    }
}

impl<S: AsyncRead + Unpin> Stream<S> {
    /// A stream reading an HTTP response from `source`.
    fn over(source: S, last_event_id: Option<u64>, record: bool) -> Stream<S> {
        Stream {
            tcp: source,
            raw: Vec::with_capacity(16 * 1024),
            body: Vec::with_capacity(16 * 1024),
            chunk_left: None,
            done: false,
            seen: Seen {
                events: 0,
                gaps: 0,
                duplicates: 0,
                seq_breaks: 0,
                bytes: 0,
                latency: histogram(),
                last_id: None,
                caught_up: false,
                ended_early: false,
            },
            expected_id: last_event_id.map_or(0, |id| id + 1),
            expected_seq: None,
            record,
        }
    }

    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut buf = [0u8; 64 * 1024];
        let n = self.tcp.read(&mut buf).await?;
        self.raw.extend_from_slice(&buf[..n]);
        Ok(n > 0)
    }

    async fn read_head(&mut self) -> std::io::Result<()> {
        loop {
            if let Some(end) = memmem::find(&self.raw, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.raw[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    return Err(std::io::Error::other(format!(
                        "attach answered {}",
                        head.lines().next().unwrap_or("")
                    )));
                }
                if !head.contains("transfer-encoding: chunked") {
                    return Err(std::io::Error::other("attach stream is not chunked"));
                }
                self.raw.drain(..end + 4);
                return Ok(());
            }
            if !self.fill().await? {
                return Err(std::io::Error::other("connection closed before the response"));
            }
        }
    }

    /// Moves whole chunk data from `raw` into `body` (RFC 9112 §7.1).
    fn dechunk(&mut self) -> std::io::Result<()> {
        let mut at = 0;
        // After the last chunk only the trailer is left, which is not data.
        while !self.done {
            match self.chunk_left {
                None => {
                    let Some(eol) = memmem::find(&self.raw[at..], b"\r\n") else { break };
                    let line = std::str::from_utf8(&self.raw[at..at + eol]).map_err(std::io::Error::other)?;
                    let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                    at += eol + 2;
                    if size == 0 {
                        self.done = true;
                        break;
                    }
                    self.chunk_left = Some(size);
                }
                Some(0) => {
                    if self.raw.len() - at < 2 {
                        break;
                    }
                    at += 2; // the CRLF after a chunk's data
                    self.chunk_left = None;
                }
                Some(left) => {
                    let take = left.min(self.raw.len() - at);
                    if take == 0 {
                        break;
                    }
                    self.body.extend_from_slice(&self.raw[at..at + take]);
                    at += take;
                    self.chunk_left = Some(left - take);
                }
            }
        }
        self.raw.drain(..at);
        Ok(())
    }

    /// Reads frames until `until` is met (true), or the stream ends (false).
    pub async fn read(&mut self, until: Until) -> std::io::Result<bool> {
        loop {
            // What came with the response's head, or with the last read.
            self.dechunk()?;
            if self.frames(until) {
                return Ok(true);
            }
            if self.done || !self.fill().await? {
                self.seen.ended_early = true;
                return Ok(false);
            }
        }
    }

    /// Handles every whole frame in `body`; true when `until` was met (the
    /// rest stays for the next read).
    fn frames(&mut self, until: Until) -> bool {
        let mut at = 0;
        let mut met = false;
        while let Some(end) = memmem::find(&self.body[at..], b"\n\n") {
            let frame = at..at + end;
            at += end + 2;
            self.seen.bytes += (end + 2) as u64;
            if self.frame(frame, until) {
                met = true;
                break;
            }
        }
        self.body.drain(..at);
        met
    }

    /// One frame; true when it meets `until`.
    fn frame(&mut self, range: std::ops::Range<usize>, until: Until) -> bool {
        let frame = &self.body[range];
        if frame == b"event: caught-up\ndata: {}" {
            self.seen.caught_up = true;
            return until == Until::CaughtUp;
        }
        let Some(rest) = frame.strip_prefix(b"id: ") else {
            return false; // keepalive, delta or notice: no id
        };
        let newline = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let Some(id) = std::str::from_utf8(&rest[..newline]).ok().and_then(|s| s.parse::<u64>().ok()) else {
            self.seen.gaps += 1;
            return false;
        };
        let data = &rest[newline..];
        self.seen.events += 1;
        if id > self.expected_id {
            self.seen.gaps += 1;
        } else if id < self.expected_id {
            self.seen.duplicates += 1;
        }
        self.expected_id = self.expected_id.max(id + 1);
        self.seen.last_id = Some(id);
        if let Some(at) = memmem::find(data, MARK) {
            let mut words = data[at + MARK.len()..].split(|b| *b == b' ');
            let number = |w: Option<&[u8]>| w.and_then(|w| std::str::from_utf8(w).ok()?.parse::<u64>().ok());
            if let (Some(seq), Some(emit)) = (number(words.next()), number(words.next())) {
                if self.expected_seq.is_some_and(|expected| seq != expected) {
                    self.seen.seq_breaks += 1;
                }
                self.expected_seq = Some(seq + 1);
                if self.record {
                    let _ = self.seen.latency.record(now_us().saturating_sub(emit).max(1));
                }
            }
        }
        until == Until::TurnEnd && memmem::find(data, br#""kind":"turn_end""#).is_some()
    }
}

/// Connects and sends an attach request, then never reads: the slow client.
/// Its receive buffer is kept small so the server meets the stall early.
pub async fn attach_and_stall(addr: SocketAddr, token: &str, session: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut tcp = socket.connect(addr).await?;
    tcp.write_all(&request(session, token, None)).await?;
    Ok(tcp)
}

/// `GET path` on a new connection: the status code, or an error.
pub async fn get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))
}

/// Polls `path` until it answers 200; the time it took, or `None` past `within`.
pub async fn first_ok(addr: SocketAddr, path: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if get_status(addr, path).await.is_ok_and(|s| s == 200) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// Checks the checker, before any figure is taken: a stream with a gap, a
/// duplicate and a lost line of the stand-in must be counted as such, and
/// a sound one must not, whether the bytes come all at once (with the
/// response's head) or a few at a time (frames and chunks cut anywhere).
pub async fn self_check() {
    let event = |id: u64, seq: u64| {
        format!(
            "id: {id}\ndata: {{\"kind\":\"text\",\"text\":\"bgload {seq:010} {:016} x\",\"id\":{id}}}\n\n",
            now_us()
        )
    };
    let response = |frames: &[String]| {
        let mut bytes =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for frame in frames {
            bytes.extend_from_slice(format!("{:x}\r\n{frame}\r\n", frame.len()).as_bytes());
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        bytes
    };
    let turn_end = |id: u64| format!("id: {id}\ndata: {{\"kind\":\"turn_end\",\"id\":{id}}}\n\n");
    let caught_up = "event: caught-up\ndata: {}\n\n".to_owned();
    let sound = response(&[
        caught_up.clone(),
        event(0, 0),
        event(1, 1),
        ": keepalive\nevent: keepalive\ndata: {}\n\n".into(),
        event(2, 2),
        turn_end(3),
    ]);
    let broken = response(&[caught_up, event(0, 0), event(2, 1), event(2, 2), event(3, 4), turn_end(4)]);
    for piece in [usize::MAX, 7] {
        for (bytes, expected) in [(&sound, (4, 0, 0, 0)), (&broken, (5, 1, 1, 1))] {
            let (mut writer, reader) = tokio::io::duplex(piece.min(64 * 1024));
            let bytes = bytes.clone();
            let feeding = tokio::spawn(async move {
                let _ = writer.write_all(&bytes).await;
            });
            let mut stream = Stream::over(reader, None, true);
            stream.read_head().await.expect("the head");
            assert!(stream.read(Until::CaughtUp).await.expect("read"), "no caught-up");
            assert!(stream.read(Until::TurnEnd).await.expect("read"), "no turn_end");
            let seen = &stream.seen;
            assert_eq!(
                (seen.events, seen.gaps, seen.duplicates, seen.seq_breaks),
                expected,
                "the client's checks miscounted ({})",
                if piece == usize::MAX { "all at once".to_owned() } else { format!("{piece} bytes at a time") }
            );
            assert_eq!(seen.latency.len(), expected.0 - 1, "a latency per stand-in line");
            feeding.await.expect("feeder");
        }
    }
}
