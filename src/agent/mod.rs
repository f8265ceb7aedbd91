//! The agent CLI (Claude Code run headless): what its output means
//! ([`line`], [`translate`]), how its process is run ([`process`]) and as
//! whom ([`user`]).

pub mod line;
pub mod process;
pub mod translate;
pub mod user;
