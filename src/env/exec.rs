//! The exec contract every environment implements: [`ExecRequest`] in (the command, its
//! `cwd` and `env`, its limits, its stdin, where its output streams to), `spawn::ExecResult`
//! out; the words that run a command
//! string through a sandbox's shell with stderr joined to stdout; and how a `cwd` that is
//! not a directory is refused, in the same words on every path.

use super::spawn::{ExecResult, Limits};
use super::EnvError;
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
    /// The command's stdin; `None`: `/dev/null`.
    pub stdin: Option<String>,
    /// Where the output goes as it is read (`"stream": true`); `None`: only the answer.
    pub sink: Option<super::stream::OutputSink>,
}

/// Runs `$1` with `bash -lc` where the sandbox has bash (like the original), else `sh -c`,
/// stderr joined to stdout (their order is kept even where a tool carries them as two
/// streams, as `docker exec` does). `command -v` is a shell builtin: the choice costs
/// microseconds, so it is made inside every command rather than by an extra call at start.
pub const BASH_OR_SH: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -lc \"$1\" 2>&1; fi; exec sh -c \"$1\" 2>&1";

/// Runs `"$@"` (a configured shell and the command) with stderr joined to stdout.
pub const MERGE_OUTPUT: &str = "exec \"$@\" 2>&1";

/// Enters directory `$1` and shifts it away, for the CLI paths (whose tools refuse a
/// directory that does not exist with their own words, before anything of ours runs: the
/// tool starts where a command without a `cwd` starts, and this enters the `cwd`). When `$1`
/// is not a directory it prints [`CWD_REFUSED`] and exits [`CWD_REFUSED_CODE`]: the command
/// never runs, and the server answers [`not_a_directory`] (400), as the agent does. `cd -P`
/// enters the physical directory, as the tools' `chdir` does; `OLDPWD`, which `cd` sets and
/// exports, is put back as it was (unset, or the environment's value): the command sees the
/// environment and directory it would have seen had the tool entered the `cwd` itself. A
/// directory that `cd` cannot enter (no permission) is the command's failure, in `sh`'s
/// words (126).
pub const ENTER_CWD: &str = "if [ -n \"${OLDPWD+x}\" ]; then ARSERVICE_OLDPWD=$OLDPWD; fi; \
     if [ ! -d \"$1\" ]; then echo 'arservice: cwd is not a directory: the command did not run'; exit 121; fi; \
     cd -P -- \"$1\" || exit 126; \
     if [ -n \"${ARSERVICE_OLDPWD+x}\" ]; then OLDPWD=$ARSERVICE_OLDPWD; unset ARSERVICE_OLDPWD; else unset OLDPWD; fi; \
     shift; ";

/// The line a command refused for its `cwd` prints instead of running: [`ENTER_CWD`]'s (its
/// last line) and the Slurm step guard's (`arservice guard --cwd`, among srun's words).
pub const CWD_REFUSED: &str = "arservice: cwd is not a directory: the command did not run";

/// The return code of a command refused for its `cwd`: not one that `sh` (126, 127), a
/// timeout (124), a signal (128 and up) or the container engines (125) give.
pub const CWD_REFUSED_CODE: i32 = 121;

/// Why a command did not run in `cwd` (the resolved path), in the same words on every
/// environment and exec path (the agent's, the local environment's, the CLI paths').
pub fn not_a_directory(cwd: &str) -> String {
    format!("cwd '{cwd}' is not a directory in the sandbox")
}

/// `result` of a command run in `cwd`, or the 400 for a `cwd` that is not a directory when
/// [`ENTER_CWD`] (or the Slurm guard) refused it: its return code and its output's last line.
/// A command's own output ending with that line and that code would be taken for it: only
/// the command itself can write them, and its answer is then this error.
pub fn refused_cwd(result: ExecResult, cwd: Option<&str>) -> Result<ExecResult, EnvError> {
    let refused = !result.timed_out
        && result.returncode == CWD_REFUSED_CODE
        && result
            .output
            .strip_suffix('\n')
            .and_then(|rest| rest.strip_suffix(CWD_REFUSED))
            .is_some_and(|before| before.is_empty() || before.ends_with('\n'));
    match cwd {
        Some(cwd) if refused => Err(EnvError::Invalid(not_a_directory(cwd))),
        _ => Ok(result),
    }
}

/// The words that run `cmd` inside a sandbox through its `sh`: the configured `shell`
/// (`sh -c MERGE_OUTPUT sh <shell...> <cmd>`), or bash where there is bash, else sh
/// (`sh -c BASH_OR_SH sh <cmd>`); stderr joined to stdout either way. With a `cwd`, the
/// script enters it first ([`ENTER_CWD`], the `cwd` an argument of `sh`, never a tool's
/// option).
pub fn shell_words(shell: Option<&[String]>, cwd: Option<&str>, cmd: &str) -> Vec<String> {
    shell_words_after("", shell, cwd, cmd)
}

