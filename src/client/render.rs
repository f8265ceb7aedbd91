//! The transcript as text for a terminal: a fold of a session's events
//! (README "API") into lines, with the console's rules (`web/transcript.js`):
//! an event seen before is not shown again; a tool's output is folded under
//! its call, even when it arrives first; deltas grow a live line that the
//! message's `text` event completes, so nothing is printed twice; results
//! show their cost; approvals say how to answer them.
//!
//! Everything the server or the agent wrote goes through [`sanitize`]
//! before it is shown: an escape sequence in agent text must not drive the
//! operator's terminal (move the cursor, retitle the window, hide a line),
//! and bidi or zero-width characters must not make a command read as
//! another (README "The web console", the approval card, escapes the same).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// What the screen does with the output of one fold step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Lines to print for good. Printed over the live line, if one is shown.
    Print(String),
    /// The live line (text still being written) shows this, replacing the
    /// live line already shown; empty: no live line any more.
    Live(String),
}

/// A tool call waiting for the operator (README "Approvals").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub tool_use_id: String,
    pub summary: String,
}

/// Lines of tool output shown under its call.
const OUTPUT_LINES: usize = 3;
/// Lines of one value of an approval's input shown, so that a long one
/// (a file's content) does not hide the keys after it; then how many more.
const VALUE_LINES: usize = 12;
/// Lines of an approval's input shown in all.
const APPROVAL_LINES: usize = 60;
/// Characters of one such line shown (it wraps, it is not cut to the width).
const APPROVAL_LINE_CHARS: usize = 1000;

/// A text block being written (README "API", live text).
#[derive(Debug, Default)]
struct Growing {
    /// Text already printed for good (whole lines, or lines cut at the width).
    committed: String,
    /// Text of the live line.
    partial: String,
}

/// One session's transcript as it has been printed.
#[derive(Debug)]
pub struct Transcript {
    last_id: Option<u64>,
    /// Tool calls shown, by tool_use_id: their output is printed under them.
    tools: HashSet<String>,
    /// Output that came before its call, shown with the call (or at the turn's end).
    orphans: Vec<(String, String)>,
    growing: HashMap<String, Growing>,
    /// The message whose partial line is on screen.
    live: Option<String>,
    /// Messages whose text is in: later deltas of theirs are stale.
    finished: HashSet<String>,
    running: bool,
    pending: Vec<Pending>,
    /// Columns a live line may take, so that it never wraps (a wrapped
    /// line could not be replaced in place).
    width: usize,
    /// Prompts this terminal sent, which its line editor already shows.
    own_prompts: Vec<String>,
}

impl Transcript {
    pub fn new(width: usize) -> Transcript {
        Transcript {
            last_id: None,
            tools: HashSet::new(),
            orphans: Vec::new(),
            growing: HashMap::new(),
            live: None,
            finished: HashSet::new(),
            running: false,
            pending: Vec::new(),
            width: width.max(20),
            own_prompts: Vec::new(),
        }
    }

    pub fn set_width(&mut self, width: usize) {
        self.width = width.max(20);
    }

    /// True while the last prompt's turn has not ended.
    pub fn running(&self) -> bool {
        self.running
    }

    /// The tool calls waiting for a decision, oldest first.
    pub fn pending(&self) -> &[Pending] {
        &self.pending
    }

    /// A prompt this terminal just sent: its `user` event is not printed
    /// again (the line editor left it on the screen).
    pub fn sent_prompt(&mut self, text: &str) {
        self.own_prompts.push(text.to_owned());
    }

    /// A sent prompt the server refused: its `user` event will not come.
    pub fn unsent_prompt(&mut self, text: &str) {
        if let Some(at) = self.own_prompts.iter().position(|p| p == text) {
            self.own_prompts.remove(at);
        }
    }

