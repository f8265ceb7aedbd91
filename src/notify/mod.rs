//! Notifications (README "Notifications"): telling the operator's phone
//! that an approval waits, a turn ended or a power verb finished.
//!
//! A [`Note`] is queued with [`Notifier::send`], which never waits: the
//! queue is bounded, and a note that does not fit is dropped and counted.
//! One worker task takes notes off the queue and hands each to every
//! channel ([`webhook`], [`push`]); a channel's failure is logged and
//! counted on `/metrics`, and never felt by the turn or request that sent
//! the note.

pub mod push;
pub mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::power::Verb;

/// Notes waiting for the worker; more are dropped (and counted).
pub const QUEUE: usize = 64;
/// A body longer than this many characters is cut (at a character boundary).
pub const BODY_CHARS: usize = 200;
/// A title longer than this many characters is cut.
pub const TITLE_CHARS: usize = 80;
/// Longest a single delivery may take, connecting and answer included.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a note is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// A tool call waits for the operator's decision.
    Approval,
    /// A turn ended, with its result or its error.
    TurnEnded,
    /// A power verb finished.
    Power,
}

impl NoteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoteKind::Approval => "approval",
            NoteKind::TurnEnded => "turn_ended",
            NoteKind::Power => "power",
        }
    }
}

/// ntfy's five priorities (<https://docs.ntfy.sh/publish/>), which Web
/// Push's `Urgency` (RFC 8030 §5.3) follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Min,
    Low,
    Default,
    High,
    Urgent,
}

impl Priority {
    /// ntfy's name for it, also used in the JSON formats.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Min => "min",
            Priority::Low => "low",
            Priority::Default => "default",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }

    /// ntfy's number for it, 1 to 5.
    pub fn number(self) -> u8 {
        match self {
            Priority::Min => 1,
            Priority::Low => 2,
            Priority::Default => 3,
            Priority::High => 4,
            Priority::Urgent => 5,
        }
    }

    /// The `Urgency` header of a push message (RFC 8030 §5.3).
    pub fn urgency(self) -> &'static str {
        match self {
            Priority::Min => "very-low",
            Priority::Low => "low",
            Priority::Default => "normal",
            Priority::High | Priority::Urgent => "high",
        }
    }
}

/// One notification, whatever the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub kind: NoteKind,
    pub title: String,
    pub body: String,
    pub priority: Priority,
    /// The session it is about, for the link back to it.
    pub session: Option<Uuid>,
}

impl Note {
    /// A tool call waits for the operator: the most urgent note there is,
    /// since the agent is stopped until someone taps.
    pub fn approval(session: Uuid, tool: &str, command: &str) -> Note {
        Note::new(NoteKind::Approval, format!("Approval needed: {tool}"), command, Priority::Urgent, Some(session))
    }

    /// A turn ended: with the agent's result line (`Ok`) or the error that
    /// ended it (`Err`).
    pub fn turn_ended(session: Uuid, outcome: Result<&str, &str>) -> Note {
        let (title, body) = match outcome {
            Ok(result) if result.trim().is_empty() => ("Turn ended", "(no result text)"),
            Ok(result) => ("Turn ended", result),
            Err(error) => ("Turn failed", error),
        };
        Note::new(NoteKind::TurnEnded, title.to_owned(), body, Priority::Default, Some(session))
    }

    /// A power verb finished on `target` (the hypervisor) with `outcome`
    /// ("exit 0", "timed out", …).
    pub fn power(verb: Verb, target: &str, outcome: &str) -> Note {
        Note::new(
            NoteKind::Power,
            format!("Power verb {verb}: {outcome}"),
            &format!("{verb} on {target}: {outcome}"),
            Priority::High,
            None,
        )
    }

    fn new(kind: NoteKind, title: String, body: &str, priority: Priority, session: Option<Uuid>) -> Note {
        Note {
            kind,
            title: truncate(&reveal_hidden(&title), TITLE_CHARS),
            body: truncate(&reveal_hidden(body), BODY_CHARS),
            priority,
            session,
        }
    }

