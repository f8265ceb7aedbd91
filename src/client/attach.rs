//! `breakglass attach`: a terminal attached to a session like tmux to its
//! server (README "The terminal client"). The session's stream is printed
//! above a line editor while the operator types; Ctrl-C stops a running
//! turn; a cut link is resumed with `Last-Event-ID`, so nothing is printed
//! twice or lost; Ctrl-D on an empty line (or the end of input) leaves.
//!
//! Three parts, each with an owner: the line editor runs on a thread of its
//! own (it blocks on the terminal) and ends on EOF or `/quit`; the stream
//! is a task this loop aborts when it leaves or switches sessions; requests
//! the operator starts (a prompt, a cancel, a decision) run in a `JoinSet`
//! so that the stream keeps printing while they wait for their answers.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustyline::error::ReadlineError;
use rustyline::{DefaultEditor, ExternalPrinter};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::ClientError;
use super::api::{Api, segment};
use super::render::{Op, Pending, Transcript, sanitize};
use super::sse::{self, Backoff, Parsed};

const PROMPT: &str = "breakglass> ";

/// How long leaving waits for the requests still in flight (the last
/// prompt or decision typed before Ctrl-D, or piped in before the end of
/// input) to be answered.
const DRAIN: Duration = Duration::from_secs(5);

const HELP: &str = "Type a prompt and Enter to send it to the agent.\n\
  Ctrl-C        stop the running turn (at an idle prompt: clear the line)\n\
  /allow [ID]   allow the tool call waiting for you (y does too)\n\
  /deny [ID] [reason]  deny it, telling the agent why (n does too)\n\
  /stop         stop the running turn\n\
  /new          open a new session and attach to it\n\
  /quit, Ctrl-D leave (the session and its turn go on on the server)";

/// What the operator did at the line editor.
#[derive(Debug)]
enum Input {
    Line(String),
    Interrupt,
    Eof,
}

/// What the stream task reports.
enum Link {
    Event(u64, Value),
    Notice(Value),
    Delta(Value),
    /// A frame too large to show (its id counts as seen).
    Skipped,
    Down(String),
    Up,
    /// The server will not let us attach again (the session is gone, the
    /// token refused): reconnecting cannot help.
    Fatal(ClientError),
}

/// What a request the operator started has to say when it is answered.
#[derive(Debug, Default)]
struct Said {
    text: String,
    /// A prompt the server did not take.
    unsent: Option<String>,
}

impl Said {
    fn text(text: impl Into<String>) -> Said {
        Said { text: text.into(), unsent: None }
    }
}

/// A line the operator typed, read.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Empty,
    Prompt(String),
    Allow(Option<String>),
    Deny(Option<String>, Option<String>),
    Stop,
    New,
    Help,
    Quit,
    Unknown(String),
}

