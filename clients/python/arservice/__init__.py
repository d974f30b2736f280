"""Python client for arservice: `ArserviceClient` over the REST API, and (in `arservice.minisweagent`,
which needs mini-swe-agent) an environment class for mini-swe-agent's agents."""

from arservice.client import ArserviceClient, ArserviceError

__version__ = "0.1.0"

__all__ = ["ArserviceClient", "ArserviceError", "__version__"]
