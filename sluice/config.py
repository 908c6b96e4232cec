"""The frozen configuration tree: one sub-config per concern, one root `EngineConfig`.

Every field is declared with `option(...)`, which records its help text, allowed choices and CLI
flag name; `config_sources.py` generates the CLI flags, the `--config` file keys and the
`SLUICE_*` environment variables from these declarations (there is no second flat list).

Rules: configs are frozen and validated once (`EngineConfig.validate` via `config_sources`);
runtime facts (number of KV blocks, final max_model_len) travel separately (`EngineReady`) and are
never written back. Pass sub-configs, not the root, to components that need only one concern.
This module imports no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           flag: str | None = None, cli: bool = True, byte_size: bool = False,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """Declare a config field with the metadata used to build CLI flags and validate values.

    `flag` overrides the generated `--field-name`; `cli=False` keeps a field out of the CLI and
    files (derived facts); `byte_size=True` accepts strings like "4GiB".
    """
    meta = {"help": help, "choices": choices, "flag": flag, "cli": cli, "byte_size": byte_size}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = option(None, "Path to a model directory in Hugging Face format "
                               "(config.json, *.safetensors, tokenizer). Default: the built-in demo model.")
    tokenizer: str | None = option(None, "Tokenizer directory; defaults to the model directory.")
    served_model_name: str | None = option(None, "Model name reported by the API; defaults to "
                                           "the model directory's name.")
    dtype: str = option("auto", "Weight and activation dtype. 'auto' is float32 on CPU and the "
                        "checkpoint's dtype on CUDA.", choices=DTYPES)
    max_model_len: int | None = option(None, "Maximum tokens per request (prompt + output). "
                                       "Default: the model's max_position_embeddings.")
    seed: int = option(0, "Global random seed for sampling without a per-request seed.")
    max_logprobs: int = option(20, "Largest `logprobs`/`prompt_logprobs` a request may ask for.")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = option(16, "Tokens per KV-cache block.", choices=(8, 16, 32, 64, 128))
    enable_prefix_caching: bool = option(True, "Reuse KV blocks across requests that share a "
                                         "prompt prefix.")
    kv_cache_memory: int | None = option(None, "Bytes of KV cache, e.g. '4GiB' or '512MiB'. "
                                         "Default: --kv-cache-memory-fraction of free memory.",
                                         byte_size=True)
    kv_cache_memory_fraction: float = option(0.3, "Fraction of free device memory (measured "
                                             "after loading and profiling) given to the KV cache "
                                             "when --kv-cache-memory is not set.")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(256, "Maximum number of requests running in one step.")
    max_num_batched_tokens: int | None = option(None, "Token budget of one step (prefill chunks "
                                                "+ decodes). Default: max(2048, max_num_seqs).")
    scheduling_policy: str = option("fcfs", "Order of admission and preemption.",
                                    choices=("fcfs", "priority"))
    enable_chunked_prefill: bool = option(True, "Split long prompts across steps to fit the "
                                          "token budget.")
    max_num_queued_requests: int | None = option(None, "Reject new requests (HTTP 429) when this "
                                                 "many are already waiting.")

    @property
    def token_budget(self) -> int:
        """The effective per-step token budget."""
        return self.max_num_batched_tokens or max(2048, self.max_num_seqs)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = option(1, "Number of tensor-parallel ranks.")
    pipeline_parallel_size: int = option(1, "Number of pipeline-parallel stages.")
    data_parallel_size: int = option(1, "Number of data-parallel engine replicas.")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = option("auto", "Device to run on; 'auto' picks CUDA when present, else CPU.",
                         choices=("auto", "cpu", "cuda"))
    num_threads: int | None = option(None, "CPU threads for torch compute. Default: all "
                                     "physical cores available to this process.")


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = option("auto", "Weight format: safetensors files, or random weights "
                              "('dummy', for testing).", choices=("auto", "safetensors", "dummy"))


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "Address the HTTP server binds.")
    port: int = option(8000, "Port the HTTP server binds.")
    api_key: str | None = option(None, "Require 'Authorization: Bearer <key>' on /v1/*.")
    allowed_origins: tuple[str, ...] = option(default_factory=tuple, help="CORS origins allowed "
                                              "(comma separated); CORS is off when empty.")


@dataclass(frozen=True)
class ObservabilityConfig:
    log_level: str = option("info", "Logging level.",
                            choices=("debug", "info", "warning", "error"))
    disable_log_stats: bool = option(False, "Do not log periodic throughput/cache statistics.")
    disable_log_requests: bool = option(True, "Do not log each request's arrival and finish.")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
    "parallel": ParallelConfig, "device": DeviceConfig, "load": LoadConfig,
    "server": ServerConfig, "observability": ObservabilityConfig,
}


@dataclass(frozen=True)
class EngineConfig:
    """The root of the tree. Build it with `config_sources.build_engine_config(...)` or
    `EngineConfig.from_kwargs(...)`, which validate; never construct sub-configs ad hoc."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build and validate from flat field names (as `LLM(**kwargs)` receives them)."""
        from sluice.config_sources import build_engine_config
        return build_engine_config(overrides=kwargs)


Section = Literal["model", "cache", "scheduler", "parallel", "device", "load", "server",
                  "observability"]
