//! Files in and out of a Slurm instance: forwarded to the job's server (`PUT`/`GET
//! /files/{run_id}/{path}` with its token), which does them through its environment; the
//! CLI path has no server there, so no file access.

use super::job::{detail_of, SlurmEnv};
use crate::env::EnvError;
use serde_json::Value;

/// The largest answer of the job's server to a file transfer read here (its count, or why
/// not).
const FILE_ANSWER_BYTES: u64 = 64 * 1024;

impl SlurmEnv {
    /// The URL of `/files/{run_id}/{path}` on the job's server, and its token; the CLI path
    /// has no server, so no file access.
    fn files_url(&self, path: &str) -> Result<(String, String), EnvError> {
        if self.steps().is_some() {
            return Err(EnvError::Invalid(crate::env::NO_FILES.into()));
        }
        let (url, token) = self.server().ok_or_else(|| EnvError::Tool {
            what: format!("the server of job {}", self.job_id),
            detail: "it has not announced itself".into(),
        })?;
        // An absolute path keeps its leading '/': `/files/r//etc/hosts`.
        let path = crate::url::encode_query(path);
        Ok((
            format!("{url}/files/{}/{path}", self.run_id),
            token.to_string(),
        ))
    }

    /// What a refusal of the job's server answers here.
    fn files_refusal(&self, status: u16, text: &str) -> EnvError {
        let detail = serde_json::from_str::<Value>(text)
            .map(|answer| detail_of(&answer))
            .unwrap_or_else(|_| text.to_string());
        match status {
            404 => EnvError::NotFound(detail),
            400..=499 => EnvError::Invalid(detail),
            _ => EnvError::Tool {
                what: format!("the server of job {}", self.job_id),
                detail: format!("{status}: {detail}"),
            },
        }
    }

    /// `PUT /files` through the job's server.
    pub(super) fn put_file_through_server(
        &self,
        upload: &crate::env::files::Upload,
        body: &mut dyn std::io::Read,
    ) -> Result<u64, EnvError> {
        let (mut url, token) = self.files_url(&upload.path)?;
        if let Some(mode) = upload.mode {
            url.push_str(&format!("?mode={mode:o}"));
        }
        let content_type = if upload.tar {
            crate::env::files::TAR_CONTENT_TYPE
        } else {
            "application/octet-stream"
        };
        let sent = self
            .agent
            .put(url)
            .config()
            .http_status_as_error(false)
            .build()
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", content_type)
            .send(ureq::SendBody::from_reader(body));
        let mut response = sent.map_err(|err| self.unreachable(err))?;
        let status = response.status().as_u16();
        let text = short_answer(&mut response);
        if status != 200 {
            return Err(self.files_refusal(status, &text));
        }
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|answer| answer["bytes"].as_u64())
            .ok_or_else(|| EnvError::Tool {
                what: format!("the server of job {}", self.job_id),
                detail: format!("unexpected answer: {text}"),
            })
    }

    /// `GET /files` through the job's server: its answer streamed on.
    pub(super) fn get_file_through_server(
        &self,
        path: &str,
    ) -> Result<crate::env::files::Download, EnvError> {
        use crate::env::files::{Download, Kind, KIND_HEADER};
        let (url, token) = self.files_url(path)?;
        let sent = self
            .agent
            .get(url)
            .config()
            .http_status_as_error(false)
            .timeout_global(None)
            .build()
            .header("Authorization", format!("Bearer {token}"))
            .call();
        let mut response = sent.map_err(|err| self.unreachable(err))?;
        let status = response.status().as_u16();
        if status != 200 {
            let text = short_answer(&mut response);
            return Err(self.files_refusal(status, &text));
        }
        let named = response
            .headers()
            .get(KIND_HEADER)
            .and_then(|value| value.to_str().ok());
        let kind = named
            .and_then(Kind::of_name)
            .ok_or_else(|| EnvError::Tool {
                what: format!("the server of job {}", self.job_id),
                detail: format!("a download of no kind ({named:?})"),
            })?;
        let length = response
            .headers()
            .get("content-length")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok());
        Ok(Download {
            kind,
            length,
            body: Box::new(response.into_body().into_reader()),
        })
    }
}

impl SlurmEnv {
    /// The job's server could not be reached for a file transfer.
    fn unreachable(&self, err: ureq::Error) -> EnvError {
        EnvError::Tool {
            what: format!("reaching the server of job {}", self.job_id),
            detail: err.to_string(),
        }
    }
}

/// A short answer of the job's server (a count, or why not), at most [`FILE_ANSWER_BYTES`].
fn short_answer(response: &mut ureq::http::Response<ureq::Body>) -> String {
    response
        .body_mut()
        .with_config()
        .limit(FILE_ANSWER_BYTES)
        .read_to_string()
        .unwrap_or_default()
}
