"""Choose the executor from the parallel config (`--distributed-executor-backend`).

    uni  one worker inside the engine-core process (one rank; the default then)
    mp   one worker process per rank (the default for more than one rank), on this machine or
         over --nnodes machines (the other nodes run `sluice serve --headless`)
    ray  one Ray actor per rank in a placement group (needs the optional `ray` package)

The model's heads are checked against `--tensor-parallel-size` (and its layers against
`--pipeline-parallel-size` / `--pp-layer-partition`) here, before any rank starts
(torch-free), so a bad split fails in one line instead of in every worker.
"""

from __future__ import annotations

from sluice.config import EngineConfig
from sluice.errors import ConfigError
from sluice.executor.base import Executor
from sluice.hf_config import ModelSpec
from sluice.model_spec.parallel_check import check_pipeline_parallel, check_tensor_parallel


def make_executor(config: EngineConfig, spec: ModelSpec, max_model_len: int) -> Executor:
    par = config.parallel
    check_tensor_parallel(spec, par.tensor_parallel_size)
    check_pipeline_parallel(spec, par.pipeline_parallel_size, par.pp_layer_partition)
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
    if backend == "ray":
        from sluice.executor.ray_executor import RayExecutor   # imports ray
        return RayExecutor(config, spec, max_model_len)
    raise ConfigError(f"--distributed-executor-backend {backend} is not implemented yet. "
                      "Fix: use mp, or leave the flag out.")
