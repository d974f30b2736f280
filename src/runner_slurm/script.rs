//! What a job is made of: the `sbatch` arguments, the job scripts (the job's server and the
//! sweep after it, or on the CLI path the hold guard), the environment `sbatch` passes into the job, the job's token.

use super::settings::*;
use crate::env::config::SlurmOptions;
use crate::env::{EnvError, EnvSpec, InstanceContext};
use std::io::Read;
use std::path::Path;

/// The arguments of `sbatch` for one instance (after the program name).
pub fn sbatch_arguments(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    settings: &SlurmSettings,
    options: &SlurmOptions,
    script: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--parsable".into(),
        format!("--job-name={}", ctx.sandbox_name()),
        format!(
            "--comment=arservice server {} run {}",
            ctx.server_id, ctx.run_id
        ),
        format!("--output={}", ctx.root.join("job.out").display()),
        format!("--chdir={}", ctx.root.display()),
        // A sandbox dies with its node: a job requeued after a node failure would start an
        // empty one elsewhere, under the dead instance's name and files.
        "--no-requeue".into(),
    ];
    if let Some(cpus) = spec.resources.get("cpus") {
        args.push(format!(
            "--cpus-per-task={}",
            cpus.as_f64().ceil().max(1.0) as u64
        ));
    }
    if let Some(memory_gb) = spec.resources.get("memory_gb") {
        args.push(format!(
            "--mem={}M",
            (memory_gb.as_f64() * 1024.0).ceil() as u64
        ));
    }
    if let Some(gpus) = spec.resources.get("gpus") {
        let whole = gpus.as_f64().ceil() as u64;
        if whole > 0 {
            args.push(format!("--gpus={whole}"));
        }
    }
    let pick =
        |own: &Option<String>, server: &Option<String>| own.clone().or_else(|| server.clone());
    for (flag, value) in [
        ("partition", pick(&options.partition, &settings.partition)),
        ("account", pick(&options.account, &settings.account)),
        ("qos", pick(&options.qos, &settings.qos)),
        ("time", pick(&options.time, &settings.time)),
        (
            "constraint",
            pick(&options.constraint, &settings.constraint),
        ),
    ] {
        if let Some(value) = value {
            args.push(format!("--{flag}={value}"));
        }
    }
    args.extend(settings.sbatch_args.iter().cloned());
    args.extend(options.sbatch_args.iter().cloned());
    args.push(script.display().to_string());
    args
}

/// The job script: runs this binary's own server on the node until the job ends (scancel
/// sends it SIGTERM, and it closes its instance before it exits, with status 0); when it
/// ended otherwise, `arservice sweep` on its state dir, which removes what a server that did
/// not close its instance left on the node (killed by SIGKILL or the OOM killer, crashed): its docker or podman container and
/// fork image, which the job's end would not take (the engine owns them), and the rest of
/// its start-up sweep. The shell traps SIGTERM (Slurm sends it to every process of the job,
/// the shell included) so that it waits for the server and sweeps within `KillWait`. Its
/// only client is this server, which already applied the operator's policy to the config it
/// forwards (presets included), hence `--allow-client-host-access`.
pub fn job_script(
    binary: &Path,
    root: &Path,
    token: &str,
    max_output_bytes: usize,
    pids_limit: u64,
    fork_timeout: std::time::Duration,
) -> String {
    let quote = |path: &Path| format!("'{}'", path.display());
    format!(
        "#!/bin/sh\n\
         # arservice: the server of one instance, on the node the job landed on.\n\
         ARS_TOKEN={token}\n\
         export ARS_TOKEN\n\
         # SIGTERM (scancel, the time limit) reaches this shell too: it stays for the sweep.\n\
         trap : TERM\n\
         {binary} --runner local --host 0.0.0.0 --port 0 --state-dir {state} \\\n\
         \x20   --ready-file {ready} --max-resources '{{\"instances\": 1}}' \\\n\
         \x20   --workers {NODE_WORKERS} --max-output-bytes {max_output_bytes} \\\n\
         \x20   --pids-limit {pids_limit} --allow-client-host-access --fork-seed {seed} \\\n\
         \x20   --fork-timeout {fork_timeout}\n\
         status=$?\n\
         unset ARS_TOKEN\n\
         # A server that did not end cleanly (killed, crashed) left its sandbox: it goes now.\n\
         if [ \"$status\" -ne 0 ]; then {binary} sweep --state-dir {state}; fi\n\
         exit $status\n",
        binary = quote(binary),
        fork_timeout = fork_timeout.as_secs_f64(),
        state = quote(&root.join("node")),
        seed = quote(&root.join(FORK_SEED_DIR)),
        ready = quote(&root.join("ready.json")),
    )
}

