//! The writer thread: the only writing connection. It groups commands into
//! transactions, assigns event ids, and publishes events after the commit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::audit::{GENESIS, Head, chain_hash, write_head};
use super::operations::{self, Finish, OperationRow};
use super::{
    AuditEntry, AuditRecord, AuthMethod, Counters, Durability, Faults, Fence, Publish, SessionRow, StoreError,
    TITLE_CHARS, now_ms, to_sql,
};
use crate::event::{Encoded, Event, Stamp, Stored};

/// Most commands in one transaction. Each commit costs a sync and the
/// rewrite of the pages it touched, so a flood is cheaper in fewer, larger
/// transactions; a thousand events are still only a few milliseconds.
pub const BATCH_MAX: usize = 1024;
/// Longest a batch stays open while commands keep arriving.
pub const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Sessions whose next event id the writer remembers; beyond that it
/// forgets them all and reads each again when next written.
const ID_CACHE: usize = 10_000;

pub(super) enum Command {
    CreateSession {
        id: Uuid,
        now: i64,
        reply: oneshot::Sender<Result<SessionRow, StoreError>>,
    },
    Append {
        session: Uuid,
        /// Encoded by the producer: the writer only adds `id` and `at`.
        encoded: Encoded,
        effect: Effect,
        sink: Arc<dyn Publish>,
        fence: Option<Fence>,
        reply: oneshot::Sender<Result<Stored, StoreError>>,
    },
    SetTurn {
        session: Uuid,
        pgid: Option<i32>,
        marker: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Audit {
        record: AuditRecord,
        reply: oneshot::Sender<Result<AuditEntry, StoreError>>,
    },
    CreateOperation {
        row: OperationRow,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    OperationStep {
        operation: Uuid,
        step: Stored,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    FinishOperation {
        finish: Box<Finish>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::CreateSession { .. } => "CreateSession",
            Command::Append { .. } => "Append",
            Command::SetTurn { .. } => "SetTurn",
            Command::Audit { .. } => "Audit",
            Command::CreateOperation { .. } => "CreateOperation",
            Command::OperationStep { .. } => "OperationStep",
            Command::FinishOperation { .. } => "FinishOperation",
        })
    }
}

/// What an event means for its session's row.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Effect {
    /// A prompt: a turn is running, and the first one is the title.
    User {
        title: String,
    },
    /// The agent announced its session: later turns resume it.
    Session,
    /// The turn is over: nothing of it is left to find after a crash.
    TurnEnd,
    None,
}

impl Effect {
    pub(super) fn of(event: &Event) -> Self {
        match event {
            Event::User { text, .. } => Effect::User { title: text.trim().chars().take(TITLE_CHARS).collect() },
            Event::Session { .. } => Effect::Session,
            Event::TurnEnd => Effect::TurnEnd,
            _ => Effect::None,
        }
    }
}

/// A session's row as a batch's events leave it, written once per batch
/// (and before any other command that touches the row) rather than once
/// per event.
struct RowChange {
    /// The session's id as the tables key it.
    sid: String,
    /// Its next event id.
    event_count: u64,
    /// `Some` once a prompt or a turn's end was logged: the last one says.
    turn_running: Option<bool>,
    /// The first prompt's title (the row keeps the first it ever had).
    title: Option<String>,
    agent_started: bool,
    /// A turn ended: its process group and marker are gone.
    turn_cleared: bool,
}

/// The writer thread's state.
pub(super) struct Writer {
    conn: Connection,
    /// Next event id per session, as committed.
    next_ids: HashMap<Uuid, u64>,
    /// Sequence number and hash of the last committed audit record.
    audit_tail: Option<(i64, String)>,
    /// The data directory, where the audit head anchor lives.
    dir: PathBuf,
    /// The anchor agreed with the chain at start-up, so it follows the
    /// chain's head; one that did not is left as evidence.
    anchoring: bool,
    /// Under `normal`, batches holding audit records are still synced:
    /// the anchor written after them must never name a record that a power
    /// loss could take back.
    durability: Durability,
    /// Test hooks (debug builds only).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    faults: Faults,
    /// Commands received so far, for [`Faults::writer_panic_after`].
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    received: u64,
    /// The `at` of the events being stamped.
    stamp: Stamp,
    /// Events committed and writes failed, for `/metrics`.
    counters: Counters,
}

