//! The exec wire between the host and an instance's agent: [`AgentExec`] (one command) goes
//! in, [`ExecResult`] comes out, as JSON over HTTP/1.1 on the instance's unix socket. Both
//! sides use this module: the host client (`env::agent::client`) and the in-sandbox server
//! (`crate::agent`); neither depends on the other. The field names are the wire: an agent of an
//! earlier build, adopted after a restart, still reads them.

use super::spawn;
use super::ExecRequest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub use spawn::ExecResult;

/// One command for the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentExec {
    pub cmd: String,
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub timeout_s: f64,
    pub max_output_bytes: usize,
    /// `None`: `bash -lc` where the sandbox has bash, else `sh -c`.
    pub shell: Option<Vec<String>>,
}

impl AgentExec {
    /// One request of the exec contract, a relative `cwd` taken from `base_cwd`.
    pub fn from_request(
        request: &ExecRequest,
        base_cwd: &str,
        shell: Option<Vec<String>>,
    ) -> AgentExec {
        AgentExec {
            cmd: request.cmd.clone(),
            cwd: request
                .cwd
                .as_ref()
                .map(|cwd| Path::new(base_cwd).join(cwd).display().to_string()),
            env: request.env.clone(),
            timeout_s: request.limits.timeout.as_secs_f64(),
            max_output_bytes: request.limits.max_output_bytes,
            shell,
        }
    }
}

/// Room for the JSON around the output in an answer, and for the agent's error details.
const ANSWER_SLACK_BYTES: u64 = 64 * 1024;

/// How much larger than the output its JSON can be: a control byte is written `\u0001` (6
/// bytes); an invalid UTF-8 byte becomes U+FFFD (3 bytes).
const JSON_ESCAPE_FACTOR: u64 = 6;

/// The largest answer an exec with this output cap can need (from an agent, or from a Slurm
/// job's server): the cap at the worst escape of every byte, plus the rest of the answer. The
/// result is bounded by the cap, never by its encoding.
pub fn answer_limit(max_output_bytes: usize) -> u64 {
    (max_output_bytes as u64)
        .saturating_add(OMITTED_NOTE_BYTES)
        .saturating_mul(JSON_ESCAPE_FACTOR)
        .saturating_add(ANSWER_SLACK_BYTES)
}

/// The note that replaces the middle of a truncated output, at its longest.
const OMITTED_NOTE_BYTES: u64 = 64;
