"""The exceptions sluice raises on purpose.

User mistakes raise a subclass of `SluiceError` carrying a message that names the value and the
fix; internal invariants use `assert`. The HTTP server maps `InvalidRequestError` to 400,
`NotFoundError` to 404 and everything else to 5xx.
"""

from __future__ import annotations


class SluiceError(Exception):
    """Base class of every error sluice raises deliberately."""


class ConfigError(SluiceError):
    """One or more configuration values are invalid.

    `problems` holds one line per problem, each naming the flag, the value, what is allowed.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} configuration problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(msg)


class InvalidRequestError(SluiceError, ValueError):
    """A request parameter is invalid (HTTP 400). `param` names the offending parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class NotFoundError(SluiceError):
    """A named resource (e.g. a model) does not exist (HTTP 404)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ModelLoadError(SluiceError):
    """A model directory is missing, incomplete, corrupt or of an unsupported architecture."""


class KVCacheTooSmallError(SluiceError):
    """The KV cache cannot hold a single request of `max_model_len` tokens."""


class EngineDeadError(SluiceError):
    """The engine core died or stopped making progress; in-flight requests cannot complete."""

    def __init__(self, message: str = "The engine core process died; restart the server."):
        super().__init__(message)


class EngineStartupError(SluiceError):
    """The engine core failed during startup; the message is the child's own error."""


class EngineSleepingError(SluiceError):
    """The engine is asleep (`/sleep`): its KV cache (and at level 2 its weights) are released,
    so generation is refused (HTTP 503) until `/wake_up`."""


class EngineBusyError(SluiceError):
    """An operation that needs an idle engine (sleep) was asked for while requests are in
    flight (HTTP 409); retry once they have finished."""
