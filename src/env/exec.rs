//! The exec contract every environment implements: [`ExecRequest`] in (the command, its
//! `cwd` and `env`, its limits), `spawn::ExecResult` out; and the words that run a command
//! string through a sandbox's shell with stderr joined to stdout.

use super::spawn::Limits;
use std::collections::BTreeMap;

/// One command, with every default already resolved except the environment's own.
#[derive(Clone, Debug)]
pub struct ExecRequest {
    pub cmd: String,
    /// Overrides the instance's working directory for this command.
    pub cwd: Option<String>,
    /// Added on top of the instance's environment for this command.
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
}

/// Runs `$1` with `bash -lc` where the sandbox has bash (like the original), else `sh -c`,
/// stderr joined to stdout (their order is kept even where a tool carries them as two
/// streams, as `docker exec` does). `command -v` is a shell builtin: the choice costs
/// microseconds, so it is made inside every command rather than by an extra call at start.
pub const BASH_OR_SH: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -lc \"$1\" 2>&1; fi; exec sh -c \"$1\" 2>&1";

/// Runs `"$@"` (a configured shell and the command) with stderr joined to stdout.
pub const MERGE_OUTPUT: &str = "exec \"$@\" 2>&1";

/// The words that run `cmd` inside a sandbox through its `sh`: the configured `shell`
/// (`sh -c MERGE_OUTPUT sh <shell...> <cmd>`), or bash where there is bash, else sh
/// (`sh -c BASH_OR_SH sh <cmd>`); stderr joined to stdout either way.
pub fn shell_words(shell: Option<&[String]>, cmd: &str) -> Vec<String> {
    let mut words: Vec<String> = vec!["sh".into(), "-c".into()];
    match shell {
        Some(shell) => {
            words.extend([MERGE_OUTPUT.into(), "sh".into()]);
            words.extend(shell.iter().cloned());
        }
        None => words.extend([BASH_OR_SH.into(), "sh".into()]),
    }
    words.push(cmd.to_string());
    words
}