    /// The console's page for this note: the session it is about (the
    /// console opens `/?session=<id>`, see web/app.js), or the console
    /// itself. `None` without a public URL: the server does not know the
    /// address browsers reach it at, and a guess would be a wrong link.
    pub fn link(&self, public_url: Option<&str>) -> Option<String> {
        let base = public_url?.trim_end_matches('/');
        Some(match self.session {
            Some(id) => format!("{base}/?session={id}"),
            None => format!("{base}/"),
        })
    }

    /// The JSON form, for `BREAKGLASS_NOTIFY_FORMAT=json` and inside a push
    /// message: `{"title","body","priority","url","kind","session"}`.
    pub fn to_json(&self, public_url: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "title": self.title,
            "body": self.body,
            "priority": self.priority.as_str(),
            "url": self.link(public_url),
            "kind": self.kind.as_str(),
            "session": self.session.map(|s| s.to_string()),
        })
    }
}

/// `text` cut to at most `max` characters, never inside one; a cut text
/// ends with "…" (counted in `max`).
/// Characters that cannot be seen (controls other than newline and tab,
/// bidi overrides and isolates, zero-width ones, tags) written as
/// `⟨U+202E⟩`, as the console's card shows them: a reversed or hidden part
/// of a command must not read as harmless on a lock screen either.
pub fn reveal_hidden(text: &str) -> String {
    let hidden = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c as u32, 0xAD | 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x2069 | 0xFEFF | 0xE0000..=0xE007F)
    };
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if hidden(c) {
            shown.push_str(&format!("⟨U+{:04X}⟩", c as u32));
        } else {
            shown.push(c);
        }
    }
    shown
}

pub fn truncate(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

/// The channels, as `/metrics` labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelName {
    Webhook,
    WebPush,
}

impl ChannelName {
    pub const ALL: [ChannelName; 2] = [ChannelName::Webhook, ChannelName::WebPush];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelName::Webhook => "webhook",
            ChannelName::WebPush => "webpush",
        }
    }
}

/// Deliveries of one channel, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

/// What `/metrics` shows of notifications.
#[derive(Debug, Default)]
pub struct Stats {
    pub webhook: Counts,
    pub push: Counts,
    /// Notes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Push subscriptions removed because their push service said they are gone.
    pub pruned: AtomicU64,
}

impl Stats {
    pub fn of(&self, channel: ChannelName) -> &Counts {
        match channel {
            ChannelName::Webhook => &self.webhook,
            ChannelName::WebPush => &self.push,
        }
    }

    fn count(&self, channel: ChannelName, sent: u64, failed: u64) {
        // Failures first: whoever sees a note's deliveries counted sees
        // its failures counted too.
        let counts = self.of(channel);
        counts.failed.fetch_add(failed, Ordering::SeqCst);
        counts.sent.fetch_add(sent, Ordering::SeqCst);
    }
}

/// How many deliveries of one note went through and how many failed (a
/// push note goes to every subscription).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub sent: u64,
    pub failed: u64,
}

/// A way to reach the operator. Each implementation is the only code that
/// knows its wire format; it logs its own failures (never a secret).
pub trait Channel: Send + Sync {
    fn name(&self) -> ChannelName;
    fn deliver<'a>(&'a self, note: &'a Note) -> BoxFuture<'a, Delivered>;
}

