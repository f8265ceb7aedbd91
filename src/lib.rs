//! breakglass: an emergency-recovery console for a wedged machine.
//!
//! The modules follow one agent stdout line to a client's screen:
//!
//! - [`agent::line`] parses one line of the agent CLI's stream-json output;
//! - [`agent::translate`] turns it into zero or more [`event::Event`]s (pure);
//! - [`log`] appends events and reads them back: the source of truth, kept by
//!   [`store`] in SQLite, which assigns ids and commits before publishing;
//! - [`hub`] fans freshly committed events out to attached clients (bounded);
//! - [`sse`] encodes the attach stream: backlog, `caught-up`, live tail;
//! - [`http`] holds the routes, authentication and error mapping.
//!
//! Beside the pipeline: [`approval`] decides which tool calls wait for the
//! operator, [`session`] ties a log to at most one running turn,
//! [`turn`] runs one turn of the agent, [`agent::process`] owns the child
//! process group, [`capture`] reads child output with a cap,
//! [`power`] is the only place `ssh` is started, [`config`]
//! validates the command line, [`cli`] dispatches subcommands, [`client`] is the terminal client
//! (speaking only the public API), [`export`]
//! renders a transcript for people, [`notify`] tells the operator's phone
//! (webhook, Web Push) without ever holding up a turn, [`files`] writes the
//! data directory's private files, [`connections`] accepts and bounds
//! HTTP connections, [`server`] wires everything to a listener and orders
//! the drain, and [`shutdown`] listens for the signals. [`util`] holds the small helpers
//! every layer may use (time formats, random tokens).

pub mod agent;
pub mod approval;
pub mod capture;
pub mod cli;
pub mod client;
pub mod config;
pub mod connections;
pub mod event;
pub mod export;
pub mod files;
pub mod http;
pub mod hub;
pub mod log;
pub mod logging;
pub mod notify;
pub mod power;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sse;
pub mod store;
pub mod turn;
pub mod util;
pub mod web;