    /// The operator's typing moved the live line up the screen, where it
    /// can no longer be replaced: what it shows is printed for good, and
    /// the text goes on on a live line of its own.
    pub fn commit_live(&mut self) {
        if let Some(growing) = self.live.take().and_then(|id| self.growing.get_mut(&id)) {
            let shown = std::mem::take(&mut growing.partial);
            growing.committed.push_str(&shown);
        }
    }

    /// Folds one event: `id` for a logged event, `None` for a notice the
    /// log could not keep. `now_ms` is the local clock, for an approval's
    /// countdown.
    pub fn event(&mut self, event: &Value, id: Option<u64>, now_ms: i64) -> Vec<Op> {
        if let Some(id) = id {
            if self.last_id.is_some_and(|last| id <= last) {
                return Vec::new();
            }
            self.last_id = Some(id);
        }
        let mut ops = Vec::new();
        let kind = str_of(event, "kind");
        match kind {
            "user" => {
                self.running = true;
                let text = str_of(event, "text");
                if let Some(at) = self.own_prompts.iter().position(|p| p == text) {
                    self.own_prompts.remove(at);
                } else {
                    let by = one_line(str_of(event, "by"));
                    ops.push(Op::Print(format!("\n{by}> {}", indent(&sanitize(text), "  "))));
                }
            }
            "session" => {}
            "text" => {
                let text = sanitize(str_of(event, "text"));
                let message_id = str_of(event, "message_id");
                if message_id.is_empty() {
                    ops.push(Op::Print(text));
                } else {
                    self.finished.insert(message_id.to_owned());
                    match self.growing.remove(message_id) {
                        Some(growing) => {
                            if self.live.as_deref() == Some(message_id) {
                                self.live = None;
                            }
                            match text.strip_prefix(&growing.committed) {
                                Some(rest) if !rest.is_empty() => ops.push(Op::Print(rest.to_owned())),
                                Some(_) => ops.push(Op::Live(String::new())),
                                // Deltas went missing (a lagging link): the whole block.
                                None => ops.push(Op::Print(text)),
                            }
                        }
                        None => ops.push(Op::Print(text)),
                    }
                }
            }
            "tool" => {
                let tool_use_id = str_of(event, "tool_use_id").to_owned();
                let name = one_line(str_of(event, "name"));
                let summary = self.cut(&one_line(&summary(event.get("input"))), name.chars().count() + 6);
                ops.push(Op::Print(format!("  ▸ {name}: {summary}")));
                if let Some(at) = self.orphans.iter().position(|(id, _)| *id == tool_use_id) {
                    ops.push(Op::Print(self.orphans.remove(at).1));
                }
                self.tools.insert(tool_use_id);
            }
            "tool_result" => {
                let tool_use_id = str_of(event, "tool_use_id").to_owned();
                let folded = self.fold_output(event);
                if self.tools.contains(&tool_use_id) {
                    ops.push(Op::Print(folded));
                } else {
                    self.orphans.push((tool_use_id, folded));
                }
            }
            "status" => ops.push(Op::Print(format!("  · {}", sanitize(str_of(event, "text"))))),
            "result" => {
                let mut facts = Vec::new();
                if let Some(ms) = event.get("duration_ms").and_then(Value::as_f64) {
                    facts.push(format!("{:.1} s", ms / 1000.0));
                }
                if let Some(turns) = event.get("num_turns").and_then(Value::as_u64) {
                    facts.push(format!("{turns} turn{}", if turns == 1 { "" } else { "s" }));
                }
                if let Some(cost) = event.get("total_cost_usd").and_then(Value::as_f64) {
                    facts.push(format!("${cost:.4}"));
                }
                let facts = facts.join(" · ");
                if event.get("is_error").and_then(Value::as_bool) == Some(true) {
                    let subtype = one_line(str_of(event, "subtype"));
                    let said = sanitize(str_of(event, "result"));
                    ops.push(Op::Print(format!(
                        "✗ {subtype} · {facts}{}",
                        if said.is_empty() { String::new() } else { format!("\n  {}", indent(&said, "  ")) }
                    )));
                } else {
                    ops.push(Op::Print(format!("✓ done · {facts}")));
                }
            }
            "error" => ops.push(Op::Print(format!("! {}", indent(&sanitize(str_of(event, "error")), "  ")))),
            "cancelled" => ops.push(Op::Print("■ Stopped by the operator".to_owned())),
            "turn_end" => {
                self.running = false;
                // Text still growing never reached the log: it goes.
                self.growing.clear();
                if self.live.take().is_some() {
                    ops.push(Op::Live(String::new()));
                }
                for (_, folded) in std::mem::take(&mut self.orphans) {
                    ops.push(Op::Print(folded));
                }
            }
            "approval" => {
                let tool_use_id = one_line(str_of(event, "tool_use_id"));
                let tool = one_line(str_of(event, "tool"));
                let summary = one_line(&summary(event.get("input")));
                let command = approved_text(&tool, event.get("input"));
                let effect = str_of(event, "effect");
                let why = if effect.is_empty() { str_of(event, "reason") } else { effect };
                let countdown = match event.get("deadline_ms").and_then(Value::as_i64) {
                    Some(deadline) if deadline > now_ms => {
                        let left = (deadline - now_ms) / 1000;
                        format!(" (auto-deny in {}:{:02})", left / 60, left % 60)
                    }
                    _ => String::new(),
                };
                let why = if why.is_empty() { String::new() } else { format!("\n  {}", one_line(why)) };
                ops.push(Op::Print(format!(
                    "? {tool} waits for you [{tool_use_id}]:{command}{why}\n  answer: /allow or /deny [reason]{countdown}"
                )));
                self.pending.retain(|p| p.tool_use_id != tool_use_id);
                self.pending.push(Pending { tool_use_id, summary });
            }
            "approval_decision" => {
                let tool_use_id = one_line(str_of(event, "tool_use_id"));
                self.pending.retain(|p| p.tool_use_id != tool_use_id);
                let by = one_line(str_of(event, "by"));
                let message = one_line(str_of(event, "message"));
                let line = match str_of(event, "decision") {
                    "allow" => format!("  ✓ allowed by {by} [{tool_use_id}]"),
                    _ if message.is_empty() => format!("  ✗ denied by {by} [{tool_use_id}]"),
                    _ => format!("  ✗ denied by {by} [{tool_use_id}]: {message}"),
                };
                ops.push(Op::Print(line));
            }
            other => ops
                .push(Op::Print(format!("  · ({} event)", one_line(if other.is_empty() { "unknown" } else { other })))),
        }
        self.reshow_live(&mut ops);
        ops
    }

