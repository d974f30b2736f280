"""An environment for mini-swe-agent whose commands run in an arservice sandbox.

`ArserviceEnvironment` follows the environment protocol of mini-swe-agent 2.x exactly as its own
`DockerEnvironment` does: keyword config validated by a pydantic config class, the instance started
in `__init__`, `execute(action, cwd="", *, timeout=None)` returning `{"output", "returncode",
"exception_info"}` (a timeout or a failed request as returncode -1 with `exception_info` and
`extra`, as `subprocess` failures are there), `Submitted` raised on `COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`,
`get_template_vars`, `serialize`, and `cleanup` (also on `__del__`) closing the instance.

It never passes the token into template variables or trajectories (the field is excluded from
`model_dump`). Importing it needs mini-swe-agent; `arservice` alone does not.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import uuid
from typing import Any

from minisweagent.exceptions import Submitted
from minisweagent.utils.serialize import recursive_merge
from pydantic import BaseModel, Field

from arservice.client import ArserviceClient, ArserviceError

UNAME_KEYS = ("system", "node", "release", "version", "machine")
"""The keys of `platform.uname()` that templates use, read from the sandbox (see `get_template_vars`)."""


def _default_url() -> str:
    return os.getenv("ARSERVICE_URL", "http://127.0.0.1:8008")


def _default_token() -> str:
    return os.getenv("ARS_TOKEN", "")


class ArserviceEnvironmentConfig(BaseModel):
    image: str = ""
    """The image (for `local`: anything; the instance's `container_name` is `image` or the type)."""
    container_type: str = "docker"
    """arservice's `container_type`: docker, podman, singularity/apptainer, enroot, bubblewrap, local."""
    cwd: str = ""
    """Working directory for commands; empty: the environment's default (the image's, or a fresh
    directory for `local`)."""
    env: dict[str, str] = {}
    """Environment variables set in the sandbox."""
    forward_env: list[str] = []
    """Variables copied from *this* process's environment (as mini-swe-agent's own environments do),
    if set. `env` wins on conflict. For the server's environment, use `environment_config`."""
    timeout: int = 30
    """Timeout for each command, in seconds; the server kills the command and all it started."""
    url: str = Field(default_factory=_default_url)
    """The arservice server (default `$ARSERVICE_URL`, else http://127.0.0.1:8008)."""
    token: str = Field(default_factory=_default_token, exclude=True, repr=False)
    """Bearer token (default `$ARS_TOKEN`). Never dumped into templates or trajectories."""
    run_id: str = ""
    """The instance's name; empty: `minisweagent-<random>`."""
    environment_config: dict[str, Any] = {}
    """More `environment_config` keys for arservice (resources, ttl, idle_timeout, shell, run_args,
    exec_mode, ...); they win over the keys above."""
    wait: float | None = None
    """Seconds to wait for free resources at start instead of failing at once (429)."""


class ArserviceEnvironment:
    def __init__(
        self,
        *,
        config_class: type = ArserviceEnvironmentConfig,
        logger: logging.Logger | None = None,
        **kwargs,
    ):
        """This class executes bash commands in an arservice instance over its HTTP API.
        See `ArserviceEnvironmentConfig` for keyword arguments.
        """
        self.logger = logger or logging.getLogger("minisweagent.environment")
        self.run_id: str | None = None
        self.config = config_class(**kwargs)
        if not self.config.run_id:
            self.config.run_id = f"minisweagent-{uuid.uuid4().hex[:12]}"
        self.client = ArserviceClient(self.config.url, token=self.config.token)
        self._uname: dict[str, str] | None = None
        self._start_instance()

    def _start_instance(self):
        env = {key: value for key in self.config.forward_env if (value := os.getenv(key)) is not None}
        env.update(self.config.env)
        environment_config: dict[str, Any] = {
            "container_type": self.config.container_type,
            "timeout": self.config.timeout,
        }
        if self.config.cwd:
            environment_config["cwd"] = self.config.cwd
        if env:
            environment_config["env"] = env
        environment_config.update(self.config.environment_config)
        container_name = self.config.image or self.config.container_type
        self.logger.debug(f"Starting arservice instance {self.config.run_id} ({container_name}) at {self.config.url}")
        self.client.start_instance(self.config.run_id, container_name, environment_config, wait=self.config.wait)
        self.run_id = self.config.run_id
        self.logger.info(f"Started arservice instance {self.run_id}")

    def get_template_vars(self, **kwargs) -> dict[str, Any]:
        return recursive_merge(self.config.model_dump(), self._sandbox_uname(), kwargs)

    def _sandbox_uname(self) -> dict[str, str]:
        """`platform.uname()`'s keys, as the sandbox sees them (the server may be another machine),
        read once; this machine's when the sandbox cannot say."""
        if self._uname is None:
            uname = platform.uname()._asdict()
            try:
                result = self.client.execute_command(
                    self.run_id, "uname -s; uname -n; uname -r; uname -v; uname -m", timeout=self.config.timeout
                )
                lines = result["output"].splitlines()
                if result["returncode"] == 0 and len(lines) == len(UNAME_KEYS):
                    uname.update(zip(UNAME_KEYS, lines))
            except (ArserviceError, OSError) as e:
                self.logger.warning(f"Cannot read uname in {self.run_id}, using this machine's: {e}")
            self._uname = uname
        return self._uname

    def serialize(self) -> dict:
        return {
            "info": {
                "config": {
                    "environment": self.config.model_dump(mode="json"),
                    "environment_type": f"{self.__class__.__module__}.{self.__class__.__name__}",
                }
            }
        }

    def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        """Execute a command in the arservice instance and return the result as a dict."""
        command = action.get("command", "")
        assert self.run_id, "Instance not started"
        timeout = timeout or self.config.timeout
        try:
            result = self.client.execute_command(self.run_id, command, timeout=timeout, cwd=cwd or None)
            extra = {key: result.get(key) for key in ("timed_out", "truncated", "duration_s")}
            if result.get("timed_out"):
                # The shape mini-swe-agent's own environments give a timeout (subprocess's words).
                error = subprocess.TimeoutExpired(command, timeout, output=result["output"])
                output = {
                    "output": result["output"],
                    "returncode": -1,
                    "exception_info": f"An error occurred while executing the command: {error}",
                    "extra": {"exception_type": type(error).__name__, "exception": str(error), **extra},
                }
            else:
                output = {
                    "output": result["output"],
                    "returncode": result["returncode"],
                    "exception_info": "",
                    "extra": extra,
                }
        except Exception as e:
            output = {
                "output": "",
                "returncode": -1,
                "exception_info": f"An error occurred while executing the command: {e}",
                "extra": {"exception_type": type(e).__name__, "exception": str(e)},
            }
        self._check_finished(output)
        return output

    def _check_finished(self, output: dict):
        """Raises Submitted if the output indicates task completion."""
        lines = output.get("output", "").lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT" and output["returncode"] == 0:
            submission = "".join(lines[1:])
            raise Submitted(
                {
                    "role": "exit",
                    "content": submission,
                    "extra": {"exit_status": "Submitted", "submission": submission},
                }
            )

    def cleanup(self):
        """Close the instance; once closed, later calls do nothing."""
        run_id, self.run_id = getattr(self, "run_id", None), None  # if init fails early, run_id is unset
        if run_id is not None:
            try:
                self.client.close_instance(run_id)
            except ArserviceError as e:
                if e.status != 404:  # 404: closed already (by someone else, or the server restarted)
                    self.run_id = run_id  # a failed close keeps the instance: a later cleanup() retries
                    self.logger.warning(f"Closing arservice instance {run_id} failed: {e}")
            except Exception as e:  # also runs from __del__, possibly at interpreter exit
                self.run_id = run_id  # a failed close keeps the instance: a later cleanup() retries
                self.logger.warning(f"Closing arservice instance {run_id} failed: {e}")

    def __del__(self):
        """Close the instance when the object is destroyed."""
        self.cleanup()
