//! Agent lines to events: the translation table of README "API" (events), and the live
//! text of partial messages (README, "How a turn runs the agent"). Pure: a
//! [`Translator`] only remembers what earlier lines of the same turn said.

use std::collections::{HashSet, VecDeque};

use crate::agent::line::{AgentLine, Block, StreamEvent};
use crate::event::{Delta, Event, TurnResult};

/// Tool output kept in a `tool_result` event; the rest is cut with a note.
pub const TOOL_RESULT_CAP: usize = 64 * 1024;

/// What one agent line stands for.
#[derive(Debug, Clone, PartialEq)]
pub enum Translated {
    /// An event for the log.
    Event(Event),
    /// New characters of a text block, for the clients attached now only.
    Delta(Delta),
}

/// Translates the lines of one turn, in order.
#[derive(Debug, Default)]
pub struct Translator {
    /// The message being streamed (its `message_start`).
    message_id: Option<String>,
    /// The block being streamed (its `content_block_start` or latest delta).
    block: Option<u64>,
    /// The latest messages whose text event is out: their late deltas are
    /// dropped, so no client sees a delta of a message after its text
    /// (README, "API"). Bounded: hostile output could name endless messages.
    /// In order, to forget the oldest, and in a set, so that the text of
    /// each new message costs one look-up rather than a comparison with
    /// every one remembered.
    finished: VecDeque<String>,
    finished_set: HashSet<String>,
}

/// Finished messages remembered; late deltas only ever follow the last few.
const FINISHED: usize = 64;
/// Longest message id remembered (the API's are about 30 characters).
const MESSAGE_ID_MAX: usize = 256;

impl Translator {
    fn finish(&mut self, id: &str) {
        if id.len() <= MESSAGE_ID_MAX && !self.finished_set.contains(id) {
            if self.finished.len() == FINISHED
                && let Some(oldest) = self.finished.pop_front()
            {
                self.finished_set.remove(&oldest);
            }
            self.finished.push_back(id.to_owned());
            self.finished_set.insert(id.to_owned());
        }
    }

    /// What one agent line stands for, in order (often nothing).
    pub fn line(&mut self, line: AgentLine) -> Vec<Translated> {
        match line {
            AgentLine::Stream { message_id, event } => self.stream(message_id, event).into_iter().collect(),
            AgentLine::Assistant { message_id, blocks } => {
                let message_id = message_id.or_else(|| self.message_id.clone());
                // The CLI prints a streamed block's whole line before that
                // block stops, so the open block is this one.
                let index = if message_id.is_some() && message_id == self.message_id { self.block } else { None };
                blocks
                    .into_iter()
                    .filter_map(|block| match block {
                        Block::Text(text) if !text.is_empty() => {
                            if let Some(id) = &message_id {
                                self.finish(id);
                            }
                            Some(Event::Text { text, message_id: message_id.clone(), index })
                        }
                        Block::ToolUse { id, name, input } => Some(Event::Tool { name, input, tool_use_id: id }),
                        Block::Text(_) | Block::Other => None,
                    })
                    .map(Translated::Event)
                    .collect()
            }
            other => translate(other).into_iter().map(Translated::Event).collect(),
        }
    }

    fn stream(&mut self, api_message_id: Option<String>, event: StreamEvent) -> Option<Translated> {
        match event {
            StreamEvent::MessageStart { message_id } => {
                self.message_id = message_id.or(api_message_id);
                self.block = None;
                None
            }
            StreamEvent::BlockStart { index } => {
                self.block = Some(index);
                None
            }
            StreamEvent::TextDelta { index, text } => {
                self.block = Some(index);
                let message_id = api_message_id.or_else(|| self.message_id.clone())?;
                if text.is_empty() || self.finished_set.contains(&message_id) {
                    return None;
                }
                Some(Translated::Delta(Delta { message_id, index, text }))
            }
            StreamEvent::Other => None,
        }
    }
}

/// The events of one agent line that needs nothing from the lines before it.
fn translate(line: AgentLine) -> Vec<Event> {
    match line {
        AgentLine::Init { session_id } => vec![Event::Session { session_id }],
        AgentLine::ApiRetry { attempt, max_retries, error } => {
            let count = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
            let mut text = format!("API retry {} of {}", count(attempt), count(max_retries));
            if let Some(error) = error {
                text.push_str(": ");
                text.push_str(&error);
            }
            vec![Event::Status { text }]
        }
        AgentLine::ToolResults { results } => results
            .into_iter()
            .map(|r| Event::ToolResult {
                tool_use_id: r.tool_use_id,
                is_error: r.is_error,
                content: cap(r.content, TOOL_RESULT_CAP),
            })
            .collect(),
        AgentLine::Result(r) => vec![Event::Result(TurnResult {
            is_error: r.is_error,
            result: r.result,
            subtype: r.subtype,
            duration_ms: r.duration_ms,
            num_turns: r.num_turns,
            total_cost_usd: r.total_cost_usd,
        })],
        // Read by the translator, which keeps their state.
        AgentLine::Assistant { .. } | AgentLine::Stream { .. } => Vec::new(),
        AgentLine::OtherSystem | AgentLine::Other => Vec::new(),
    }
}

/// Keeps at most `max` bytes (on a character boundary) and says how much was cut.
pub fn cap(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("\n… [{cut} more bytes not shown]"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile output naming message after message (some with huge ids)
    /// keeps the translator's memory to the last few.
    #[test]
    fn the_finished_messages_remembered_are_bounded() {
        let mut translator = Translator::default();
        for i in 0..10_000 {
            let id = if i % 2 == 0 { format!("msg_{i}") } else { "x".repeat(100_000) + &i.to_string() };
            let line = AgentLine::Assistant { message_id: Some(id), blocks: vec![Block::Text("t".into())] };
            translator.line(line);
        }
        assert!(translator.finished.len() <= FINISHED, "{}", translator.finished.len());
        assert_eq!(translator.finished_set.len(), translator.finished.len(), "the set follows the list");
        assert!(translator.finished.iter().all(|id| translator.finished_set.contains(id)));
        assert!(translator.finished.iter().all(|id| id.len() <= MESSAGE_ID_MAX));
        assert!(translator.finished.iter().any(|id| id == "msg_9998"), "the latest is remembered");
    }

    #[test]
    fn cap_keeps_short_text_and_cuts_on_a_char_boundary() {
        assert_eq!(cap("short".into(), 10), "short");
        let capped = cap("ééééé".into(), 3); // 2 bytes each: cut after one é
        assert!(capped.starts_with("é\n…"), "{capped}");
        assert!(capped.ends_with("[8 more bytes not shown]"), "{capped}");
    }
}