/// [`shell_words`], the script starting with `setup` (shell code that leaves `"$@"` as it
/// found it).
pub fn shell_words_after(
    setup: &str,
    shell: Option<&[String]>,
    cwd: Option<&str>,
    cmd: &str,
) -> Vec<String> {
    let enter = if cwd.is_some() { ENTER_CWD } else { "" };
    let run = if shell.is_some() {
        MERGE_OUTPUT
    } else {
        BASH_OR_SH
    };
    let mut words: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        format!("{setup}{enter}{run}"),
        "sh".into(),
    ];
    words.extend(cwd.map(String::from));
    words.extend(shell.into_iter().flatten().cloned());
    words.push(cmd.to_string());
    words
}

/// The request's `stdin` as the file a command reads it from ([`super::spawn::input_file`]);
/// `None` (`/dev/null`) when it has none.
pub fn stdin_file(request: &ExecRequest) -> Result<Option<std::fs::File>, super::EnvError> {
    super::spawn::stdin_of(request.stdin.as_deref()).map_err(|source| super::EnvError::Io {
        context: "cannot hold the command's stdin".into(),
        source,
    })
}

/// The command's own `cwd` as a path in the sandbox, a relative one taken from `base` (the
/// instance's working directory); `None` when the command names none.
pub fn command_cwd(base: &str, request: &ExecRequest) -> Option<String> {
    let cwd = request.cwd.as_ref()?;
    Some(std::path::Path::new(base).join(cwd).display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn result(output: &str, returncode: i32) -> ExecResult {
        ExecResult {
            output: output.into(),
            returncode,
            timed_out: false,
            truncated: false,
            duration_s: 0.0,
        }
    }

    #[test]
    fn the_script_and_the_server_agree_on_the_refusal() {
        assert!(ENTER_CWD.contains(&format!("echo '{CWD_REFUSED}'; exit {CWD_REFUSED_CODE};")));
        let refused = format!("{CWD_REFUSED}\n");
        let err = refused_cwd(result(&refused, CWD_REFUSED_CODE), Some("/x")).unwrap_err();
        assert!(matches!(err, EnvError::Invalid(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "cwd '/x' is not a directory in the sandbox"
        );
        // A tool's warning before it is still the refusal.
        let warned = format!("WARNING: something\n{CWD_REFUSED}\n");
        assert!(refused_cwd(result(&warned, CWD_REFUSED_CODE), Some("/x")).is_err());
        // Another code, other words, no cwd, or a timeout: the command's own result.
        assert!(refused_cwd(result(&refused, 1), Some("/x")).is_ok());
        assert!(refused_cwd(result("x", CWD_REFUSED_CODE), Some("/x")).is_ok());
        assert!(refused_cwd(result(&format!("x{refused}"), CWD_REFUSED_CODE), Some("/x")).is_ok());
        assert!(refused_cwd(result(&refused, CWD_REFUSED_CODE), None).is_ok());
        let mut late = result(&refused, CWD_REFUSED_CODE);
        late.timed_out = true;
        assert!(refused_cwd(late, Some("/x")).is_ok());
    }

    #[test]
    fn shell_words_with_and_without_a_cwd() {
        assert_eq!(
            shell_words(None, None, "ls"),
            ["sh", "-c", BASH_OR_SH, "sh", "ls"]
        );
        assert_eq!(
            shell_words(Some(&["zsh".into(), "-c".into()]), Some("/w"), "ls"),
            [
                "sh",
                "-c",
                &format!("{ENTER_CWD}{MERGE_OUTPUT}"),
                "sh",
                "/w",
                "zsh",
                "-c",
                "ls"
            ]
        );
    }

    /// Runs `shell_words` with `cwd` through the host's `sh` from `/`, with `env` only.
    fn run(cwd: &str, env: &[(&str, &str)], cmd: &str) -> (String, i32) {
        let words = shell_words(Some(&["sh".into(), "-c".into()]), Some(cwd), cmd);
        let output = Command::new(&words[0])
            .args(&words[1..])
            .current_dir("/")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            output.status.code().unwrap(),
        )
    }

    #[test]
    fn enter_cwd_changes_nothing_the_command_sees_but_its_directory() {
        let dir = std::env::temp_dir().join(format!("ars-enter-cwd-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let _ = std::fs::remove_file(dir.join("link"));
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        let real = dir
            .join("real")
            .canonicalize()
            .unwrap()
            .display()
            .to_string();
        let link = dir.join("link").display().to_string();
        // The environment `sh` started with, and the physical directory, as a tool's chdir.
        let (output, code) = run(&link, &[("A", "1")], "pwd; env | sort");
        assert_eq!(code, 0, "{output}");
        assert_eq!(
            output,
            format!("{real}\nA=1\nPATH=/usr/bin:/bin\nPWD={real}\n")
        );
        let (output, _) = run(&real, &[("OLDPWD", "/old")], "env | grep OLDPWD");
        assert_eq!(output, "OLDPWD=/old\n");
        for bad in ["/nonexistent/dir", "/etc/passwd", "-P", "--privileged"] {
            let (output, code) = run(bad, &[], "echo ran");
            assert_eq!(output, format!("{CWD_REFUSED}\n"), "{bad}");
            assert_eq!(code, CWD_REFUSED_CODE, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
