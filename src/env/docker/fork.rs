//! Forks of a docker or podman instance: `<cli> commit` of the source's container to an image
//! named after this server and the new instance (`ars-fork-<server_id>:<run_id>`, labelled
//! `arservice.fork=<run_id>`), which the new instance runs and removes when it goes; and the
//! sweep of such images that no instance uses any more (a crash between commit and close).

use super::{LABEL_RUN_ID, LABEL_SERVER, REAP_TIMEOUT};
use crate::env::fork::ForkImage;
use crate::env::{run_tool, EnvError, InstanceContext};
use std::process::Command;

/// The label of a fork's image: the `run_id` of the instance that runs it.
pub const LABEL_FORK: &str = "arservice.fork";

/// The repository of this server's fork images; the tag is the new instance's `run_id`
/// (a valid tag: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`, as a `run_id` is).
pub fn fork_repository(server_id: &str) -> String {
    format!("ars-fork-{server_id}")
}

/// The image of the fork `dst`.
pub fn fork_image_name(dst: &InstanceContext) -> String {
    format!("{}:{}", fork_repository(&dst.server_id), dst.run_id)
}

/// The arguments of `<cli> commit` of `container` for the fork `dst` (after the program).
/// The container is paused while it is committed (the engine's default), so that the copy is
/// of one moment. The image would carry the source container's own labels, which every
/// container run from it inherits: its server and run labels are emptied (the fork's start
/// sets its own), so that a container someone runs by hand from a fork image is never taken
/// for one of this server's sandboxes (and swept).
pub fn commit_arguments(container: &str, dst: &InstanceContext) -> Vec<String> {
    vec![
        "commit".into(),
        "--change".into(),
        format!("LABEL {LABEL_SERVER}="),
        "--change".into(),
        format!("LABEL {LABEL_RUN_ID}="),
        "--change".into(),
        format!("LABEL {LABEL_FORK}={}", dst.run_id),
        container.into(),
        fork_image_name(dst),
    ]
}

/// Commits `container` to the fork image of `dst`; nothing is left when it fails.
pub fn commit(cli: &str, container: &str, dst: &InstanceContext) -> Result<ForkImage, EnvError> {
    let image = ForkImage {
        cli: cli.into(),
        name: fork_image_name(dst),
    };
    let mut commit = Command::new(cli);
    commit.args(commit_arguments(container, dst));
    if let Err(err) = run_tool(&format!("{cli} commit"), commit, dst.fork_timeout) {
        // A commit that timed out may still finish in the engine.
        let _ = image.remove();
        return Err(err);
    }
    Ok(image)
}

/// Removes this server's fork images whose instance is not in `keep` (their `run_id`s),
/// which a crash or a failed close left; how many. One a container still runs is refused by
/// the engine and stays.
pub fn remove_fork_images(
    cli: &str,
    server_id: &str,
    keep: &dyn Fn() -> Vec<String>,
) -> Result<usize, EnvError> {
    let repository = fork_repository(server_id);
    let mut list = Command::new(cli);
    list.args(["images", "--format", "{{.Tag}}", &repository]);
    let listing = run_tool(&format!("{cli} images"), list, REAP_TIMEOUT)?;
    let kept = keep();
    let mut removed = 0;
    for tag in listing
        .lines()
        .map(str::trim)
        .filter(|tag| crate::run_id::RunId::parse(tag, "tag").is_ok())
        .filter(|tag| !kept.iter().any(|kept| kept == tag))
    {
        let image = ForkImage {
            cli: cli.into(),
            name: format!("{repository}:{tag}"),
        };
        match image.remove() {
            Ok(()) => removed += 1,
            Err(err) => log::debug!("keeping the fork image {}: {err}", image.name),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_command_line_names_and_labels_the_image_after_the_new_instance() {
        let dst = InstanceContext::for_tests("Dst.1");
        assert_eq!(
            commit_arguments("ars-abcd1234-src", &dst),
            [
                "commit",
                "--change",
                "LABEL arservice.server=",
                "--change",
                "LABEL arservice.run_id=",
                "--change",
                "LABEL arservice.fork=Dst.1",
                "ars-abcd1234-src",
                "ars-fork-abcd1234:Dst.1"
            ]
        );
    }
}
