//! Integration tests: one binary (matklad's "Delete Cargo Integration Tests").
//! Most start the real `breakglass` binary on port 0 with a fake agent CLI
//! (`tests/fake-bin/claude`) first on its PATH.

// Starting, signalling and reaping the server under test is simplest with
// std's process API; a blocked test thread stalls only that test.
#![allow(clippy::disallowed_methods)]

mod backend_fakes;
mod bmc;
mod harness;

mod approvals;
mod attach;
mod auth;
mod backup;
mod connections;
mod crash;
mod drill;
mod fleet;
mod frozen;
mod hook_probe;
mod layering;
mod lifecycle;
mod limits;
mod live;
mod metrics;
mod model_api;
mod notify;
mod pve;
mod pve_api;
mod real_claude;
mod redfish;
mod separation;
mod storage;
mod targets;
mod terminal;
mod translate;
mod turns;
mod web;
