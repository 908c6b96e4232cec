"""The C++ decode and prefill kernels (cpu_paged) against the pure-torch paged backend, the
oracle (over a bf16 cache with AVX512-BF16, prompts multiply in bf16: against the oracle with
the same roundings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sluice.model.attention.backends.cpu_paged import CpuPagedBackend
from sluice.model.attention.backends.torch_paged import TorchPagedBackend
from sluice.model.attention.metadata import build_attention_metadata

from _sluice_model_helpers import bf16_product_oracle, bf16_product_rows

BLOCK = 16


def _random_step(rng: np.random.Generator, query_lens: list[int], seq_lens: list[int],
                 num_blocks: int):
    """Metadata for requests with scattered (non-contiguous, shuffled) blocks."""
    free = rng.permutation(np.arange(1, num_blocks))
    max_blocks = max(-(-s // BLOCK) for s in seq_lens)
    table = np.zeros((len(seq_lens), max_blocks), dtype=np.int32)
    slots, used = [], 0
    for r, (q, s) in enumerate(zip(query_lens, seq_lens)):
        n = -(-s // BLOCK)
        table[r, :n] = free[used:used + n]
        used += n
        for pos in range(s - q, s):
            slots.append(int(table[r, pos // BLOCK]) * BLOCK + pos % BLOCK)
    qsl = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int64)
    return build_attention_metadata(qsl, np.asarray(seq_lens, dtype=np.int64), table,
                                    np.asarray(slots, dtype=np.int64), BLOCK,
                                    torch.device("cpu"))


@pytest.fixture(scope="module")
def kernel(cpu_ops):
    return cpu_ops


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (4, 4, 32), (6, 2, 64),
                                                     (4, 1, 20), (2, 1, 8), (4, 2, 128),
                                                     (8, 2, 64), (3, 1, 128)])
@pytest.mark.parametrize("mix", ["decode", "mixed"])
def test_kernel_matches_torch_oracle(kernel, heads, kv_heads, head_dim, mix):
    rng = np.random.default_rng(heads * 100 + head_dim)
    num_blocks = 200
    seq_lens = [1, 7, 16, 17, 45, 130, 300]
    query_lens = [1] * len(seq_lens)
    if mix == "mixed":  # add prefill chunks, fresh and mid-prompt, between the decodes
        seq_lens += [40, 90]
        query_lens += [40, 25]
    metadata = _random_step(rng, query_lens, seq_lens, num_blocks)
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim)
    cache[:, 0] = 0  # the null block
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim)
    k = torch.randn(tokens, kv_heads, head_dim)
    v = torch.randn(tokens, kv_heads, head_dim)
    scale = head_dim ** -0.5
    expected = TorchPagedBackend().forward(q, k, v, cache.clone(), metadata, scale)
    got = CpuPagedBackend(kernel).forward(q, k, v, cache.clone(), metadata, scale)
    # fp32, same math in a different summation order: ~1e-6 relative
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_lens", [[1000], [700, 3, 64], list(range(5, 500, 20))],
                         ids=["one-long", "few", "many"])
def test_decode_split_and_unsplit_paths_match_oracle(kernel, seq_lens):
    """One kernel call over all requests (as the fused decode step makes it). Rows longer
    than one key chunk (128) split their keys into chunks merged by log-sum-exp (split-KV);
    shorter rows take one work item each. Both match torch."""
    rng = np.random.default_rng(len(seq_lens))
    num_blocks = 2 + sum(-(-s // BLOCK) for s in seq_lens)
    metadata = _random_step(rng, [1] * len(seq_lens), seq_lens, num_blocks)
    cache = torch.randn(2, num_blocks, BLOCK, 2, 32)
    n = len(seq_lens)
    q, k, v = torch.randn(n, 8, 32), torch.randn(n, 2, 32), torch.randn(n, 2, 32)
    expected = TorchPagedBackend().forward(q, k, v, cache, metadata, 0.2)  # writes k, v
    nb = -(-max(seq_lens) // BLOCK)
    got = torch.empty_like(q)
    kernel.paged_decode_attention(got, q, cache, metadata.block_table[:, :nb].long().reshape(-1),
                                  nb, metadata.seq_lens, 0.2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_row_does_not_depend_on_the_other_rows(kernel):
    """A row's result is bit-identical alone and in any batch (its key chunks follow its own
    length): speculative verification steps (several rows) then equal plain decode steps,
    which int8 activations would otherwise amplify into different tokens."""
    rng = np.random.default_rng(7)
    seq_lens = [1000, 3, 64, 129, 300, 2000]
    num_blocks = 2 + sum(-(-s // BLOCK) for s in seq_lens)
    metadata = _random_step(rng, [1] * len(seq_lens), seq_lens, num_blocks)
    cache = torch.randn(2, num_blocks, BLOCK, 2, 32)
    n = len(seq_lens)
    q = torch.randn(n, 8, 32)
    table = metadata.block_table.long()
    nb = table.shape[1]
    batch = torch.empty_like(q)
    kernel.paged_decode_attention(batch, q, cache, table.reshape(-1), nb, metadata.seq_lens, 0.2)
    for r in range(n):
        alone = torch.empty_like(q[r:r + 1])
        kernel.paged_decode_attention(alone, q[r:r + 1].contiguous(), cache,
                                      table[r].contiguous(), nb, metadata.seq_lens[r:r + 1], 0.2)
        assert torch.equal(alone[0], batch[r]), r


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (6, 3, 20)])
def test_prefill_kernel_over_many_tiles_matches_oracle(kernel, heads, kv_heads, head_dim):
    """Prompts long enough for several query tiles (32) and key chunks (128): a fresh 300-token
    prompt, a 200-token chunk after 150 cached tokens, a 2-token chunk, with decodes between."""
    rng = np.random.default_rng(head_dim)
    seq_lens, query_lens = [300, 9, 350, 40, 2], [300, 1, 200, 1, 2]
    metadata = _random_step(rng, query_lens, seq_lens, 80)
    cache = torch.randn(2, 80, BLOCK, kv_heads, head_dim)
    tokens = sum(query_lens)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim)
    q = qkv[:, :heads]                                    # strided rows, as the model gives
    k, v = qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    expected = TorchPagedBackend().forward(q, k, v, cache.clone(), metadata, 0.3)
    got = CpuPagedBackend(kernel).forward(q, k, v, cache.clone(), metadata, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 96), (8, 2, 128),
                                                     (2, 1, 32)])
def test_prefill_bf16_products_over_a_bf16_cache(kernel, heads, kv_heads, head_dim):
    """A bf16 cache with AVX512-BF16: requests of >= 32 query tokens (a fresh 300-token prompt,
    a 200-token chunk after 57 cached tokens, a fresh 33-token one whose first query sees one
    key) multiply bf16(q * scale) by the keys and bf16(p) by the values, float32 sums: within
    2^-9 max |v| of attention with q so rounded (`bf16_product_oracle`). The shorter ones (a
    31-token and a 2-token chunk, decodes) keep the float32 products: 1e-5 of the exact
    attention. Without AVX512-BF16 every row is the float32 products."""
    rng = np.random.default_rng(head_dim + heads)
    seq_lens, query_lens = [300, 9, 257, 33, 1, 100, 40], [300, 1, 200, 33, 1, 31, 2]
    metadata = _random_step(rng, query_lens, seq_lens, 120)
    cache = torch.randn(2, 120, BLOCK, kv_heads, head_dim).to(torch.bfloat16)
    cache[:, 0] = 0
    tokens = sum(query_lens)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim)
    q = qkv[:, :heads] * 2                                # peaked attention: indexing shows
    k, v = (x.to(torch.bfloat16).float() for x in (qkv[:, heads:heads + kv_heads],
                                                    qkv[:, heads + kv_heads:]))
    scale = head_dim ** -0.5
    got = CpuPagedBackend(kernel).forward(q, k, v, cache.clone(), metadata, scale)
    exact = TorchPagedBackend().forward(q, k, v, cache.float(), metadata, scale)
    rounded = bf16_product_oracle(q, k, v, cache.float(), metadata, scale)
    bf16_rows = bf16_product_rows(kernel, torch.bfloat16, head_dim, query_lens)
    assert bf16_rows.any() == kernel.prefill_bf16_products_available(head_dim)
    bound = 2.0 ** -9 * max(cache[1].float().abs().max(), v.abs().max()).item() + 1e-5
    torch.testing.assert_close(got[bf16_rows], rounded[bf16_rows], rtol=0, atol=bound)
    torch.testing.assert_close(got[~bf16_rows], exact[~bf16_rows], rtol=1e-5, atol=1e-5)
    if bf16_rows.any():   # the rounding is real: the exact attention is further off
        assert (got[bf16_rows] - exact[bf16_rows]).abs().max() > 1e-4


def test_kernel_ignores_stale_data_past_seq_len(kernel):
    """Slots after seq_len in a request's last block hold garbage; it must not leak in."""
    rng = np.random.default_rng(0)
    metadata = _random_step(rng, [1, 1], [5, 21], 16)
    cache = torch.randn(2, 16, BLOCK, 2, 16)
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    clean = CpuPagedBackend(kernel).forward(q, k, v, cache.clone(), metadata, 0.25)
    poisoned = cache.clone()
    table = metadata.block_table
    poisoned[:, int(table[0, 0]), 5:] = 1e30
    poisoned[:, int(table[1, 1]), 5:] = float("nan")
    assert torch.equal(CpuPagedBackend(kernel).forward(q, k, v, poisoned, metadata, 0.25),
                       clean)


def test_no_compiler_falls_back_to_the_torch_backend(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    from sluice.model import cpu_ops
    from sluice.model.attention.backends import cpu_paged

    def broken_build(*args, **kwargs):
        raise RuntimeError("Error building extension: c++ not found")

    monkeypatch.setenv("SLUICE_CPU_KERNELS", "jit")  # not the prebuilt module: build here
    monkeypatch.setattr(cpp_extension, "load", broken_build)
    module, info = cpu_ops._load()
    assert module is None and info["source"] == "none"
    assert "kernels unavailable" in caplog.text
    monkeypatch.setattr(cpu_ops, "load_cpu_ops", lambda: None)
    backend = cpu_paged.make_cpu_paged_backend()
    assert type(backend) is TorchPagedBackend