fn parse(line: &str, pending: &[Pending]) -> Command {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Command::Empty;
    }
    if !pending.is_empty() {
        match trimmed.to_lowercase().as_str() {
            "y" | "yes" => return Command::Allow(None),
            "n" | "no" => return Command::Deny(None, None),
            _ => {}
        }
    }
    let Some(command) = trimmed.strip_prefix('/') else { return Command::Prompt(line.trim_end().to_owned()) };
    let (word, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
    let rest = rest.trim();
    match word {
        "allow" => Command::Allow(Some(rest).filter(|r| !r.is_empty()).map(str::to_owned)),
        "deny" => {
            // The first word names the call when it is one that waits.
            let (first, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if !first.is_empty() && pending.iter().any(|p| p.tool_use_id == first) {
                Command::Deny(Some(first.to_owned()), Some(after.trim()).filter(|r| !r.is_empty()).map(str::to_owned))
            } else {
                Command::Deny(None, Some(rest).filter(|r| !r.is_empty()).map(str::to_owned))
            }
        }
        "stop" => Command::Stop,
        "new" => Command::New,
        "help" | "?" => Command::Help,
        "quit" | "exit" => Command::Quit,
        other => Command::Unknown(other.to_owned()),
    }
}

/// Where output goes: above the line being edited, or plainly to stdout
/// when this is no terminal (no live line then: only whole lines).
struct Screen {
    printer: Option<Box<dyn ExternalPrinter + Send>>,
    live_shown: bool,
}

/// Moves to the line above and clears it: the live line, replaced.
const OVER_LIVE: &str = "\x1b[1A\r\x1b[2K";

impl Screen {
    fn apply(&mut self, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Print(text) => {
                    let over = if std::mem::take(&mut self.live_shown) { OVER_LIVE } else { "" };
                    self.print(format!("{over}{text}"));
                }
                Op::Live(text) if text.is_empty() => {
                    if std::mem::take(&mut self.live_shown) {
                        // Clear it, and stand on the line above, so that the
                        // editor's newline puts its prompt where the live line was.
                        self.print(format!("{OVER_LIVE}\x1b[1A"));
                    }
                }
                Op::Live(text) => {
                    if self.printer.is_some() {
                        let over = if self.live_shown { OVER_LIVE } else { "" };
                        self.print(format!("{over}{text}"));
                        self.live_shown = true;
                    }
                }
            }
        }
    }

    /// A line of this client's own.
    fn say(&mut self, text: impl Into<String>) {
        self.apply(vec![Op::Print(text.into())]);
    }

    fn print(&mut self, mut text: String) {
        match &mut self.printer {
            Some(printer) => {
                // Between two reads (just after Enter or Ctrl-C) the editor
                // writes a message as it is, without the newline it adds
                // while reading, and its next prompt then starts by clearing
                // that line: the message would be lost. Ending it here is
                // the same while reading.
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                if printer.print(text).is_err() {
                    self.printer = None;
                }
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }
}

pub async fn run(api: Api, session: Option<String>, new: bool) -> Result<(), ClientError> {
    // Asked first, so that a wrong address or token fails before the editor starts.
    let idle = sse::idle_for(&api.whoami().await?);
    let (session, opened) = choose(&api, session, new).await?;

    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut editor =
        DefaultEditor::new().map_err(|err| ClientError::Usage(format!("cannot start the line editor: {err}")))?;
    let printer: Option<Box<dyn ExternalPrinter + Send>> = if interactive {
        editor.create_external_printer().ok().map(|p| Box::new(p) as Box<dyn ExternalPrinter + Send>)
    } else {
        None
    };
    let columns = Arc::new(AtomicUsize::new(editor.dimensions().map_or(80, |(cols, _)| cols.into())));
    let mut screen = Screen { printer, live_shown: false };
    let width = || columns.load(Ordering::Relaxed).saturating_sub(1);

    let (input_tx, mut input) = mpsc::unbounded_channel();
    let editor_thread = {
        let columns = columns.clone();
        std::thread::spawn(move || edit(editor, input_tx, columns))
    };
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|err| ClientError::Usage(format!("cannot watch for Ctrl-C: {err}")))?;

    let mut attached = Attached::start(&api, session, idle, width());
    screen.say(banner(&attached.session, opened));
    let mut requests: JoinSet<Said> = JoinSet::new();
    // Why the server will not let this session be followed any more: the
    // exit status says so when the operator leaves (README "The terminal
    // client", exit 3 for a refused token).
    let mut fatal: Option<ClientError> = None;
    loop {
        tokio::select! {
            // The operator's keys first: Enter moves the live line up.
            biased;
            typed = input.recv() => {
                let typed = typed.unwrap_or(Input::Eof);
                screen.live_shown = false;
                // Only a live line that was shown is moved up by typing; in
                // a pipe none is, and its text must still come with the block.
                if screen.printer.is_some() {
                    attached.transcript.commit_live();
                }
                match typed {
                    Input::Eof => break,
                    Input::Interrupt => interrupt(&api, &attached, &mut screen, &mut requests),
                    Input::Line(line) => {
                        let command = parse(&line, attached.transcript.pending());
                        match command {
                            Command::Quit => break,
                            Command::New => match api.open_session().await {
                                Ok(id) => {
                                    fatal = None;
                                    attached.stop().await;
                                    attached = Attached::start(&api, id, idle, width());
                                    screen.say(banner(&attached.session, true));
                                }
                                Err(err) => screen.say(format!("! cannot open a session: {err}")),
                            },
                            command => act(&api, &mut attached, command, &mut screen, &mut requests),
                        }
                    }
                }
            }
            _ = interrupts.recv() => interrupt(&api, &attached, &mut screen, &mut requests),
            // Once the stream task has ended (after a fatal refusal) the
            // channel is closed: the pattern disables this branch rather
            // than have every turn of the loop find it ready.
            Some(link) = attached.links.recv() => {
                attached.transcript.set_width(width());
                let ops = match link {
                    Link::Event(id, event) => attached.transcript.event(&event, Some(id), crate::util::now_ms()),
                    Link::Notice(event) => attached.transcript.event(&event, None, crate::util::now_ms()),
                    Link::Delta(delta) => attached.transcript.delta(&delta),
                    Link::Skipped => vec![Op::Print("  · (an event too large to show)".into())],
                    Link::Down(why) => vec![Op::Print(format!("link down ({why}), reconnecting…"))],
                    Link::Up => vec![Op::Print("reattached".into())],
                    Link::Fatal(err) => {
                        let said = format!("! cannot attach again: {err} (Ctrl-D to leave)");
                        fatal = Some(err);
                        vec![Op::Print(said)]
                    }
                };
                screen.apply(ops);
            }
            Some(said) = requests.join_next(), if !requests.is_empty() => {
                let Ok(said) = said else { continue };
                if let Some(prompt) = &said.unsent {
                    attached.transcript.unsent_prompt(prompt);
                }
                if !said.text.is_empty() {
                    screen.say(said.text);
                }
            }
        }
    }
    attached.stop().await;
    // What the operator typed last is sent, not cancelled by leaving; what
    // fails is said.
    let drained = tokio::time::timeout(DRAIN, async {
        while let Some(said) = requests.join_next().await {
            if let Ok(said) = said
                && !said.text.is_empty()
            {
                screen.say(said.text);
            }
        }
    })
    .await;
    if drained.is_err() {
        screen.say(format!("! left with {} request(s) unanswered after {} s", requests.len(), DRAIN.as_secs()));
    }
    requests.shutdown().await;
    // The editor has returned its last line (EOF or /quit) and ends by itself.
    drop(input);
    let _ = editor_thread.join();
    fatal.map_or(Ok(()), Err)
}

