//! The host side of an instance's agent: the per-instance directory that holds its socket
//! (mode 0700, mounted into that sandbox only) with the binary to mount ([`AgentMount`]), and
//! the client that sends it commands ([`client::AgentClient`]). The agent itself, the server
//! inside the sandbox, is `crate::agent`; the two share only the wire (`env::wire`).

pub mod client;
pub mod elf;

pub use client::{AgentClient, AgentError};

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
