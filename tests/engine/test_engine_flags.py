"""vLLM's engine options honoured by sluice's engine (issue 14, item 2), through the offline
`LLM` in-process on the tiny llama: --kv-cache-dtype, --dtype aliases,
--gpu-memory-utilization, --chat-template, and the start-up lines of the no-effect options."""

from __future__ import annotations

import logging

import pytest
import torch

from sluice import LLM, SamplingParams

MiB = 1 << 20
COMMON = dict(kv_cache_memory="16MiB", max_model_len=256, max_num_seqs=8)
PROMPTS = ["hello world this is", "the quick brown fox jumps over"]


def worker(llm: LLM):
    return llm.client.engine.executor.worker


def run(llm_dir, n_tokens=12, **kwargs):
    with LLM(str(llm_dir), **{**COMMON, **kwargs}) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=n_tokens, temperature=0,
                                                    prompt_logprobs=1), use_tqdm=False)
        caches = worker(llm).model_runner.kv_caches
        dtypes = {c.dtype for c in caches}
        tokens = [o.outputs[0].token_ids for o in outs]
        prompt_lp = [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]
                     for o in outs]
    return dtypes, tokens, prompt_lp


def test_kv_cache_dtype_stores_the_cache_in_that_dtype(llama_dir):
    f32_dtypes, f32_tokens, f32_lp = run(llama_dir, kv_cache_dtype="float32")
    bf_dtypes, bf_tokens, bf_lp = run(llama_dir, kv_cache_dtype="bfloat16")
    ref_dtypes, ref_tokens, _ = run(llama_dir, kv_cache_dtype="bfloat16", kernels="torch")
    assert f32_dtypes == {torch.float32} and bf_dtypes == {torch.bfloat16} == ref_dtypes
    # the bf16 cache really changes the numbers, a little ...
    flat32 = torch.tensor([x for row in f32_lp for x in row])
    flatbf = torch.tensor([x for row in bf_lp for x in row])
    assert not torch.equal(flat32, flatbf)
    torch.testing.assert_close(flatbf, flat32, rtol=0, atol=0.05)
    # ... greedy output is unchanged on this model, and the fast kernels (which read float32
    # caches only) give the pure-torch path's tokens over the same bf16 cache
    assert bf_tokens == f32_tokens
    assert bf_tokens == ref_tokens


def test_kv_cache_dtype_auto_follows_the_model_dtype(llama_dir):
    """'auto' stores the weights' dtype: bfloat16 for --dtype bfloat16, float16 for --dtype
    half, with the C++ kernels (which read both, over float32 activations) and under
    --kernels torch."""
    for dtype, kernels, expected in (("bfloat16", "auto", torch.bfloat16),
                                     ("half", "auto", torch.float16),
                                     ("half", "torch", torch.float16)):
        dtypes, tokens, _ = run(llama_dir, n_tokens=4, dtype=dtype, kernels=kernels)
        assert dtypes == {expected}, (dtype, kernels)
        assert all(len(t) == 4 for t in tokens)


@pytest.mark.parametrize("name,dtype", [("float", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("half", torch.float16)])
def test_dtype_aliases_run(llama_dir, name, dtype):
    with LLM(str(llama_dir), dtype=name, **COMMON) as llm:
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0),
                           use_tqdm=False)
        model = worker(llm).model_runner.model
        # the matrices (projections, embedding) are stored in `dtype`; on CPU 16-bit weights
        # compute over float32 activations, so the norms' vectors stay in the compute dtype
        assert {p.dtype for p in model.parameters() if p.dim() == 2} == {dtype}
        assert {p.dtype for p in model.parameters() if p.dim() == 1} == {
            worker(llm).model_runner.compute_dtype}
    assert len(out[0].outputs[0].token_ids) == 4


