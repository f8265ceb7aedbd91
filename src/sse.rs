//! The attach stream (README "API"), in the `text/event-stream` format of the
//! HTML Living Standard (§9.2 Server-sent events).
//!
//! Order on one stream: the backlog (every event, or those after
//! `Last-Event-ID`), one `caught-up` frame, then live events, with a
//! `: keepalive` comment whenever the stream has been idle for a period.
//! The stream subscribes before it reads the backlog and skips ids it has
//! already sent, so an event appended while a client attaches is sent exactly
//! once. A subscriber that lags behind the hub's ring reads what it missed
//! from the log instead of failing.
//!
//! `caught-up` promises the client it has the whole log, so it is sent only
//! once the replay has reached the log's end (its event count) with no id
//! missing on the way. A log damaged in the middle (rows lost, a page that
//! cannot be read) ends the stream instead, with an error notice saying
//! where the replay stopped: the client must not take a short history for
//! the whole one, and reconnecting would only stop at the same place.
//!
//! Deltas (new characters of a text block, README "API") are sent live as
//! `event: delta` frames without an id: never logged, never replayed, and
//! never after an event the client already has that was published later
//! than them (that event may be the text they belong to).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::AbortOnDropHandle;

use crate::event::{Event, EventId, Stored};
use crate::hub::{Published, Subscription};
use crate::log::Log;
use crate::store::StoreError;

/// Bytes of event JSON read from the log at a time while replaying: one
/// page is in flight per client, encoded as frames while it is read.
const PAGE_BYTES: usize = 256 * 1024;
/// Live frames put in one body chunk, at most (one frame may exceed it): a
/// client that fell behind gets what waits for it in one write, not one
/// write per frame.
const CHUNK_BYTES: usize = 64 * 1024;

pub const CAUGHT_UP: &str = "event: caught-up\ndata: {}\n\n";
/// A comment (README "API") that also dispatches a `keepalive` event: pages using
/// `EventSource` never see comments, and need some sign that a silent link
/// is alive.
pub const KEEPALIVE: &str = ": keepalive\nevent: keepalive\ndata: {}\n\n";

/// What attach streams count for `GET /metrics` (README "Metrics").
#[derive(Debug, Clone)]
pub struct StreamCounters {
    /// Streams open now, by `stream`: `session` or `operation`.
    pub attached: Family<[(&'static str, &'static str); 1], Gauge>,
    /// Bytes of a session's events sent from the log rather than live: the
    /// replay on attach and resume, and the catch-up of a lagging stream.
    pub replay_bytes: Counter,
}

impl Default for StreamCounters {
    /// Both kinds of stream start at zero, so that a scraper sees them
    /// before the first client attaches.
    fn default() -> Self {
        let attached = Family::default();
        for stream in ["session", "operation"] {
            drop(attached.get_or_create(&[("stream", stream)]));
        }
        StreamCounters { attached, replay_bytes: Counter::default() }
    }
}

/// One open stream, counted in [`StreamCounters::attached`] until it is
/// dropped (its client went away, or the stream ended).
#[derive(Debug)]
pub struct Attachment(Gauge);

