"""Cross-field configuration rules: what `EngineConfig.validate` and
`config_sources.build_engine_config` check after every field passed its own check (type,
choices, range). Each rule returns readable problems (flag, value, why, the fix); a rule that
touches a field which already failed its own check is skipped. No torch."""

from __future__ import annotations

import typing

from sluice.config import EngineConfig, ParallelConfig, field_specs
from sluice.errors import ConfigError

SUPPORTED_MAX: dict[str, int] = {}
"""Values that parse and fit their range but that this version cannot run yet, by field name.
Raise the limit here when the feature lands."""


def cross_field_problems(cfg: EngineConfig, skip: typing.AbstractSet[str] = frozenset()
                         ) -> list[str]:
    """Rules that involve more than one field or this version's limits. Rules touching a field
    in `skip` (one that already failed its own check) are not evaluated."""
    problems: list[str] = []
    specs = field_specs()
    for name, limit in SUPPORTED_MAX.items():
        value = getattr(getattr(cfg, specs[name].section), name)
        if name not in skip and value > limit:
            flag = specs[name].flag
            problems.append(
                f"{flag}: {value} is not supported yet in this version of sluice (only "
                f"{flag} {limit} is). Fix: remove {flag} or set it to {limit}.")
    problems += _parallel_problems(cfg.parallel, skip)
    problems += _data_parallel_problems(cfg.parallel, skip)
    problems += _multinode_problems(cfg.parallel, skip)
    if "structured_outputs_config" not in skip and cfg.model.structured_outputs_config:
        from sluice.structured_output.config import parse_structured_outputs_config
        try:
            parse_structured_outputs_config(cfg.model.structured_outputs_config)
        except ConfigError as e:
            problems += e.problems
    if "speculative_config" not in skip and cfg.scheduler.speculative_config:
        from sluice.spec_decode.config import speculative_problems
        problems += speculative_problems(cfg)
    if "kv_events_config" not in skip and cfg.cache.kv_events_config is not None:
        from sluice.kv_events.config import parse_kv_events_config
        try:
            parse_kv_events_config(cfg.cache.kv_events_config)
        except ConfigError as e:
            problems += e.problems
    if (cfg.model.quantization == "gguf" and cfg.load.load_format in ("safetensors", "dummy")
            and not {"quantization", "load_format"} & skip):
        problems.append(f"--quantization gguf: runs the blocks of a GGUF file, but --load-format "
                        f"is {cfg.load.load_format}. Fix: pass a .gguf model with --load-format "
                        "auto or gguf, or drop --quantization.")
    if (cfg.model.quantization == "int8" and cfg.lora.enable_lora
            and not {"quantization", "enable_lora"} & skip):
        problems.append("--quantization int8 with --enable-lora: LoRA adapters need the base "
                        "weights in float. Fix: drop one of the two.")
    if (cfg.server.enable_auto_tool_choice and cfg.server.tool_call_parser is None
            and "enable_auto_tool_choice" not in skip):
        problems.append("--enable-auto-tool-choice: needs --tool-call-parser (e.g. hermes or "
                        "llama3_json) to find the calls in the model's output. Fix: add "
                        "--tool-call-parser NAME.")
    if "kv_transfer_config" not in skip and cfg.cache.kv_transfer_config is not None:
        from sluice.kv_transfer.config import parse_kv_transfer_config
        from sluice.kv_transfer.factory import parallel_problems
        try:
            parse_kv_transfer_config(cfg.cache.kv_transfer_config)
            problems += parallel_problems(cfg)
        except ConfigError as e:
            problems += e.problems
    sched, mml = cfg.scheduler, cfg.model.max_model_len
    mnbt = sched.max_num_batched_tokens
    if mnbt is not None and not {"max_num_batched_tokens", "max_num_seqs"} & skip:
        if mnbt < sched.max_num_seqs:
            problems.append(
                f"--max-num-batched-tokens: {mnbt} is smaller than --max-num-seqs "
                f"({sched.max_num_seqs}); every running request needs at least one token per "
                f"step. Fix: raise --max-num-batched-tokens to at least {sched.max_num_seqs} or "
                f"lower --max-num-seqs to at most {mnbt}.")
    if (mnbt is not None and mml is not None and not sched.enable_chunked_prefill
            and not {"max_num_batched_tokens", "max_model_len", "enable_chunked_prefill"} & skip
            and mnbt < mml):
        problems.append(
            f"--max-num-batched-tokens: {mnbt} is smaller than --max-model-len ({mml}) while "
            f"chunked prefill is disabled, so a long prompt could never be scheduled. Fix: raise "
            f"--max-num-batched-tokens to at least {mml}, lower --max-model-len to at most "
            f"{mnbt}, or pass --enable-chunked-prefill.")
    return problems


