//! Forks (`POST /fork_instance`): what an environment hands the start of a new instance whose
//! filesystem is a copy of a running one's ([`ForkSeed`], made by
//! `Environment::fork_into`), the one way a tree is copied for it ([`copy_dirs`]: `cp -a
//! --reflink=auto` through the spawn helper within `--fork-timeout`, links copied as links, never
//! followed), and the removal of what a fork that failed midway made ([`ForkSeed::discard`]).
//!
//! Which state each environment copies is in its own file; `docs/environments.md` lists them.
//!
//! Under the Slurm runner, what docker, podman and enroot keep on a job's node travels to the
//! fork's job, which may run on another node, through the shared state dir: the source job's
//! server exports its seed into a directory ([`export_seed`]: the committed image saved as a
//! tar, or the copied rootfs), the login server renames that into the new job's `seed/`, and
//! the new job's server imports it ([`import_seed`]: `<cli> load` and a rename to its own fork
//! image name, or the rootfs moved to where its enroot keeps containers) before its instance
//! starts.

use super::config::WritableLayer;
use super::{run_tool, EnvError, EnvSpec, InstanceContext, Kind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The longest one copy (or `docker commit`) of a fork may take when `--fork-timeout` does
/// not say (`InstanceContext::fork_timeout` carries the server's).
pub const FORK_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest `<cli> rmi` of a fork's image may take.
const RMI_TIMEOUT: Duration = Duration::from_secs(600);

/// What a fork's start begins from, beyond the source's config: made by
/// `Environment::fork_into` before the new instance starts, and read by its start from
/// `InstanceContext::fork`.
#[derive(Clone, Debug, Default)]
pub struct ForkSeed {
    /// docker and podman: the image committed from the source's container, which the new
    /// instance runs and removes when it goes.
    pub image: Option<ForkImage>,
    /// What the copy made outside the new instance's directory (enroot's container rootfs
    /// under `ENROOT_DATA_PATH`): removed when the fork fails.
    pub outside: Vec<PathBuf>,
}

/// An image committed for one fork, by the CLI that removes it.
#[derive(Clone, Debug, PartialEq)]
pub struct ForkImage {
    pub cli: String,
    pub name: String,
}

/// The directories below an instance's own that hold what its sandbox writes, for the kinds
/// whose writable state is all there (`local`, bubblewrap, apptainer with an overlay
/// directory): what the Slurm runner copies from a job's instance. `None` for the others
/// (docker's container, enroot's rootfs, apptainer's tmpfs are elsewhere). The environments'
/// own `fork_into` copy the same.
pub fn writable_dirs(spec: &EnvSpec) -> Option<&'static [&'static str]> {
    match spec.kind {
        Kind::Local => Some(&LOCAL_DIRS),
        Kind::Bubblewrap if spec.image.starts_with('/') => Some(&BWRAP_ROOTFS_DIRS),
        Kind::Bubblewrap => Some(&BWRAP_HOST_DIRS),
        Kind::Apptainer if spec.apptainer().writable == WritableLayer::Overlay => {
            Some(&APPTAINER_OVERLAY_DIRS)
        }
        Kind::Apptainer | Kind::Docker | Kind::Podman | Kind::Enroot => None,
    }
}

/// What [`writable_dirs`] names, by environment.
pub const LOCAL_DIRS: [&str; 1] = ["work"];
pub const BWRAP_ROOTFS_DIRS: [&str; 2] = ["upper", "tmp"];
pub const BWRAP_HOST_DIRS: [&str; 2] = ["work", "tmp"];
pub const APPTAINER_OVERLAY_DIRS: [&str; 3] = ["overlay", "workdir", "home"];

/// In an exported seed: the committed image, saved (`<cli> save`).
pub const EXPORT_IMAGE_TAR: &str = "image.tar";
/// In an exported seed: `{"cli": ..., "name": ...}` of that image.
pub const EXPORT_IMAGE: &str = "image.json";
/// In an exported seed: enroot's copied container root filesystem.
pub const EXPORT_ROOTFS: &str = "rootfs";

/// Why an environment without a fork refuses it (a 400).
pub fn cannot_fork(what: &str) -> EnvError {
    EnvError::Invalid(format!("{what} cannot be forked"))
}