impl Attachment {
    /// `stream` names the kind: `session` or `operation`.
    pub fn new(counters: &StreamCounters, stream: &'static str) -> Self {
        let gauge = counters.attached.get_or_create_owned(&[("stream", stream)]);
        gauge.inc();
        Attachment(gauge)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `Last-Event-ID` request header: a non-negative integer, or absent.
/// Anything else means a full replay, never an error.
pub fn parse_last_event_id(value: Option<&[u8]>) -> Option<EventId> {
    let text = std::str::from_utf8(value?).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// One event as an SSE frame. The JSON is a single line (serde_json escapes
/// newlines inside strings), so one `data:` field carries it.
pub fn frame(event: &Stored) -> Bytes {
    let mut buf = Vec::with_capacity(event.json.len() + 32);
    push_frame(&mut buf, event.id, &event.json);
    Bytes::from(buf)
}

/// Appends `id: N\ndata: <json>\n\n` to `buf`.
fn push_frame(buf: &mut Vec<u8>, id: EventId, json: &str) {
    buf.extend_from_slice(b"id: ");
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = id;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
    buf.extend_from_slice(b"\ndata: ");
    buf.extend_from_slice(json.as_bytes());
    buf.extend_from_slice(b"\n\n");
}

/// A notice the log could not keep: a frame without an id, so a client's
/// Last-Event-ID is unaffected.
pub fn notice_frame(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

/// A delta: a named event without an id, so a client's Last-Event-ID is
/// unaffected and nothing replays it.
pub fn delta_frame(json: &str) -> Bytes {
    Bytes::from(format!("event: delta\ndata: {json}\n\n"))
}

/// The frames of one attached client, ending when `shutdown` fires (after
/// everything already in the log is sent) or the log can no longer be read.
/// Each item is one body chunk of one or more whole frames.
pub fn attach(
    log: Arc<Log>,
    last_event_id: Option<EventId>,
    keepalive: Duration,
    shutdown: CancellationToken,
    counters: &StreamCounters,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + use<> {
    // The stream's own token, cancelled with the server's: it is looked at
    // for every chunk, and the server's is one lock shared by every stream.
    let shutdown = shutdown.child_token();
    let state = Attach {
        subscription: log.subscribe(),
        log,
        sent: last_event_id,
        phase: Phase::Backlog,
        keepalive,
        idle: Box::pin(tokio::time::sleep(keepalive)),
        last_write: Instant::now(),
        cancelled: Box::pin(shutdown.clone().cancelled_owned()),
        shutdown,
        prefetch: None,
        replay_bytes: counters.replay_bytes.clone(),
        _attached: Attachment::new(counters, "session"),
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((Ok(chunk), state))
    })
}

/// Why a stream ends before its client leaves or the server drains.
enum End {
    /// The log could not be read for now: the client reconnects.
    Quietly,
    /// The log is damaged: this notice says where, and the stream ends.
    Told(Bytes),
}

enum Phase {
    /// Replaying the log; `caught-up` follows.
    Backlog,
    /// Tailing the hub.
    Live,
    /// Reading what the hub dropped for us from the log, then back to live.
    CatchUp,
    /// Shutting down: sending what the log holds, then ending.
    Closing,
    /// Nothing more to send: the log is damaged and the stream said so, or
    /// the drain sent the log's end.
    Ended,
}

struct Attach {
    log: Arc<Log>,
    subscription: Subscription,
    /// The highest id this stream has sent (or the client already had).
    sent: Option<EventId>,
    phase: Phase,
    keepalive: Duration,
    /// Fires at the earliest time a keepalive may be due. It is moved only
    /// when it fires, never per event: a timer registered and cancelled for
    /// every event of every client costs more than the event's write.
    idle: Pin<Box<Sleep>>,
    /// When this stream last handed a chunk to its connection.
    last_write: Instant,
    shutdown: CancellationToken,
    /// `shutdown`, waited on across events (one waiter per stream, not one
    /// made and dropped per event).
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The next page of the log, read while the last one is being sent, so
    /// that reading and sending overlap: at most two pages per stream.
    /// Aborted if the stream ends first.
    prefetch: Option<Prefetch>,
    /// Counts the pages sent from the log.
    replay_bytes: Counter,
    /// Counts this stream as attached while it lives.
    _attached: Attachment,
}

/// A page of the log being read ahead.
struct Prefetch {
    /// What it reads after.
    after: Option<EventId>,
    read: AbortOnDropHandle<Result<(Page, EventId), StoreError>>,
}

/// The frames of one page of the log, encoded as its rows are read.
#[derive(Default)]
struct Page {
    frames: Vec<u8>,
    /// The id the next row must have: ids are contiguous in a sound log.
    next: EventId,
    /// The last id encoded.
    last: Option<EventId>,
    /// A row came with another id than `next`: rows are missing there.
    gap: bool,
}

/// Frames ready to go out in one chunk: a single frame is sent as it is
/// (an event's frame is shared by every client), more are copied together.
#[derive(Default)]
struct Batch {
    single: Option<Bytes>,
    joined: Vec<u8>,
}

impl Batch {
    fn push(&mut self, frame: Bytes) {
        if self.single.is_none() && self.joined.is_empty() {
            self.single = Some(frame);
            return;
        }
        if let Some(first) = self.single.take() {
            self.joined.extend_from_slice(&first);
        }
        self.joined.extend_from_slice(&frame);
    }

    fn len(&self) -> usize {
        self.single.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    fn into_chunk(self) -> Option<Bytes> {
        match self.single {
            Some(frame) => Some(frame),
            None if self.joined.is_empty() => None,
            None => Some(Bytes::from(self.joined)),
        }
    }
}

impl Attach {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        let chunk = match self.step().await {
            Ok(chunk) => chunk,
            Err(End::Quietly) => None,
            Err(End::Told(notice)) => {
                self.phase = Phase::Ended;
                Some(notice)
            }
        };
        self.last_write = Instant::now();
        chunk
    }

    /// The next chunk; `Ok(None)` when the stream is over.
    async fn step(&mut self) -> Result<Option<Bytes>, End> {
        loop {
            if self.shutdown.is_cancelled() && matches!(self.phase, Phase::Live | Phase::CatchUp) {
                self.phase = Phase::Closing;
            }
            match self.phase {
                Phase::Ended => return Ok(None),
                Phase::Backlog | Phase::CatchUp | Phase::Closing => {
                    if let Some(chunk) = self.read_log().await? {
                        return Ok(Some(chunk));
                    }
                }
                Phase::Live => {
                    if let Some(chunk) = self.live().await? {
                        return Ok(Some(chunk));
                    }
                }
            }
        }
    }

    /// One page of the log after what was sent, as one chunk, and where the
    /// stream goes next; `None` when there was nothing to send. `caught-up`
    /// promises the whole log, so the replay sends it only once what was
    /// sent reaches the log's count (read with the page, in one snapshot);
    /// a page that stops short of it, or a row missing on the way, is a
    /// damaged log.
    async fn read_log(&mut self) -> Result<Option<Bytes>, End> {
        let read = match self.prefetch.take() {
            Some(prefetch) if prefetch.after == self.sent => {
                prefetch.read.await.unwrap_or_else(|err| Err(StoreError::Sqlite(format!("reader task failed: {err}"))))
            }
            // Dropping one read after something else aborts it.
            _ => read_page(self.log.clone(), self.sent).await,
        };
        let (page, count) = match read {
            Ok(read) => read,
            Err(StoreError::Corrupt(err)) => return Err(self.damaged(Some(&err)).await),
            Err(err) => {
                tracing::warn!(%err, "attach stream ends: the log cannot be read");
                return Err(End::Quietly);
            }
        };
        // An id this log never issued (a log from another life): replay it all.
        if matches!(self.phase, Phase::Backlog)
            && let Some(sent) = self.sent.filter(|&sent| sent >= count)
        {
            tracing::warn!(session = %self.log.session(), last_event_id = sent, next = count, "Last-Event-ID beyond the log; replaying it all");
            self.sent = None;
            return Ok(None);
        }
        if page.last.is_some() {
            self.sent = page.last;
        }
        let at_end = !page.gap && self.next_expected() >= count;
        let mut frames = page.frames;
        self.replay_bytes.inc_by(frames.len() as u64);
        // Rows missing: what came before them was sent, and this read
        // (which starts at the hole) says where the replay stopped.
        if frames.is_empty() && page.gap {
            return Err(self.damaged(None).await);
        }
        match self.phase {
            Phase::Backlog if at_end => {
                frames.extend_from_slice(CAUGHT_UP.as_bytes());
                self.phase = Phase::Live;
            }
            // The log ends short of its count: rows missing at its end.
            Phase::Backlog if frames.is_empty() => return Err(self.damaged(None).await),
            Phase::CatchUp if at_end || frames.is_empty() => self.phase = Phase::Live,
            // Whatever the log holds is sent before the stream ends, so a
            // drain's last events (the turns' ends) reach the client.
            Phase::Closing if at_end || frames.is_empty() => self.phase = Phase::Ended,
            _ => {}
        }
        if !at_end && !frames.is_empty() && matches!(self.phase, Phase::Backlog | Phase::CatchUp | Phase::Closing) {
            let after = self.sent;
            let read = tokio::spawn(read_page(self.log.clone(), after));
            self.prefetch = Some(Prefetch { after, read: AbortOnDropHandle::new(read) });
        }
        Ok((!frames.is_empty()).then(|| Bytes::from(frames)))
    }

    /// What the hub has for this stream, as one chunk: the first item waited
    /// for, then whatever else is already there (up to [`CHUNK_BYTES`]).
    /// `None` when nothing was to be sent (a keepalive not yet due, a stale
    /// delta, or the hub dropped events and the log is to be read).
    async fn live(&mut self) -> Result<Option<Bytes>, End> {
        let first = tokio::select! {
            biased;
            received = self.subscription.recv() => received,
            // `step` sees the token and closes; this future is not polled again.
            () = self.cancelled.as_mut() => return Ok(None),
            () = self.idle.as_mut() => {
                let due = self.last_write + self.keepalive;
                let now = Instant::now();
                if now < due {
                    self.idle.as_mut().reset(due);
                    return Ok(None);
                }
                self.idle.as_mut().reset(now + self.keepalive);
                return Ok(Some(Bytes::from_static(KEEPALIVE.as_bytes())));
            }
        };
        let mut batch = Batch::default();
        let mut received = first;
        loop {
            match received {
                Ok(Published::Notice(json)) => batch.push(notice_frame(&json)),
                Ok(Published::Delta { after, json }) => {
                    if self.sent.is_none_or(|sent| after.is_some_and(|after| after >= sent)) {
                        batch.push(delta_frame(&json));
                    }
                }
                Ok(Published::Event(shared)) if !self.is_new(shared.event.id) => {}
                Ok(Published::Event(shared)) if shared.event.id == self.next_expected() => {
                    self.sent = Some(shared.event.id);
                    batch.push(shared.frame(frame));
                }
                // A gap (the ring dropped events for us) or a lag notice:
                // the log has everything; read it to its end.
                Ok(Published::Event(_)) | Err(RecvError::Lagged(_)) => {
                    self.phase = Phase::CatchUp;
                    break;
                }
                Err(RecvError::Closed) => {
                    self.phase = Phase::Ended;
                    break;
                }
            }
            if batch.len() >= CHUNK_BYTES {
                break;
            }
            received = match self.subscription.try_recv() {
                Ok(item) => Ok(item),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
            };
        }
        Ok(batch.into_chunk())
    }

    fn is_new(&self, id: EventId) -> bool {
        self.sent.is_none_or(|sent| id > sent)
    }

    fn next_expected(&self) -> EventId {
        self.sent.map_or(0, |sent| sent + 1)
    }

    /// The notice that ends a stream on a damaged log, and the log line
    /// that goes with it.
    async fn damaged(&self, cause: Option<&str>) -> End {
        let at = self.next_expected();
        let count = self.log.next_id().await.map_or_else(|_| "?".to_owned(), |c| c.to_string());
        let error = format!("the log of this session is damaged: replay stopped at id {at} of {count}");
        tracing::error!(session = %self.log.session(), cause, "{error}");
        End::Told(notice_frame(&crate::log::notice(&Event::Error { error })))
    }
}

/// The page of the log after `after`, encoded, and the log's count.
async fn read_page(log: Arc<Log>, after: Option<EventId>) -> Result<(Page, EventId), StoreError> {
    let start = Page { next: after.map_or(0, |sent| sent + 1), ..Page::default() };
    log.scan_after(after, PAGE_BYTES, start, Page::push).await
}

impl Page {
    /// Encodes one row; false (stop reading) at a hole in the ids.
    fn push(&mut self, id: EventId, json: &str) -> bool {
        if id != self.next {
            self.gap = true;
            return false;
        }
        push_frame(&mut self.frames, id, json);
        self.last = Some(id);
        self.next = id + 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_accepts_only_non_negative_integers() {
        assert_eq!(parse_last_event_id(Some(b"42")), Some(42));
        assert_eq!(parse_last_event_id(Some(b" 7 ")), Some(7));
        assert_eq!(parse_last_event_id(Some(b"0")), Some(0));
        for bad in [&b""[..], b"-1", b"abc", b"1.5", b"+3", b"99999999999999999999999", b"\xff"] {
            assert_eq!(parse_last_event_id(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(parse_last_event_id(None), None);
    }

    use crate::event::Event;
    use futures_util::StreamExt;

    /// An attach stream as the tests mostly want it: a minute's keepalive,
    /// no shutdown, counters of its own.
    fn open(log: Arc<Log>, last_event_id: Option<EventId>) -> impl Stream<Item = Result<Bytes, Infallible>> {
        attach(log, last_event_id, Duration::from_secs(60), CancellationToken::new(), &StreamCounters::default())
    }

    /// The frames of a stream one at a time, whatever chunks carry them.
    struct Frames<S> {
        stream: std::pin::Pin<Box<S>>,
        ready: std::collections::VecDeque<String>,
    }

    impl<S: Stream<Item = Result<Bytes, Infallible>>> Frames<S> {
        fn new(stream: S) -> Self {
            Frames { stream: Box::pin(stream), ready: Default::default() }
        }

        /// The next frame; None once the stream ended.
        async fn next(&mut self) -> Option<String> {
            loop {
                if let Some(frame) = self.ready.pop_front() {
                    return Some(frame);
                }
                let next = tokio::time::timeout(Duration::from_secs(20), self.stream.next()).await;
                let Ok(chunk) = next.expect("the stream went silent")?;
                let text = std::str::from_utf8(&chunk).unwrap();
                assert!(text.ends_with("\n\n"), "a chunk carries whole frames: {text:?}");
                self.ready.extend(text.split_inclusive("\n\n").map(str::to_owned));
            }
        }

        /// The next chunk as it came (one or more whole frames).
        async fn chunk(&mut self) -> Bytes {
            assert!(self.ready.is_empty(), "frames of the last chunk are left: {:?}", self.ready);
            let next = tokio::time::timeout(Duration::from_secs(20), self.stream.next()).await;
            let Ok(chunk) = next.expect("the stream went silent").expect("the stream ended");
            chunk
        }
    }

    /// Reads frames until `turn_end`, returning the event ids and how many
    /// `caught-up` frames were seen.
    async fn ids_until_turn_end(stream: impl Stream<Item = Result<Bytes, Infallible>>) -> (Vec<EventId>, usize) {
        ids_of(&mut Frames::new(stream)).await
    }

    async fn ids_of<S: Stream<Item = Result<Bytes, Infallible>>>(frames: &mut Frames<S>) -> (Vec<EventId>, usize) {
        let (mut ids, mut caught_up) = (Vec::new(), 0);
        while let Some(text) = frames.next().await {
            if text == CAUGHT_UP {
                caught_up += 1;
                continue;
            }
            let Some(rest) = text.strip_prefix("id: ") else {
                continue;
            };
            ids.push(rest.split('\n').next().unwrap().parse().unwrap());
            if text.contains(r#""kind":"turn_end""#) {
                break;
            }
        }
        (ids, caught_up)
    }

    async fn append_many(log: &Log, n: usize) {
        let mut pending = Vec::with_capacity(n);
        for i in 0..n {
            pending.push(
                log.submit(Event::Text { text: i.to_string(), message_id: None, index: None }, None).await.unwrap(),
            );
        }
        for p in pending {
            p.committed().await.unwrap();
        }
        log.append(Event::TurnEnd).await.unwrap();
    }

    /// Regression: a subscriber that lagged read one page from the log and
    /// then waited for the next live event, stopping short of the log's end.
    #[tokio::test]
    async fn a_lagging_subscriber_reads_the_log_to_its_end() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        let mut frames = Frames::new(open(log.clone(), None));
        assert_eq!(frames.next().await.unwrap(), CAUGHT_UP);
        append_many(&log, 70_000).await; // far beyond the hub's ring, nobody reading
        let (ids, caught_up) = ids_of(&mut frames).await;
        assert_eq!(caught_up, 0, "caught-up is sent once, before the live tail");
        assert_eq!(ids, (0..=70_000).collect::<Vec<_>>());
    }

    /// Attaching while a writer appends: every id exactly once, whichever
    /// side of the backlog/live seam it falls on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attaching_during_appends_sends_each_id_once() {
        for round in 0..20 {
            let (_dir, log) = crate::log::tests::temp_log().await;
            let log = Arc::new(log);
            let writer = tokio::spawn({
                let log = log.clone();
                async move {
                    for i in 0..2_000 {
                        log.append(Event::Text { text: i.to_string(), message_id: None, index: None }).await.unwrap();
                        if i % 100 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    log.append(Event::TurnEnd).await.unwrap();
                }
            });
            // Attach at a different point of the writer's progress each round.
            for _ in 0..round * 10 {
                tokio::task::yield_now().await;
            }
            let stream = open(log.clone(), None);
            let (ids, caught_up) = ids_until_turn_end(stream).await;
            writer.await.unwrap();
            assert_eq!(caught_up, 1, "round {round}");
            assert_eq!(ids, (0..=2_000).collect::<Vec<_>>(), "round {round}");
        }
    }

    /// A delta published before an event the stream then sends from the
    /// log (its message's text, say) is stale: it is dropped, not sent
    /// after that event. One published after the stream's last event is sent.
    #[tokio::test]
    async fn a_delta_older_than_what_the_backlog_sent_is_dropped() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        log.append(Event::User { text: "?".into(), by: "t".into() }).await.unwrap();
        let delta = |text: &str| crate::event::Delta { message_id: "msg_1".into(), index: 0, text: text.into() };
        // Subscribed (the stream exists) but not yet polled: the delta waits
        // in its subscription while the text is appended.
        let mut stream = Frames::new(open(log.clone(), None));
        log.delta(&delta("stale "));
        log.append(Event::Text { text: "stale text".into(), message_id: Some("msg_1".into()), index: Some(0) })
            .await
            .unwrap();
        let mut frames = Vec::new();
        loop {
            let frame = stream.next().await.unwrap();
            let done = frame == CAUGHT_UP;
            frames.push(frame);
            if done {
                break;
            }
        }
        log.delta(&delta("fresh"));
        log.append(Event::TurnEnd).await.unwrap();
        for _ in 0..2 {
            frames.push(stream.next().await.unwrap());
        }
        assert!(frames[..2].iter().all(|f| f.starts_with("id: ")), "{frames:#?}");
        assert_eq!(frames[2], CAUGHT_UP);
        assert_eq!(frames[3], "event: delta\ndata: {\"index\":0,\"message_id\":\"msg_1\",\"text\":\"fresh\"}\n\n");
        assert!(frames[4].starts_with("id: 2\n"), "{frames:#?}");
    }

    /// Deltas are ephemeral: a subscriber that falls behind a flood of them
    /// may miss some, but never an event.
    #[tokio::test]
    async fn a_subscriber_lagging_behind_deltas_misses_no_event() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        let mut frames = Frames::new(open(log.clone(), None));
        assert_eq!(frames.next().await.unwrap(), CAUGHT_UP);
        let delta = crate::event::Delta { message_id: "msg_1".into(), index: 0, text: "x".into() };
        for i in 0..50 {
            log.append(Event::Status { text: i.to_string() }).await.unwrap();
            for _ in 0..crate::hub::CAPACITY {
                log.delta(&delta);
            }
        }
        log.append(Event::TurnEnd).await.unwrap();
        let (ids, _) = ids_of(&mut frames).await;
        assert_eq!(ids, (0..=50).collect::<Vec<_>>());
    }

    fn ids_in(chunk: &[u8]) -> Vec<EventId> {
        let text = std::str::from_utf8(chunk).unwrap();
        text.split_inclusive("\n\n")
            .filter_map(|frame| frame.strip_prefix("id: "))
            .map(|rest| rest.split('\n').next().unwrap().parse().unwrap())
            .collect()
    }

    /// A replay goes out in a few large chunks (one page of the log each),
    /// not a chunk per event, and still carries every id once, in order,
    /// with `caught-up` after the last.
    #[tokio::test]
    async fn a_replay_sends_pages_of_frames_each_id_once_then_caught_up() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        append_many(&log, 4_999).await;
        let mut frames = Frames::new(open(log.clone(), None));
        let (mut ids, mut chunks) = (Vec::new(), 0);
        loop {
            let chunk = frames.chunk().await;
            chunks += 1;
            ids.extend(ids_in(&chunk));
            if chunk.ends_with(CAUGHT_UP.as_bytes()) {
                break;
            }
        }
        assert_eq!(ids, (0..5_000).collect::<Vec<_>>());
        assert!(chunks <= 3, "{chunks} chunks for 5000 events");
    }

    /// A client resuming near the head gets its events and `caught-up` in
    /// one chunk, from one read of the log (the page and the count together).
    #[tokio::test]
    async fn a_resume_near_the_head_is_one_chunk_with_caught_up() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        append_many(&log, 99).await;
        let mut frames = Frames::new(open(log.clone(), Some(89)));
        let chunk = frames.chunk().await;
        assert_eq!(ids_in(&chunk), (90..100).collect::<Vec<_>>());
        assert!(chunk.ends_with(CAUGHT_UP.as_bytes()), "{chunk:?}");
    }

    /// A Last-Event-ID this log never issued (a log from another life)
    /// replays the whole log.
    #[tokio::test]
    async fn a_last_event_id_beyond_the_log_replays_it_all() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        append_many(&log, 9).await;
        for beyond in [10, 5_000] {
            let mut frames = Frames::new(open(log.clone(), Some(beyond)));
            let mut ids = Vec::new();
            while let Some(frame) = frames.next().await.filter(|frame| frame != CAUGHT_UP) {
                ids.extend(ids_in(frame.as_bytes()));
            }
            assert_eq!(ids, (0..10).collect::<Vec<_>>(), "Last-Event-ID {beyond}");
        }
    }

    /// Live events that wait for a client (it was busy writing) go out
    /// together in one chunk, in order.
    #[tokio::test]
    async fn live_events_waiting_for_a_client_go_out_in_one_chunk() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        let mut frames = Frames::new(open(log.clone(), None));
        assert_eq!(&frames.chunk().await[..], CAUGHT_UP.as_bytes());
        append_many(&log, 49).await;
        let chunk = frames.chunk().await;
        assert_eq!(ids_in(&chunk), (0..50).collect::<Vec<_>>());
    }

    /// Every attached client sends the same bytes for an event: it is
    /// encoded once, not once per client.
    #[tokio::test]
    async fn an_event_is_encoded_once_for_every_client() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        let mut clients: Vec<_> = (0..3).map(|_| Frames::new(open(log.clone(), None))).collect();
        for client in &mut clients {
            assert_eq!(&client.chunk().await[..], CAUGHT_UP.as_bytes());
        }
        log.append(Event::TurnEnd).await.unwrap();
        let mut chunks = Vec::new();
        for client in &mut clients {
            chunks.push(client.chunk().await);
        }
        assert!(chunks[0].starts_with(b"id: 0\n"), "{:?}", chunks[0]);
        assert!(chunks.iter().all(|chunk| chunk.as_ptr() == chunks[0].as_ptr()), "one encoding shared by all");
    }

