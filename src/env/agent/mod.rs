//! The host side of an instance's agent: the per-instance directory that holds its socket
//! (mode 0700, mounted into that sandbox only) with the binary to mount ([`AgentMount`]), the
//! client that sends it commands ([`client::AgentClient`]), and [`Exec`], the choice between
//! the agent and the environment's CLI that every environment shares. The agent itself, the server
//! inside the sandbox, is `crate::agent`; the two share only the wire (`env::wire`).

pub mod client;
pub mod elf;

pub use client::{AgentClient, AgentError};

use crate::env::files::{self, Download, Upload};
use crate::env::stream::OutputSink;
use crate::env::wire::{ExecResult, ExecWire};
use crate::env::{EnvError, InstanceContext};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest a unix socket path may be (`sun_path` holds 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long a start waits for the agent to answer before the sandbox falls back to its CLI.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a start looks for the agent's socket.
const AGENT_POLL: Duration = Duration::from_millis(5);

/// The host side of an instance's agent: the binary and the per-instance directory (mode
/// 0700) that holds its socket, mounted into that sandbox only.
pub struct AgentMount {
    pub binary: PathBuf,
    pub dir: PathBuf,
}

/// Where the agent binary is mounted in a sandbox.
pub const AGENT_IN_SANDBOX: &str = "/.arservice/agent";

/// Where the instance's agent directory (with the socket) is mounted in a sandbox.
pub const AGENT_DIR_IN_SANDBOX: &str = "/.arservice/run";

/// The socket, as the agent inside the sandbox sees it.
pub const SOCKET_IN_SANDBOX: &str = "/.arservice/run/agent.sock";

impl AgentMount {
    /// A short per-instance directory under the state dir (a socket path must stay under 108
    /// bytes), or `None` when even that is too long.
    pub fn prepare(binary: &Path, ctx: &InstanceContext) -> Result<Option<AgentMount>, EnvError> {
        let dir = AgentMount::dir_of(ctx);
        if dir.join("agent.sock").as_os_str().len() > MAX_SOCKET_PATH {
            log::warn!(
                "state dir path too long for a unix socket: {} runs without its agent",
                ctx.run_id
            );
            return Ok(None);
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| EnvError::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
        Ok(Some(AgentMount {
            binary: binary.to_path_buf(),
            dir,
        }))
    }

    /// The instance's agent mount, or `None` when it runs without one: no `--agent` binary,
    /// `force_cli` (`exec_mode: "cli"`), or a path that `fits` refuses (a tool's mount syntax
    /// cannot carry every character; `tool` names it in the warning).
    pub fn for_instance(
        ctx: &InstanceContext,
        force_cli: bool,
        tool: &str,
        fits: impl Fn(&Path) -> bool,
    ) -> Result<Option<AgentMount>, EnvError> {
        let Some(binary) = ctx.agent.as_deref().filter(|_| !force_cli) else {
            return Ok(None);
        };
        let Some(mount) = AgentMount::prepare(binary, ctx)? else {
            return Ok(None);
        };
        if fits(&mount.binary) && fits(&mount.dir) {
            return Ok(Some(mount));
        }
        log::warn!(
            "the agent's paths cannot go into {tool}: {} runs without its agent",
            ctx.run_id
        );
        let _ = std::fs::remove_dir_all(&mount.dir);
        Ok(None)
    }

    /// The instance's agent directory: `<state>/agents/<hash of its sandbox name>`.
    pub fn dir_of(ctx: &InstanceContext) -> PathBuf {
        ctx.state_dir.join("agents").join(format!(
            "{:016x}",
            crate::env::fnv1a(ctx.sandbox_name().as_bytes())
        ))
    }

    /// Waits until the agent answers (`Some`), or `failed()` says it never will (`None`).
    pub fn connect(&self, failed: &dyn Fn() -> bool) -> Option<AgentClient> {
        let client = AgentClient::new(self.dir.join("agent.sock"));
        let deadline = std::time::Instant::now() + AGENT_START_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if client.ready() {
                return Some(client);
            }
            if failed() {
                return None;
            }
            std::thread::sleep(AGENT_POLL);
        }
        None
    }
}

/// How one instance's commands run: through its agent, or through its environment's CLI.
/// Every environment with an agent holds one and supplies the rest: how to launch the agent
/// (which gives the client to [`Exec::agent`]) and how to run a command through its CLI (the
/// `cli` closure of [`Exec::run`]). The branch between the two, the agent's error mapping,
/// the removal of the socket's directory, `exec_mode` in `/stats` and `agent` in the journal
/// are here once.
pub struct Exec {
    /// `Some` when commands go through the agent.
    client: Option<AgentClient>,
    /// The host directory of the agent's socket, removed on close (kept from a failed launch
    /// too, so that close removes it).
    dir: Option<PathBuf>,
    /// The sandbox's name, for errors.
    sandbox: String,
    /// The agent reads `stdin`: false for one adopted from a journal written before it did
    /// (an earlier build, which would run the command without it).
    reads_stdin: bool,
}

/// The key of a journal handle that says the instance's agent reads `stdin`.
const READS_STDIN: &str = "agent_reads_stdin";

impl Exec {
    /// Commands through the CLI; `dir` (of an agent that did not come up) removed on close.
    pub fn cli(sandbox: &str, dir: Option<PathBuf>) -> Exec {
        Exec {
            client: None,
            dir,
            sandbox: sandbox.to_string(),
            reads_stdin: true,
        }
    }

    /// Commands through the agent that `client` reaches, if it came up (else the CLI).
    pub fn agent(sandbox: &str, client: Option<AgentClient>, dir: PathBuf) -> Exec {
        Exec {
            client,
            dir: Some(dir),
            sandbox: sandbox.to_string(),
            reads_stdin: true,
        }
    }

    /// The agent of a sandbox an earlier life started (`handle` from [`Exec::handle_into`]),
    /// when it had one and it answers; else commands go through the CLI (`tool` in the
    /// warning).
    pub fn adopt(ctx: &InstanceContext, handle: &serde_json::Value, tool: &str) -> Exec {
        let dir = AgentMount::dir_of(ctx);
        let name = ctx.sandbox_name();
        let client = (handle["agent"].as_bool() == Some(true)).then(|| {
            let client = AgentClient::new(dir.join("agent.sock"));
            if !client.ready() {
                log::warn!("the agent of {name} does not answer: its commands go through {tool}");
            }
            client
        });
        Exec {
            reads_stdin: handle[READS_STDIN].as_bool() == Some(true),
            ..Exec::agent(&name, client.filter(AgentClient::ready), dir)
        }
    }

    /// True when commands go through the agent.
    pub fn through_agent(&self) -> bool {
        self.client.is_some()
    }

    /// Runs one command: through the agent (`request` as `to_agent` words it), or `cli`; its
    /// output streamed to `sink` when there is one (the CLI path gets it in its request).
    pub fn run(
        &self,
        sink: Option<&OutputSink>,
        to_agent: impl FnOnce() -> ExecWire,
        cli: impl FnOnce() -> Result<ExecResult, EnvError>,
    ) -> Result<ExecResult, EnvError> {
        match &self.client {
            Some(client) => {
                let exec = to_agent();
                if exec.stdin.is_some() && !self.reads_stdin {
                    return Err(EnvError::Invalid(format!(
                        "the agent of {} is of an earlier build (adopted after a restart) that \
                         does not read stdin: send the command without it, or start a new instance",
                        self.sandbox
                    )));
                }
                match sink {
                    Some(sink) => client.exec_streamed(&exec, sink),
                    None => client.exec(&exec),
                }
                .map_err(|err| err.into_env_error(&self.sandbox))
            }
            None => cli(),
        }
    }

    /// Writes a file (or unpacks a tar) through the agent; a relative path from `base` (the
    /// instance's working directory in the sandbox).
    pub fn put_file(
        &self,
        base: &str,
        upload: &Upload,
        body: &mut dyn std::io::Read,
    ) -> Result<u64, EnvError> {
        let upload = Upload {
            path: files::resolve(base, &upload.path)?,
            ..upload.clone()
        };
        self.agent_client()?
            .put_file(&upload, body)
            .map_err(|err| err.into_env_error(&self.sandbox))
    }

    /// Opens a file or directory for a download through the agent (a relative path from
    /// `base`).
    pub fn get_file(&self, base: &str, path: &str) -> Result<Download, EnvError> {
        let path = files::resolve(base, path)?;
        self.agent_client()?
            .get_file(&path)
            .map_err(|err| err.into_env_error(&self.sandbox))
    }

    /// The agent, or why files cannot go without it.
    fn agent_client(&self) -> Result<&AgentClient, EnvError> {
        self.client.as_ref().ok_or_else(|| {
            EnvError::Invalid(format!(
                "{} runs its commands through its CLI (exec_mode \"cli\", or its agent did not come up): /files needs the agent",
                self.sandbox
            ))
        })
    }

    /// Removes the agent's directory (the sandbox ends its processes itself).
    pub fn close(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Adds `exec_mode` (`agent` or `cli`) to what `/stats` shows.
    pub fn describe_into(&self, map: &mut serde_json::Map<String, serde_json::Value>) {
        let mode = if self.through_agent() { "agent" } else { "cli" };
        map.insert("exec_mode".into(), serde_json::Value::from(mode));
    }

    /// Adds `agent` (whether a later life should look for it) to a journal handle.
    pub fn handle_into(&self, mut handle: serde_json::Value) -> serde_json::Value {
        handle["agent"] = serde_json::Value::from(self.through_agent());
        handle[READS_STDIN] = serde_json::Value::from(self.reads_stdin);
        handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::spawn::Limits;
    use crate::env::ExecRequest;

    /// An agent adopted from a journal of a build before `stdin` runs commands without it:
    /// a command with `stdin` is refused (400) before it reaches the agent.
    #[test]
    fn an_agent_adopted_without_the_stdin_mark_is_not_sent_stdin() {
        let dir = std::env::temp_dir().join(format!("ars-exec-old-{}", std::process::id()));
        let old = Exec {
            reads_stdin: false,
            ..Exec::agent(
                "sb",
                Some(AgentClient::new(dir.join("none.sock"))),
                dir.clone(),
            )
        };
        let mut request = ExecRequest {
            cmd: "cat".into(),
            cwd: None,
            env: Default::default(),
            limits: Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 10,
            },
            stdin: Some("x".into()),
            sink: None,
        };
        let to_agent = |request: &ExecRequest| ExecWire::for_agent(request, "/", None);
        let cli = || panic!("the agent path has no CLI here");
        match old.run(None, || to_agent(&request), cli) {
            Err(EnvError::Invalid(detail)) => assert!(detail.contains("earlier build"), "{detail}"),
            other => panic!("{other:?}"),
        }
        // Without stdin it goes to the agent (here unreachable: a tool error, not a 400).
        request.stdin = None;
        assert!(matches!(
            old.run(None, || to_agent(&request), cli),
            Err(EnvError::Tool { .. })
        ));
        // The mark goes into the journal of an agent this build started, and is read back.
        let handle = Exec::agent("sb", None, dir.clone()).handle_into(serde_json::json!({}));
        assert_eq!(handle[READS_STDIN], true);
        assert!(old.handle_into(serde_json::json!({}))[READS_STDIN] == false);
    }
}
