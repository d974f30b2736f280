"""A thin client for arservice's REST API: one method per route, JSON in and out.

It owns the HTTP side only: the URL, the token (`Authorization: Bearer`), timeouts that bound every
request, and turning an error answer into `ArserviceError` with the server's `detail`. It never
retries (a retried start or command is not idempotent) and never interprets a command's result.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable
from urllib.parse import quote

import requests

DEFAULT_URL = "http://127.0.0.1:8008"
"""Where `arservice` listens by default (`--port 8008`)."""

START_HTTP_TIMEOUT = 900.0
"""Seconds a start may take: an image pull plus a container start (the server bounds both)."""

COMMAND_HTTP_SLACK = 30.0
"""Seconds added to a command's own timeout for the HTTP answer: the server kills the command at
its timeout and then answers, so a reply later than this means the server or the network is stuck."""

COMMAND_HTTP_TIMEOUT = 3600.0
"""Seconds a command may take when the call names no timeout (the instance's default applies)."""

CONTROL_HTTP_TIMEOUT = 120.0
"""Seconds for everything else: close, stats, resources, health."""

FILE_HTTP_TIMEOUT = 600.0
"""Seconds a file upload or download may stall (requests applies it to each read, not the whole)."""


class ArserviceError(Exception):
    """An answer other than 2xx: `status` (HTTP), `detail` (the server's words), `infra` (true when the
    sandbox, engine, job or agent failed, false for a bad request; `None` when the server did not say)."""

    def __init__(self, method: str, path: str, status: int, detail: str, infra: bool | None = None):
        self.method = method
        self.path = path
        self.status = status
        self.detail = detail
        self.infra = infra
        super().__init__(f"{method} {path} answered {status}: {detail}")


class ArserviceClient:
    """One arservice server. `url` defaults to `$ARSERVICE_URL` or `http://127.0.0.1:8008`, `token`
    to `$ARS_TOKEN` (the variable the server reads its own token from). Thread-safe as far as
    `requests.Session` is: give each thread its own client for heavy concurrent use."""

    def __init__(self, url: str | None = None, token: str | None = None, *, session: requests.Session | None = None):
        self.url = (url or os.environ.get("ARSERVICE_URL") or DEFAULT_URL).rstrip("/")
        token = os.environ.get("ARS_TOKEN") if token is None else token
        self.session = session or requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def start_instance(
        self,
        run_id: str,
        container_name: str,
        environment_config: dict[str, Any] | None = None,
        *,
        wait: float | None = None,
        http_timeout: float | None = None,
    ) -> dict[str, Any]:
        """Starts an instance and answers once it can run commands: `{"status", "instance_id"}`.
        `wait`: seconds to queue for resources instead of a 429 at once."""
        body: dict[str, Any] = {"run_id": run_id, "container_name": container_name}
        if environment_config is not None:
            body["environment_config"] = environment_config
        if wait is not None:
            body["wait"] = wait
        timeout = http_timeout or START_HTTP_TIMEOUT + (wait or 0)
        return self._call("POST", "/start_instance", body, timeout)

    def fork_instance(
        self,
        run_id: str,
        new_run_id: str,
        *,
        wait: float | None = None,
        http_timeout: float | None = None,
    ) -> dict[str, Any]:
        """Starts `new_run_id` from a copy of the running instance `run_id`'s files (with its config and
        resources; its processes are not copied, and `run_id` keeps running): `{"status",
        "instance_id"}`. `wait`: seconds to queue for resources instead of a 429 at once."""
        body: dict[str, Any] = {"run_id": run_id, "new_run_id": new_run_id}
        if wait is not None:
            body["wait"] = wait
        timeout = http_timeout or START_HTTP_TIMEOUT + (wait or 0)
        return self._call("POST", "/fork_instance", body, timeout)

    def execute_command(
        self,
        run_id: str,
        cmd: str,
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        max_output_bytes: int | None = None,
        stdin: str | None = None,
        http_timeout: float | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Runs `cmd` and returns the `result`: `{"output", "returncode", "timed_out", "truncated",
        "duration_s"}`. A timeout is not an error: `timed_out` is true and `returncode` 124.
        `stdin` is fed to the command (default: /dev/null). With `on_output`, the output is streamed
        (`"stream": true`): `on_output(chunk)` is called with each piece of text as the command
        prints it (the whole output, not capped), then the capped `result` is returned as usual."""
        body: dict[str, Any] = {"run_id": run_id, "cmd": cmd}
        for key, value in (
            ("timeout", timeout),
            ("cwd", cwd),
            ("env", env),
            ("max_output_bytes", max_output_bytes),
            ("stdin", stdin),
        ):
            if value is not None:
                body[key] = value
        if http_timeout is None:
            http_timeout = COMMAND_HTTP_TIMEOUT if timeout is None else timeout + COMMAND_HTTP_SLACK
        if on_output is None:
            return self._call("POST", "/execute_command", body, http_timeout)["result"]
        body["stream"] = True
        # A streamed answer can take as long as the command: `http_timeout` bounds each read.
        with self.session.post(self.url + "/execute_command", json=body, timeout=http_timeout, stream=True) as response:
            if not response.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                return self._answer("POST", "/execute_command", response)["result"]
            for line in response.iter_lines():
                answer = json.loads(line)
                if set(answer) == {"output"}:
                    on_output(answer["output"])
                elif answer.get("status") == "success":
                    return answer["result"]
                else:
                    status = answer.get("http_status", 500)
                    raise ArserviceError("POST", "/execute_command", status, answer.get("detail", line), answer.get("infra"))
        raise ArserviceError("POST", "/execute_command", 502, "the stream ended without its answer", True)

    def close_instance(self, run_id: str, *, http_timeout: float | None = None) -> dict[str, Any]:
        """Closes an instance: its sandbox, processes and files are gone, its resources free."""
        return self._call("POST", "/close_instance", {"run_id": run_id}, http_timeout or CONTROL_HTTP_TIMEOUT)

    def put_file(
        self, run_id: str, path: str, data: bytes | Any, *, mode: int | None = None, tar: bool = False
    ) -> int:
        """`PUT /files/{run_id}/{path}`: writes `data` (bytes or a binary file object, streamed) to the
        file `path` in the instance (relative to its working directory), or with `tar=True` unpacks it
        into the directory `path`. Returns the bytes written."""
        query = f"?mode={mode:o}" if mode is not None else ""
        headers = {"Content-Type": "application/x-tar" if tar else "application/octet-stream"}
        url = f"{self.url}/files/{quote(run_id, safe='')}/{quote(path)}{query}"
        response = self.session.put(url, data=data, headers=headers, timeout=FILE_HTTP_TIMEOUT)
        return self._answer("PUT", f"/files/{run_id}/{path}", response)["bytes"]

    def get_file(self, run_id: str, path: str) -> bytes:
        """`GET /files/{run_id}/{path}`: a file's bytes, or a directory as tar bytes (open them with
        `tarfile.open(fileobj=io.BytesIO(...))`). For a large download, stream it yourself from
        the same URL with `session.get(..., stream=True)`."""
        url = f"{self.url}/files/{quote(run_id, safe='')}/{quote(path)}"
        response = self.session.get(url, timeout=FILE_HTTP_TIMEOUT)
        if not response.ok:
            self._answer("GET", f"/files/{run_id}/{path}", response)
        return response.content

    def stats(self, run_id: str | None = None, container_name: str | None = None) -> dict[str, Any]:
        """`GET /stats`, filtered by substrings of `run_id` and `container_name`."""
        query = "&".join(
            f"{key}={quote(value)}" for key, value in (("run_id", run_id), ("container_name", container_name)) if value
        )
        return self._call("GET", "/stats" + (f"?{query}" if query else ""), None, CONTROL_HTTP_TIMEOUT)

    def run(self, run_id: str) -> dict[str, Any]:
        """`GET /runs/{run_id}`: the run's sums (wall and CPU time, commands, timeouts, infra failures,
        model calls and cost), while it runs and after its close."""
        return self._call("GET", f"/runs/{quote(run_id, safe='')}", None, CONTROL_HTTP_TIMEOUT)

    def available_resources(self) -> dict[str, Any]:
        """`GET /get_available_resources`: what is left of every enforced resource."""
        return self._call("GET", "/get_available_resources", None, CONTROL_HTTP_TIMEOUT)

    def healthz(self) -> bool:
        """True while the server accepts work."""
        try:
            self._call("GET", "/healthz", None, CONTROL_HTTP_TIMEOUT)
        except (ArserviceError, requests.RequestException):
            return False
        return True

    def _call(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        response = self.session.request(method, self.url + path, json=body, timeout=timeout)
        return self._answer(method, path, response)

    def _answer(self, method: str, path: str, response: requests.Response) -> dict[str, Any]:
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not response.ok:
            detail = answer.get("detail") if isinstance(answer, dict) else None
            infra = answer.get("infra") if isinstance(answer, dict) else None
            raise ArserviceError(method, path, response.status_code, detail or response.text[:2000], infra)
        if not isinstance(answer, dict):
            raise ArserviceError(method, path, response.status_code, f"not a JSON object: {response.text[:2000]!r}")
        return answer