/// The queue and the channels behind it.
pub struct Notifier {
    queue: mpsc::Sender<Note>,
    stats: Arc<Stats>,
    push: Option<Arc<push::Push>>,
    /// Fired at shutdown: the worker stops once the queue is empty.
    closing: CancellationToken,
    /// Fired when the drain can wait no longer: deliveries are cut off.
    cut_off: CancellationToken,
    worker: TaskTracker,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Notifier {
    /// Starts the worker over `channels`; `push` is also kept for the
    /// subscription endpoints. Call from within the runtime.
    pub fn start(webhook: Option<webhook::Webhook>, push: Option<Arc<push::Push>>, stats: Arc<Stats>) -> Notifier {
        let mut channels: Vec<Arc<dyn Channel>> = Vec::new();
        if let Some(webhook) = webhook {
            channels.push(Arc::new(webhook));
        }
        if let Some(push) = &push {
            channels.push(push.clone());
        }
        let (queue, notes) = mpsc::channel(QUEUE);
        let (closing, cut_off, worker) = (CancellationToken::new(), CancellationToken::new(), TaskTracker::new());
        worker.spawn(work(notes, channels, stats.clone(), closing.clone(), cut_off.clone()));
        worker.close();
        Notifier { queue, stats, push, closing, cut_off, worker }
    }

    /// A notifier with no channel: notes are counted as dropped by nobody
    /// and go nowhere (tests of other parts, and `Default`).
    pub fn disabled() -> Notifier {
        Notifier::start(None, None, Arc::default())
    }

    /// Queues a note and returns at once. A full queue (channels slower
    /// than the notes) drops it and counts the drop.
    pub fn send(&self, note: Note) {
        match self.queue.try_send(note) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(note)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = note.kind.as_str(), "notification queue full: a note was dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The Web Push channel, for the subscription endpoints.
    pub fn push(&self) -> Option<&Arc<push::Push>> {
        self.push.as_ref()
    }

    /// At shutdown: lets the worker deliver what is queued (the ends of the
    /// turns shutdown stopped, say) for at most `within`, then cuts it off.
    pub async fn drain(&self, within: Duration) {
        self.closing.cancel();
        if tokio::time::timeout(within, self.worker.wait()).await.is_err() {
            tracing::warn!("notifications still being delivered {within:?} into shutdown; dropping them");
            self.cut_off.cancel();
            self.worker.wait().await;
        }
    }
}

/// The worker: one note at a time, to every channel at once.
async fn work(
    mut notes: mpsc::Receiver<Note>,
    channels: Vec<Arc<dyn Channel>>,
    stats: Arc<Stats>,
    closing: CancellationToken,
    cut_off: CancellationToken,
) {
    loop {
        let note = tokio::select! {
            biased;
            () = cut_off.cancelled() => return,
            note = notes.recv() => note,
            () = closing.cancelled(), if notes.is_empty() => return,
        };
        let Some(note) = note else { return };
        let deliveries = futures_util::future::join_all(channels.iter().map(|channel| async {
            let delivered = channel.deliver(&note).await;
            stats.count(channel.name(), delivered.sent, delivered.failed);
        }));
        tokio::select! {
            () = cut_off.cancelled() => return,
            _ = deliveries => {}
        }
    }
}

/// The HTTP client every channel uses: bounded in time, never following a
/// redirect (a 3xx is a failure: a redirect could carry a note, and a
/// token in its URL, somewhere the operator did not name), no proxy from
/// the environment, TLS with rustls and the system's roots.
///
/// Built when the first note goes out, not at start-up: reading the
/// system's roots is most of the time and memory a fresh start would spend
/// on it, most servers send few notes, and a certificate store that cannot
/// be read must cost the notifications (each counted as failed, and the
/// next note tries again), never the console (README "Notifications").
#[derive(Clone, Default)]
pub struct HttpClient(Arc<tokio::sync::OnceCell<reqwest::Client>>);

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").field("built", &self.0.initialized()).finish()
    }
}

impl HttpClient {
    /// The client, built on the first call (off the runtime's threads: it
    /// reads files); an error says why it could not be.
    pub async fn get(&self) -> Result<&reqwest::Client, String> {
        self.0
            .get_or_try_init(|| async {
                match tokio::task::spawn_blocking(build_http_client).await {
                    Ok(built) => built,
                    Err(err) => Err(format!("while building the HTTP client: {err}")),
                }
            })
            .await
    }

