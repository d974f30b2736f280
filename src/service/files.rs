//! Files in and out of an instance (`PUT` and `GET /files/{run_id}/{path}`): the lookup, the
//! activity that keeps an instance from idling out while files move, and what a failure
//! answers or, for a download already under way, counts. The transfer itself is the environment's (`crate::env::files`).

use super::instance::{Death, Instance, Refused, State};
use super::Service;
use crate::env::files::{Download, Upload};
use crate::env::EnvError;
use crate::error::Error;
use crate::run_id::RunId;
use std::io::Read;
use std::sync::{Arc, Weak};

impl Service {
    /// Writes `body` to the file `upload` names in the instance (or unpacks it, a tar, into
    /// that directory): the bytes written.
    pub fn put_file(
        &self,
        run_id: &RunId,
        upload: &Upload,
        body: &mut dyn std::io::Read,
    ) -> Result<u64, Error> {
        let instance = self.reachable(run_id)?;
        instance.touch();
        let outcome = instance.env.put_file(upload, body);
        instance.touch();
        self.file_outcome(&instance, "write a file in", outcome)
            .inspect_err(|error| self.count_infra(run_id, error))
    }

    /// Opens the file or directory at `path` in the instance for a download. Once under way,
    /// a download the environment cuts (a read that fails, or ends short of its length: the
    /// agent or the job's server died, a disk failed) counts as an infrastructure failure of
    /// the run, and marks it dead when its sandbox is found gone ([`Watched`]); a client that
    /// hangs up does not count.
    pub fn get_file(self: &Arc<Self>, run_id: &RunId, path: &str) -> Result<Download, Error> {
        let instance = self.reachable(run_id)?;
        instance.touch();
        let outcome = instance.env.get_file(path);
        let download = self
            .file_outcome(&instance, "read a file in", outcome)
            .inspect_err(|error| self.count_infra(run_id, error))?;
        let body = Box::new(Watched {
            inner: download.body,
            length: download.length,
            read: 0,
            cut: Some((Arc::downgrade(self), instance)),
        });
        Ok(Download { body, ..download })
    }

    /// A download of `instance` that the environment cut after `read` bytes: counted as the
    /// infrastructure's failure, and the instance marked dead when its sandbox is gone.
    fn download_cut(&self, instance: &Instance, why: &str) {
        let reason = instance.env.health();
        log::warn!(
            "a download from {} was cut: {why}{}",
            instance.run_id,
            reason
                .as_deref()
                .map(|reason| format!(" (its sandbox is gone: {reason})"))
                .unwrap_or_default()
        );
        let error = Error::Env {
            action: "read a file in",
            run_id: instance.run_id.to_string(),
            source: EnvError::Io {
                context: "the download was cut".into(),
                source: std::io::Error::other(why.to_string()),
            },
        };
        self.count_infra(&instance.run_id, &error);
        if let Some(reason) = reason {
            self.mark_dead(instance, reason, Death::FoundByCommand);
        }
    }

    /// The instance `run_id` names, when it can take a request now.
    fn reachable(&self, run_id: &RunId) -> Result<Arc<Instance>, Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let instance = self.live(run_id)?;
        match instance.runnable() {
            Ok(()) => Ok(instance),
            Err(Refused::Closing) => Err(Error::RunIdInUse {
                run_id: run_id.to_string(),
                state: State::Closing.name(),
            }),
            Err(Refused::Dead(reason)) => Err(Error::Gone {
                run_id: run_id.to_string(),
                reason,
            }),
            Err(Refused::Reaped(reason)) => Err(Error::Reaped {
                run_id: run_id.to_string(),
                reason,
            }),
        }
    }

    /// What a transfer's outcome answers; a sandbox found gone is marked dead, as after a
    /// command.
    fn file_outcome<T>(
        &self,
        instance: &Instance,
        action: &'static str,
        outcome: Result<T, EnvError>,
    ) -> Result<T, Error> {
        let run_id = instance.run_id.to_string();
        match outcome {
            Ok(value) => Ok(value),
            Err(EnvError::Gone(reason)) => {
                self.mark_dead(instance, reason.clone(), Death::FoundByCommand);
                Err(Error::Gone { run_id, reason })
            }
            Err(source @ (EnvError::Invalid(_) | EnvError::NotFound(_))) => Err(Error::Env {
                action,
                run_id,
                source,
            }),
            Err(source) => {
                if let Some(reason) = instance.env.health() {
                    self.mark_dead(instance, reason.clone(), Death::FoundByCommand);
                    return Err(Error::Gone { run_id, reason });
                }
                Err(Error::Env {
                    action,
                    source: with_what_to_do(source, &run_id),
                    run_id,
                })
            }
        }
    }
}

/// An infrastructure failure of a transfer (the agent, the job's server or the disk failed),
/// with what the client can do about it.
fn with_what_to_do(source: EnvError, run_id: &str) -> EnvError {
    let hint = format!(
        "nothing was written (or the download did not start); send the request again, and if GET /runs/{run_id} says the instance is dead, close it and start another"
    );
    match source {
        EnvError::Tool { what, detail } => EnvError::Tool {
            what,
            detail: format!("{detail}; {hint}"),
        },
        EnvError::Io { context, source } => EnvError::Io {
            context: format!("{context} ({hint})"),
            source,
        },
        other => other,
    }
}

/// A download's body as the environment gives it, watched for a cut: the first read that
/// fails (but for an interrupted one), or an end before the announced length, reports it
/// once (`Service::download_cut`). The reads are passed on as they are.
struct Watched {
    inner: Box<dyn Read + Send>,
    length: Option<u64>,
    read: u64,
    /// Taken by the first cut: the service (not kept alive by a download) and the instance.
    cut: Option<(Weak<Service>, Arc<Instance>)>,
}

impl Watched {
    fn report(&mut self, why: String) {
        if let Some((service, instance)) = self.cut.take() {
            if let Some(service) = service.upgrade() {
                service.download_cut(&instance, &why);
            }
        }
    }
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(0) if !buf.is_empty() && self.length.is_some_and(|length| self.read < length) => {
                let length = self.length.unwrap_or_default();
                self.report(format!("it ended after {} of {length} bytes", self.read));
                Ok(0)
            }
            Ok(read) => {
                self.read += read as u64;
                Ok(read)
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => Err(err),
            Err(err) => {
                self.report(format!(
                    "reading it failed after {} bytes: {err}",
                    self.read
                ));
                Err(err)
            }
        }
    }
}
