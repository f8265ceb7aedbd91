//! Agent lines to events: the translation table of SPEC §5. Pure.

use crate::agent::line::{AgentLine, Block};
use crate::event::{Event, TurnResult};

/// Tool output kept in a `tool_result` event; the rest is cut with a note.
pub const TOOL_RESULT_CAP: usize = 64 * 1024;

/// The events one agent line stands for, in order (often none).
pub fn translate(line: AgentLine) -> Vec<Event> {
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
        AgentLine::Assistant { blocks } => blocks
            .into_iter()
            .filter_map(|block| match block {
                Block::Text(text) if !text.is_empty() => Some(Event::Text { text }),
                Block::ToolUse { id, name, input } => Some(Event::Tool { name, input, tool_use_id: id }),
                Block::Text(_) | Block::Other => None,
            })
            .collect(),
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

    #[test]
    fn cap_keeps_short_text_and_cuts_on_a_char_boundary() {
        assert_eq!(cap("short".into(), 10), "short");
        let capped = cap("ééééé".into(), 3); // 2 bytes each: cut after one é
        assert!(capped.starts_with("é\n…"), "{capped}");
        assert!(capped.ends_with("[8 more bytes not shown]"), "{capped}");
    }
}
