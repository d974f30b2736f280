//! The routes of the API, and what a URL says: its path and its decoded query string.

use tiny_http::Method;

/// The routes of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    StartInstance,
    /// `POST /fork_instance`: a start from a copy of a running instance (the start lane).
    ForkInstance,
    /// `POST /export_instance`: a Slurm job's server exports a fork's seed (the start lane).
    ExportInstance,
    ExecuteCommand,
    CloseInstance,
    AvailableResources,
    Stats,
    /// `GET /runs/{run_id}`: one run's sums.
    Runs,
    Healthz,
    Metrics,
    OpenApi,
    ChatCompletions,
    Messages,
    /// `GET` and `PUT /files/{run_id}/{path}`: served on a thread of their own, body and
    /// answer streamed (`files::serve_files`).
    Files,
}

impl Route {
    /// Every route, for the check against the OpenAPI document.
    #[cfg(test)]
    pub(super) const ALL: [Route; 14] = [
        Route::StartInstance,
        Route::ForkInstance,
        Route::ExportInstance,
        Route::ExecuteCommand,
        Route::CloseInstance,
        Route::AvailableResources,
        Route::Stats,
        Route::Runs,
        Route::Healthz,
        Route::Metrics,
        Route::OpenApi,
        Route::ChatCompletions,
        Route::Messages,
        Route::Files,
    ];

    pub(super) fn of(path: &str) -> Option<Route> {
        Some(match path {
            "/start_instance" => Route::StartInstance,
            "/fork_instance" => Route::ForkInstance,
            "/export_instance" => Route::ExportInstance,
            "/execute_command" => Route::ExecuteCommand,
            "/close_instance" => Route::CloseInstance,
            "/get_available_resources" => Route::AvailableResources,
            "/stats" => Route::Stats,
            "/healthz" => Route::Healthz,
            "/metrics" => Route::Metrics,
            "/openapi.json" => Route::OpenApi,
            "/v1/chat/completions" => Route::ChatCompletions,
            "/v1/messages" => Route::Messages,
            _ if path.starts_with("/runs/") => Route::Runs,
            files if files.starts_with("/files/") => Route::Files,
            _ => return None,
        })
    }

    pub(super) fn method(self) -> Method {
        if self.is_control() {
            Method::Get
        } else {
            Method::Post
        }
    }

    pub(super) fn method_name(self) -> &'static str {
        if self == Route::Files {
            "GET, PUT"
        } else if self.is_control() {
            "GET"
        } else {
            "POST"
        }
    }

    /// Control routes are cheap, frequent, and must answer while every worker runs a command.
    pub(super) fn is_control(self) -> bool {
        matches!(
            self,
            Route::AvailableResources
                | Route::Stats
                | Route::Runs
                | Route::Healthz
                | Route::Metrics
                | Route::OpenApi
        )
    }

    /// The model gateway's routes, spoken to by OpenAI and Anthropic SDKs.
    pub(super) fn is_model(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Messages)
    }

    /// Polled every second by `poll` and health checks: logged at debug only.
    pub(super) fn is_noisy(self) -> bool {
        matches!(self, Route::Stats | Route::Healthz | Route::Metrics)
    }
}

pub(super) fn path_of(url: &str) -> Option<&str> {
    url.split('?').next()
}

/// The decoded `key=value` pairs of a URL's query string.
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    pub(super) fn parse(url: &str) -> Query {
        let query = url.split_once('?').map(|(_, query)| query).unwrap_or("");
        Query(crate::url::decode_query(query))
    }

    /// The first non-empty value of `key`.
    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, value)| name == key && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }
}
