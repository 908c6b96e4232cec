"""Worker: one per rank (a tensor-parallel rank of a pipeline stage). Sets up the device, loads
the model, measures memory, allocates the KV cache and runs steps through its `ModelRunner`."""

from __future__ import annotations

import logging
import time

import torch

from sluice.config import EngineConfig
from sluice.errors import ConfigError
from sluice.hf_config import AUTO_KV_CACHE_REASONS, ModelSpec
from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
from sluice.model.loader import resolve_dtype
from sluice.platform import current_platform
from sluice.platform.interface import to_torch_dtype
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output.output import GrammarOutput
from sluice.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_PROFILE_TOKENS = 256  # tokens of the profiling/warm-up forward; kept small for fast startup


def kv_cache_auto_dtype(spec: ModelSpec, quantization: str | None,
                        dtype: torch.dtype) -> torch.dtype:
    """What `--kv-cache-dtype auto` stores for `--dtype` `dtype` (as the `Worker` resolves it,
    for callers without one): the checkpoint's choice (`ModelSpec.auto_kv_cache_dtype`: fp8_e4m3
    for declared fp8 KV scales, float16 for a GGUF file with int8 activations), else `dtype`
    (every dtype a model's weights take is one the C++ attention reads:
    `cpu_paged.KERNEL_CACHE_DTYPES`)."""
    chosen = spec.auto_kv_cache_dtype(quantization, dtype == torch.float32)
    return dtype if chosen is None else to_torch_dtype(chosen)


