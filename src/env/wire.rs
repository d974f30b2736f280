//! The one exec request of every wire, [`ExecWire`]: the body of `/execute_command` (HTTP),
//! what the host sends an instance's agent (JSON over HTTP/1.1 on the instance's unix
//! socket), and what the server forwards to a Slurm job's server (the job's own
//! `/execute_command`). [`ExecResult`] comes back on each. Both ends of the agent channel use
//! this module: the host client (`env::agent::client`) and the in-sandbox server
//! (`crate::agent`); neither depends on the other.
//!
//! **Compatibility.** A server restarted on a new binary adopts sandboxes whose agent, and
//! Slurm jobs whose server, is the old binary. Agents before this type read the timeout as
//! `timeout_s` (required), job servers as `timeout`; both ignore fields they do not know. So
//! what is sent carries the timeout under both names, and what is read accepts either (see
//! [`Fields`]). A field added since (`stdin`, `stream`) is ignored by an older agent or job
//! server: one that ignores `stream` answers once, as before, and the host passes that
//! answer's output on as one chunk.

use super::spawn;
use super::ExecRequest;
use crate::run_id::RunId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub use spawn::ExecResult;

/// One command on any exec wire. On HTTP the limits may be left out (the instance's timeout,
/// the server's output cap); the host fills every one in before it sends an agent or a job's
/// server the command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Fields", into = "Fields")]
pub struct ExecWire {
    /// The instance: on HTTP and to a job's server; not to an agent (its socket is the
    /// instance's).
    pub run_id: Option<RunId>,
    pub cmd: String,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Seconds.
    pub timeout: Option<f64>,
    pub max_output_bytes: Option<usize>,
    /// To an agent: the configured shell; `None`: `bash -lc` where the sandbox has bash,
    /// else `sh -c`.
    pub shell: Option<Vec<String>>,
    /// The command's stdin; `None`: `/dev/null`.
    pub stdin: Option<String>,
    /// Answer a stream of NDJSON lines (`env::stream`) instead of one answer.
    pub stream: bool,
}

/// [`ExecWire`] as JSON: the timeout under its two names (see the module doc).
#[derive(Serialize, Deserialize)]
struct Fields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run_id: Option<RunId>,
    cmd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
    /// `null` reads as none (as HTTP always took it).
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<f64>,
    /// The name agents before [`ExecWire`] read (and require).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_output_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shell: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stdin: Option<String>,
    /// Sent only when true: what is sent without it is what earlier builds sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
}

impl TryFrom<Fields> for ExecWire {
    type Error = String;

    fn try_from(fields: Fields) -> Result<ExecWire, String> {
        let timeout = match (fields.timeout, fields.timeout_s) {
            (Some(timeout), Some(timeout_s)) if timeout != timeout_s => {
                return Err(format!(
                    "timeout ({timeout}) and timeout_s ({timeout_s}) differ: give one"
                ))
            }
            (timeout, timeout_s) => timeout.or(timeout_s),
        };
        Ok(ExecWire {
            run_id: fields.run_id,
            cmd: fields.cmd,
            cwd: fields.cwd,
            env: fields.env.unwrap_or_default(),
            timeout,
            max_output_bytes: fields.max_output_bytes,
            shell: fields.shell,
            stdin: fields.stdin,
            stream: fields.stream.unwrap_or(false),
        })
    }
}

impl From<ExecWire> for Fields {
    fn from(exec: ExecWire) -> Fields {
        Fields {
            run_id: exec.run_id,
            cmd: exec.cmd,
            cwd: exec.cwd,
            env: Some(exec.env),
            timeout: exec.timeout,
            timeout_s: exec.timeout,
            max_output_bytes: exec.max_output_bytes,
            shell: exec.shell,
            stdin: exec.stdin,
            stream: exec.stream.then_some(true),
        }
    }
}

impl ExecWire {
    /// One request of the exec contract for an agent, a relative `cwd` taken from
    /// `base_cwd`.
    pub fn for_agent(
        request: &ExecRequest,
        base_cwd: &str,
        shell: Option<Vec<String>>,
    ) -> ExecWire {
        ExecWire {
            run_id: None,
            cmd: request.cmd.clone(),
            cwd: request
                .cwd
                .as_ref()
                .map(|cwd| Path::new(base_cwd).join(cwd).display().to_string()),
            env: request.env.clone(),
            timeout: Some(request.limits.timeout.as_secs_f64()),
            max_output_bytes: Some(request.limits.max_output_bytes),
            shell,
            stdin: request.stdin.clone(),
            stream: request.sink.is_some(),
        }
    }

