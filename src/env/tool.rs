//! Calling a sandbox technology's CLI (`docker run`, `apptainer instance start`) to
//! completion through the one spawn helper, and finding programs on `PATH`.

use super::spawn::{self, Limits};
use super::EnvError;
use std::process::Command;
use std::time::Duration;

/// Output kept from a CLI call (its error message is the tail of it).
const TOOL_OUTPUT_BYTES: usize = 16 * 1024;

/// How much of a tool's output an error message quotes.
const TOOL_ERROR_CHARS: usize = 600;

/// Runs a CLI (`docker run ...`) to completion within `timeout`; its output on success.
///
/// `what` names the call in errors (`docker run`); a non-zero exit is an [`EnvError::Tool`]
/// carrying the tail of what the tool said.
pub fn run_tool(what: &str, command: Command, timeout: Duration) -> Result<String, EnvError> {
    let groups = spawn::ProcessGroups::default();
    let limits = Limits {
        timeout,
        max_output_bytes: TOOL_OUTPUT_BYTES,
    };
    let program = command.get_program().to_string_lossy().into_owned();
    let result =
        spawn::run(command, None, limits, &groups, None).map_err(|source| EnvError::Io {
            context: format!("cannot run {what} ('{program}' is not installed or not on PATH)"),
            source,
        })?;
    // What the tool left running on purpose (`apptainer instance start` detaches the
    // instance) stays: only a timeout kills what a tool started.
    if result.timed_out {
        return Err(EnvError::Tool {
            what: what.to_string(),
            detail: format!("timed out after {:.0} s", timeout.as_secs_f64()),
        });
    }
    if result.returncode != 0 {
        return Err(EnvError::Tool {
            what: what.to_string(),
            detail: tail(result.output.trim(), TOOL_ERROR_CHARS),
        });
    }
    Ok(result.output)
}

/// True when `program` is a file in one of `PATH`'s directories.
pub fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// The first of `names` found on `PATH`, or the first name.
pub fn first_on_path<'a>(names: &[&'a str]) -> &'a str {
    names
        .iter()
        .copied()
        .find(|name| on_path(name))
        .unwrap_or(names[0])
}

/// The last `chars` characters of `text`.
pub fn tail(text: &str, chars: usize) -> String {
    let count = text.chars().count();
    if count <= chars {
        text.to_string()
    } else {
        let cut: String = text.chars().skip(count - chars).collect();
        format!("...{cut}")
    }
}