impl ForkSeed {
    /// Removes what the fork made, for one that failed after `fork_into`: the new instance's
    /// directory, what was copied outside it, and the committed image. Best effort, logged.
    pub fn discard(&self, ctx: &InstanceContext) {
        if let Err(err) = super::local::remove_tree(&ctx.root) {
            log::warn!("removing {} of a failed fork: {err}", ctx.root.display());
        }
        for path in &self.outside {
            if let Err(err) = super::local::remove_tree(path) {
                log::warn!("removing {} of a failed fork: {err}", path.display());
            }
        }
        if let Some(image) = &self.image {
            if let Err(err) = image.remove() {
                log::warn!("removing the image {} of a failed fork: {err}", image.name);
            }
        }
    }
}

impl ForkImage {
    /// `<cli> rmi <image>`; an image already gone is fine. One that a container still runs
    /// is refused by the engine (no `--force`) and stays for the sweep.
    pub fn remove(&self) -> Result<(), EnvError> {
        let mut rmi = Command::new(&self.cli);
        rmi.args(["rmi", &self.name]);
        match run_tool(&format!("{} rmi", self.cli), rmi, RMI_TIMEOUT) {
            Err(EnvError::Tool { detail, .. })
                if detail.contains("No such image") || detail.contains("image not known") =>
            {
                Ok(())
            }
            other => other.map(drop),
        }
    }
}

/// Moves `seed` (made by `fork_into` for the context whose directory is `made`) into `into`,
/// a new private directory, as files on the shared state dir: the image saved to
/// [`EXPORT_IMAGE_TAR`] (with its name in [`EXPORT_IMAGE`]) and then removed from this node's
/// engine, or the rootfs moved to [`EXPORT_ROOTFS`]. What it leaves on failure is removed:
/// `into`, the image, the rootfs; `made` always.
pub fn export_seed(
    seed: &ForkSeed,
    made: &Path,
    into: &Path,
    timeout: Duration,
) -> Result<(), EnvError> {
    let exported = export_into(seed, into, timeout);
    let _ = super::local::remove_tree(made);
    if let Some(image) = &seed.image {
        if let Err(err) = image.remove() {
            log::warn!("removing the exported image {}: {err}", image.name);
        }
    }
    for path in &seed.outside {
        let _ = super::local::remove_tree(path);
    }
    if exported.is_err() {
        let _ = super::local::remove_tree(into);
    }
    exported
}

fn export_into(seed: &ForkSeed, into: &Path, timeout: Duration) -> Result<(), EnvError> {
    let _ = super::local::remove_tree(into);
    super::instance_dir(into)?;
    let io = |context: String| move |source| EnvError::Io { context, source };
    if let Some(image) = &seed.image {
        let tar = into.join(EXPORT_IMAGE_TAR);
        let mut save = Command::new(&image.cli);
        save.args(["save", "-o"]).arg(&tar).arg(&image.name);
        run_tool(&format!("{} save", image.cli), save, timeout)?;
        let named = serde_json::json!({"cli": image.cli, "name": image.name}).to_string();
        std::fs::write(into.join(EXPORT_IMAGE), named)
            .map_err(io(format!("cannot write {}", into.display())))?;
    }
    match seed.outside.as_slice() {
        [] => {}
        [rootfs] => move_tree(rootfs, &into.join(EXPORT_ROOTFS), timeout)?,
        more => {
            return Err(EnvError::Invalid(format!(
                "a seed of {} trees cannot be exported",
                more.len()
            )))
        }
    }
    if seed.image.is_none() && seed.outside.is_empty() {
        return Err(EnvError::Invalid(
            "this environment's files are not exported: they are copied from the state dir".into(),
        ));
    }
    Ok(())
}