    /// One request of the exec contract for the server in a Slurm job, which runs instance
    /// `run_id` (its `cwd` as the request gave it: the job's server resolves it).
    pub fn for_job(request: &ExecRequest, run_id: &RunId) -> ExecWire {
        ExecWire {
            run_id: Some(run_id.clone()),
            cmd: request.cmd.clone(),
            cwd: request.cwd.clone(),
            env: request.env.clone(),
            timeout: Some(request.limits.timeout.as_secs_f64()),
            max_output_bytes: Some(request.limits.max_output_bytes),
            shell: None,
            stdin: request.stdin.clone(),
            stream: request.sink.is_some(),
        }
    }

    /// The limits an agent runs the command under: both must be given.
    pub fn limits(&self) -> Result<spawn::Limits, String> {
        let timeout = self.timeout.ok_or("timeout is required")?;
        let max_output_bytes = self
            .max_output_bytes
            .ok_or("max_output_bytes is required")?;
        let timeout = std::time::Duration::try_from_secs_f64(timeout)
            .map_err(|_| format!("timeout {timeout} is not a number of seconds"))?;
        Ok(spawn::Limits {
            timeout,
            max_output_bytes,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::spawn::Limits;
    use serde_json::json;
    use std::time::Duration;

    /// The agent's request as builds before [`ExecWire`] read it (and sent it).
    #[derive(Debug, Deserialize, Serialize)]
    struct OldAgentExec {
        cmd: String,
        cwd: Option<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        timeout_s: f64,
        max_output_bytes: usize,
        shell: Option<Vec<String>>,
    }

    fn request(stdin: Option<&str>) -> ExecRequest {
        ExecRequest {
            cmd: "cat".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: Limits {
                timeout: Duration::from_millis(1500),
                max_output_bytes: 1000,
            },
            stdin: stdin.map(String::from),
            sink: None,
        }
    }

    #[test]
    fn an_old_agents_request_parses() {
        let old = OldAgentExec {
            cmd: "ls".into(),
            cwd: None,
            env: BTreeMap::new(),
            timeout_s: 2.5,
            max_output_bytes: 10,
            shell: Some(vec!["sh".into(), "-c".into()]),
        };
        let exec: ExecWire = serde_json::from_value(json!(old)).unwrap();
        assert_eq!(exec.timeout, Some(2.5));
        assert_eq!(exec.max_output_bytes, Some(10));
        assert_eq!(exec.shell.as_deref().map(<[String]>::len), Some(2));
        assert_eq!(exec.limits().unwrap().timeout, Duration::from_millis(2500));
        assert_eq!(exec.stdin, None);
    }

    #[test]
    fn what_an_old_agent_is_sent_parses_as_it_read_it() {
        let sent = serde_json::to_vec(&ExecWire::for_agent(&request(Some("in\n")), "/base", None))
            .unwrap();
        let old: OldAgentExec = serde_json::from_slice(&sent).unwrap();
        assert_eq!(old.timeout_s, 1.5);
        assert_eq!(old.max_output_bytes, 1000);
        assert_eq!(old.cwd.as_deref(), Some("/base/sub"));
        assert_eq!(old.env["K"], "V");
        // And the new agent reads it whole, stdin included.
        let new: ExecWire = serde_json::from_slice(&sent).unwrap();
        assert_eq!(new.stdin.as_deref(), Some("in\n"));
        assert_eq!(new.timeout, Some(1.5));
    }

    #[test]
    fn what_a_jobs_server_is_sent_names_the_timeout_as_http_does() {
        let sent = json!(ExecWire::for_job(
            &request(None),
            &RunId::parse("r1", "run_id").unwrap()
        ));
        // What servers before this type read from `/execute_command`.
        assert_eq!(sent["run_id"], "r1");
        assert_eq!(sent["cmd"], "cat");
        assert_eq!(sent["timeout"], 1.5);
        assert_eq!(sent["max_output_bytes"], 1000);
        assert_eq!(sent["cwd"], "sub");
        assert!(sent.get("stdin").is_none(), "{sent}");
        let back: ExecWire = serde_json::from_value(sent).unwrap();
        assert_eq!(
            back,
            ExecWire::for_job(&request(None), &RunId::parse("r1", "run_id").unwrap())
        );
    }

    #[test]
    fn two_different_timeouts_are_refused_and_limits_are_required() {
        let err =
            serde_json::from_value::<ExecWire>(json!({"cmd": "x", "timeout": 1, "timeout_s": 2}))
                .unwrap_err();
        assert!(err.to_string().contains("differ"), "{err}");
        let bare: ExecWire = serde_json::from_value(json!({"cmd": "x"})).unwrap();
        assert!(bare.limits().unwrap_err().contains("timeout is required"));
    }
}
