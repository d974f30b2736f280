//! The journal: one small JSON file per kept instance under `<state-dir>/journal/`, so that a
//! server restarted after a crash knows what its earlier life was running.
//!
//! Owns the files and their format, nothing else: it never starts, adopts or removes a
//! sandbox (`service.rs` decides that). Every write is atomic (a temporary file, then a
//! rename), so a crash at any moment leaves either the old record, the new one, or none: never
//! half of one. An instance without a record is never adopted, so the order "start the
//! sandbox → write the record → list it" can only err on the side of removal. The files are
//! private (0600 in a 0700 directory): a Slurm record carries the job's token. No link is
//! followed: a record that is a link is dropped unread, and a link where a record is written
//! is replaced, never written through (see `state_dir`).

use crate::run_id::RunId;
use crate::state_dir;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The format of the records; a record of another version is not adopted.
const VERSION: u32 = 1;

/// The largest record read back: larger files are not records arservice wrote.
const MAX_RECORD_BYTES: u64 = 256 * 1024 * 1024;

/// What a later life needs to take one instance over: the service's own fields, typed, and
/// the environment's [`EnvHandle`], opaque.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// [`VERSION`]; a record of another version is not adopted.
    pub version: u32,
    /// Validated when read back: a record naming an invalid `run_id` is dropped unread.
    pub run_id: RunId,
    pub container_name: Option<String>,
    /// The merged `environment_config`, parsed again on adoption (as at start, so that an
    /// adopted instance is the instance that was started).
    pub config: Map<String, Value>,
    /// When the instance was started, in seconds since the epoch (its `ttl` counts from it).
    pub created_at: f64,
    /// Which runner started it (`Runner::name`): a record of another runner is not adopted.
    pub runner: String,
    pub handle: EnvHandle,
    /// The request chose the config's `executable` (see `EnvSpec::client_executable`).
    #[serde(default)]
    pub client_executable: bool,
    /// A pooled sandbox, idle in the pool of this preset (its `run_id` is its
    /// `RunId::pool_member` name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The sandbox of a run that took it from a pool: its pool name, which names its
    /// container, directories and processes (`None`: the `run_id` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<RunId>,
    /// The `run_id` it was forked from (`/fork_instance`), shown again after adoption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<RunId>,
}

/// What an environment needs to take its sandbox over (`Environment::handle`): a container
/// name, a job id and its token... Owned by the environment that wrote it, and opaque to the
/// service and to the journal, which store it and give it back unread (`Runner::adopt`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EnvHandle(pub Value);

impl Record {
    pub fn new(
        run_id: &RunId,
        container_name: Option<&str>,
        config: &Map<String, Value>,
        created_at: f64,
        runner: &str,
        handle: Value,
    ) -> Record {
        Record {
            version: VERSION,
            run_id: run_id.clone(),
            container_name: container_name.map(String::from),
            config: config.clone(),
            created_at,
            runner: runner.to_string(),
            handle: EnvHandle(handle),
            client_executable: false,
            pool: None,
            sandbox: None,
            forked_from: None,
        }
    }

    /// The name of the sandbox: its pool name when a run took it from a pool.
    pub fn sandbox(&self) -> &RunId {
        self.sandbox.as_ref().unwrap_or(&self.run_id)
    }
}

/// The journal directory of one server.
pub struct Journal {
    dir: PathBuf,
    /// Records whose removal failed (the journal directory unreachable): removed again by
    /// [`Journal::retry_removals`], unless a new record of that `run_id` was written since.
    /// Left in place, a record of a sandbox already closed would be adopted by a restart.
    unremoved: Mutex<BTreeSet<RunId>>,
}

impl Journal {
    /// Opens (creating) `<state_dir>/journal`, a private directory of this user (a link or
    /// another user's directory there is an error).
    pub fn open(state_dir: &Path) -> std::io::Result<Journal> {
        let dir = state_dir.join("journal");
        state_dir::private_dir(&dir)?;
        Ok(Journal {
            dir,
            unremoved: Mutex::new(BTreeSet::new()),
        })
    }

    fn path(&self, run_id: &RunId) -> PathBuf {
        self.dir.join(format!("{run_id}.json"))
    }

    /// Writes `record` atomically, replacing any earlier record of its `run_id`.
    pub fn write(&self, record: &Record) -> std::io::Result<()> {
        self.unremoved.lock().remove(&record.run_id);
        let path = self.path(&record.run_id);
        let partial = self.dir.join(format!(".{}.partial", record.run_id));
        let body = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        let mut file = state_dir::create_private_file(&partial)?;
        file.write_all(&body)?;
        drop(file);
        std::fs::rename(&partial, &path)
    }

    /// Forgets `run_id`; a record that is not there is not an error. One that cannot be
    /// removed now is removed by a later [`Journal::retry_removals`].
    pub fn remove(&self, run_id: &RunId) {
        let mut unremoved = self.unremoved.lock();
        if let Err(err) = self.remove_file(run_id) {
            log::warn!("cannot remove the journal record of {run_id} (retried later): {err}");
            unremoved.insert(run_id.clone());
        }
    }

    /// Removes again the records whose removal failed (called by every health round); those
    /// that still cannot be removed wait for the next call.
    pub fn retry_removals(&self) {
        let mut unremoved = self.unremoved.lock();
        unremoved.retain(|run_id| match self.remove_file(run_id) {
            Ok(()) => {
                log::info!("removed the journal record of {run_id} at last");
                false
            }
            Err(_) => true,
        });
    }

