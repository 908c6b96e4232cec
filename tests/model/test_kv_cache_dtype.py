"""A KV cache stored in another dtype than the model's (`--kv-cache-dtype`): the attention
backends write k/v in the cache's dtype and attend over exactly the values it holds; the C++
kernels and the fused decode stack read float32, bfloat16, float16 and fp8 caches
(`KERNEL_CACHE_DTYPES`). A GGUF file's default mode stores float16, as llama.cpp."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sluice.model.attention.backends.cpu_paged import KERNEL_CACHE_DTYPES, CpuPagedBackend
from sluice.model.attention.backends.torch_paged import TorchPagedBackend
from sluice.model.attention.forward_context import set_forward_context
from sluice.model.attention.kv_cache import (FP8_KV_DTYPES, SATURATED_KV_DTYPES, cache_bytes,
                                             to_cache_dtype)
from sluice.model.attention.metadata import build_attention_metadata

from _sluice_model_helpers import (bf16_product_oracle, bf16_product_rows,
                                   run_tests_in_kernel_build)

BLOCK = 16


def _step(query_lens: list[int], seq_lens: list[int], num_blocks: int):
    rng = np.random.default_rng(0)
    free = rng.permutation(np.arange(1, num_blocks))
    max_blocks = max(-(-s // BLOCK) for s in seq_lens)
    table = np.zeros((len(seq_lens), max_blocks), dtype=np.int32)
    slots, used = [], 0
    for r, (q, s) in enumerate(zip(query_lens, seq_lens)):
        n = -(-s // BLOCK)
        table[r, :n] = free[used:used + n]
        used += n
        slots += [int(table[r, p // BLOCK]) * BLOCK + p % BLOCK for p in range(s - q, s)]
    qsl = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int64)
    return build_attention_metadata(qsl, np.asarray(seq_lens, dtype=np.int64), table,
                                    np.asarray(slots, dtype=np.int64), BLOCK,
                                    torch.device("cpu"))


# decodes, a fresh prompt (no gather: this step's k/v) and a chunk after earlier context
QUERY_LENS = [1, 1, 1, 40, 25]
SEQ_LENS = [7, 33, 130, 40, 90]


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                         torch.float8_e5m2],
                         ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("backend", ["torch_paged", "cpu_paged"])
@pytest.mark.parametrize("head_dim", [32, 64])   # 64: the kernels' compile-time D / 16
def test_low_precision_cache_equals_float32_cache_of_rounded_values(cache_dtype, backend,
                                                                    head_dim, request):
    """Attention over a bf16/fp16/fp8 cache == attention over a float32 cache holding the same
    (rounded) numbers, with this step's k/v rounded the same way; the cache keeps its dtype
    and holds k/v rounded to it (fp16 and fp8: saturated to their range; fp8 as vLLM's scale-1
    cache)."""
    if backend == "cpu_paged":
        impl = CpuPagedBackend(request.getfixturevalue("cpu_ops"))
    else:
        impl = TorchPagedBackend()
    torch.manual_seed(0)
    md = _step(QUERY_LENS, SEQ_LENS, 40)
    tokens = sum(QUERY_LENS)
    q, k, v = torch.randn(tokens, 8, head_dim), torch.randn(tokens, 2, head_dim), \
        torch.randn(tokens, 2, head_dim)
    low = torch.randn(2, 40, BLOCK, 2, head_dim).to(cache_dtype)
    if cache_dtype == torch.float16:   # past float16's range (saturated), its subnormals
        k[-1, 0, :4] = torch.tensor([1e6, -65520.0, 3e-6, -1e-7])
        v[-1, 1, :4] = torch.tensor([-6e4, 2.0 ** -24 * 1.5, 1e-6, -2.0 ** -25])
    if cache_dtype.itemsize == 1:
        # values past fp8's range (saturated) and fp8 subnormals written ...
        k[-1, 0, :4] = torch.tensor([1e6, -1e6, 3e-3, -1e-9])
        v[-1, 1, :4] = torch.tensor([-7e4, 7e4, 1e-3, 2e-5])
        # ... and every fp8 value but NaN, subnormals included, already in the cache
        codes = torch.arange(256, dtype=torch.uint8).view(cache_dtype)
        codes = codes[~codes.float().isnan()]
        low.view(-1)[:codes.numel()] = codes
    low[:, 0] = 0
    ref_cache = low.float()
    rounded = [to_cache_dtype(x, cache_dtype).float() for x in (k, v)]
    assert rounded[0].isfinite().all() and rounded[1].isfinite().all()
    expected = TorchPagedBackend().forward(q, *rounded, ref_cache, md, 0.2)
    got = impl.forward(q, k, v, low, md, 0.2)
    assert low.dtype == cache_dtype and got.dtype == torch.float32
    # the 40-token prompt over a bf16 cache multiplies in bf16 on AVX512-BF16 (see
    # test_cpu_paged_backend's bf16 test for the bound); every other row is exact
    bf16_rows = (bf16_product_rows(impl.kernel, cache_dtype, head_dim, QUERY_LENS)
                 if backend == "cpu_paged" else torch.zeros(tokens, dtype=torch.bool))
    torch.testing.assert_close(got[~bf16_rows], expected[~bf16_rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        got[bf16_rows], bf16_product_oracle(q, *rounded, ref_cache, md, 0.2)[bf16_rows],
        rtol=0, atol=2.0 ** -9 * ref_cache[1].abs().max().item() + 1e-5)
    torch.testing.assert_close(low.float(), ref_cache, rtol=0, atol=0)  # same values written
    slot = int(md.slot_mapping[-1])
    assert torch.equal(cache_bytes(low.view(2, -1, 2, head_dim)[0, slot]),
                       cache_bytes(to_cache_dtype(k[-1], cache_dtype)))
    if backend == "cpu_paged" and cache_dtype in KERNEL_CACHE_DTYPES:
        # the kernels read a bf16 / fp8 cache themselves (rows widened exactly): bit for bit their
        # result over a float32 cache of the same values (but for the bf16 products' rows)
        again = low.clone()
        over_float32 = impl.forward(q, *rounded, ref_cache.clone(), md, 0.2)
        torch.testing.assert_close(impl.forward(q, k, v, again, md, 0.2)[~bf16_rows],
                                   over_float32[~bf16_rows], rtol=0, atol=0)


@pytest.mark.parametrize("cache_dtype", KERNEL_CACHE_DTYPES,
                         ids=lambda dtype: str(dtype).removeprefix("torch."))
def test_cpp_cache_writes_narrow_as_torch(cpu_ops, cache_dtype):
    """The C++ cache writes (`store_kv_rows`, the fused decode stack's) store the bits
    `to_cache_dtype` stores, ties, overflow (saturated for float16 and fp8), subnormals,
    signed zeros and NaN (sign included) too, at every position of the vector loops and their
    tails."""
    torch.manual_seed(0)
    special = torch.tensor([65504.0, 65519.0, 65520.0, -1e6, 2.0 ** -24 * 1.5, 2.0 ** -25,
                            -2.0 ** -26, 1e-40, float("inf"), -float("inf"), float("nan"),
                            -float("nan"), 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                            1.0 + 2.0 ** -8, 448.0, 500.0, -6e4, 0.0, -0.0])
    src = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-8, 6, (1000,)), special,
                     torch.randn(7)])
    for n in (src.numel(), 23, 9, 1):
        x = src[-n:].contiguous()
        if cache_dtype in FP8_KV_DTYPES:   # torch casts NaN to fp8 NaN; writes never hold NaN
            x = torch.nan_to_num(x, nan=0.0, posinf=1e9, neginf=-1e9)
        got = torch.empty(x.shape, dtype=cache_dtype)
        cpu_ops.store_kv_rows(got, x)
        expected = to_cache_dtype(x, cache_dtype)
        if cache_dtype in SATURATED_KV_DTYPES:   # +-inf and overflows stored as the largest value
            assert not expected.float().isinf().any()
        # NaN stays NaN; its bits are torch's too but for bf16 (torch's vectorised bf16 cast
        # stores another NaN pattern than c10's 0x7FC0, which the C++ writes store)
        nan = expected.float().isnan() if cache_dtype == torch.bfloat16 \
            else torch.zeros(x.shape, dtype=torch.bool)
        assert torch.equal(got.float().isnan(), expected.float().isnan()), n
        assert torch.equal(got[~nan].view(torch.uint8), expected[~nan].view(torch.uint8)), n


def test_fused_decode_takes_the_caches_the_kernels_read():
    from sluice.model.fused_decode import FusedDecode
    md = _step([1, 1], [5, 9], 4)
    hidden = torch.randn(2, 64)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                      torch.float8_e5m2):
            with set_forward_context(md, [torch.zeros(2, 4, BLOCK, 2, 32, dtype=dtype)]):
                assert FusedDecode.applies(hidden) == (dtype in KERNEL_CACHE_DTYPES)


@pytest.mark.parametrize("variant", ["x86_64_v3", "x86_64_v4"])
def test_each_kernel_build_reads_fp8_and_fp16_caches_exactly(variant):
    """The 16- and 8-bit caches' widening and the float16 narrowing have an AVX-512 and an F16C
    (x86-64-v3) form: each build the CPU runs passes the cache tests above (kernels over a
    bf16 / fp16 / fp8 cache == over a float32 cache of the same values, bit for bit; the C++
    cache writes round as torch), loaded in a fresh process ('float16' also selects
    bfloat16)."""
    run_tests_in_kernel_build(variant, __file__, "cpu_paged and (float8 or float16) or narrow",
                              passed=13)


MAX_SMOLLM2_FP8_PPL_INCREASE = 0.015
"""SmolLM2 over an fp8_e4m3 (`fp8`) cache: held-out perplexity at most 1.5% above the float32
cache's (measured +0.63% here in decode-sized steps, +0.76% with whole prompts: RESULTS)."""

MAX_SMOLLM2_FP16_PPL_CHANGE = 0.004
"""SmolLM2 over a float16 cache (its GGUF file's default, as llama.cpp's): held-out perplexity
within 0.4% of the float32 cache's (measured +0.13% here, a bfloat16 cache +0.26%: RESULTS)."""


def test_smollm2_gguf_cache_dtypes_perplexity(cpu_ops, smollm2_gguf, caplog):
    """The real model's file in its default mode (Q4_1 blocks, int8 activations), one request
    and at most 8 tokens per step, so every forward is the fused decode stack over the cache:
    `--kv-cache-dtype auto` is float16 (llama.cpp's K/V type; the same perplexity as an
    explicit float16, bit for bit), within MAX_SMOLLM2_FP16_PPL_CHANGE of float32; fp8 within
    MAX_SMOLLM2_FP8_PPL_INCREASE of float32."""
    from sluice.frontend.llm import LLM
    from sluice.testing.perplexity import engine_perplexity, heldout_prompts

    prompts = heldout_prompts(8)
    ppl = {}
    for kv in ("auto", "float16", "float32", "fp8"):
        caplog.clear()
        with caplog.at_level(logging.INFO), \
                LLM(str(smollm2_gguf), kv_cache_memory="64MiB", max_model_len=512,
                    max_num_batched_tokens=8, max_num_seqs=1, kv_cache_dtype=kv) as llm:
            ppl[kv] = engine_perplexity(llm, prompts)[0]
        # the log names the cache, and for auto why it is float16
        reason = "of float16 (auto: a GGUF file with int8 activations, llama.cpp's K/V type"
        assert (reason in caplog.text) == (kv == "auto"), caplog.text[-2000:]
    assert ppl["auto"] == ppl["float16"] != ppl["float32"], ppl
    assert abs(ppl["float16"] / ppl["float32"] - 1) <= MAX_SMOLLM2_FP16_PPL_CHANGE, ppl
    assert ppl["fp8"] != ppl["float32"]                    # the fp8 cache was read
    assert ppl["fp8"] <= ppl["float32"] * (1 + MAX_SMOLLM2_FP8_PPL_INCREASE), ppl
