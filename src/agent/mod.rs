//! The agent CLI (Claude Code run headless): what its output means
//! ([`line`], [`translate`]), how its process is run ([`process`]), as
//! whom ([`user`]) and as which agent ([`definition`]).

pub mod definition;
pub mod line;
pub mod process;
pub mod translate;
pub mod user;
