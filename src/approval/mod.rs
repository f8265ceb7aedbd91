//! The operator in the loop: which of the agent's tool calls wait for a
//! decision ([`policy`], pure). The hook endpoint the agent calls back and
//! the pending decisions build on it.

pub mod policy;