/// The session to attach to: the one named, a new one, or the newest (a
/// new one when there is none). Whether it was opened here.
async fn choose(api: &Api, session: Option<String>, new: bool) -> Result<(String, bool), ClientError> {
    if let Some(id) = session {
        let found = api.session(&id).await?;
        return Ok((found["id"].as_str().unwrap_or(&id).to_owned(), false));
    }
    if !new {
        let page = api.sessions(1).await?;
        if let Some(id) = page["sessions"][0]["id"].as_str() {
            return Ok((id.to_owned(), false));
        }
    }
    Ok((api.open_session().await?, true))
}

fn banner(session: &str, opened: bool) -> String {
    let what = if opened { "opened and attached to" } else { "attached to" };
    format!(
        "{what} session {}: type a prompt; /help for commands; Ctrl-C stops a turn; Ctrl-D leaves",
        sanitize(session)
    )
}

/// The line editor's thread: each line, Ctrl-C and the end of input go to
/// the loop; it ends after EOF or `/quit`, so the terminal is left in the
/// mode it was found in.
fn edit(mut editor: DefaultEditor, lines: mpsc::UnboundedSender<Input>, columns: Arc<AtomicUsize>) {
    loop {
        if let Some((cols, _)) = editor.dimensions() {
            columns.store(cols.into(), Ordering::Relaxed);
        }
        let input = match editor.readline(PROMPT) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                Input::Line(line)
            }
            Err(ReadlineError::Interrupted) => Input::Interrupt,
            Err(_) => Input::Eof,
        };
        let last = match &input {
            Input::Eof => true,
            Input::Line(line) => matches!(parse(line, &[]), Command::Quit),
            Input::Interrupt => false,
        };
        if lines.send(input).is_err() || last {
            return;
        }
    }
}

