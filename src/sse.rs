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

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, EventId, Stored};
use crate::hub::{Published, Subscription};
use crate::log::Log;
use crate::store::StoreError;

/// Events read from the log at a time while replaying.
const PAGE: usize = 256;

pub const CAUGHT_UP: &str = "event: caught-up\ndata: {}\n\n";
/// A comment (README "API") that also dispatches a `keepalive` event: pages using
/// `EventSource` never see comments, and need some sign that a silent link
/// is alive.
pub const KEEPALIVE: &str = ": keepalive\nevent: keepalive\ndata: {}\n\n";

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
    Bytes::from(format!("id: {}\ndata: {}\n\n", event.id, event.json))
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
pub fn attach(
    log: Arc<Log>,
    last_event_id: Option<EventId>,
    keepalive: Duration,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let state = Attach {
        subscription: log.subscribe(),
        log,
        sent: last_event_id,
        pending: VecDeque::new(),
        phase: Phase::Backlog,
        keepalive,
        shutdown,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let frame = state.next_frame().await?;
        Some((Ok(frame), state))
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
    /// The log is damaged: the stream has said so and ends.
    Ended,
}

struct Attach {
    log: Arc<Log>,
    subscription: Subscription,
    /// The highest id this stream has sent (or the client already had).
    sent: Option<EventId>,
    pending: VecDeque<Stored>,
    phase: Phase,
    keepalive: Duration,
    shutdown: CancellationToken,
}

impl Attach {
    async fn next_frame(&mut self) -> Option<Bytes> {
        match self.step().await {
            Ok(frame) => frame,
            Err(End::Quietly) => None,
            Err(End::Told(frame)) => {
                self.phase = Phase::Ended;
                self.pending.clear();
                Some(frame)
            }
        }
    }

    /// The next frame; `Ok(None)` when the stream is over.
    async fn step(&mut self) -> Result<Option<Bytes>, End> {
        loop {
            if matches!(self.phase, Phase::Ended) {
                return Ok(None);
            }
            if self.shutdown.is_cancelled() && matches!(self.phase, Phase::Live | Phase::CatchUp) {
                self.phase = Phase::Closing;
            }
            if let Some(event) = self.pending.pop_front() {
                if !self.is_new(event.id) {
                    continue;
                }
                // Ids are contiguous in a sound log; a hole means lost rows.
                if Some(event.id) != self.next_expected() {
                    return Err(self.damaged(None).await);
                }
                self.sent = Some(event.id);
                return Ok(Some(frame(&event)));
            }
            match self.phase {
                Phase::Backlog => {
                    if !self.fill_from_log().await? && !self.reached_the_end().await? {
                        return Err(self.damaged(None).await);
                    }
                    if self.pending.is_empty() {
                        self.phase = Phase::Live;
                        return Ok(Some(Bytes::from_static(CAUGHT_UP.as_bytes())));
                    }
                }
                Phase::CatchUp => {
                    if !self.fill_from_log().await? {
                        self.phase = Phase::Live;
                    }
                }
                // Whatever the log holds is sent before the stream ends, so
                // a drain's last events (the turns' ends) reach the client.
                Phase::Closing => {
                    if !self.fill_from_log().await? {
                        return Ok(None);
                    }
                }
                Phase::Ended => return Ok(None),
                Phase::Live => {
                    let received = tokio::select! {
                        _ = self.shutdown.cancelled() => continue,
                        received = tokio::time::timeout(self.keepalive, self.subscription.recv()) => received,
                    };
                    match received {
                        Err(_idle) => return Ok(Some(Bytes::from_static(KEEPALIVE.as_bytes()))),
                        Ok(Ok(Published::Notice(json))) => return Ok(Some(notice_frame(&json))),
                        Ok(Ok(Published::Delta { after, json })) => {
                            if self.sent.is_none_or(|sent| after.is_some_and(|after| after >= sent)) {
                                return Ok(Some(delta_frame(&json)));
                            }
                        }
                        Ok(Ok(Published::Event(event))) if !self.is_new(event.id) => {}
                        Ok(Ok(Published::Event(event))) if Some(event.id) == self.next_expected() => {
                            self.pending.push_back(event)
                        }
                        // A gap (the ring dropped events for us) or a lag
                        // notice: the log has everything; read it to its end.
                        Ok(Ok(Published::Event(_))) | Ok(Err(RecvError::Lagged(_))) => self.phase = Phase::CatchUp,
                        Ok(Err(RecvError::Closed)) => return Ok(None),
                    }
                }
            }
        }
    }

    fn is_new(&self, id: EventId) -> bool {
        self.sent.is_none_or(|sent| id > sent)
    }

    fn next_expected(&self) -> Option<EventId> {
        Some(self.sent.map_or(0, |sent| sent + 1))
    }

    /// Queues the next page of the log after what was sent; false when there
    /// was nothing more. A log that cannot be read ends the stream: quietly
    /// when that may pass (the client reconnects with its Last-Event-ID),
    /// with an error notice when the log is damaged.
    async fn fill_from_log(&mut self) -> Result<bool, End> {
        match self.log.read_after(self.sent, PAGE).await {
            Ok(page) => {
                let more = !page.is_empty();
                self.pending.extend(page);
                Ok(more)
            }
            Err(StoreError::Corrupt(err)) => Err(self.damaged(Some(&err)).await),
            Err(err) => {
                tracing::warn!(%err, "attach stream ends: the log cannot be read");
                Err(End::Quietly)
            }
        }
    }

    /// Whether what was sent reaches the log's end, asked once the log had
    /// nothing more after it. A count taken before a read is covered by that
    /// read, so events committed meanwhile are read (and the replay goes on)
    /// rather than taken for missing ones.
    async fn reached_the_end(&mut self) -> Result<bool, End> {
        let count = self.log.next_id().await.map_err(|err| {
            tracing::warn!(%err, "attach stream ends: the log cannot be read");
            End::Quietly
        })?;
        if self.next_expected().is_some_and(|next| next >= count) {
            return Ok(true);
        }
        self.fill_from_log().await
    }

    /// The notice that ends a stream on a damaged log, and the log line
    /// that goes with it.
    async fn damaged(&self, cause: Option<&str>) -> End {
        let at = self.next_expected().unwrap_or(0);
        let count = self.log.next_id().await.map_or_else(|_| "?".to_owned(), |c| c.to_string());
        let error = format!("the log of this session is damaged: replay stopped at id {at} of {count}");
        tracing::error!(session = %self.log.session(), cause, "{error}");
        End::Told(notice_frame(&crate::log::notice(&Event::Error { error })))
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

    /// Reads frames until `turn_end`, returning the event ids and how many
    /// `caught-up` frames were seen.
    async fn ids_until_turn_end(stream: impl Stream<Item = Result<Bytes, Infallible>>) -> (Vec<EventId>, usize) {
        let mut stream = std::pin::pin!(stream);
        let (mut ids, mut caught_up) = (Vec::new(), 0);
        loop {
            let next = tokio::time::timeout(Duration::from_secs(20), stream.next()).await;
            let Some(Ok(frame)) = next.expect("the stream went silent before turn_end") else {
                break;
            };
            let text = std::str::from_utf8(&frame).unwrap();
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
        let stream = attach(log.clone(), None, Duration::from_secs(60), CancellationToken::new());
        let mut stream = Box::pin(stream);
        assert_eq!(&stream.next().await.unwrap().unwrap()[..], CAUGHT_UP.as_bytes());
        append_many(&log, 70_000).await; // far beyond the hub's ring, nobody reading
        let (ids, caught_up) = ids_until_turn_end(stream).await;
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
            let stream = attach(log.clone(), None, Duration::from_secs(60), CancellationToken::new());
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
        let mut stream = Box::pin(attach(log.clone(), None, Duration::from_secs(60), CancellationToken::new()));
        log.delta(&delta("stale "));
        log.append(Event::Text { text: "stale text".into(), message_id: Some("msg_1".into()), index: Some(0) })
            .await
            .unwrap();
        let mut frames = Vec::new();
        loop {
            let frame = stream.next().await.unwrap().unwrap();
            let done = &frame[..] == CAUGHT_UP.as_bytes();
            frames.push(String::from_utf8(frame.to_vec()).unwrap());
            if done {
                break;
            }
        }
        log.delta(&delta("fresh"));
        log.append(Event::TurnEnd).await.unwrap();
        for _ in 0..2 {
            frames.push(String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap());
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
        let mut stream = Box::pin(attach(log.clone(), None, Duration::from_secs(60), CancellationToken::new()));
        assert_eq!(&stream.next().await.unwrap().unwrap()[..], CAUGHT_UP.as_bytes());
        let delta = crate::event::Delta { message_id: "msg_1".into(), index: 0, text: "x".into() };
        for i in 0..50 {
            log.append(Event::Status { text: i.to_string() }).await.unwrap();
            for _ in 0..crate::hub::CAPACITY {
                log.delta(&delta);
            }
        }
        log.append(Event::TurnEnd).await.unwrap();
        let (ids, _) = ids_until_turn_end(stream).await;
        assert_eq!(ids, (0..=50).collect::<Vec<_>>());
    }

    #[test]
    fn frame_is_id_then_one_data_line() {
        let stored = Stored { id: 3, json: r#"{"kind":"text","text":"a\nb","id":3}"#.into() };
        assert_eq!(&frame(&stored)[..], b"id: 3\ndata: {\"kind\":\"text\",\"text\":\"a\\nb\",\"id\":3}\n\n");
    }
}
