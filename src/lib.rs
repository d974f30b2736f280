//! arservice: sandboxes for AI-agent rollouts behind a plain REST API.
//!
//! `main.rs` parses the command line and wires these together: `http` (the only place that
//! knows HTTP), `openapi` (the API's document), `api` (request bodies), `service` (the
//! instance table, recovery, the watch, `/stats`), `run_id` (the one validated name of an
//! instance), `state_dir` (the private directory proven to be ours), `journal` (what a
//! restart after a crash adopts), `ledger` (admission), `metrics` (every counter), `runner`
//! and the runners, `env` (one file per sandbox technology, plus the one spawn helper),
//! `agent` and `guard` (what runs inside a sandbox and in a Slurm CLI-path step on its node),
//! `cli` (the command lines: the server's flags, and `agent`'s and `guard`'s), and `gateway`
//! (model calls forwarded to LLM upstreams, with their usage and cost per run).

pub mod agent;
pub mod api;
pub mod cli;
pub mod env;
pub mod error;
pub mod gateway;
pub mod guard;
pub mod http;
pub mod journal;
pub mod ledger;
pub mod metrics;
pub mod openapi;
#[cfg(test)]
mod property;
pub mod run_id;
pub mod runner;
pub mod runner_local;
pub mod runner_slurm;
pub mod service;
pub mod state_dir;
pub mod url;