    /// Folds one delta (`{message_id, index, text}`, README "API").
    pub fn delta(&mut self, delta: &Value) -> Vec<Op> {
        let message_id = str_of(delta, "message_id");
        let text = str_of(delta, "text");
        if message_id.is_empty() || text.is_empty() || self.finished.contains(message_id) {
            return Vec::new();
        }
        let mut ops = Vec::new();
        if self.live.as_deref().is_some_and(|live| live != message_id) {
            // Another message was growing on the live line: it stays as it is.
            self.live = None;
            ops.push(Op::Live(String::new()));
        }
        let width = self.width;
        let growing = self.growing.entry(message_id.to_owned()).or_default();
        growing.partial.push_str(&sanitize(text));
        // Whole lines, and lines that reached the width, are printed for good.
        loop {
            let cut = match growing.partial.find('\n') {
                Some(newline) if growing.partial[..newline].chars().count() <= width => newline + 1,
                _ => match growing.partial.char_indices().nth(width) {
                    Some((at, _)) => at,
                    None => break,
                },
            };
            let line: String = growing.partial.drain(..cut).collect();
            growing.committed.push_str(&line);
            ops.push(Op::Print(line.strip_suffix('\n').unwrap_or(&line).to_owned()));
        }
        if growing.partial.is_empty() {
            if self.live.take().is_some() {
                ops.push(Op::Live(String::new()));
            }
        } else {
            ops.push(Op::Live(growing.partial.clone()));
            self.live = Some(message_id.to_owned());
        }
        ops
    }