/// Changes made by the open transaction, applied to the writer's state only
/// once it commits.
#[derive(Default)]
struct Staged {
    next_ids: HashMap<Uuid, u64>,
    audit_tail: Option<(i64, String)>,
}

/// What a command did inside a transaction that then committed.
enum Done {
    Session(SessionRow),
    Event(Stored),
    Nothing,
    Audit(AuditEntry),
    /// The command's own input was wrong; the rest of the batch stands.
    Refused(StoreError),
}

impl Command {
    /// Answers the sender. A committed event is published to its sink
    /// first, in commit order.
    fn answer(self, outcome: Result<Done, StoreError>) {
        // A sender that has gone (a client disconnected) needs no answer.
        match (self, outcome) {
            (Command::CreateSession { reply, .. }, Ok(Done::Session(row))) => drop(reply.send(Ok(row))),
            (Command::Append { sink, reply, .. }, Ok(Done::Event(stored))) => {
                sink.publish(stored.clone());
                drop(reply.send(Ok(stored)));
            }
            (Command::SetTurn { reply, .. }, Ok(Done::Nothing)) => drop(reply.send(Ok(()))),
            (Command::Audit { reply, .. }, Ok(Done::Audit(entry))) => drop(reply.send(Ok(entry))),
            (
                Command::CreateOperation { reply, .. }
                | Command::OperationStep { reply, .. }
                | Command::FinishOperation { reply, .. },
                Ok(Done::Nothing),
            ) => drop(reply.send(Ok(()))),
            (command, Ok(Done::Refused(err))) => command.refuse(err),
            (command, Err(err)) => command.fail(err),
            (command, Ok(_)) => command.fail(StoreError::Sqlite("internal: mismatched answer".into())),
        }
    }

    /// Refuses the command, and the later writes of its producer.
    fn fail(self, err: StoreError) {
        if let Command::Append { fence: Some(fence), .. } = &self {
            fence.trip();
        }
        self.refuse(err);
    }

