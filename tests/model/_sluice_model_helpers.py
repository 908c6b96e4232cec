"""Test helpers: drive a model through the paged path the way the model runner will.

`PagedRunner` owns KV caches, a block allocator (optionally handing out blocks in random order,
so block tables are non-contiguous) and per-request token lists; `step()` runs one flattened
forward over any mix of requests and returns the logits of every scheduled token.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sluice.hf_config import load_model_spec
from sluice.model.attention import (allocate_kv_caches, build_attention_metadata,
                                    set_forward_context)
from sluice.model.loader import load_model


class PagedRunner:
    def __init__(self, model, num_blocks: int = 128, block_size: int = 16,
                 shuffle_seed: int | None = 0, cache_dtype: torch.dtype | None = None) -> None:
        """`cache_dtype`: the KV cache's (default: the model's dtype)."""
        self.model = model
        self.block_size = block_size
        dtype = cache_dtype or getattr(model, "dtype", None) or next(model.parameters()).dtype
        self.kv_caches = allocate_kv_caches(model.spec, num_blocks, block_size, dtype, "cpu")
        for cache in self.kv_caches:  # stale finite garbage in unused blocks must be masked
            garbage = torch.empty(cache[:, 1:].shape).uniform_(-1e3, 1e3)
            cache[:, 1:] = garbage.clamp(-400, 400) if cache.element_size() == 1 else garbage
        self.free = list(range(1, num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.free)
        self.tokens: dict[str, list[int]] = {}
        self.tables: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def add(self, req_id: str, token_ids: list[int]) -> None:
        self.tokens[req_id] = list(token_ids)
        self.tables[req_id] = []
        self.computed[req_id] = 0

    def extend(self, req_id: str, token_ids: list[int]) -> None:
        self.tokens[req_id].extend(token_ids)

    def step(self, schedule: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """Run (req_id, num_tokens) pairs as one batch; -> req_id: logits [num_tokens, vocab]."""
        bs = self.block_size
        input_ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
        for rid, n in schedule:
            start = self.computed[rid]
            end = start + n
            assert end <= len(self.tokens[rid])
            table = self.tables[rid]
            while len(table) * bs < end:
                table.append(self.free.pop())
            input_ids += self.tokens[rid][start:end]
            positions += list(range(start, end))
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
        max_blocks = max(len(self.tables[rid]) for rid, _ in schedule)
        block_table = np.zeros((len(schedule), max_blocks), dtype=np.int32)
        for i, (rid, _) in enumerate(schedule):
            block_table[i, :len(self.tables[rid])] = self.tables[rid]
        meta = build_attention_metadata(np.array(qsl, dtype=np.int32),
                                        np.array(seq_lens, dtype=np.int32), block_table,
                                        np.array(slots, dtype=np.int64), bs,
                                        torch.device("cpu"))
        with torch.inference_mode(), set_forward_context(meta, self.kv_caches):
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions))
            logits = self.model.compute_logits(hidden)
        out = {}
        for i, (rid, n) in enumerate(schedule):
            out[rid] = logits[qsl[i]:qsl[i + 1]]
            self.computed[rid] += n
        return out


def randomize_vectors(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy a single-file model dir, giving every 1-D tensor (norm weights, biases) random
    values: HF initialises them to ones/zeros, which would hide a skipped norm or bias."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(dst / "model.safetensors"))
    for name, t in tensors.items():
        if t.dim() == 1:
            noise = torch.rand(t.shape, generator=g) if name.endswith("norm.weight") \
                else torch.randn(t.shape, generator=g) * 0.2
            tensors[name] = (0.5 + noise if name.endswith("norm.weight") else noise).to(t.dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def load_ours(model_dir: Path, dtype: torch.dtype = torch.float32, **kwargs):
    spec = load_model_spec(model_dir)
    return load_model(spec, dtype, torch.device("cpu"), **kwargs)


def load_hf(model_dir: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """HF logits [len, vocab] for one unpadded sequence in a single forward."""
    with torch.inference_mode():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def _tp_rank_main(rank: int, tp_size: int, port: int, fn, args: tuple, results) -> None:
    """One spawned rank of `run_on_tp_ranks`: join the gloo TP group, run fn(*args)."""
    import traceback

    from sluice.distributed import parallel_state as ps
    torch.set_num_threads(1)
    ps.init_parallel_state(ps.ParallelLayout(tp_size=tp_size, rank=rank),
                           f"tcp://127.0.0.1:{port}", "gloo", timeout_s=60)
    try:
        results[rank] = fn(*args)
    except BaseException:
        results[rank] = traceback.format_exc()
        raise
    finally:
        ps.destroy_parallel_state()


def run_on_tp_ranks(fn, args: tuple, tp_size: int = 2, local=None, timeout_s: float = 240):
    """Run `fn(*args)` on `tp_size` spawned processes forming one tensor-parallel group on gloo
    (one torch thread each); meanwhile run `local()` here (e.g. the TP=1 reference). `fn` must
    be importable (module level). Returns (the ranks' results in rank order, local's result);
    fails the test with a rank's traceback if one failed or did not finish."""
    import torch.multiprocessing as mp

    from sluice.platform.host import free_ports
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = free_ports("127.0.0.1")[0]
    procs = [ctx.Process(target=_tp_rank_main, args=(r, tp_size, port, fn, args, results))
             for r in range(tp_size)]
    for p in procs:
        p.start()
    here = local() if local is not None else None
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    got = dict(results)
    for r in range(tp_size):
        assert not isinstance(got.get(r), (str, type(None))), f"rank {r} failed:\n{got.get(r)}"
    assert [p.exitcode for p in procs] == [0] * tp_size
    return [got[r] for r in range(tp_size)], here