/// Ctrl-C: stop the running turn; at an idle prompt the editor has
/// already cleared the line.
fn interrupt(api: &Api, attached: &Attached, screen: &mut Screen, requests: &mut JoinSet<Said>) {
    if attached.transcript.running() {
        stop(api, attached, screen, requests);
    }
}

fn stop(api: &Api, attached: &Attached, screen: &mut Screen, requests: &mut JoinSet<Said>) {
    screen.say("asked the turn to stop…");
    let (api, session) = (api.clone(), attached.session.clone());
    requests.spawn(async move {
        match api.cancel(&session).await {
            Ok(true) => Said::default(),
            Ok(false) => Said::text("no turn was running"),
            Err(err) => Said::text(format!("! stop failed: {err}")),
        }
    });
}

/// Carries out a typed command (all but `/new` and `/quit`).
fn act(api: &Api, attached: &mut Attached, command: Command, screen: &mut Screen, requests: &mut JoinSet<Said>) {
    match command {
        Command::Empty | Command::New | Command::Quit => {}
        Command::Help => screen.say(HELP),
        Command::Unknown(word) => screen.say(format!("unknown command /{}: /help lists them", sanitize(&word))),
        Command::Stop => {
            if attached.transcript.running() {
                stop(api, attached, screen, requests);
            } else {
                screen.say("no turn is running");
            }
        }
        Command::Prompt(prompt) => {
            attached.transcript.sent_prompt(&prompt);
            let (api, session) = (api.clone(), attached.session.clone());
            requests.spawn(async move {
                let text = match api.prompt(&session, &prompt).await {
                    Ok(_) => return Said::default(),
                    Err(ClientError::Refused { status: 409, .. }) => {
                        "a turn is running: wait for it, or Ctrl-C to stop it".to_owned()
                    }
                    Err(err) => format!("! the prompt was not sent: {err}"),
                };
                Said { text, unsent: Some(prompt) }
            });
        }
        Command::Allow(id) | Command::Deny(id, _) if resolve(attached.transcript.pending(), id.as_deref()).is_err() => {
            let Err(why) = resolve(attached.transcript.pending(), id.as_deref()) else { return };
            screen.say(why);
        }
        Command::Allow(id) => decide(api, attached, id, true, None, requests),
        Command::Deny(id, message) => decide(api, attached, id, false, message, requests),
    }
}

fn decide(
    api: &Api,
    attached: &Attached,
    id: Option<String>,
    allow: bool,
    message: Option<String>,
    requests: &mut JoinSet<Said>,
) {
    let Ok(tool_use_id) = resolve(attached.transcript.pending(), id.as_deref()) else { return };
    let (api, session) = (api.clone(), attached.session.clone());
    requests.spawn(async move {
        match api.decide(&session, &tool_use_id, allow, message.as_deref()).await {
            // The decision shows when its event arrives on the stream.
            Ok(_) => Said::default(),
            Err(ClientError::Refused { status: 409, .. }) => {
                Said::text(format!("[{}] was already decided", sanitize(&tool_use_id)))
            }
            Err(err) => Said::text(format!("! the decision was not taken: {err}")),
        }
    });
}