class Worker:
    """One rank. `rank` is its global rank (0: the driver), `local_rank` its index on this
    machine (the device it uses). The process group, if any, is joined before construction
    (`sluice.distributed.init_parallel_state`, by the executor's worker process).
    `num_threads` is this rank's share of `--threads` (None: `--threads` itself)."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int, rank: int = 0,
                 local_rank: int = 0, num_threads: int | None = None):
        self.config = config
        self.spec = spec
        self.rank = rank
        self.local_rank = local_rank
        self.platform = current_platform(config.device)
        self.device = self.platform.torch_device(local_rank)
        self.dtype = resolve_dtype(config.model.dtype, spec, self.device)
        layer_ops = self.platform.layer_ops_name(config.device.kernels)
        flag = config.cache.kv_cache_dtype   # 'auto' takes the checkpoint's choice, if any
        chosen = spec.auto_kv_cache_dtype(config.model.quantization,
                                          self.dtype == torch.float32) if flag == "auto" else None
        self.kv_cache_dtype = self.platform.resolve_kv_cache_dtype(chosen or flag, self.dtype)
        self.kv_cache_dtype_reason = f" (auto: {AUTO_KV_CACHE_REASONS[chosen]})" if chosen else ""
        if rank == 0:
            for note in self.platform.ineffective_options(config):
                logger.info(note)
        self.platform.prepare_worker_process()
        self.platform.set_num_threads(num_threads or config.device.num_threads)
        torch.manual_seed(config.model.seed)
        kernels = config.device.kernels
        self.model_runner = ModelRunner(
            config, spec, self.device, self.dtype, max_model_len,
            kv_cache_dtype=self.kv_cache_dtype,
            attn_backend=self.platform.attention_backend_name(kernels),
            layer_ops=layer_ops)
        self.kv_hooks = None   # a KV connector's worker half (`sluice.kv_transfer`), if any

    def load_model(self) -> None:
        self.memory_at_start = self.platform.memory_for_utilization()
        self.model_runner.load_model()

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of one KV block on this rank: its local KV heads of its stage's layers."""
        drafter = self.model_runner.drafter   # a draft model's cache has as many blocks
        return kv_cache_bytes_per_block(self.spec, self.config.cache.block_size,
                                        self.kv_cache_dtype,
                                        tp_size=self.model_runner.tp_group.size,
                                        num_layers=self.model_runner.num_layers) + (
            drafter.kv_cache_bytes_per_block() if drafter is not None else 0)

    def determine_available_kv_memory(self) -> int:
        """Bytes for the KV cache, after a profiling forward: `--kv-cache-memory` if set; else
        with `--gpu-memory-utilization u`, u x `memory_at_start` (the platform's
        `memory_for_utilization`, read before the weights loaded) minus the model's tensors
        (`ModelRunner.model_memory_bytes`) and the activation peak estimated for a full
        `max_num_batched_tokens` step; else `--kv-cache-memory-fraction` of the free memory
        measured now, minus that activation peak. Raises ConfigError when the utilization
        budget leaves nothing for the cache."""
        start = time.perf_counter()
        self.model_runner.dummy_run(_PROFILE_TOKENS, num_reqs=2)
        logger.debug("profiling forward took %.2fs", time.perf_counter() - start)
        cache = self.config.cache
        if cache.kv_cache_memory is not None:
            return cache.kv_cache_memory
        if cache.gpu_memory_utilization is not None:
            return self._kv_memory_for_utilization(cache.gpu_memory_utilization)
        free = self.platform.free_memory_bytes()
        lora = self.model_runner.lora_manager   # adapters loaded later (--max-cpu-loras)
        free -= lora.reserved_bytes() if lora is not None else 0
        return int(max(0, free - self._activation_peak_bytes())
                   * self.config.cache.kv_cache_memory_fraction)

    def _kv_memory_for_utilization(self, utilization: float) -> int:
        budget = int(self.memory_at_start * utilization)
        weights = self.model_runner.model_memory_bytes()
        activations = self._activation_peak_bytes()
        kv = budget - weights - activations
        gib = 2**30
        logger.info("--gpu-memory-utilization %g: %.2f GiB of %.2f GiB %s; weights %.2f GiB, "
                    "activation peak %.2f GiB, KV cache %.2f GiB", utilization, budget / gib,
                    self.memory_at_start / gib,
                    "device memory" if self.device.type != "cpu" else "RAM available at start",
                    weights / gib, activations / gib, max(kv, 0) / gib)
        if kv <= 0:
            raise ConfigError(
                f"--gpu-memory-utilization: {utilization:g} of {self.memory_at_start / gib:.2f} "
                f"GiB is {budget / gib:.2f} GiB, which the weights ({weights / gib:.2f} GiB) and "
                f"the activation peak ({activations / gib:.2f} GiB) already use up, leaving "
                "nothing for the KV cache. Fix: raise --gpu-memory-utilization, or give the cache "
                "a size with --kv-cache-memory.")
        return kv

    def _activation_peak_bytes(self) -> int:
        """A generous estimate of one step's activations at the full token budget."""
        s = self.spec
        per_token = (4 * s.hidden_size + 3 * s.intermediate_size
                     + (s.num_attention_heads + 2 * s.num_key_value_heads) * s.head_dim)
        element_size = torch.empty((), dtype=self.model_runner.compute_dtype).element_size()
        return 2 * self.config.scheduler.token_budget * per_token * element_size

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)
        if self.config.cache.kv_transfer_config is not None and self.kv_hooks is None:
            from sluice.kv_transfer.factory import make_worker_connector
            from sluice.kv_transfer.worker_hooks import WorkerConnectorHooks
            tp = self.model_runner.tp_group
            self.kv_hooks = WorkerConnectorHooks(make_worker_connector(self.config, tp.rank,
                                                                       tp.size))
            self.kv_hooks.connector.register_kv_caches(self.model_runner.kv_caches)
        logger.info("KV cache: %.2f GiB of %s%s in %d blocks of %d tokens (resident from "
                    "startup)", num_blocks * self.kv_cache_bytes_per_block() / 2**30,
                    str(self.kv_cache_dtype).removeprefix("torch."), self.kv_cache_dtype_reason,
                    num_blocks, self.config.cache.block_size)

    def warm_up(self) -> None:
        """A decode-shaped step so the first real request does not pay for lazy init."""
        self.model_runner.dummy_run(num_tokens=8, num_reqs=8)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """The step's forward; `sample_tokens` must follow (see `ModelRunner`). A KV
        connector's hooks run around it (`kv_transfer.worker_hooks`)."""
        if self.kv_hooks is not None:
            self.kv_hooks.before_forward(scheduler_output, self.model_runner.kv_caches)
        self.model_runner.execute_model(scheduler_output)
        if self.kv_hooks is not None:
            self.kv_hooks.after_forward()

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        """Sample the step `execute_model` ran, under the grammar bitmask (or None)."""
        output = self.model_runner.sample_tokens(grammar_output)
        return output if self.kv_hooks is None else self.kv_hooks.attach(output)

    def step(self, scheduler_output: SchedulerOutput,
             grammar_output: GrammarOutput | None = None) -> ModelRunnerOutput:
        """Both halves of a step at once."""
        self.execute_model(scheduler_output)
        return self.sample_tokens(grammar_output)

    def sleep(self, level: int) -> None:
        """Release the KV cache (level 1) and the weights too (level 2); see
        `ModelRunner.sleep`."""
        self.model_runner.sleep(level)
        logger.info("sleeping at level %d: KV cache%s released", level,
                    " and weights" if level == 2 else "")

    def wake_up(self) -> None:
        """Reload what `sleep` released and warm up again, so the first request after waking
        pays no lazy initialisation."""
        start = time.perf_counter()
        self.model_runner.wake_up()
        self.warm_up()
        logger.info("woke up in %.2fs", time.perf_counter() - start)