/// The directory of a job's instance directory where a fork's copy of its source's files
/// waits for the job's server (`--fork-seed`), which takes it for its instance.
pub const FORK_SEED_DIR: &str = "seed";

/// Variables of the login server's environment that a job gets (sbatch exports what it has),
/// besides the names in [`JOB_PREFIXES`] and the config's `forward_env`: never its token or
/// model keys, nor anything else it happens to hold.
pub(super) const JOB_ENV_FROM_SERVER: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

/// Prefixes of the variables that configure Slurm itself and the container tools on the node.
pub(super) const JOB_PREFIXES: [&str; 7] = [
    "SLURM_",
    "SBATCH_",
    "APPTAINER_",
    "SINGULARITY_",
    "ENROOT_",
    "DOCKER_",
    "CONTAINERS_",
];

/// The environment `sbatch` runs with, and so the job's: the server's own variables that the
/// job needs ([`JOB_ENV_FROM_SERVER`], [`JOB_PREFIXES`]) and those `forward_env` names.
pub fn job_environment(
    forward_env: &[String],
    server: impl Iterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    server
        .filter(|(name, _)| {
            JOB_ENV_FROM_SERVER.contains(&name.as_str())
                || JOB_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
                || forward_env.contains(name)
        })
        .collect()
}

/// A fresh random token for one job's server.
pub(super) fn random_token() -> Result<String, EnvError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|source| EnvError::Io {
            context: "cannot read /dev/urandom".into(),
            source,
        })?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The job script of the CLI path: the hold guard keeps the allocation until `scancel`, says
/// so in `ready.json`, and at the job's end kills what still carries the instance's marker.
pub fn hold_script(binary: &Path, root: &Path, instance: &str) -> String {
    let quote = |path: &Path| format!("'{}'", path.display());
    format!(
        "#!/bin/sh\n\
         # arservice: holds the allocation; commands run as srun steps under arservice guard.\n\
         exec {binary} guard --hold --instance '{instance}' --ready-file {ready}\n",
        binary = quote(binary),
        ready = quote(&root.join("ready.json")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_script_runs_our_server_then_sweeps_what_it_left() {
        let script = job_script(
            Path::new("/opt/arservice"),
            Path::new("/state/instances/r"),
            "00ff",
            1024,
            512,
            std::time::Duration::from_secs(90),
        );
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("ARS_TOKEN=00ff\nexport ARS_TOKEN\n"));
        assert!(!script.contains("--token"), "the token must not show in ps");
        // The shell outlives the SIGTERM of a scancel, and runs the server, not `exec`s it.
        let trap = script.find("\ntrap : TERM\n").expect(&script);
        let server = script
            .find("\n'/opt/arservice' --runner local --host 0.0.0.0 --port 0")
            .expect(&script);
        assert!(trap < server, "{script}");
        assert!(!script.contains("exec "), "{script}");
        assert!(script.contains("--state-dir '/state/instances/r/node'"));
        assert!(script.contains("--ready-file '/state/instances/r/ready.json'"));
        assert!(script.contains("--max-output-bytes 1024"));
        assert!(script.contains("--pids-limit 512 --allow-client-host-access"));
        assert!(script.contains("--fork-seed '/state/instances/r/seed'"));
        assert!(script.ends_with(
            "--fork-timeout 90\n\
             status=$?\n\
             unset ARS_TOKEN\n\
             # A server that did not end cleanly (killed, crashed) left its sandbox: it goes now.\n\
             if [ \"$status\" -ne 0 ]; then '/opt/arservice' sweep --state-dir '/state/instances/r/node'; fi\n\
             exit $status\n"
        ));
        // Every line is a command of POSIX sh or a comment: the script parses.
        let checked = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .unwrap();
        assert!(checked.success(), "{script}");
    }
}
