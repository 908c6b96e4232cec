"""Tensor parallelism in the model: TP=2 on gloo against TP=1, for every architecture.

Two spawned ranks (one thread each) join a TP=2 world and run, per tiny fp32 model, a batched
prefill of two prompts and three greedy decode steps on the paged KV cache; the test process
runs the same at TP=1 meanwhile. Logits agree within 1e-4 (the TP sum of two partial GEMMs only
reorders float32 additions: ~1e-6 here) and greedy tokens are identical. The cases cover
llama (KV heads split), qwen2 (q/k/v bias, tied embeddings), qwen3 (q/k norm, a single KV head
so it is replicated on both ranks), mistral (single KV head, tied, with the C++ layer ops and
paged kernel: packed GEMMs per shard, fused decode and greedy screen stepping aside); the qwen
and mistral vocabularies (1999) do not divide by 2, so the vocab is padded.

The ranks also run a `ModelRunner` with a random-sampling and a greedy request: only the
driver samples (rank 1 has no sampler at all) and both ranks end with the same tokens.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from _sluice_model_helpers import randomize_vectors, run_on_tp_ranks
from sluice.errors import ConfigError
from sluice.model_spec.parallel_check import check_tensor_parallel, padded_vocab_size
from sluice.testing.tiny_models import TinyModelSpec

TP = 2
ATOL = dict(atol=1e-4, rtol=0.0)
PROMPT_LENS = (7, 19)
DECODE_STEPS = 3
BLOCK_SIZE = 16

# name -> (TinyModelSpec, layer_ops, attention backend)
CASES = {
    "llama": (TinyModelSpec(architecture="LlamaForCausalLM"), "torch", None),
    "qwen2_tied_bias": (TinyModelSpec(architecture="Qwen2ForCausalLM", vocab_size=1999,
                                      tie_word_embeddings=True), "torch", None),
    "qwen3_one_kv_head": (TinyModelSpec(architecture="Qwen3ForCausalLM", vocab_size=1999,
                                        num_key_value_heads=1, extra={"head_dim": 16}),
                          "torch", None),
    "mistral_one_kv_head_cpu_ops": (TinyModelSpec(architecture="MistralForCausalLM",
                                                  vocab_size=1999, num_key_value_heads=1,
                                                  tie_word_embeddings=True),
                                    "cpu", "cpu_paged"),
}


@pytest.fixture(scope="module")
def case_dirs(tiny_model_factory, tmp_path_factory):
    """name -> model dir (norm weights and biases randomised, so a skipped one would show)."""
    out = {}
    for name, (spec, _, _) in CASES.items():
        src = tiny_model_factory(f"tp_{name}", spec)
        out[name] = str(randomize_vectors(src, tmp_path_factory.mktemp("tp") / name))
    return out


# ---- what every rank (and the TP=1 reference) runs --------------------------------------------

def run_greedy(model_dir: str, layer_ops: str, attn_backend: str | None,
               quantization: str | None = None,
               cache_dtype: torch.dtype = torch.float32) -> dict:
    """Prefill two prompts in one batch, then DECODE_STEPS greedy decode steps (the model loaded
    with `quantization`, the KV cache in `cache_dtype`). Returns the logits of every step (None
    off the driver), the tokens, and facts about the built model."""
    from sluice.distributed.parallel_state import get_tp_group
    from sluice.hf_config import load_model_spec
    from sluice.model.attention import (allocate_kv_caches, build_attention_metadata,
                                        set_forward_context)
    from sluice.model.layers.linear import LazyTensor
    from sluice.model.loader import load_model

    tp = get_tp_group()
    spec = load_model_spec(model_dir)
    whole_reads = []   # 2-D checkpoint tensors read whole (every one is sharded under TP)
    real_materialize = LazyTensor.materialize

    def materialize(self):
        if self.dim() == 2:
            whole_reads.append(tuple(self.shape))
        return real_materialize(self)

    LazyTensor.materialize = materialize
    try:
        model = load_model(spec, torch.float32, "cpu", layer_ops=layer_ops,
                           attn_backend=attn_backend, quantization=quantization)
    finally:
        LazyTensor.materialize = real_materialize
    kv = allocate_kv_caches(spec, 16, BLOCK_SIZE, cache_dtype, "cpu", tp_size=tp.size)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(4, spec.vocab_size, (n,), generator=g).tolist()
              for n in PROMPT_LENS]
    tables = [[1 + 2 * r, 2 + 2 * r] for r in range(len(tokens))]
    computed = [0] * len(tokens)
    step_logits = []
    for step in range(1 + DECODE_STEPS):
        ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
        for r, toks in enumerate(tokens):
            start, end = computed[r], len(toks)
            ids += toks[start:end]
            pos += list(range(start, end))
            slots += [tables[r][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                      for p in range(start, end)]
            qsl.append(qsl[-1] + end - start)
            seq_lens.append(end)
            computed[r] = end
        meta = build_attention_metadata(np.array(qsl, dtype=np.int32),
                                        np.array(seq_lens, dtype=np.int32),
                                        np.array(tables, dtype=np.int32),
                                        np.array(slots, dtype=np.int64), BLOCK_SIZE,
                                        torch.device("cpu"))
        with torch.inference_mode(), set_forward_context(meta, kv):
            hidden = model(torch.tensor(ids), torch.tensor(pos))
            logits = model.compute_logits(hidden)
        step_logits.append(logits)
        # the driver picks the greedy tokens and broadcasts them, as the model runner does
        last = torch.tensor(qsl[1:]) - 1
        picked = (logits[last].argmax(-1) if logits is not None
                  else torch.empty(len(tokens), dtype=torch.long))
        picked = tp.broadcast(picked.contiguous(), src=0)
        for r, t in enumerate(picked.tolist()):
            tokens[r].append(t)
    attn = model.model.layers[0].self_attn
    return {"logits": step_logits, "tokens": tokens, "whole_reads": whole_reads,
            "local_heads": (attn.attn.num_heads, attn.attn.num_kv_heads),
            "kv_cache_heads": kv[0].shape[3],
            "vocab_rows": model.model.embed_tokens.weight.shape[0],
            "fused_decode": model.model.fused_decode is not None,
            "greedy_screen": model.lm_head.greedy is not None}


def run_model_runner(model_dir: str) -> dict:
    """A ModelRunner over 4 steps: request 'rand' samples at temperature 1 (unseeded), 'greedy'
    is greedy with prompt logprobs. Off the driver the sampler is removed: it must not sample."""
    from sluice.config_sources import build_engine_config
    from sluice.distributed.parallel_state import get_tp_group
    from sluice.hf_config import load_model_spec
    from sluice.sampling_params import SamplingParams
    from sluice.step import CachedRequestData, NewRequestData, SchedulerOutput
    from sluice.worker.model_runner import ModelRunner

    config = build_engine_config(overrides={"model": model_dir, "kv_cache_memory": "16MiB",
                                            "max_model_len": 64, "max_num_seqs": 4,
                                            "block_size": BLOCK_SIZE})
    runner = ModelRunner(config, load_model_spec(model_dir), torch.device("cpu"),
                         torch.float32, 64)
    runner.load_model()
    runner.initialize_kv_cache(8)
    if get_tp_group().rank != 0:
        runner.sampler = None
    params = {"rand": SamplingParams(temperature=1.0, max_tokens=8),
              "greedy": SamplingParams(temperature=0.0, prompt_logprobs=2, max_tokens=8)}
    prompts = {"rand": [5, 9, 13, 200, 7], "greedy": [11, 3, 70, 8, 21, 99, 4]}
    new = [NewRequestData(rid, prompts[rid], len(prompts[rid]), params[rid],
                          [1 + 2 * i, 2 + 2 * i], 0) for i, rid in enumerate(prompts)]
    outputs = [runner.step(SchedulerOutput(
        scheduled_new_reqs=new, num_scheduled_tokens={r: len(p) for r, p in prompts.items()},
        total_num_scheduled_tokens=sum(map(len, prompts.values()))))]
    for _ in range(3):
        cached = [CachedRequestData(rid, [], runner.requests[rid].num_computed_tokens)
                  for rid in prompts]
        outputs.append(runner.step(SchedulerOutput(
            scheduled_cached_reqs=cached, num_scheduled_tokens={r: 1 for r in prompts},
            total_num_scheduled_tokens=len(prompts))))
    return {"tokens": {rid: runner.requests[rid].token_ids for rid in prompts},
            "sampled": [o.sampled_token_ids for o in outputs],
            "prompt_logprobs": len(outputs[0].prompt_logprobs.get("greedy", []))}


def _rank_run(cases: dict) -> dict:
    """What each TP rank (and the TP=1 reference) computes: every case's greedy run, and the
    model runner's steps on the llama case."""
    out = {name: run_greedy(*args) for name, args in cases.items()}
    out["runner"] = run_model_runner(cases["llama"][0])
    return out