/// Takes an exported seed that is now `ctx.root` (the new instance's directory): loads its
/// image into this node's engine under this server's own name for the fork
/// (`ars-fork-<server_id>:<run_id>`, [`super::docker::fork_image_name`], which its close and
/// its sweeps find; the exporter's name is dropped), or moves its rootfs to `rootfs_to`
/// (enroot's place for the new container); the [`ForkSeed`] the start reads. Anything else:
/// the seed as it is. What it made is removed on failure (the caller removes `ctx.root`).
pub fn import_seed(
    ctx: &InstanceContext,
    engine: Option<&str>,
    timeout: Duration,
    rootfs_to: &dyn Fn() -> PathBuf,
) -> Result<ForkSeed, EnvError> {
    let root = ctx.root.as_path();
    let mut seed = ForkSeed::default();
    let named = root.join(EXPORT_IMAGE);
    if named.exists() {
        let bad = |detail: String| EnvError::Tool {
            what: "the fork's exported image".into(),
            detail,
        };
        let text = std::fs::read_to_string(&named).map_err(|err| bad(err.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|err| bad(err.to_string()))?;
        let (Some(cli), Some(name)) = (value["cli"].as_str(), value["name"].as_str()) else {
            return Err(bad(format!("{} names no image", named.display())));
        };
        if !name.starts_with("ars-fork-") {
            return Err(bad(format!("not a fork image: {cli} {name}")));
        }
        // The image is loaded with this instance's own engine, never with a program the
        // file names: one that differs is refused.
        let cli = match engine {
            Some(engine) if engine == cli => engine,
            _ => {
                return Err(bad(format!(
                    "an image saved by {cli}, for an instance whose engine is {}",
                    engine.unwrap_or("none (not docker or podman)")
                )))
            }
        };
        let loaded = ForkImage {
            cli: cli.into(),
            name: name.into(),
        };
        let tar = root.join(EXPORT_IMAGE_TAR);
        let mut load = Command::new(cli);
        load.args(["load", "-q", "-i"]).arg(&tar);
        if let Err(err) = run_tool(&format!("{cli} load"), load, timeout) {
            let _ = loaded.remove();
            return Err(err);
        }
        let own = super::docker::fork_image_name(ctx);
        seed.image = Some(rename_image(loaded, &own, timeout)?);
        let _ = std::fs::remove_file(&tar);
        let _ = std::fs::remove_file(&named);
    }
    let rootfs = root.join(EXPORT_ROOTFS);
    if rootfs.symlink_metadata().is_ok() {
        let target = rootfs_to();
        if target.symlink_metadata().is_ok() {
            return Err(EnvError::Tool {
                what: "the fork's exported rootfs".into(),
                detail: format!("{} already exists", target.display()),
            });
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|source| EnvError::Io {
                context: format!("cannot create {}", parent.display()),
                source,
            })?;
        }
        move_tree(&rootfs, &target, timeout)?;
        seed.outside.push(target);
    }
    Ok(seed)
}

/// `<cli> tag` of `image` as `name`, then `<cli> rmi` of its old name (which only drops that
/// name: the image keeps the new one). On failure neither name is left.
fn rename_image(image: ForkImage, name: &str, timeout: Duration) -> Result<ForkImage, EnvError> {
    let renamed = ForkImage {
        cli: image.cli.clone(),
        name: name.into(),
    };
    let mut tag = Command::new(&image.cli);
    tag.args(["tag", &image.name, name]);
    let done = run_tool(&format!("{} tag", image.cli), tag, timeout)
        .map(drop)
        .and_then(|()| image.remove());
    if let Err(err) = done {
        let _ = renamed.remove();
        let _ = image.remove();
        return Err(err);
    }
    Ok(renamed)
}

/// Renames `from` to `to`; across file systems (a node-local enroot data path), a copy and
/// the removal of `from`. On failure nothing is left at `to`.
fn move_tree(from: &Path, to: &Path, timeout: Duration) -> Result<(), EnvError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
            if let Err(err) = copy_tree(from, to, timeout) {
                let _ = super::local::remove_tree(to);
                return Err(err);
            }
            super::local::remove_tree(from)
        }
        Err(source) => Err(EnvError::Io {
            context: format!("cannot move {} to {}", from.display(), to.display()),
            source,
        }),
    }
}

/// Copies each of `dirs` (names below `from`) that exists to the same name below `to`,
/// which it makes private (0700) first: `cp -a --reflink=auto` (ownership, modes, times,
/// extended attributes, device nodes such as overlay whiteouts, and links as links), one
/// call per directory, no shell, each within `timeout`. On failure (a timeout included: the
/// copy is killed) `to` is removed again.
pub fn copy_dirs(from: &Path, to: &Path, dirs: &[&str], timeout: Duration) -> Result<(), EnvError> {
    super::instance_dir(to)?;
    let copied = dirs
        .iter()
        .filter(|dir| {
            from.join(dir)
                .symlink_metadata()
                .is_ok_and(|meta| meta.is_dir())
        })
        .try_for_each(|dir| copy_tree(&from.join(dir), &to.join(dir), timeout));
    if copied.is_err() {
        let _ = super::local::remove_tree(to);
    }
    copied
}

