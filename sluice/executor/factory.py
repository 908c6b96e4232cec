"""Choose the executor from the parallel config (`--distributed-executor-backend`).

    uni  one worker inside the engine-core process (one rank; the default then)
    mp   one worker process per rank on this machine (the default for more than one rank)
    ray  one Ray actor per rank (not implemented yet; refused by config validation)

The model's heads are checked against `--tensor-parallel-size` here, before any rank starts
(torch-free), so a bad split fails in one line instead of in every worker.
"""

from __future__ import annotations

from sluice.config import EngineConfig
from sluice.errors import ConfigError
from sluice.executor.base import Executor
from sluice.hf_config import ModelSpec
from sluice.model_spec.parallel_check import check_tensor_parallel


def make_executor(config: EngineConfig, spec: ModelSpec, max_model_len: int) -> Executor:
    par = config.parallel
    check_tensor_parallel(spec, par.tensor_parallel_size)
    backend = par.executor_backend
    if backend == "uni":
        if par.world_size != 1:
            raise ConfigError(f"--distributed-executor-backend uni runs one rank, not "
                              f"{par.world_size}. Fix: use mp.")
        from sluice.executor.uniproc import UniprocExecutor   # imports torch
        return UniprocExecutor(config, spec, max_model_len)
    if backend == "mp":
        from sluice.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config, spec, max_model_len)
    raise ConfigError(f"--distributed-executor-backend {backend} is not implemented yet. "
                      "Fix: use mp, or leave the flag out.")