    /// Refuses the command for its own input; its producer may go on.
    fn refuse(self, err: StoreError) {
        match self {
            Command::CreateSession { reply, .. } => drop(reply.send(Err(err))),
            Command::Append { reply, .. } => drop(reply.send(Err(err))),
            Command::SetTurn { reply, .. } => drop(reply.send(Err(err))),
            Command::Audit { reply, .. } => drop(reply.send(Err(err))),
            Command::CreateOperation { reply, .. }
            | Command::OperationStep { reply, .. }
            | Command::FinishOperation { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        dir: PathBuf,
        anchoring: bool,
        durability: Durability,
        faults: Faults,
        counters: Counters,
    ) -> Self {
        Writer {
            counters,
            conn,
            next_ids: HashMap::new(),
            audit_tail: None,
            dir,
            anchoring,
            durability,
            faults,
            received: 0,
            stamp: Stamp::default(),
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let opened = Instant::now();
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX && opened.elapsed() < BATCH_WINDOW {
                match rx.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            #[cfg(debug_assertions)]
            {
                self.received += batch.len() as u64;
                if self.faults.writer_panic_after.is_some_and(|n| self.received >= n) {
                    panic!("injected fault (BREAKGLASS_FAULT_WRITER_PANIC_AFTER): the writer panics");
                }
            }
            self.apply(batch);
        }
        // Every sender is gone: the server is stopping. Leave a clean file.
        if let Err(err) = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
            tracing::warn!(%err, "could not checkpoint the database on close");
        }
    }

    /// One transaction for the whole batch. An event is one `INSERT`,
    /// which SQLite makes atomic on its own (a statement that fails is
    /// undone alone and the transaction goes on); every other command runs
    /// in a savepoint of its own. Either way a command that fails is rolled
    /// back alone and told why, and the rest commit (one session's trouble
    /// is not another's). Each session's row is updated once for the batch's
    /// events. When the transaction itself fails (its commit, a row's
    /// update, or an error after which SQLite rolled it all back), each
    /// command is tried again in a transaction of its own, so that again
    /// only the failing ones fail.
    fn apply(&mut self, batch: Vec<Command>) {
        match self.transaction(&batch) {
            Ok((outcomes, staged)) => self.committed(batch, outcomes, staged),
            Err(err) if batch.len() == 1 => {
                tracing::error!(%err, "a storage transaction failed; its write is refused");
                self.counters.write_failed(&err);
                batch.into_iter().for_each(|command| command.fail(err.clone()));
            }
            Err(err) => {
                tracing::warn!(%err, commands = batch.len(), "a storage transaction failed; retrying its writes one by one");
                for command in batch {
                    self.apply(vec![command]);
                }
            }
        }
    }

    /// Runs `batch` in one transaction and commits it. `Ok` holds each
    /// command's outcome (a command's own error is one of them); `Err`
    /// means the transaction as a whole failed and nothing of it was kept.
    fn transaction(&mut self, batch: &[Command]) -> Result<(Vec<Result<Done, StoreError>>, Staged), StoreError> {
        let sync_this_one =
            self.durability == Durability::Normal && batch.iter().any(|c| matches!(c, Command::Audit { .. }));
        if !sync_this_one {
            return self.write_batch(batch);
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let result = self.write_batch(batch);
        if let Err(err) = self.conn.pragma_update(None, "synchronous", "NORMAL") {
            tracing::warn!(%err, "could not return to synchronous=NORMAL after an audit record");
        }
        result
    }

    /// The transaction itself.
    fn write_batch(&mut self, batch: &[Command]) -> Result<(Vec<Result<Done, StoreError>>, Staged), StoreError> {
        let mut staged = Staged::default();
        let mut outcomes = Vec::with_capacity(batch.len());
        // Producers with a write that failed in this transaction: their
        // later writes are refused, as their fence will say once it is over.
        let mut failed: Vec<&Fence> = Vec::new();
        let mut rows: HashMap<Uuid, RowChange> = HashMap::new();
        // Immediate: the write lock is taken (waiting out the busy timeout)
        // before anything is read, so a transaction never has to upgrade a
        // read lock, which SQLite refuses at once when another connection
        // (a checkpoint, an operator's sqlite3) holds the database.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            // Prepared once per batch, not looked up once per event.
            let mut insert = tx.prepare_cached("INSERT INTO events (session, id, json) VALUES (?1, ?2, ?3)")?;
            for command in batch {
                let fenced = match command {
                    Command::Append { fence: Some(fence), .. } => {
                        fence.is_tripped() || failed.iter().any(|f| f.same(fence))
                    }
                    _ => false,
                };
                if fenced {
                    outcomes.push(Ok(Done::Refused(StoreError::Fenced)));
                    continue;
                }
                let outcome = match command {
                    Command::Append { session, encoded, effect, .. } => {
                        let event = NewEvent { session: *session, encoded, effect };
                        append(&tx, &mut insert, &self.next_ids, &mut staged, &mut rows, &mut self.stamp, event)
                    }
                    _ => {
                        // The row as this command finds it includes the
                        // events before it.
                        update_rows(&tx, &mut rows)?;
                        tx.prepare_cached("SAVEPOINT command")?.execute([])?;
                        let outcome = execute(&tx, &self.audit_tail, &mut staged, command);
                        if outcome.is_ok() {
                            tx.prepare_cached("RELEASE command")?.execute([])?;
                        } else if !tx.is_autocommit() {
                            tx.execute_batch("ROLLBACK TO command; RELEASE command")?;
                        }
                        outcome
                    }
                };
                match outcome {
                    Ok(done) => outcomes.push(Ok(done)),
                    // SQLite rolls the whole transaction back on some errors
                    // (a full disk, I/O): then the batch fails.
                    Err(err) if tx.is_autocommit() => return Err(err),
                    Err(err) => {
                        tracing::warn!(%err, command = ?command, "a storage write failed; the rest of its transaction goes on");
                        if let Command::Append { fence: Some(fence), .. } = command {
                            failed.push(fence);
                        }
                        outcomes.push(Err(err));
                    }
                }
            }
        }
        update_rows(&tx, &mut rows)?;
        tx.commit()?;
        Ok((outcomes, staged))
    }

    /// Takes in what a committed transaction changed, then answers its
    /// commands in order (publishing committed events).
    fn committed(&mut self, batch: Vec<Command>, outcomes: Vec<Result<Done, StoreError>>, staged: Staged) {
        if self.next_ids.len() > ID_CACHE {
            self.next_ids.clear();
        }
        self.next_ids.extend(staged.next_ids);
        if let Some((seq, hash)) = staged.audit_tail {
            // Before the records are acknowledged, so that the anchor lags
            // an acknowledged record only when this write fails.
            if self.anchoring
                && let Err(err) = write_head(&self.dir, &Head { seq, hash: hash.clone() })
            {
                tracing::error!(%err, seq, "could not move the audit trail's head anchor forward");
            }
            self.audit_tail = Some((seq, hash));
        }
        let mut appended = 0;
        for outcome in &outcomes {
            match outcome {
                Ok(Done::Event(_)) => appended += 1,
                Err(err) => self.counters.write_failed(err),
                Ok(_) => {}
            }
        }
        // One atomic step per batch, not one per event.
        self.counters.events_appended.inc_by(appended);
        for (command, outcome) in batch.into_iter().zip(outcomes) {
            command.answer(outcome);
        }
    }
}

/// An event to insert, as its command holds it.
struct NewEvent<'a> {
    session: Uuid,
    encoded: &'a Encoded,
    effect: &'a Effect,
}

/// Inserts one event (one statement: it fails alone) and notes what it
/// changes in its session's row. Changes to `staged` and `rows` are made
/// only once the insert succeeded.
fn append(
    tx: &Transaction<'_>,
    insert: &mut rusqlite::CachedStatement<'_>,
    next_ids: &HashMap<Uuid, u64>,
    staged: &mut Staged,
    rows: &mut HashMap<Uuid, RowChange>,
    stamp: &mut Stamp,
    event: NewEvent<'_>,
) -> Result<Done, StoreError> {
    let NewEvent { session, encoded, effect } = event;
    let next = match staged.next_ids.get(&session).or_else(|| next_ids.get(&session)) {
        Some(next) => Some(*next),
        None => tx
            .prepare_cached("SELECT event_count FROM sessions WHERE id = ?1")?
            .query_row([session.to_string()], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|n| n as u64),
    };
    let Some(id) = next else {
        return Ok(Done::Refused(StoreError::NoSession));
    };
    let stored = encoded.stored(id, stamp.at(now_ms()));
    let row = rows.entry(session).or_insert_with(|| RowChange {
        sid: session.to_string(),
        event_count: id,
        turn_running: None,
        title: None,
        agent_started: false,
        turn_cleared: false,
    });
    insert.execute(params![row.sid, to_sql(id), &*stored.json])?;
    row.event_count = id + 1;
    match effect {
        Effect::User { title } => {
            row.turn_running = Some(true);
            row.title.get_or_insert_with(|| title.clone());
        }
        Effect::Session => row.agent_started = true,
        Effect::TurnEnd => {
            row.turn_running = Some(false);
            row.turn_cleared = true;
        }
        Effect::None => {}
    }
    staged.next_ids.insert(session, id + 1);
    Ok(Done::Event(stored))
}

/// Writes what the batch's events so far changed in their sessions' rows,
/// as each event's own updates would have left them.
fn update_rows(tx: &Transaction<'_>, rows: &mut HashMap<Uuid, RowChange>) -> Result<(), StoreError> {
    let now = now_ms();
    for (_, row) in rows.drain() {
        let flags = row.turn_running.is_some() || row.title.is_some() || row.agent_started || row.turn_cleared;
        if !flags {
            tx.prepare_cached("UPDATE sessions SET event_count = ?2, last_activity_ms = ?3 WHERE id = ?1")?
                .execute(params![row.sid, to_sql(row.event_count), now])?;
            continue;
        }
        tx.prepare_cached(
            "UPDATE sessions SET event_count = ?2, last_activity_ms = ?3,
                 turn_running = coalesce(?4, turn_running), title = coalesce(title, ?5),
                 agent_started = max(agent_started, ?6),
                 turn_pgid = CASE WHEN ?7 THEN NULL ELSE turn_pgid END,
                 turn_marker = CASE WHEN ?7 THEN NULL ELSE turn_marker END
             WHERE id = ?1",
        )?
        .execute(params![
            row.sid,
            to_sql(row.event_count),
            now,
            row.turn_running,
            row.title,
            row.agent_started,
            row.turn_cleared
        ])?;
    }
    Ok(())
}

/// Runs one command other than an event inside the open transaction (in
/// its own savepoint).
/// Changes to `staged` are made last, only once every statement succeeded.
fn execute(
    tx: &Transaction<'_>,
    audit_tail: &Option<(i64, String)>,
    staged: &mut Staged,
    command: &Command,
) -> Result<Done, StoreError> {
    match command {
        Command::CreateSession { id, now, .. } => {
            tx.prepare_cached("INSERT INTO sessions (id, created_ms, last_activity_ms) VALUES (?1, ?2, ?2)")?
                .execute(params![id.to_string(), now])?;
            staged.next_ids.insert(*id, 0);
            Ok(Done::Session(SessionRow {
                id: *id,
                created_ms: *now,
                title: None,
                agent_started: false,
                last_activity_ms: *now,
                event_count: 0,
                turn_running: false,
                turn_pgid: None,
                turn_marker: None,
            }))
        }
        Command::Append { .. } => Err(StoreError::Sqlite("internal: an event outside its batch's inserts".into())),
        Command::SetTurn { session, pgid, marker, .. } => {
            tx.prepare_cached("UPDATE sessions SET turn_pgid = ?2, turn_marker = ?3 WHERE id = ?1")?
                .execute(params![session.to_string(), pgid, marker])?;
            Ok(Done::Nothing)
        }
        Command::Audit { record, .. } => {
            let (prev_seq, prev_hash) = match staged.audit_tail.clone().or_else(|| audit_tail.clone()) {
                Some(tail) => tail,
                None => tx
                    .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })
                    .optional()?
                    .unwrap_or_else(|| (0, GENESIS.to_owned())),
            };
            let seq = prev_seq + 1;
            let at_ms = now_ms();
            let hash = chain_hash(&prev_hash, seq, at_ms, record);
            tx.prepare_cached(
                "INSERT INTO audit (seq, at_ms, identity, peer, action, target, outcome, prev_hash, hash, via)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                seq,
                at_ms,
                record.identity,
                record.peer,
                record.action,
                record.target,
                record.outcome,
                prev_hash,
                hash,
                record.via.map(AuthMethod::as_str)
            ])?;
            staged.audit_tail = Some((seq, hash.clone()));
            Ok(Done::Audit(AuditEntry { seq, at_ms, record: record.clone(), prev_hash, hash }))
        }
        Command::CreateOperation { row, .. } => operations::create(tx, row).map(|()| Done::Nothing),
        Command::OperationStep { operation, step, .. } => {
            operations::step(tx, *operation, step).map(|()| Done::Nothing)
        }
        Command::FinishOperation { finish, .. } => operations::finish(tx, finish).map(|()| Done::Nothing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Durability, Store};

    fn append(
        session: Uuid,
        text: &str,
        fence: Option<&Fence>,
    ) -> (Command, oneshot::Receiver<Result<Stored, StoreError>>) {
        append_event(session, Event::Text { text: text.into(), message_id: None, index: None }, fence)
    }

    /// The command a log's `submit` sends, for any event.
    fn append_event(
        session: Uuid,
        event: Event,
        fence: Option<&Fence>,
    ) -> (Command, oneshot::Receiver<Result<Stored, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        let (encoded, effect) = (Encoded::new(&event), Effect::of(&event));
        let sink = crate::store::tests::nobody();
        (Command::Append { session, encoded, effect, sink, fence: fence.cloned(), reply }, rx)
    }

    /// A transaction whose commit fails (here a deferred foreign key that
    /// one session's writes break) is tried again write by write: only that
    /// session's writes fail, its fence trips, and the others commit.
    #[test]
    fn a_failed_commit_is_retried_write_by_write() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Normal).unwrap());
        let conn = Connection::open(dir.path().join("breakglass.db")).unwrap();
        // The dropped store's writer thread may still be closing its
        // connection (a checkpoint that holds the lock): wait for it, as the
        // store's own connections do.
        conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        let (good, bad) = (Uuid::new_v4(), Uuid::new_v4());
        conn.execute_batch(&format!(
            "PRAGMA foreign_keys = ON;
             INSERT INTO sessions (id, created_ms, last_activity_ms) VALUES ('{good}', 0, 0), ('{bad}', 0, 0);
             CREATE TABLE parent (id TEXT PRIMARY KEY);
             CREATE TABLE orphan (parent TEXT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
             CREATE TRIGGER breaks_the_commit AFTER INSERT ON events WHEN NEW.session = '{bad}'
             BEGIN INSERT INTO orphan VALUES ('none'); END;"
        ))
        .unwrap();
        let mut writer =
            Writer::new(conn, dir.path().to_owned(), true, Durability::Full, Faults::default(), Counters::default());
        let fence = Fence::default();
        let (batch, replies): (Vec<_>, Vec<_>) = [
            append(good, "a", None),
            append(bad, "b", Some(&fence)),
            append(good, "c", None),
            append(bad, "d", Some(&fence)),
        ]
        .into_iter()
        .unzip();
        writer.apply(batch);
        let answers: Vec<_> = replies.into_iter().map(|mut rx| rx.try_recv().expect("answered")).collect();
        assert_eq!(answers[0].as_ref().map(|s| s.id).ok(), Some(0), "{:?}", answers[0]);
        assert!(matches!(&answers[1], Err(StoreError::Sqlite(e)) if e.contains("FOREIGN KEY")), "{:?}", answers[1]);
        assert_eq!(answers[2].as_ref().map(|s| s.id).ok(), Some(1));
        assert!(matches!(answers[3], Err(StoreError::Fenced)), "{:?}", answers[3]);
        assert!(fence.is_tripped());
        let kept: Vec<(String, i64)> = writer
            .conn
            .prepare("SELECT session, id FROM events ORDER BY session, id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kept, [(good.to_string(), 0), (good.to_string(), 1)]);
    }

    /// One batch for one session: a prompt, its turn's process group, an
    /// insert that fails (and the fenced write after it), the session's
    /// announcement and the turn's end. The failing write is rolled back
    /// alone, and the row ends as the events one by one would leave it.
    #[test]
    fn a_batch_leaves_the_row_as_its_events_one_by_one_would() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Normal).unwrap());
        let conn = Connection::open(dir.path().join("breakglass.db")).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        let session = Uuid::new_v4();
        conn.execute_batch(&format!(
            "INSERT INTO sessions (id, created_ms, last_activity_ms) VALUES ('{session}', 0, 0);
             CREATE TRIGGER refuses_boom BEFORE INSERT ON events WHEN NEW.json LIKE '%boom%'
             BEGIN SELECT RAISE(ABORT, 'boom refused'); END;"
        ))
        .unwrap();
        let mut writer =
            Writer::new(conn, dir.path().to_owned(), true, Durability::Full, Faults::default(), Counters::default());
        let with = |event: Event, fence: Option<&Fence>| append_event(session, event, fence);
        let fence = Fence::default();
        let (turn, mut turn_reply) = oneshot::channel();
        let (user, mut r0) = with(Event::User { text: " first ".into(), by: "alice".into() }, None);
        let (announce, mut r1) = with(Event::Session { session_id: "s".into() }, None);
        let (boom, mut r2) = with(Event::Text { text: "boom".into(), message_id: None, index: None }, Some(&fence));
        let (after, mut r3) = with(Event::Text { text: "after".into(), message_id: None, index: None }, Some(&fence));
        let (end, mut r4) = with(Event::TurnEnd, None);
        let set_turn = Command::SetTurn { session, pgid: Some(7), marker: "M=1".into(), reply: turn };
        writer.apply(vec![user, set_turn, announce, boom, after, end]);
        assert!(turn_reply.try_recv().unwrap().is_ok());
        assert_eq!(r0.try_recv().unwrap().unwrap().id, 0);
        assert_eq!(r1.try_recv().unwrap().unwrap().id, 1);
        assert!(matches!(r2.try_recv().unwrap(), Err(StoreError::Sqlite(e)) if e.contains("boom refused")));
        assert!(matches!(r3.try_recv().unwrap(), Err(StoreError::Fenced)));
        let end = r4.try_recv().unwrap().unwrap();
        assert_eq!(end.id, 2);
        assert!(
            end.json.starts_with(r#"{"at":""#) && end.json.ends_with(r#"","id":2,"kind":"turn_end"}"#),
            "{}",
            end.json
        );
        let row: (i64, i64, Option<String>, i64, Option<i64>, Option<String>) = writer
            .conn
            .query_row(
                "SELECT event_count, turn_running, title, agent_started, turn_pgid, turn_marker FROM sessions",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .unwrap();
        assert_eq!(row, (3, 0, Some("first".into()), 1, None, None));
        let ids: Vec<i64> = writer
            .conn
            .prepare("SELECT id FROM events")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, [0, 1, 2]);
    }

    /// Another connection writing while a batch starts (a checkpoint on
    /// close, an operator's sqlite3): the batch waits for it, and does not
    /// fail because its read snapshot went stale before it could write.
    #[test]
    fn a_batch_waits_out_another_connections_write() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Normal).unwrap());
        let path = dir.path().join("breakglass.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        let session = Uuid::new_v4();
        conn.execute(
            "INSERT INTO sessions (id, created_ms, last_activity_ms) VALUES (?1, 0, 0)",
            [session.to_string()],
        )
        .unwrap();
        // The writer's busy handler says when it is waiting; only then does
        // the other connection commit (or after a deadline, if it never waits).
        use std::sync::atomic::{AtomicBool, Ordering};
        static WAITING: AtomicBool = AtomicBool::new(false);
        fn busy(_: i32) -> bool {
            WAITING.store(true, Ordering::SeqCst);
            std::thread::yield_now();
            true
        }
        conn.busy_handler(Some(busy)).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE; UPDATE sessions SET last_activity_ms = 1;").unwrap();
        let committer = std::thread::spawn(move || {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while !WAITING.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::yield_now();
            }
            other.execute_batch("COMMIT").unwrap();
        });
        let mut writer =
            Writer::new(conn, dir.path().to_owned(), true, Durability::Full, Faults::default(), Counters::default());
        let (command, mut reply) = append(session, "a", None);
        writer.apply(vec![command]);
        committer.join().unwrap();
        let answer = reply.try_recv().expect("answered");
        assert_eq!(answer.as_ref().map(|s| s.id).ok(), Some(0), "{answer:?}");
    }
}
