"""Engine-core clients: how a frontend talks to an engine core.

`InprocClient` runs the engine core in this process (the offline `LLM` default): `get_output`
runs one step. The ZeroMQ client for a background engine-core process implements the same
interface. The engine is imported lazily so that importing the frontend never imports torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

from sluice.config import EngineConfig
from sluice.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady


class EngineCoreClient(ABC):
    """Typed calls into an engine core. `ready` holds the runtime facts from startup."""

    ready: EngineReady

    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: Iterable[str]) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """The next batch of outputs (blocks until the engine produced a step)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine core; safe to call twice."""


class InprocClient(EngineCoreClient):
    """The engine core in this process, stepped by the caller."""

    def __init__(self, config: EngineConfig):
        from sluice.engine.core import EngineCore  # lazy: keeps torch out of frontend imports
        self.engine = EngineCore(config)
        self.ready = self.engine.ready

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.engine.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine.step()

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