    /// After printing something else, the live line goes back below it.
    fn reshow_live(&self, ops: &mut Vec<Op>) {
        if ops.iter().all(|op| matches!(op, Op::Live(_))) {
            return;
        }
        if let Some(growing) = self.live.as_ref().and_then(|id| self.growing.get(id)) {
            ops.push(Op::Live(growing.partial.clone()));
        }
    }

    /// A tool's output under its call: its first lines, and how much more.
    fn fold_output(&self, event: &Value) -> String {
        let content = sanitize(str_of(event, "content"));
        let error = event.get("is_error").and_then(Value::as_bool) == Some(true);
        let lines: Vec<&str> = content.lines().collect();
        let mut out = String::new();
        for (i, line) in lines.iter().take(OUTPUT_LINES).enumerate() {
            let lead = match (i, error) {
                (0, true) => "    ⎿ error: ",
                (0, false) => "    ⎿ ",
                _ => "      ",
            };
            if i > 0 {
                out.push('\n');
            }
            out.push_str(lead);
            out.push_str(&self.cut(line, lead.chars().count()));
        }
        if lines.is_empty() {
            out.push_str(if error { "    ⎿ error (no output)" } else { "    ⎿ (no output)" });
        }
        if lines.len() > OUTPUT_LINES {
            out.push_str(&format!("\n      {}", more_lines(lines.len() - OUTPUT_LINES)));
        }
        out
    }