    /// The keepalive comes once the stream has been quiet for the period,
    /// never while events flow faster than that.
    #[tokio::test]
    async fn a_keepalive_comes_after_a_quiet_period_only() {
        let (_dir, log) = crate::log::tests::temp_log().await;
        let log = Arc::new(log);
        let keepalive = Duration::from_millis(800);
        let mut frames =
            Frames::new(attach(log.clone(), None, keepalive, CancellationToken::new(), &StreamCounters::default()));
        assert_eq!(frames.next().await.unwrap(), CAUGHT_UP);
        let started = tokio::time::Instant::now();
        for i in 0..20 {
            // Pacing the events, not waiting for anything: a quarter of the period apart.
            tokio::time::sleep(keepalive / 4).await;
            log.append(Event::Status { text: i.to_string() }).await.unwrap();
            let frame = frames.next().await.unwrap();
            assert!(frame.starts_with(&format!("id: {i}\n")), "{frame:?}");
        }
        assert!(started.elapsed() > keepalive * 4, "the events spanned several periods");
        let quiet = tokio::time::Instant::now();
        assert_eq!(frames.next().await.unwrap(), KEEPALIVE);
        assert!(quiet.elapsed() >= keepalive * 3 / 4, "{:?}", quiet.elapsed());
    }

    #[test]
    fn frame_is_id_then_one_data_line() {
        let stored = Stored { id: 3, json: r#"{"kind":"text","text":"a\nb","id":3}"#.into() };
        assert_eq!(&frame(&stored)[..], b"id: 3\ndata: {\"kind\":\"text\",\"text\":\"a\\nb\",\"id\":3}\n\n");
    }
}
