"""The worker's named KV-connector hooks around one step (the worker calls three methods;
the connector's logic stays in its worker half)::

    before_forward(so, kv_caches)   register (new) caches; start_load_kv(so.kv_connector_metadata)
    ... the model runner's forward ...
    after_forward()                 wait_for_save(); collect the step's KVConnectorOutput
    attach(model_runner_output)     put it on the step's output for the scheduler half
"""

from __future__ import annotations

from typing import Any

from sluice.kv_transfer.connector import KVConnectorWorker
from sluice.kv_transfer.metadata import KVConnectorOutput
from sluice.step import ModelRunnerOutput, SchedulerOutput


class WorkerConnectorHooks:
    def __init__(self, connector: KVConnectorWorker):
        self.connector = connector
        self._caches: list[Any] | None = None
        self._step: SchedulerOutput | None = None
        self._output: KVConnectorOutput | None = None

    def before_forward(self, scheduler_output: SchedulerOutput, kv_caches: list[Any]) -> None:
        if kv_caches is not self._caches:   # allocated, or reallocated after a wake-up
            self._caches = kv_caches
            self.connector.register_kv_caches(kv_caches)
        self._step = scheduler_output
        self.connector.start_load_kv(scheduler_output.kv_connector_metadata)

    def after_forward(self) -> None:
        so, self._step = self._step, None
        self.connector.wait_for_save()
        self._output = self.connector.build_output(
            so.finished_request_ids,
            idle=so.is_empty and (so.kv_connector_metadata is None
                                  or not so.kv_connector_metadata.loads))

    def attach(self, output: ModelRunnerOutput) -> ModelRunnerOutput:
        output.kv_connector_output, self._output = self._output, None
        return output

    def shutdown(self) -> None:
        self.connector.shutdown()