def run_tests_in_kernel_build(variant: str, test_file: str, select: str, passed: int) -> None:
    """Run `pytest test_file -k select` in a fresh process that loads the prebuilt `variant`
    kernel build (SLUICE_CPU_KERNELS; checked first, in its own process) and assert that
    `passed` tests passed; skip where this install has no such build or this CPU cannot run
    it. For kernels with one form per instruction set."""
    import os
    import subprocess
    import sys

    from sluice.platform import cpu_kernels as K
    info = K.read_build_info()
    if info is None or variant not in info["variants"]:
        pytest.skip(f"no prebuilt {variant} module here")
    if not K.VARIANTS[variant]["requires"] <= K.cpu_flags():
        pytest.skip(f"this CPU cannot run {variant}")
    env = dict(os.environ, SLUICE_CPU_KERNELS=variant)
    loaded = subprocess.run(
        [sys.executable, "-c", "from sluice.model import cpu_ops; cpu_ops.load_cpu_ops(); "
         "print(cpu_ops.kernels_info()['variant'])"], capture_output=True, text=True,
        timeout=120, env=env)
    assert loaded.stdout.strip() == variant, loaded.stdout + loaded.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
         "-k", select], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{passed} passed" in result.stdout, result.stdout[-500:]



def bf16_product_rows(kernel, cache_dtype: torch.dtype, head_dim: int,
                      query_lens: list[int]) -> torch.Tensor:
    """Bool mask over a step's token rows: True where `CpuPagedBackend`'s prefill kernel
    multiplies in bf16 (a bf16 cache, AVX512-BF16 here, requests of at least
    `prefill_bf16_min_queries()` query tokens); elsewhere its products are float32."""
    on = (cache_dtype == torch.bfloat16 and kernel.prefill_bf16_products_available(head_dim))
    minimum = kernel.prefill_bf16_min_queries()
    return torch.tensor([on and q >= minimum for q in query_lens for _ in range(q)])


def bf16_product_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: torch.Tensor, metadata, scale: float) -> torch.Tensor:
    """The torch backend's attention over a float32 `cache` with bf16(q * scale) as queries
    (scale 1): the bf16 products' one rounding besides p's. `k`, `v` and `cache` already hold
    bf16 values. The kernel's p = bf16(e^(s - m)) moves each output by at most 2^-9 max |v|
    from this (|bf16(p) - p| <= 2^-9 p, and the weights sum to 1)."""
    from sluice.model.attention.backends.torch_paged import TorchPagedBackend
    rounded_q = (q * scale).to(torch.bfloat16).float()
    return TorchPagedBackend().forward(rounded_q, k, v, cache, metadata, 1.0)
