"""The connector registry: `kv_connector` name → its scheduler half and worker half.

    "ZmqPullConnector"  (alias "ZmqConnectorV1")   the ZeroMQ/TCP pull connector

The engine core builds the scheduler half (`make_scheduler_hooks`), each worker its worker half
(`make_worker_connector`, imported lazily: it needs torch and zmq). No torch at import.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.errors import ConfigError

if TYPE_CHECKING:
    from sluice.config import EngineConfig
    from sluice.core.sched.hooks import SchedulerHooks
    from sluice.hf_config import ModelSpec
    from sluice.kv_transfer.connector import KVConnectorWorker

_ZMQ = ("sluice.kv_transfer.zmq_pull:ZmqPullScheduler",
        "sluice.kv_transfer.zmq_pull_worker:ZmqPullWorker")
_REGISTRY: dict[str, tuple[str, str]] = {"ZmqPullConnector": _ZMQ, "ZmqConnectorV1": _ZMQ}


def connector_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def parallel_problems(config: "EngineConfig") -> list[str]:
    """What a connector cannot do with this engine's parallelism (empty: fine)."""
    par = config.parallel
    problems = []
    if par.pipeline_parallel_size > 1:
        problems.append("--kv-transfer-config with --pipeline-parallel-size > 1 is not "
                        "supported; run the prefill and decode engines with -pp 1.")
    return problems


def kv_layout(config: "EngineConfig", spec: "ModelSpec") -> dict[str, Any]:
    """The layout record both engines must share for blocks to move between them. Its
    kv_cache_dtype is the flag's, except that 'auto' where the checkpoint decides the cache
    (`ModelSpec.auto_kv_cache_dtype`: fp8_e4m3 for declared fp8 KV-cache scales, float16 for
    a GGUF file with int8 activations, whose `--dtype auto` is float32) is what it resolves to,
    so an engine given 'fp8' (or 'float16') and one given 'auto' agree."""
    kv_cache_dtype = config.cache.kv_cache_dtype
    if kv_cache_dtype == "auto":
        kv_cache_dtype = spec.auto_kv_cache_dtype(
            config.model.quantization, config.model.dtype in ("auto", "float32")) or "auto"
    return {"model": Path(spec.path).name, "dtype": config.model.dtype,
            "kv_cache_dtype": kv_cache_dtype, "block_size": config.cache.block_size,
            "num_kv_heads": spec.num_key_value_heads, "head_dim": spec.head_dim,
            "num_layers": spec.num_hidden_layers,
            "tp_size": config.parallel.tensor_parallel_size}


def make_scheduler_hooks(config: "EngineConfig", spec: "ModelSpec") -> "SchedulerHooks | None":
    """The scheduler hooks of the configured connector; None without --kv-transfer-config."""
    from sluice.kv_transfer.config import parse_kv_transfer_config
    from sluice.kv_transfer.connector import ConnectorSchedulerHooks
    kv_config = parse_kv_transfer_config(config.cache.kv_transfer_config)
    if kv_config is None:
        return None
    problems = parallel_problems(config)
    if problems:
        raise ConfigError(problems)
    scheduler_cls = _load(_REGISTRY[kv_config.kv_connector][0])
    return ConnectorSchedulerHooks(scheduler_cls(
        kv_config, kv_layout(config, spec), config.cache.block_size,
        dp_rank=config.parallel.data_parallel_rank or 0))


def make_worker_connector(config: "EngineConfig", tp_rank: int,
                          tp_size: int) -> "KVConnectorWorker | None":
    """This rank's worker half; None without --kv-transfer-config."""
    from sluice.kv_transfer.config import parse_kv_transfer_config
    kv_config = parse_kv_transfer_config(config.cache.kv_transfer_config)
    if kv_config is None:
        return None
    worker_cls = _load(_REGISTRY[kv_config.kv_connector][1])
    return worker_cls(kv_config, tp_rank, tp_size, config.parallel.data_parallel_rank or 0)
