//! What differs between the container engines a docker-style CLI drives ([`Engine`]: docker
//! and podman), and the shared view of this server's containers that every instance's health
//! check reads ([`ContainerWatch`]: one `ps` per CLI and server, however many instances).

use super::{run_tool, EnvSpec, Kind, KILL_TIMEOUT, LABEL_SERVER};
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// The engine a container CLI drives. Podman's CLI mirrors docker's, except:
///
/// - `rm --force` first stops the container with its stop timeout (10 s) and only then kills;
///   docker kills at once. Podman gets `--time 0`, the same semantics.
/// - `ps --format '{{.State}}'` is docker's state word (`running`) but podman 4's status
///   sentence (`Up 5 seconds ago`): podman's listing is read from `--format json`.
/// - `--init` needs an init binary on the host (podman's `init_path`, catatonit); without
///   one `run` fails, and the container runs without `--init` (see [`INIT_MISSING`]).
/// - `run --workdir DIR` fails when the image has no `DIR` (podman 4; docker creates it): a
///   `cwd` is made by `exec mkdir -p` once the container runs, and every command names it
///   (see [`Engine::makes_cwd`]).
/// - Its errors are worded in lower case (`no such object`, `no such container`), and
///   `rm --force` of a container that is gone succeeds.
/// - `podman load` names an image `localhost/NAME`; `NAME` alone finds it (podman looks up
///   a short name in its own store first), so a `container_name` works on either engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

/// The engine of every CLI asked so far (a `docker` may be podman's docker emulation).
static ENGINES: LazyLock<Mutex<HashMap<String, Engine>>> = LazyLock::new(Default::default);

impl Engine {
    /// The engine an instance's CLI drives. A CLI a client chose (`EnvSpec::client_executable`)
    /// is never run to find out (the server runs no client's program on its own): it is judged
    /// by its name and the config's `container_type`.
    pub fn for_spec(spec: &EnvSpec, cli: &str) -> Engine {
        if !spec.client_executable {
            return Engine::of(cli);
        }
        match spec.kind {
            Kind::Podman => Engine::Podman,
            _ => Engine::from_name(cli),
        }
    }

    /// The engine behind `cli`, asked of `<cli> --version` once per CLI and process. A CLI
    /// that does not answer is judged by its name, and asked again next time. Only for CLIs
    /// an operator chose (a preset, the default): see [`Engine::for_spec`].
    pub fn of(cli: &str) -> Engine {
        if let Some(engine) = ENGINES.lock().get(cli) {
            return *engine;
        }
        let mut version = Command::new(cli);
        version.arg("--version");
        match run_tool(&format!("{cli} --version"), version, KILL_TIMEOUT) {
            Ok(output) => {
                let engine = Engine::from_version(&output);
                ENGINES.lock().insert(cli.to_string(), engine);
                engine
            }
            Err(_) => Engine::from_name(cli),
        }
    }

    /// Podman when a line of `--version`'s output says `podman version` (its docker
    /// emulation prints a notice first).
    pub(super) fn from_version(output: &str) -> Engine {
        if output
            .lines()
            .any(|line| line.trim_start().starts_with("podman version"))
        {
            Engine::Podman
        } else {
            Engine::Docker
        }
    }

    pub(super) fn from_name(cli: &str) -> Engine {
        let name = Path::new(cli).file_name().unwrap_or_default();
        if name.to_string_lossy().contains("podman") {
            Engine::Podman
        } else {
            Engine::Docker
        }
    }

    /// True when the instance's `cwd` is made by an `exec mkdir -p` after `run`, instead of
    /// `run --workdir`; the container then starts in the image's directory and every command
    /// names `cwd`. A relative `cwd` still goes to `--workdir`, which refuses it, as docker's.
    pub(super) fn makes_cwd(self, cwd: Option<&str>) -> bool {
        self == Engine::Podman && cwd.is_some_and(|cwd| cwd.starts_with('/'))
    }

    /// `rm --force` that kills at once, as docker's does.
    pub(super) fn rm_force(self) -> &'static [&'static str] {
        match self {
            Engine::Docker => &["rm", "--force"],
            Engine::Podman => &["rm", "--force", "--time", "0"],
        }
    }

    /// The arguments of `ps` that list this server's containers, for [`Engine::states`].
    pub(super) fn ps_states(self, server_id: &str) -> Vec<String> {
        let format = match self {
            Engine::Docker => "{{.Names}}|{{.State}}|{{.Status}}",
            Engine::Podman => "json",
        };
        vec![
            "ps".into(),
            "--all".into(),
            "--filter".into(),
            format!("label={LABEL_SERVER}={server_id}"),
            "--format".into(),
            format.into(),
        ]
    }

    /// Each container's name with whether it runs and its status in words, from the output
    /// of [`Engine::ps_states`]; `None` when the output cannot be read.
    pub(super) fn states(self, listing: &str) -> Option<States> {
        match self {
            Engine::Docker => Some(
                listing
                    .lines()
                    .filter_map(|line| {
                        let (name, rest) = line.split_once('|')?;
                        let (state, status) = rest.split_once('|').unwrap_or((rest, rest));
                        Some((name.to_string(), (alive(state), status.to_string())))
                    })
                    .collect(),
            ),
            Engine::Podman => {
                // Rootless podman may log a warning first (on stderr, merged here) when it
                // sets up its user namespace: the JSON starts at the first line that opens it.
                let start = listing
                    .match_indices('[')
                    .map(|(at, _)| at)
                    .find(|&at| at == 0 || listing.as_bytes()[at - 1] == b'\n')?;
                let rows: Vec<Value> = serde_json::from_str(listing[start..].trim()).ok()?;
                Some(
                    rows.iter()
                        .filter_map(|row| {
                            let name = row["Names"][0].as_str()?;
                            let running = row["State"].as_str().is_some_and(alive);
                            let status = row["Status"].as_str().unwrap_or_default();
                            Some((name.to_string(), (running, status.to_string())))
                        })
                        .collect(),
                )
            }
        }
    }
}