def _parallel_problems(par: ParallelConfig, skip: typing.AbstractSet[str]) -> list[str]:
    """What this version cannot run of the parallel config (see `cross_field_problems`)."""
    problems: list[str] = []
    pp = par.pipeline_parallel_size
    partition = par.pp_layer_partition
    if partition is not None and not {"pp_layer_partition", "pipeline_parallel_size"} & skip:
        counts = [part.strip() for part in partition.split(",")]
        if len(counts) != pp or not all(c.isdigit() and int(c) >= 1 for c in counts):
            problems.append(
                f"--pp-layer-partition: {partition!r} must be {pp} comma-separated layer counts "
                f"of at least 1 (one per stage of --pipeline-parallel-size {pp}). Fix: give "
                f"{pp} counts that add up to the model's layers, or leave it out.")
    backend = par.distributed_executor_backend
    if "distributed_executor_backend" in skip or {"tensor_parallel_size",
                                                  "pipeline_parallel_size"} & skip:
        return problems
    if backend == "uni" and par.world_size > 1:
        problems.append(
            f"--distributed-executor-backend: 'uni' runs a single rank in the engine-core "
            f"process, but --tensor-parallel-size {par.tensor_parallel_size} x "
            f"--pipeline-parallel-size {pp} asks for {par.world_size} ranks. Fix: use 'mp', "
            "or leave the flag out.")
    return problems


def _data_parallel_problems(par: ParallelConfig, skip: typing.AbstractSet[str]) -> list[str]:
    """--data-parallel-size / --data-parallel-rank (see `cross_field_problems`)."""
    if {"data_parallel_size", "data_parallel_rank", "nnodes"} & skip:
        return []
    size, rank = par.data_parallel_size, par.data_parallel_rank
    if rank is not None and rank >= size:
        return [f"--data-parallel-rank: {rank} is not an engine of --data-parallel-size {size} "
                f"(ranks are 0 to {size - 1}). Fix: pass --data-parallel-size {rank + 1} or "
                f"more, or a rank below {size}."]
    if rank is None and size > 1 and par.nnodes > 1:
        return [f"--data-parallel-size: {size} engines in one server with --nnodes "
                f"{par.nnodes} is not supported yet. Fix: run one server per engine with "
                "--data-parallel-rank (each with its own --master-port), or drop --nnodes."]
    return []


def _multinode_problems(par: ParallelConfig, skip: typing.AbstractSet[str]) -> list[str]:
    """--nnodes / --node-rank against the ranks and the executor (see `cross_field_problems`)."""
    if {"nnodes", "node_rank", "tensor_parallel_size", "pipeline_parallel_size",
            "distributed_executor_backend", "master_port"} & skip:
        return []
    nnodes, world = par.nnodes, par.world_size
    if par.node_rank >= nnodes:
        return [f"--node-rank: {par.node_rank} is not a node of --nnodes {nnodes} (node ranks "
                f"are 0 to {nnodes - 1}). Fix: pass --node-rank below {nnodes}."]
    if nnodes == 1:
        return []
    if world % nnodes:
        return [f"--nnodes: {nnodes} nodes cannot share {world} ranks (--tensor-parallel-size "
                f"{par.tensor_parallel_size} x --pipeline-parallel-size "
                f"{par.pipeline_parallel_size}) evenly. Fix: pick --nnodes that divides {world}."]
    if par.executor_backend != "mp":
        return [f"--nnodes: {nnodes} nodes need --distributed-executor-backend mp, not "
                f"{par.executor_backend!r} (Ray places its actors on the cluster's nodes "
                "itself). Fix: drop --distributed-executor-backend, or drop --nnodes and "
                "--node-rank."]
    if par.rendezvous_port == 65535:
        return ["--master-port: 65535 leaves no room for the head's join port (master port + "
                "1) with --nnodes > 1. Fix: pick a lower port."]
    return []