    /// Removes the record of `run_id`; one that is not there is not an error.
    fn remove_file(&self, run_id: &RunId) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(run_id)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// Every readable record of the current version, and removes the rest (half-written
    /// temporaries, unreadable or foreign files, links) with a warning; a link is removed,
    /// never read through.
    pub fn load(&self) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let record = state_dir::read_regular(&path, MAX_RECORD_BYTES)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
                .filter(|record| {
                    record.version == VERSION
                        && path.file_name() == self.path(&record.run_id).file_name()
                });
            match record {
                Some(record) => records.push(record),
                None => {
                    log::warn!("ignoring unreadable journal file {}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    fn id(text: &str) -> RunId {
        RunId::parse(text, "run_id").unwrap()
    }

    fn temp_state_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ars-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A removal that fails while the directory is unreachable is done by the next retry
    /// once it is back, unless the `run_id` was written again meanwhile.
    #[test]
    fn a_failed_removal_is_retried_and_a_new_record_is_kept() {
        let state = temp_state_dir("unremoved");
        let journal = Journal::open(&state).unwrap();
        let config = json!({}).as_object().unwrap().clone();
        for run_id in ["gone", "again"] {
            let record = Record::new(&id(run_id), None, &config, 1.0, "local", Value::Null);
            journal.write(&record).unwrap();
        }
        let (dir, parked) = (state.join("journal"), state.join("parked"));
        std::fs::rename(&dir, &parked).unwrap();
        std::fs::write(&dir, "not a directory").unwrap();
        journal.remove(&id("gone"));
        journal.remove(&id("again"));
        journal.retry_removals();
        std::fs::remove_file(&dir).unwrap();
        std::fs::rename(&parked, &dir).unwrap();
        let again = Record::new(&id("again"), None, &config, 2.0, "local", Value::Null);
        journal.write(&again).unwrap();
        journal.retry_removals();
        let ids: Vec<String> = journal
            .load()
            .iter()
            .map(|record| record.run_id.to_string())
            .collect();
        assert_eq!(ids, ["again"]);
        assert!(journal.unremoved.lock().is_empty());
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn records_round_trip_and_are_private() {
        let state = temp_state_dir("roundtrip");
        let journal = Journal::open(&state).unwrap();
        let config = json!({"container_type": "local"})
            .as_object()
            .unwrap()
            .clone();
        let record = Record::new(&id("r1"), None, &config, 12.5, "local", json!({"a": 1}));
        journal.write(&record).unwrap();
        journal
            .write(&Record::new(
                &id("r0"),
                Some("img"),
                &config,
                2.0,
                "local",
                Value::Null,
            ))
            .unwrap();
        let loaded = journal.load();
        let ids: Vec<&str> = loaded.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, ["r0", "r1"], "oldest first");
        assert_eq!(loaded[1].handle, EnvHandle(json!({"a": 1})));
        assert_eq!(loaded[0].container_name.as_deref(), Some("img"));
        let mode = std::fs::metadata(state.join("journal/r1.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        journal.remove(&id("r1"));
        journal.remove(&id("r1"));
        assert_eq!(journal.load().len(), 1);
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn broken_and_foreign_files_are_dropped() {
        let state = temp_state_dir("broken");
        let journal = Journal::open(&state).unwrap();
        std::fs::write(state.join("journal/.x.partial"), b"{\"version\":").unwrap();
        std::fs::write(state.join("journal/y.json"), b"not json").unwrap();
        let config = Map::new();
        let mut renamed = Record::new(&id("z"), None, &config, 1.0, "local", Value::Null);
        journal.write(&renamed).unwrap();
        // A record whose file name does not match its run_id is not trusted.
        std::fs::rename(state.join("journal/z.json"), state.join("journal/w.json")).unwrap();
        renamed.run_id = id("v");
        renamed.version = VERSION + 1;
        journal.write(&renamed).unwrap();
        // A record naming an invalid run_id is not one arservice wrote.
        let mut invalid = serde_json::to_value(&renamed).unwrap();
        invalid["version"] = json!(VERSION);
        invalid["run_id"] = json!("../x");
        std::fs::write(state.join("journal/x.json"), invalid.to_string()).unwrap();
        assert!(journal.load().is_empty());
        assert_eq!(std::fs::read_dir(state.join("journal")).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn links_are_never_followed() {
        let state = temp_state_dir("links");
        let journal = Journal::open(&state).unwrap();
        let victim = state.join("victim.txt");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, state.join("journal/linked.json")).unwrap();
        std::os::unix::fs::symlink(&victim, state.join("journal/.r.partial")).unwrap();
        let record = Record::new(&id("r"), None, &Map::new(), 1.0, "local", Value::Null);
        journal.write(&record).unwrap();
        let loaded = journal.load();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].run_id, "r");
        assert!(!state.join("journal/linked.json").exists());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A journal directory that is a link is refused.
        let other = temp_state_dir("links-other");
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(state.join("journal"), other.join("journal")).unwrap();
        assert!(Journal::open(&other).is_err());
        let _ = std::fs::remove_dir_all(&state);
        let _ = std::fs::remove_dir_all(&other);
    }
}