    /// `text` cut to fit the width after `taken` columns.
    fn cut(&self, text: &str, taken: usize) -> String {
        let room = self.width.saturating_sub(taken).max(10);
        if text.chars().count() <= room {
            return text.to_owned();
        }
        let mut cut: String = text.chars().take(room - 1).collect();
        cut.push('…');
        cut
    }
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A one-line summary of a tool call's input: the command, the path, or
/// JSON (as `toolSummary` in web/transcript.js).
fn summary(input: Option<&Value>) -> String {
    match input {
        None | Some(Value::Null) => String::new(),
        Some(input) => ["command", "file_path", "path", "pattern"]
            .iter()
            .find_map(|key| input.get(key).and_then(Value::as_str))
            .map_or_else(|| input.to_string(), str::to_owned),
    }
}

/// What an approval asks to allow, as the web console's card shows it
/// (`commandText` in web/approval.js): a Bash command as given, any other
/// tool's input as one `key: value` a line, so that the content of a Write
/// or the new text of an Edit is seen before it is allowed. Sanitized and
/// bounded; a single Bash line stays on the card's first line, anything
/// else goes under it, a value's further lines indented under its key.
fn approved_text(tool: &str, input: Option<&Value>) -> String {
    let command = input.and_then(|i| i.get("command")).and_then(Value::as_str);
    // (indent, line) pairs.
    let lines: Vec<(&str, String)> = match (input, command) {
        (None | Some(Value::Null), _) => return String::new(),
        (Some(_), Some(command)) if tool == "Bash" => {
            let text = sanitize(command);
            if !text.contains('\n') {
                return format!(" {}", bounded(&text));
            }
            text.lines().map(|line| ("    ", line.to_owned())).collect()
        }
        (Some(Value::Object(object)), _) => object
            .iter()
            .flat_map(|(key, value)| {
                let value = match value {
                    Value::String(text) => sanitize(text),
                    other => sanitize(&other.to_string()),
                };
                let lines: Vec<&str> = value.lines().collect();
                let mut shown = vec![("    ", format!("{}: {}", one_line(key), lines.first().unwrap_or(&"")))];
                shown.extend(lines.iter().skip(1).take(VALUE_LINES - 1).map(|line| ("      ", (*line).to_owned())));
                if lines.len() > VALUE_LINES {
                    shown.push(("      ", more_lines(lines.len() - VALUE_LINES)));
                }
                shown
            })
            .collect(),
        (Some(other), _) => vec![("    ", sanitize(&other.to_string()))],
    };
    let mut out = String::new();
    for (indent, line) in lines.iter().take(APPROVAL_LINES) {
        out.push_str(&format!("\n{indent}{}", bounded(line)));
    }
    if lines.len() > APPROVAL_LINES {
        out.push_str(&format!("\n    {}", more_lines(lines.len() - APPROVAL_LINES)));
    }
    out
}

fn more_lines(more: usize) -> String {
    format!("… {more} more line{}", if more == 1 { "" } else { "s" })
}

/// A line of an approval's input, cut at [`APPROVAL_LINE_CHARS`].
fn bounded(line: &str) -> String {
    if line.chars().count() <= APPROVAL_LINE_CHARS {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(APPROVAL_LINE_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// Sanitized, on one line: a newline reads as `⏎`.
fn one_line(text: &str) -> String {
    sanitize(text).replace('\n', "⏎")
}

/// Continuation lines of `text` indented by `lead`.
fn indent(text: &str, lead: &str) -> String {
    text.replace('\n', &format!("\n{lead}"))
}

/// Text that cannot drive the terminal: every control character but the
/// newline (escape, carriage return, backspace, the C1 controls including
/// CSI), and every character that hides or reorders text (the set the web
/// console escapes, `HIDDEN` in web/approval.js), is shown as its code point
/// in brackets (an escape as `⟨U+001B⟩`) instead; a tab becomes spaces.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('\n'),
            '\t' => out.push_str("    "),
            c if c.is_control() || is_format(c) || is_blank(c) => out.push_str(&format!("⟨U+{:04X}⟩", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Characters that draw nothing and are not format characters: private
/// use (category Co, which a font may draw as anything or nothing), the
/// variation selectors, the Hangul fillers and the combining grapheme joiner.
fn is_blank(c: char) -> bool {
    matches!(c as u32,
        0xE000..=0xF8FF | 0xF0000..=0xFFFFD | 0x100000..=0x10FFFD
        | 0xFE00..=0xFE0F | 0xE0100..=0xE01EF
        | 0x115F | 0x1160 | 0x3164 | 0xFFA0 | 0x034F)
}

/// Unicode's format characters (category Cf) and the line and paragraph
/// separators: invisible, or reordering the text around them.
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2 | 0x180E
        | 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF
        | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn printed(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::Print(s) => s.clone(),
                Op::Live(s) => format!("[live] {s}"),
            })
            .collect()
    }

    #[test]
    fn escape_sequences_and_invisible_characters_are_shown_inert() {
        assert_eq!(sanitize("a\x1b[2Jb\x1b]0;owned\x07"), "a⟨U+001B⟩[2Jb⟨U+001B⟩]0;owned⟨U+0007⟩");
        assert_eq!(sanitize("x\ry\u{9b}31m"), "x⟨U+000D⟩y⟨U+009B⟩31m");
        assert_eq!(sanitize("rm \u{202e}fdp.exe\u{200b}"), "rm ⟨U+202E⟩fdp.exe⟨U+200B⟩");
        assert_eq!(sanitize("line\nnext\tcol"), "line\nnext    col");
    }

    #[test]
    fn the_invisible_characters_the_web_console_escapes_are_escaped_here_too() {
        // Private use, variation selectors, Hangul fillers, the grapheme joiner.
        for c in [
            '\u{E000}',
            '\u{F8FF}',
            '\u{F0000}',
            '\u{10FFFD}',
            '\u{FE00}',
            '\u{FE0F}',
            '\u{E0100}',
            '\u{E01EF}',
            '\u{115F}',
            '\u{1160}',
            '\u{3164}',
            '\u{FFA0}',
            '\u{034F}',
        ] {
            assert_eq!(sanitize(&format!("a{c}b")), format!("a⟨U+{:04X}⟩b", c as u32));
        }
        assert_eq!(sanitize("café ☃ 日本"), "café ☃ 日本", "visible text stays as it is");
    }

    #[test]
    fn an_event_seen_before_is_not_printed_again() {
        let mut t = Transcript::new(80);
        let status = json!({"kind": "status", "id": 3, "text": "hi"});
        assert_eq!(printed(&t.event(&status, Some(3), 0)), ["  · hi"]);
        assert!(t.event(&status, Some(3), 0).is_empty());
        assert!(t.event(&json!({"kind": "status", "text": "old"}), Some(2), 0).is_empty());
        assert_eq!(t.last_id, Some(3));
    }

    #[test]
    fn deltas_grow_a_live_line_and_the_text_event_completes_it_without_repeating() {
        let mut t = Transcript::new(80);
        assert_eq!(printed(&t.delta(&json!({"message_id": "m", "index": 0, "text": "Check"}))), ["[live] Check"]);
        assert_eq!(
            printed(&t.delta(&json!({"message_id": "m", "index": 0, "text": "ing\nthe "}))),
            ["Checking", "[live] the "]
        );
        let text = json!({"kind": "text", "id": 1, "text": "Checking\nthe disk.", "message_id": "m"});
        assert_eq!(printed(&t.event(&text, Some(1), 0)), ["the disk."]);
        assert!(t.delta(&json!({"message_id": "m", "index": 0, "text": "late"})).is_empty(), "stale delta");
    }

    #[test]
    fn a_live_line_is_cut_at_the_width_so_it_never_wraps() {
        let mut t = Transcript::new(20);
        let ops = t.delta(&json!({"message_id": "m", "index": 0, "text": "a".repeat(45)}));
        assert_eq!(printed(&ops), ["a".repeat(20), "a".repeat(20), format!("[live] {}", "a".repeat(5))]);
    }

    #[test]
    fn a_live_line_left_behind_by_typing_is_not_printed_again() {
        let mut t = Transcript::new(80);
        t.delta(&json!({"message_id": "m", "index": 0, "text": "alpha beta"}));
        t.commit_live();
        assert_eq!(printed(&t.delta(&json!({"message_id": "m", "index": 0, "text": " gamma"}))), ["[live]  gamma"]);
        let text = json!({"kind": "text", "id": 1, "text": "alpha beta gamma delta", "message_id": "m"});
        assert_eq!(printed(&t.event(&text, Some(1), 0)), [" gamma delta"]);
    }

    #[test]
    fn text_that_does_not_follow_the_deltas_shown_is_printed_whole() {
        let mut t = Transcript::new(80);
        t.delta(&json!({"message_id": "m", "index": 0, "text": "one\n"}));
        let text = json!({"kind": "text", "id": 1, "text": "two\nthree", "message_id": "m"});
        assert_eq!(printed(&t.event(&text, Some(1), 0)), ["two\nthree"]);
    }

    #[test]
    fn another_event_while_text_grows_prints_above_the_live_line() {
        let mut t = Transcript::new(80);
        t.delta(&json!({"message_id": "m", "index": 0, "text": "wor"}));
        let status = json!({"kind": "status", "text": "note"});
        assert_eq!(printed(&t.event(&status, None, 0)), ["  · note", "[live] wor"]);
    }

    #[test]
    fn tool_output_is_folded_under_its_call_even_when_it_comes_first() {
        let mut t = Transcript::new(80);
        let result = json!({"kind": "tool_result", "tool_use_id": "t1", "is_error": false, "content": "a\nb\nc\nd\ne"});
        assert!(t.event(&result, Some(2), 0).is_empty());
        let tool = json!({"kind": "tool", "tool_use_id": "t1", "name": "Bash", "input": {"command": "ls"}});
        assert_eq!(
            printed(&t.event(&tool, Some(3), 0)),
            ["  ▸ Bash: ls", "    ⎿ a\n      b\n      c\n      … 2 more lines"]
        );
    }

    #[test]
    fn results_show_time_turns_and_cost_and_errors_their_words() {
        let mut t = Transcript::new(80);
        let ok =
            json!({"kind": "result", "is_error": false, "duration_ms": 1234, "num_turns": 1, "total_cost_usd": 0.0012});
        assert_eq!(printed(&t.event(&ok, Some(1), 0)), ["✓ done · 1.2 s · 1 turn · $0.0012"]);
        let bad = json!({"kind": "result", "is_error": true, "subtype": "error_max_turns", "result": "gave up", "num_turns": 9});
        assert_eq!(printed(&t.event(&bad, Some(2), 0)), ["✗ error_max_turns · 9 turns\n  gave up"]);
    }

    #[test]
    fn an_approval_says_how_to_answer_and_its_decision_clears_it() {
        let mut t = Transcript::new(80);
        let approval = json!({"kind": "approval", "tool_use_id": "toolu_1", "tool": "Bash",
            "input": {"command": "ssh pve reset"}, "reason": "a power verb", "effect": "hard reset",
            "deadline_ms": 600_000});
        assert_eq!(
            printed(&t.event(&approval, Some(1), 1_000)),
            [
                "? Bash waits for you [toolu_1]: ssh pve reset\n  hard reset\n  answer: /allow or /deny [reason] (auto-deny in 9:59)"
            ]
        );
        assert_eq!(t.pending(), [Pending { tool_use_id: "toolu_1".into(), summary: "ssh pve reset".into() }]);
        let decision =
            json!({"kind": "approval_decision", "tool_use_id": "toolu_1", "decision": "deny", "by": "timeout"});
        assert_eq!(printed(&t.event(&decision, Some(2), 0)), ["  ✗ denied by timeout [toolu_1]"]);
        assert!(t.pending().is_empty());
    }

    #[test]
    fn an_approval_for_another_tool_shows_every_key_of_its_input_on_a_line_of_its_own() {
        let mut t = Transcript::new(80);
        let approval = json!({"kind": "approval", "tool_use_id": "toolu_2", "tool": "Write",
            "input": {"file_path": "/etc/sudoers.d/x", "content": "ALL ALL=(ALL) NOPASSWD: ALL\n# \u{202e}ok"},
            "reason": "writes a file"});
        assert_eq!(
            printed(&t.event(&approval, Some(1), 0)),
            [concat!(
                "? Write waits for you [toolu_2]:\n",
                "    content: ALL ALL=(ALL) NOPASSWD: ALL\n",
                "      # ⟨U+202E⟩ok\n",
                "    file_path: /etc/sudoers.d/x\n",
                "  writes a file\n",
                "  answer: /allow or /deny [reason]"
            )]
        );
        let edit = json!({"kind": "approval", "tool_use_id": "toolu_3", "tool": "Edit",
            "input": {"file_path": "/a", "old_string": "x", "new_string": "y\n".repeat(100), "replace_all": true}});
        let shown = printed(&t.event(&edit, Some(2), 0)).concat();
        assert!(shown.contains("    new_string: y\n      y\n"), "{shown}");
        assert!(shown.contains("    replace_all: true"), "{shown}");
        assert!(shown.contains("      … 88 more lines\n    old_string: x"), "bounded: {shown}");
    }

    #[test]
    fn the_turn_runs_from_its_user_event_to_its_turn_end_and_an_own_prompt_is_not_repeated() {
        let mut t = Transcript::new(80);
        t.sent_prompt("hello");
        assert!(t.event(&json!({"kind": "user", "text": "hello", "by": "bearer"}), Some(0), 0).is_empty());
        assert!(t.running());
        assert!(t.event(&json!({"kind": "turn_end"}), Some(1), 0).is_empty());
        assert!(!t.running());
        let other = json!({"kind": "user", "text": "from the phone", "by": "alice"});
        assert_eq!(printed(&t.event(&other, Some(2), 0)), ["\nalice> from the phone"]);
    }
}
