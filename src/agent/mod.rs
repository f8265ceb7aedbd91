//! The agent CLI (Claude Code run headless): what its output means
//! ([`line`], [`translate`]) and how its process is run ([`process`]).

pub mod line;
pub mod process;
pub mod translate;