/// The call a decision is for: the one named, or the only one waiting.
fn resolve(pending: &[Pending], id: Option<&str>) -> Result<String, String> {
    match (id, pending) {
        (Some(id), _) => Ok(id.to_owned()),
        (None, [only]) => Ok(only.tool_use_id.clone()),
        (None, []) => Err("no tool call waits for you".to_owned()),
        (None, _) => Err(format!(
            "{} calls wait: name one ({})",
            pending.len(),
            pending.iter().map(|p| p.tool_use_id.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// One attached session: its stream task and what has been printed of it.
struct Attached {
    session: String,
    transcript: Transcript,
    links: mpsc::UnboundedReceiver<Link>,
    task: JoinHandle<()>,
}

impl Attached {
    fn start(api: &Api, session: String, idle: Duration, width: usize) -> Attached {
        let (tx, links) = mpsc::unbounded_channel();
        let task = tokio::spawn(follow(api.clone(), session.clone(), idle, tx));
        Attached { session, transcript: Transcript::new(width), links, task }
    }

    async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// The session's stream, for as long as this client is attached: every
/// frame to the loop, and on a cut, one "down", reconnects with backoff
/// from the last id seen, and one "up".
async fn follow(api: Api, session: String, idle: Duration, links: mpsc::UnboundedSender<Link>) {
    let path = format!("/api/session/{}/stream", segment(&session));
    let mut last: Option<u64> = None;
    let mut down = false;
    let mut backoff = Backoff::new();
    loop {
        let why = match api.stream(&path, last, idle).await {
            Ok(response) => {
                if std::mem::take(&mut down) {
                    let _ = links.send(Link::Up);
                }
                backoff.reset();
                sse::read(response, idle, |parsed| {
                    if let Some(id) = sse::id_of(&parsed) {
                        last = Some(last.map_or(id, |l| l.max(id)));
                    }
                    let link = match parsed {
                        Parsed::Skipped { .. } => Some(Link::Skipped),
                        Parsed::Frame(ref frame) => match (frame.name.as_str(), sse::event(&parsed)) {
                            ("", Some((id, event))) => Some(Link::Event(id, event)),
                            ("", None) => serde_json::from_str(&frame.data).ok().map(Link::Notice),
                            ("delta", _) => serde_json::from_str(&frame.data).ok().map(Link::Delta),
                            // caught-up, keepalive: nothing to show.
                            _ => None,
                        },
                    };
                    link.is_none_or(|link| links.send(link).is_ok())
                })
                .await
            }
            Err(err) if err.is_transient() => err.to_string(),
            Err(err) => {
                let _ = links.send(Link::Fatal(err));
                return;
            }
        };
        if links.is_closed() {
            return;
        }
        if !std::mem::replace(&mut down, true) {
            let _ = links.send(Link::Down(why));
        }
        backoff.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(ids: &[&str]) -> Vec<Pending> {
        ids.iter().map(|id| Pending { tool_use_id: (*id).into(), summary: String::new() }).collect()
    }

    #[test]
    fn typed_lines_read_as_prompts_commands_and_answers() {
        assert_eq!(parse("  ", &[]), Command::Empty);
        assert_eq!(parse("is devvm up?  ", &[]), Command::Prompt("is devvm up?".into()));
        assert_eq!(parse("y", &[]), Command::Prompt("y".into()), "y is a prompt when nothing waits");
        assert_eq!(parse("y", &pending(&["t1"])), Command::Allow(None));
        assert_eq!(parse("N", &pending(&["t1"])), Command::Deny(None, None));
        assert_eq!(parse("/allow t2", &[]), Command::Allow(Some("t2".into())));
        assert_eq!(
            parse("/deny t1 not now", &pending(&["t1"])),
            Command::Deny(Some("t1".into()), Some("not now".into()))
        );
        assert_eq!(
            parse("/deny wait for the backup", &pending(&["t1"])),
            Command::Deny(None, Some("wait for the backup".into()))
        );
        assert_eq!(parse("/quit", &[]), Command::Quit);
        assert_eq!(parse("/frob", &[]), Command::Unknown("frob".into()));
    }

    #[test]
    fn a_decision_without_an_id_goes_to_the_only_waiting_call() {
        assert_eq!(resolve(&pending(&["t1"]), None), Ok("t1".into()));
        assert_eq!(resolve(&pending(&[]), None), Err("no tool call waits for you".into()));
        assert_eq!(resolve(&pending(&["a", "b"]), None), Err("2 calls wait: name one (a, b)".into()));
        assert_eq!(resolve(&pending(&[]), Some("x")), Ok("x".into()));
    }
}