/// `cp -a --reflink=auto --no-target-directory -- FROM TO`: `TO` becomes a copy of `FROM`,
/// or the copy is killed after `timeout` (what it made stays, for the caller to remove).
pub fn copy_tree(from: &Path, to: &Path, timeout: Duration) -> Result<(), EnvError> {
    run_tool("cp -a (the fork's copy)", copy_command(from, to), timeout).map(drop)
}

/// The command line of [`copy_tree`].
pub fn copy_command(from: &Path, to: &Path) -> Command {
    let mut cp = Command::new("cp");
    cp.args(["-a", "--reflink=auto", "--no-target-directory", "--"])
        .arg(from)
        .arg(to);
    cp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(command: &Command) -> Vec<String> {
        std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn what_each_environment_copies() {
        let spec = |config: serde_json::Value| {
            EnvSpec::parse(config.as_object().unwrap().clone(), Some("img")).unwrap()
        };
        let dirs = |config| writable_dirs(&spec(config)).map(<[&str]>::to_vec);
        use serde_json::json;
        assert_eq!(dirs(json!({"container_type": "local"})), Some(vec!["work"]));
        assert_eq!(
            dirs(json!({"container_type": "bwrap", "image": "/rootfs"})),
            Some(vec!["upper", "tmp"])
        );
        assert_eq!(
            dirs(json!({"container_type": "bwrap"})),
            Some(vec!["work", "tmp"])
        );
        assert_eq!(
            dirs(json!({"container_type": "apptainer", "writable": "overlay"})),
            Some(vec!["overlay", "workdir", "home"])
        );
        for other in ["apptainer", "docker", "podman", "enroot"] {
            assert_eq!(dirs(json!({"container_type": other})), None, "{other}");
        }
    }

    #[test]
    fn the_copy_is_one_cp_without_a_shell() {
        let cp = copy_command(Path::new("/s/a/upper"), Path::new("/s/b/upper"));
        assert_eq!(
            args(&cp),
            [
                "cp",
                "-a",
                "--reflink=auto",
                "--no-target-directory",
                "--",
                "/s/a/upper",
                "/s/b/upper"
            ]
        );
    }

    #[test]
    fn a_copy_keeps_links_as_links_and_skips_missing_dirs() {
        let base = std::env::temp_dir().join(format!("ars-fork-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (from, to) = (base.join("from"), base.join("to"));
        std::fs::create_dir_all(from.join("work/sub")).unwrap();
        std::fs::write(from.join("work/sub/file"), "hello").unwrap();
        std::os::unix::fs::symlink("/etc", from.join("work/out")).unwrap();
        // A directory to copy that is itself a link is not followed out of the tree.
        std::os::unix::fs::symlink("/etc", from.join("tmp")).unwrap();
        copy_dirs(&from, &to, &["work", "missing", "tmp"], FORK_TIMEOUT).unwrap();
        assert!(!to.join("tmp").exists(), "a linked directory is not copied");
        assert_eq!(
            std::fs::read_to_string(to.join("work/sub/file")).unwrap(),
            "hello"
        );
        let link = to.join("work/out").symlink_metadata().unwrap();
        assert!(link.file_type().is_symlink(), "a link stays a link");
        assert!(!to.join("missing").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A docker-shaped import through a stand-in engine that logs its calls: the loaded image
    /// is tagged with the importer's own fork name and its exported name dropped; when the
    /// tag fails, the import fails and neither name is left (both `rmi`s are asked).
    #[test]
    fn an_imported_image_takes_the_importers_name_or_leaves_none() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("ars-fork-rename-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let (engine, log) = (base.join("engine"), base.join("calls"));
        let run = |tag_fails: bool| {
            let _ = std::fs::remove_file(&log);
            std::fs::write(
                &engine,
                format!(
                    "#!/bin/sh\necho \"$*\" >> '{}'\n[ \"$1\" = tag ] && exit {}\nexit 0\n",
                    log.display(),
                    u8::from(tag_fails)
                ),
            )
            .unwrap();
            std::fs::set_permissions(&engine, std::fs::Permissions::from_mode(0o755)).unwrap();
            let mut dst = InstanceContext::for_tests("dst");
            dst.root = base.join("root");
            std::fs::create_dir_all(&dst.root).unwrap();
            std::fs::write(dst.root.join(EXPORT_IMAGE_TAR), "tar").unwrap();
            let cli = engine.display().to_string();
            std::fs::write(
                dst.root.join(EXPORT_IMAGE),
                serde_json::json!({"cli": cli, "name": "ars-fork-src-export:dst"}).to_string(),
            )
            .unwrap();
            let imported = import_seed(&dst, Some(&cli), FORK_TIMEOUT, &|| base.join("none"));
            let calls = std::fs::read_to_string(&log).unwrap();
            (imported, calls)
        };
        let tar = base.join("root").join(EXPORT_IMAGE_TAR);
        let (imported, calls) = run(false);
        let image = imported.unwrap().image.unwrap();
        assert_eq!(image.name, "ars-fork-abcd1234:dst");
        assert_eq!(
            calls,
            format!(
                "load -q -i {}\ntag ars-fork-src-export:dst ars-fork-abcd1234:dst\nrmi ars-fork-src-export:dst\n",
                tar.display()
            )
        );
        let (imported, calls) = run(true);
        assert!(
            matches!(&imported, Err(EnvError::Tool { what, .. }) if what.contains("tag")),
            "{imported:?}"
        );
        assert_eq!(
            calls,
            format!(
                "load -q -i {}\ntag ars-fork-src-export:dst ars-fork-abcd1234:dst\nrmi ars-fork-abcd1234:dst\nrmi ars-fork-src-export:dst\n",
                tar.display()
            )
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    /// enroot's shape of an exported seed: the rootfs moved into the export, then out of it
    /// to where the new container goes; a seed with nothing to export is refused, leaving no
    /// export behind.
    #[test]
    fn an_exported_rootfs_travels_by_renames() {
        let base = std::env::temp_dir().join(format!("ars-fork-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (made, rootfs) = (base.join("made"), base.join("data/ars-s-export-dst"));
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::create_dir_all(&made).unwrap();
        std::fs::write(rootfs.join("etc/f"), "kept").unwrap();
        let seed = ForkSeed {
            image: None,
            outside: vec![rootfs.clone()],
        };
        let export = base.join("exports/dst");
        export_seed(&seed, &made, &export, FORK_TIMEOUT).unwrap();
        assert!(!made.exists() && !rootfs.exists());
        assert!(export.join(EXPORT_ROOTFS).join("etc/f").exists());
        let target = base.join("node/data/ars-t-dst");
        let mut dst = InstanceContext::for_tests("dst");
        dst.root = export.clone();
        let imported = import_seed(&dst, None, FORK_TIMEOUT, &|| target.clone()).unwrap();
        assert_eq!(imported.outside, std::slice::from_ref(&target));
        assert!(imported.image.is_none());
        assert_eq!(
            std::fs::read_to_string(target.join("etc/f")).unwrap(),
            "kept"
        );
        assert!(!export.join(EXPORT_ROOTFS).exists());
        // A second import finds its place taken: refused, the copy left for the caller.
        std::fs::create_dir_all(export.join(EXPORT_ROOTFS)).unwrap();
        assert!(import_seed(&dst, Some("docker"), FORK_TIMEOUT, &|| target.clone()).is_err());
        let empty = base.join("exports/none");
        assert!(matches!(
            export_seed(&ForkSeed::default(), &made, &empty, FORK_TIMEOUT),
            Err(EnvError::Invalid(_))
        ));
        assert!(!empty.exists(), "a refused export leaves nothing");
        // An image.json that names no fork image is refused before any load.
        std::fs::write(
            export.join(EXPORT_IMAGE),
            r#"{"cli": "docker", "name": "ubuntu:latest"}"#,
        )
        .unwrap();
        assert!(import_seed(&dst, Some("docker"), FORK_TIMEOUT, &|| target.clone()).is_err());
        // Nor is a program other than the instance's own engine ever run for the load.
        for (named, engine) in [("/tmp/not-docker", Some("docker")), ("docker", None)] {
            std::fs::write(
                export.join(EXPORT_IMAGE),
                serde_json::json!({"cli": named, "name": "ars-fork-x:dst"}).to_string(),
            )
            .unwrap();
            let refused = import_seed(&dst, engine, FORK_TIMEOUT, &|| target.clone());
            assert!(
                matches!(&refused, Err(EnvError::Tool { detail, .. }) if detail.contains("an image saved by")),
                "{refused:?}"
            );
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