def test_gpu_memory_utilization_budgets_weights_activations_and_kv(llama_dir, monkeypatch):
    """KV bytes = u x memory at start - the model's tensors - the activation peak, and the
    engine's block count follows; --kv-cache-memory wins; a budget the weights fill is a
    clear error."""
    from sluice.platform.cpu import CpuPlatform
    from sluice.worker.worker import Worker
    monkeypatch.setattr(CpuPlatform, "memory_for_utilization", lambda self: 256 * MiB)
    seen = []
    real = Worker.determine_available_kv_memory

    def spy(self):
        kv = real(self)
        seen.append((kv, self.model_runner.model_memory_bytes(), self._activation_peak_bytes(),
                     self.kv_cache_bytes_per_block()))
        return kv

    monkeypatch.setattr(Worker, "determine_available_kv_memory", spy)
    blocks = []
    for u in (0.08, 0.12):
        with LLM(str(llama_dir), gpu_memory_utilization=u, max_model_len=256,
                 max_num_seqs=256) as llm:
            kv, weights, activations, per_block = seen.pop()
            assert weights > 0 and activations > 0
            assert kv == int(256 * MiB * u) - weights - activations
            assert llm.client.ready.num_kv_blocks == kv // per_block
            blocks.append(kv // per_block)
    assert blocks[1] - blocks[0] == pytest.approx(0.04 * 256 * MiB / per_block, abs=1)

    with LLM(str(llama_dir), gpu_memory_utilization=0.08, kv_cache_memory="1MiB",
             max_model_len=256) as llm:
        assert seen.pop()[0] == MiB
    with pytest.raises(Exception, match="--gpu-memory-utilization: 0.01 of 0.25 GiB"):
        LLM(str(llama_dir), gpu_memory_utilization=0.01, max_model_len=256)


def test_chat_template_option_and_per_call_template(llama_dir, tmp_path, caplog):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    messages = [{"role": "user", "content": "hi there"}]
    params = SamplingParams(max_tokens=2, temperature=0)
    with caplog.at_level(logging.INFO, logger="sluice"):
        llm = LLM(str(llama_dir), chat_template=str(template), enforce_eager=True,
                  swap_space=4, trust_remote_code=True, **COMMON)
    with llm:
        assert llm.chat(messages, params, use_tqdm=False)[0].prompt == "<<hi there>>"
        inline = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
        assert llm.chat(messages, params, use_tqdm=False,
                        chat_template=inline)[0].prompt == "[hi there]"
    # the options with no effect on this device: one start-up line each, saying why
    lines = [r.getMessage() for r in caplog.records]
    for start in ("--enforce-eager has no effect on cpu", "--swap-space 4 has no effect on cpu",
                  "--trust-remote-code has no effect"):
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)


@pytest.mark.parametrize("name,dtype", [("fp8", torch.float8_e4m3fn),
                                        ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_kv_cache(llama_dir, name, dtype):
    """`--kv-cache-dtype fp8` / `fp8_e5m2` (vLLM's names) store the cache in one byte per
    value (twice the blocks of a bf16 cache in the same memory), and the model still computes
    what it does over a float32 cache, within the format's rounding; the fused C++ decode path
    and the pure-torch path read it alike."""
    f32_dtypes, f32_tokens, f32_lp = run(llama_dir, kv_cache_dtype="float32")
    fp8_dtypes, fp8_tokens, fp8_lp = run(llama_dir, kv_cache_dtype=name)
    ref_dtypes, ref_tokens, ref_lp = run(llama_dir, kv_cache_dtype=name, kernels="torch")
    assert fp8_dtypes == {dtype} == ref_dtypes
    flat32 = torch.tensor([x for row in f32_lp for x in row])
    flat8 = torch.tensor([x for row in fp8_lp for x in row])
    assert not torch.equal(flat32, flat8)
    torch.testing.assert_close(flat8, flat32, rtol=0, atol=0.25)
    torch.testing.assert_close(flat8, torch.tensor([x for row in ref_lp for x in row]),
                               rtol=0, atol=1e-3)
    assert fp8_tokens == ref_tokens
    many_seqs = {**COMMON, "max_num_seqs": 1024}   # blocks bounded by memory, not requests
    with LLM(str(llama_dir), kv_cache_dtype="bfloat16", **many_seqs) as llm:
        bf16_blocks = worker(llm).model_runner.num_kv_blocks
    with LLM(str(llama_dir), kv_cache_dtype=name, **many_seqs) as llm:
        assert worker(llm).model_runner.num_kv_blocks in (2 * bf16_blocks - 1, 2 * bf16_blocks)