@pytest.mark.timeout(300)
def test_tp2_matches_tp1_for_every_architecture(case_dirs):
    cases = {name: (case_dirs[name], ops, backend)
             for name, (_, ops, backend) in CASES.items()}
    torch.set_num_threads(1)
    got, want = run_on_tp_ranks(_rank_run, (cases,), tp_size=TP, local=lambda: _rank_run(cases))
    want_runner = want["runner"]
    for name, (spec, ops, _) in CASES.items():
        ref, r0, r1 = want[name], got[0][name], got[1][name]
        for step, (a, b) in enumerate(zip(r0["logits"], ref["logits"])):
            assert a.shape == b.shape, (name, step)
            torch.testing.assert_close(a, b, **ATOL, msg=lambda m: f"{name} step {step}: {m}")
        assert all(x is None for x in r1["logits"]), "logits are gathered to tp rank 0 only"
        assert r0["tokens"] == ref["tokens"] == r1["tokens"], name
        # each rank holds its heads (a single KV head is replicated) and its vocab rows
        h, kvh = spec.num_attention_heads, spec.num_key_value_heads
        local = (h // TP, max(1, kvh // TP))
        assert r0["local_heads"] == r1["local_heads"] == local, name
        assert r0["kv_cache_heads"] == local[1] and ref["kv_cache_heads"] == kvh, name
        assert r0["vocab_rows"] == padded_vocab_size(spec.vocab_size, TP) // TP, name
        assert ref["vocab_rows"] == spec.vocab_size, name
        # sharded 2-D weights are read as slices of the memory-mapped checkpoint
        assert r0["whole_reads"] == [] and r1["whole_reads"] == [], name
        # the fast paths that need one rank step aside
        assert not r0["fused_decode"] and not r0["greedy_screen"], name
    assert want["mistral_one_kv_head_cpu_ops"]["fused_decode"] or \
        not _cpu_ops_available(), "the TP=1 reference should use the fused decode stack"

    r0, r1 = got[0]["runner"], got[1]["runner"]
    assert r0["tokens"] == r1["tokens"], "ranks must hold identical per-request state"
    assert r0["sampled"] == r1["sampled"]
    assert r0["tokens"]["greedy"] == want_runner["tokens"]["greedy"]
    assert all(len(r0["sampled"][i][rid]) == 1 for i in range(4) for rid in ("rand", "greedy"))
    assert r0["prompt_logprobs"] == want_runner["prompt_logprobs"] == 6
    assert r1["prompt_logprobs"] == 0, "only the driver computes prompt logprobs"


def _cpu_ops_available() -> bool:
    from sluice.model.cpu_ops import load_cpu_ops
    return load_cpu_ops() is not None


@pytest.mark.parametrize("heads,kv_heads,tp,named", [
    (4, 2, 3, "num_attention_heads (4)"),
    (6, 6, 4, "num_attention_heads (6)"),
    (12, 4, 6, "num_key_value_heads (4)"),    # tp > KV heads but not a multiple of them
    (4, 4, 8, "num_attention_heads (4)"),
])
def test_tp_that_does_not_split_the_heads_is_refused(heads, kv_heads, tp, named):
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(_spec(heads, kv_heads), tp)
    msg = str(e.value)
    assert f"--tensor-parallel-size {tp}" in msg and named in msg, msg


@pytest.mark.parametrize("heads,kv_heads,tp", [(4, 2, 2), (4, 2, 4), (12, 3, 6), (8, 1, 8),
                                               (4, 4, 1)])
def test_tp_that_splits_or_replicates_the_heads_is_accepted(heads, kv_heads, tp):
    check_tensor_parallel(_spec(heads, kv_heads), tp)


def _spec(heads: int, kv_heads: int):
    from sluice.hf_config import ModelSpec, RopeSpec
    return ModelSpec(path="m", architecture="LlamaForCausalLM", model_type="llama",
                     vocab_size=100, hidden_size=heads * 8, intermediate_size=48,
                     num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, rope=RopeSpec(),
                     tie_word_embeddings=False, attention_bias=False, qk_norm=False,
                     hidden_act="silu", torch_dtype=None, eos_token_ids=(0,), bos_token_id=0)