    /// Whether a note has needed it yet.
    pub fn is_built(&self) -> bool {
        self.0.initialized()
    }
}

fn build_http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .connect_timeout(DELIVERY_TIMEOUT / 2)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("breakglass/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|err| format!("while building the HTTP client: {err}"))
}

/// `scheme://host[:port]` of a URL: all that is ever logged of one, since
/// its path, query or user part may carry a token.
pub fn origin(url: &reqwest::Url) -> String {
    url.origin().ascii_serialization()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_http_client_is_built_by_the_first_note_and_kept() {
        let client = HttpClient::default();
        let shared = client.clone();
        assert!(!client.is_built(), "built before any note");
        let first: *const reqwest::Client = client.get().await.unwrap();
        assert!(shared.is_built(), "clones share the client");
        let again: *const reqwest::Client = shared.get().await.unwrap();
        assert_eq!(first, again, "built once");
    }

    #[test]
    fn truncation_keeps_whole_characters_and_marks_the_cut() {
        assert_eq!(truncate("  short  ", 10), "short");
        assert_eq!(truncate("abcdef", 6), "abcdef");
        assert_eq!(truncate("abcdefg", 6), "abcde…");
        // Multi-byte characters are never split: 300 'é' (2 bytes each).
        let long = "é".repeat(300);
        let cut = truncate(&long, BODY_CHARS);
        assert_eq!(cut.chars().count(), BODY_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("word word", 6), "word…", "no dangling space before the mark");
    }

    #[test]
    fn each_note_has_its_kind_priority_and_short_body() {
        let session = Uuid::new_v4();
        let approval = Note::approval(session, "Bash", &format!("ssh pve reset {}", "x".repeat(500)));
        assert_eq!(approval.kind, NoteKind::Approval);
        assert_eq!(approval.priority, Priority::Urgent);
        assert_eq!(approval.title, "Approval needed: Bash");
        assert!(approval.body.starts_with("ssh pve reset "));
        assert_eq!(approval.body.chars().count(), BODY_CHARS);
        assert_eq!(approval.session, Some(session));

        let ended = Note::turn_ended(session, Ok("devvm is up again"));
        assert_eq!((ended.title.as_str(), ended.body.as_str()), ("Turn ended", "devvm is up again"));
        assert_eq!(ended.priority, Priority::Default);
        let failed = Note::turn_ended(session, Err("turn timed out after 1800s"));
        assert_eq!((failed.title.as_str(), failed.body.as_str()), ("Turn failed", "turn timed out after 1800s"));

        let power = Note::power(Verb::Cycle, "pve.example", "exit 0");
        assert_eq!(power.kind, NoteKind::Power);
        assert_eq!(power.priority, Priority::High);
        assert_eq!(power.title, "Power verb cycle: exit 0");
        assert_eq!(power.body, "cycle on pve.example: exit 0");
        assert_eq!(power.session, None);
    }

    #[test]
    fn the_link_needs_a_public_url_and_names_the_session() {
        let session = Uuid::parse_str("0b7c6f1e-8f0a-4a57-9d7e-0c2f6a9b1d23").unwrap();
        let note = Note::turn_ended(session, Ok("done"));
        assert_eq!(note.link(None), None, "no guess without BREAKGLASS_PUBLIC_URL");
        let expected = "https://console.example/?session=0b7c6f1e-8f0a-4a57-9d7e-0c2f6a9b1d23";
        assert_eq!(note.link(Some("https://console.example/")).as_deref(), Some(expected));
        assert_eq!(note.link(Some("https://console.example")).as_deref(), Some(expected));
        let power = Note::power(Verb::Status, "pve", "exit 0");
        assert_eq!(power.link(Some("https://console.example")).as_deref(), Some("https://console.example/"));
        let json = note.to_json(Some("https://console.example"));
        assert_eq!(
            json,
            serde_json::json!({"title": "Turn ended", "body": "done", "priority": "default", "url": expected,
                "kind": "turn_ended", "session": session.to_string()})
        );
    }

    #[test]
    fn priorities_map_to_ntfy_and_push_urgency() {
        let all = [Priority::Min, Priority::Low, Priority::Default, Priority::High, Priority::Urgent];
        let numbers: Vec<_> = all.iter().map(|p| p.number()).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5]);
        let urgencies: Vec<_> = all.iter().map(|p| p.urgency()).collect();
        assert_eq!(urgencies, ["very-low", "low", "normal", "high", "high"]);
    }

    /// A channel that records what reaches it, and can be held up.
    struct Recorder {
        seen: std::sync::Mutex<Vec<Note>>,
        gate: tokio::sync::Semaphore,
    }

    impl Channel for Recorder {
        fn name(&self) -> ChannelName {
            ChannelName::Webhook
        }
        fn deliver<'a>(&'a self, note: &'a Note) -> BoxFuture<'a, Delivered> {
            Box::pin(async move {
                let _pass = self.gate.acquire().await;
                self.seen.lock().unwrap().push(note.clone());
                Delivered { sent: 1, failed: 0 }
            })
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let recorder = Arc::new(Recorder { seen: Default::default(), gate: tokio::sync::Semaphore::new(0) });
        let stats = Arc::new(Stats::default());
        let (queue, notes) = mpsc::channel(QUEUE);
        let (closing, cut_off) = (CancellationToken::new(), CancellationToken::new());
        let worker = tokio::spawn(work(notes, vec![recorder.clone()], stats.clone(), closing.clone(), cut_off.clone()));
        let notifier =
            Notifier { queue, stats: stats.clone(), push: None, closing, cut_off, worker: TaskTracker::new() };
        let session = Uuid::new_v4();
        // The worker holds one note at the closed gate; QUEUE more fit.
        let started = std::time::Instant::now();
        for i in 0..QUEUE + 10 {
            notifier.send(Note::turn_ended(session, Ok(&format!("turn {i}"))));
            tokio::task::yield_now().await;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "send never waits");
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 9, "one in the worker, {QUEUE} queued, the rest dropped");
        recorder.gate.add_permits(1000);
        notifier.closing.cancel();
        worker.await.unwrap();
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen.len(), QUEUE + 1, "the queue is delivered before the worker stops");
        assert_eq!(seen[0].body, "turn 0");
        assert_eq!(stats.webhook.sent.load(Ordering::Relaxed), QUEUE as u64 + 1);
    }

    #[tokio::test]
    async fn the_approval_note_goes_through_the_same_call_path() {
        let recorder = Arc::new(Recorder { seen: Default::default(), gate: tokio::sync::Semaphore::new(100) });
        let stats = Arc::new(Stats::default());
        let (queue, notes) = mpsc::channel(QUEUE);
        let (closing, cut_off) = (CancellationToken::new(), CancellationToken::new());
        let worker = tokio::spawn(work(notes, vec![recorder.clone()], stats, closing.clone(), cut_off.clone()));
        let notifier =
            Notifier { queue, stats: Arc::default(), push: None, closing, cut_off, worker: TaskTracker::new() };
        let session = Uuid::new_v4();
        notifier.send(Note::approval(session, "Bash", "ssh pve reset"));
        notifier.closing.cancel();
        worker.await.unwrap();
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(*seen, [Note::approval(session, "Bash", "ssh pve reset")]);
    }

    #[test]
    fn hidden_characters_are_named_in_notes() {
        let note = Note::approval(Uuid::nil(), "Bash", "echo safe \u{202E}/ fr- mr\u{200B}");
        assert_eq!(note.body, "echo safe ⟨U+202E⟩/ fr- mr⟨U+200B⟩");
        assert_eq!(reveal_hidden("two\nlines\tand tabs"), "two\nlines\tand tabs");
    }
}