/// True for the state of a container that still runs: `running`, or `paused` (by `docker
/// commit`, which pauses it while a fork copies it, or by an operator): not dead.
fn alive(state: &str) -> bool {
    matches!(state, "running" | "paused")
}

/// True when the CLI said the container (or object) does not exist, in docker's words or
/// podman's.
pub(super) fn no_such(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("no such container")
        || detail.contains("no such object")
        || detail.contains("no container with name or id")
}

/// What docker and podman say when `--pull never` meets a missing image.
pub(super) fn image_missing(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("no such image")
        || detail.contains("unable to find image")
        || detail.contains("image not known")
}

/// How old the shared view of the containers may get before a health check refreshes it.
const WATCH_MAX_AGE: Duration = Duration::from_secs(2);

/// This server's containers as one `ps` call shows them: the health of every instance costs
/// one CLI call per [`WATCH_MAX_AGE`], not one per instance.
pub struct ContainerWatch {
    cli: String,
    engine: Engine,
    server_id: String,
    /// When the listing was taken, and what it said.
    state: Mutex<(Option<Instant>, States)>,
}

/// Each container's name with whether it runs and its status in words.
type States = HashMap<String, (bool, String)>;

/// One watch per (CLI, server).
type Watches = HashMap<(String, String), Arc<ContainerWatch>>;
static WATCHES: LazyLock<Mutex<Watches>> = LazyLock::new(Default::default);

impl ContainerWatch {
    pub(super) fn of(cli: &str, engine: Engine, server_id: &str) -> Arc<ContainerWatch> {
        let key = (cli.to_string(), server_id.to_string());
        Arc::clone(WATCHES.lock().entry(key).or_insert_with(|| {
            Arc::new(ContainerWatch {
                cli: cli.to_string(),
                engine,
                server_id: server_id.to_string(),
                state: Mutex::new((None, HashMap::new())),
            })
        }))
    }

    /// `Some(reason)` when container `name`, started at `started`, is gone or no longer
    /// running. A listing older than the container cannot tell, so it is refreshed.
    pub(super) fn ended(&self, name: &str, started: Instant) -> Option<String> {
        let stale = self
            .state
            .lock()
            .0
            .is_none_or(|at| at.elapsed() > WATCH_MAX_AGE || at < started);
        if stale {
            // The listing is as old as the moment it was asked for, not when it came back: a
            // container still being created when `ps` ran shows `Created` in it, and must not
            // count as ended because `ps` answered after the container started.
            let asked = Instant::now();
            let mut ps = Command::new(&self.cli);
            ps.args(self.engine.ps_states(&self.server_id));
            // An engine that does not answer (or answers what cannot be read) is not a dead
            // container: say nothing.
            let listing = run_tool(&format!("{} ps", self.cli), ps, KILL_TIMEOUT).ok()?;
            let states = self.engine.states(&listing)?;
            *self.state.lock() = (Some(asked), states);
        }
        let state = self.state.lock();
        match state.1.get(name) {
            None => Some(format!("container {name} was removed from outside")),
            Some((true, _)) => None,
            Some((false, status)) => {
                Some(format!("container {name} is no longer running ({status})"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_as_old_as_when_it_was_asked_for() {
        let dir = std::env::temp_dir().join(format!("ars-engine-listing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let calls = dir.join("calls");
        let cli = dir.join("fake-docker");
        // A `ps` that takes 1 s and sees the container still being created.
        std::fs::write(
            &cli,
            format!(
                "#!/bin/sh\necho ps >> '{}'\nsleep 1\necho 'c1|created|Created'\n",
                calls.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
        let watch = ContainerWatch::of(&cli.display().to_string(), Engine::Docker, "engine-test");
        // The container "started" while that `ps` ran: its answer cannot tell about it, so the
        // next look asks again rather than call the container ended.
        let started = std::thread::scope(|scope| {
            let first = scope.spawn(|| watch.ended("c1", Instant::now()));
            // Once that `ps` runs (it has written its line), the container starts.
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::fs::read_to_string(&calls).map_or(true, |text| text.is_empty()) {
                assert!(Instant::now() < deadline, "the fake ps never ran");
                std::thread::sleep(Duration::from_millis(10));
            }
            let started = Instant::now();
            assert!(
                first.join().unwrap().is_some(),
                "the first listing says Created"
            );
            started
        });
        watch.ended("c1", started);
        let asked = std::fs::read_to_string(&calls).unwrap().lines().count();
        assert_eq!(
            asked, 2,
            "a listing asked for before the start was taken as newer"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A container paused (as `docker commit` pauses a fork's source) is alive; an exited one
    /// is not, in either engine's listing.
    #[test]
    fn a_paused_container_is_alive() {
        let docker = Engine::Docker
            .states("a|paused|Up 18 seconds (Paused)\nb|exited|Exited (0)\nc|running|Up 1 second\n")
            .unwrap();
        assert_eq!(
            (docker["a"].0, docker["b"].0, docker["c"].0),
            (true, false, true)
        );
        let podman = Engine::Podman
            .states(
                r#"[{"Names": ["a"], "State": "paused", "Status": ""},
                        {"Names": ["b"], "State": "exited", "Status": ""}]"#,
            )
            .unwrap();
        assert_eq!((podman["a"].0, podman["b"].0), (true, false));
    }
}
