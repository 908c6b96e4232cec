"""Worker: one per tensor-parallel rank. Sets up the device, loads the model, measures memory,
allocates the KV cache and runs steps through its `ModelRunner`."""

from __future__ import annotations

import logging
import time

import torch

from sluice.config import EngineConfig
from sluice.hf_config import ModelSpec
from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
from sluice.model.loader import resolve_dtype
from sluice.platform import current_platform
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_PROFILE_TOKENS = 256  # tokens of the profiling/warm-up forward; kept small for fast startup


class Worker:
    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int, rank: int = 0):
        self.config = config
        self.spec = spec
        self.rank = rank
        self.platform = current_platform(config.device)
        self.device = self.platform.torch_device()
        self.dtype = resolve_dtype(config.model.dtype, spec, self.device)
        self.platform.prepare_worker_process()
        self.platform.set_num_threads(config.device.num_threads)
        torch.manual_seed(config.model.seed)
        kernels = config.device.kernels
        self.model_runner = ModelRunner(
            config, spec, self.device, self.dtype, max_model_len,
            attn_backend=self.platform.attention_backend_name(kernels),
            layer_ops=self.platform.layer_ops_name(kernels))

    def load_model(self) -> None:
        self.model_runner.load_model()

    def kv_cache_bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(self.spec, self.config.cache.block_size, self.dtype)

    def determine_available_kv_memory(self) -> int:
        """Bytes for the KV cache: `--kv-cache-memory` if set, else a fraction of the free
        memory measured after a profiling forward, minus the activation peak estimated for a
        full `max_num_batched_tokens` step."""
        start = time.perf_counter()
        self.model_runner.dummy_run(_PROFILE_TOKENS, num_reqs=2)
        logger.debug("profiling forward took %.2fs", time.perf_counter() - start)
        if self.config.cache.kv_cache_memory is not None:
            return self.config.cache.kv_cache_memory
        free = self.platform.free_memory_bytes()
        return int(max(0, free - self._activation_peak_bytes())
                   * self.config.cache.kv_cache_memory_fraction)

    def _activation_peak_bytes(self) -> int:
        """A generous estimate of one step's activations at the full token budget."""
        s = self.spec
        per_token = (4 * s.hidden_size + 3 * s.intermediate_size
                     + (s.num_attention_heads + 2 * s.num_key_value_heads) * s.head_dim)
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.config.scheduler.token_budget * per_token * element_size

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)
        logger.info("KV cache: %.2f GiB in %d blocks of %d tokens (resident from startup)",
                    num_blocks * self.kv_cache_bytes_per_block() / 2**30, num_blocks,
                    self.config.cache.block_size)

    def warm_up(self) -> None:
        """A decode-shaped step so the first real request does not pay for lazy init."""
        self.model_runner.dummy_run(num_tokens=8, num_reqs=8)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)
