"""Speculative decoding (n-gram proposer) end to end through the engine core: it never changes
what is generated. Greedy runs are token-identical to the same engine without speculation on
every architecture, with chunked prefill and with preemption forced; logprobs of the emitted
tokens equal the plain run's; penalties are applied at every draft position; and random
sampling keeps the target distribution (chi-square against HF's exact distribution).

Each greedy case also checks that drafts were proposed and some accepted, so speculation
really ran (a random tiny model's greedy output falls into loops the n-gram lookup finds)."""

from __future__ import annotations

import json

import pytest
import torch

from sluice.config_sources import build_engine_config
from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import run_engine_core

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "disable_by_batch_size": 1000}
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _engine(model_dir, speculative: dict | None = None, **overrides):
    from sluice.engine.core import EngineCore
    overrides.setdefault("kv_cache_memory", "32MiB")
    overrides.setdefault("max_model_len", 256)
    if speculative is not None:
        overrides["speculative_config"] = json.dumps(speculative)
    return EngineCore(build_engine_config(overrides={"model": str(model_dir), **overrides}))


def _prompts(vocab: int = 2048) -> list[list[int]]:
    """Prompts with repeated spans (copy-friendly) and plain random ones, mixed lengths."""
    g = torch.Generator().manual_seed(0)
    span = torch.randint(4, vocab, (9,), generator=g).tolist()
    return [span * 4,
            torch.randint(4, vocab, (5,), generator=g).tolist(),
            torch.randint(4, vocab, (37,), generator=g).tolist() + span + span[:4],
            [7, 8, 9] * 6,
            torch.randint(4, vocab, (60,), generator=g).tolist()]


def _both(model_dir, prompts, params, **overrides):
    plain = run_engine_core(_engine(model_dir, **overrides), prompts, params)
    spec = run_engine_core(_engine(model_dir, NGRAM, **overrides), prompts, params)
    return plain, spec


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM",
                                  "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_greedy_ngram_is_token_identical(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = _prompts()
    plain, spec = _both(model_dir, prompts, GREEDY)
    assert spec.tokens == plain.tokens
    assert all(len(t) == GREEDY.max_tokens for t in spec.tokens.values())
    assert spec.spec_draft_tokens > 0 and spec.spec_accepted_tokens > 0
    assert plain.spec_draft_tokens == 0


# The demo model is a bf16 checkpoint, which `--dtype auto` keeps in bf16 on a CPU with native
# bf16 products: there every product, plain decode step or verification, goes through oneDNN's
# bf16 GEMM (`half_linear`), and the tokens are identical too.
DEMO_DTYPES = ["float32", "auto"]


@pytest.mark.parametrize("dtype", DEMO_DTYPES)
def test_demo_model_greedy_ngram_is_token_identical(dtype):
    from sluice.config_sources import default_model_path
    prompts = _prompts(vocab=4096)
    plain, spec = _both(default_model_path(), prompts, GREEDY, dtype=dtype)
    assert spec.tokens == plain.tokens
    assert spec.spec_draft_tokens > 0 and spec.spec_accepted_tokens > 0


def test_chunked_prefill_and_preemption(llama_dir):
    """A 6-token budget (drafts must fit beside other requests' chunks) and a KV cache of a
    dozen blocks: prompts are chunked, requests preempted and recomputed — same tokens."""
    from sluice.hf_config import load_model_spec
    from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
    block_bytes = kv_cache_bytes_per_block(load_model_spec(llama_dir), 16, torch.float32)
    overrides = dict(kv_cache_memory=block_bytes * 12, max_model_len=128, block_size=16,
                     max_num_batched_tokens=6, max_num_seqs=4)
    plain, spec = _both(llama_dir, _prompts(), GREEDY, **overrides)
    assert spec.preemptions > 0
    assert spec.tokens == plain.tokens
    assert spec.spec_accepted_tokens > 0


def test_stops_and_penalties_at_every_draft_position(llama_dir):
    """max_tokens cut inside a draft run, a stop token, and penalties (applied with the drafts
    before each position counted as output) give the plain run's tokens."""
    prompts = _prompts()
    plain_greedy = run_engine_core(_engine(llama_dir), prompts, GREEDY).tokens
    stop_token = plain_greedy["0"][17]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                       stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                       repetition_penalty=1.05, frequency_penalty=0.05,
                       presence_penalty=0.05),
    ]
    for params in cases:
        plain, spec = _both(llama_dir, prompts, params)
        assert spec.tokens == plain.tokens, params
        assert spec.spec_draft_tokens > 0
    assert len(spec.tokens["0"]) == 30


def test_logprobs_of_emitted_tokens_equal_plain_run(llama_dir):
    from sluice.frontend.llm import LLM
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    runs = []
    for spec in (None, NGRAM):
        kwargs = {} if spec is None else {"speculative_config": spec}
        llm = LLM(str(llama_dir), kv_cache_memory="32MiB", max_model_len=256, **kwargs)
        runs.append(llm.generate(prompts, params, use_tqdm=False))
        llm.shutdown()
    for plain, spec in zip(*runs):
        a, b = plain.outputs[0], spec.outputs[0]
        assert b.token_ids == a.token_ids
        assert len(b.logprobs) == len(a.logprobs) == 24
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert list(step_b) == list(step_a)   # same tokens, same order
            for token in step_a:
                assert step_b[token].rank == step_a[token].rank
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-4)


def test_sampling_keeps_the_target_distribution(llama_dir):
    """2000 samples of three tokens (temperature 0.8, top-k 4) with speculation: the counts of
    each 3-token outcome fit HF's exact distribution under the same filters (chi-square,
    significance 0.001; fixed seeds, so the test is deterministic). The prompt is the model's
    own greedy continuation, so drafts are proposed at the sampled positions and both the
    accept and the residual paths run."""
    from scipy.stats import chisquare

    from _sluice_engine_helpers import _hf_model
    start = [11, 12, 13]
    greedy = run_engine_core(_engine(llama_dir), [start],
                             SamplingParams(temperature=0.0, max_tokens=30,
                                            ignore_eos=True)).tokens["0"]
    prompt = start + greedy
    temperature, top_k, samples = 0.8, 4, 2000

    hf = _hf_model(str(llama_dir))

    def dist(prefix: list[int]) -> dict[int, float]:
        with torch.no_grad():
            logits = hf(torch.tensor([prefix])).logits[0, -1] / temperature
        top = logits.topk(top_k)
        probs = torch.softmax(top.values.double(), dim=-1)
        return dict(zip(top.indices.tolist(), probs.tolist()))

    expected: dict[tuple[int, ...], float] = {}
    for a, pa in dist(prompt).items():
        for b, pb in dist(prompt + [a]).items():
            for c, pc in dist(prompt + [a, b]).items():
                expected[(a, b, c)] = pa * pb * pc

    params = SamplingParams(temperature=temperature, top_k=top_k, max_tokens=3,
                            ignore_eos=True)
    engine = _engine(llama_dir, NGRAM, max_num_seqs=256, seed=1234)
    run = run_engine_core(engine, [prompt] * samples, params)
    # drafts were verified at the second token of many samples, accepted and rejected
    assert run.spec_draft_tokens > samples // 4
    assert samples // 40 < run.spec_accepted_tokens < run.spec_draft_tokens - samples // 40
    counts: dict[tuple[int, ...], int] = {}
    for tokens in run.tokens.values():
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    assert set(counts) <= set(expected)   # nothing outside the top-k filters
    # cells expected fewer than 5 times are pooled, as the chi-square test needs (no pooled
    # cell when every cell is big: its 0 observed over 0 expected would make the statistic NaN)
    big = [k for k, p in expected.items() if p * samples >= 5]
    observed = [counts.get(k, 0) for k in big]
    wanted = [expected[k] * samples for k in big]
    if len(big) < len(expected):
        observed.append(samples - sum(observed))
        wanted.append(samples * (1 - sum(expected[k] for k in big)))
    else:   # the expected counts then sum to the samples up to rounding; chisquare checks that
        wanted = [w * samples / sum(wanted) for w in wanted]
    assert chisquare(observed, wanted).pvalue > 1e-3


def test_tensor_parallel_greedy_and_seeded_sampling(llama_dir):
    """-tp 2 (one process per rank, gloo): the driver verifies the drafts and broadcasts the
    emitted tokens; greedy output equals the single-rank plain run, and a seeded sampled
    request equals the single-rank speculative run with the same seed."""
    from sluice.frontend.llm import LLM
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    runs = []
    for kwargs in ({}, {"speculative_config": NGRAM},
                   {"speculative_config": NGRAM, "tensor_parallel_size": 2}):
        with LLM(str(llama_dir), kv_cache_memory="32MiB", max_model_len=256, **kwargs) as llm:
            runs.append([[o.outputs[0].token_ids for o in llm.generate(prompts, p,
                                                                        use_tqdm=False)]
                         for p in (greedy, seeded)])
    plain, spec, spec_tp = runs
    assert spec[0] == plain[0] and spec_tp[0] == plain[0]
    assert spec_tp[1] == spec[1]


# ---- draft model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def draft_dir(tiny_model_factory):
    """A one-layer random llama with the tiny models' tokenizer: a weak but valid draft."""
    from sluice.testing.tiny_models import TinyModelSpec
    return tiny_model_factory("draft-llama", TinyModelSpec(num_hidden_layers=1), seed=5)


def _draft(model_dir, k: int = 3) -> dict:
    return {"model": str(model_dir), "num_speculative_tokens": k, "disable_by_batch_size": 1000}


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM",
                                  "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_draft_model_greedy_is_token_identical(tiny_model_dir, draft_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = _prompts()
    plain = run_engine_core(_engine(model_dir), prompts, GREEDY)
    with_draft = run_engine_core(_engine(model_dir, _draft(draft_dir)), prompts, GREEDY)
    assert with_draft.tokens == plain.tokens
    assert with_draft.spec_draft_tokens > 0
    # the target as its own draft proposes exactly what it then generates
    itself = run_engine_core(_engine(model_dir, _draft(model_dir)), prompts, GREEDY)
    assert itself.tokens == plain.tokens
    assert itself.spec_accepted_tokens == itself.spec_draft_tokens > 0


@pytest.mark.parametrize("dtype", DEMO_DTYPES)
def test_demo_model_as_its_own_draft(dtype):
    from sluice.config_sources import default_model_path
    demo = default_model_path()
    prompts = _prompts(vocab=4096)
    plain = run_engine_core(_engine(demo, dtype=dtype), prompts, GREEDY)
    itself = run_engine_core(_engine(demo, _draft(demo, k=4), dtype=dtype), prompts, GREEDY)
    assert itself.tokens == plain.tokens
    assert itself.spec_accepted_tokens == itself.spec_draft_tokens > 0


def test_draft_model_with_chunked_prefill_and_preemption(llama_dir, draft_dir):
    from sluice.hf_config import load_model_spec
    from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
    def block_bytes(model_dir) -> int:
        return kv_cache_bytes_per_block(load_model_spec(model_dir), 16, torch.float32)

    overrides = dict(max_model_len=96, block_size=16, max_num_batched_tokens=6,
                     max_num_seqs=4)
    blocks = 8   # each engine: 8 blocks of its own size (a draft's cache adds to a block)
    plain = run_engine_core(_engine(llama_dir, kv_cache_memory=blocks * block_bytes(llama_dir),
                                    **overrides), _prompts(), GREEDY)
    for draft in (draft_dir, llama_dir):   # a weak draft (rejections), the target itself
        memory = blocks * (block_bytes(llama_dir) + block_bytes(draft))
        run = run_engine_core(_engine(llama_dir, _draft(draft), kv_cache_memory=memory,
                                      **overrides), _prompts(), GREEDY)
        assert run.preemptions > 0
        assert run.tokens == plain.tokens
        assert run.spec_draft_tokens > 0
    assert run.spec_accepted_tokens == run.spec_draft_tokens


def test_draft_model_sampling_is_seeded_and_logprobs_match(llama_dir, draft_dir):
    from sluice.frontend.llm import LLM
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    logprobs = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)
    runs = []
    for kwargs in ({}, {"speculative_config": _draft(llama_dir)},
                   {"speculative_config": _draft(llama_dir)}):
        with LLM(str(llama_dir), kv_cache_memory="32MiB", max_model_len=256, **kwargs) as llm:
            runs.append((llm.generate(prompts, logprobs, use_tqdm=False),
                         [o.outputs[0].token_ids for o in llm.generate(prompts, seeded,
                                                                       use_tqdm=False)]))
    (plain, _), (spec, sampled), (_, sampled_again) = runs
    assert sampled == sampled_again   # a seeded request is reproducible with speculation
    for a, b in zip(plain, spec):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert list(step_b) == list(step_a)
            for token in step_a:
                assert step_b[token].logprob == pytest.approx(step_a[token].logprob, abs=1e-4)


def test_a_draft_with_another_vocabulary_is_refused(llama_dir, tiny_model_factory):
    from sluice.errors import ConfigError
    from sluice.testing.tiny_models import TinyModelSpec
    other = tiny_model_factory("draft-small-vocab", TinyModelSpec(vocab_size=1024,
                                                                  num_hidden_layers=1))
    with pytest.raises(ConfigError, match="vocabulary of 1024 tokens.*2048"):
        _engine(llama_dir, _draft(other))


def test_prefix_cache_hits_with_speculation(llama_dir, draft_dir):
    """Requests arriving one after another share their prefixes through the prefix cache
    (blocks written while drafts were verified included): same tokens as without."""
    base = _prompts()[2]
    prompts = [base, base + [5, 6, 7], base[:32] + [9, 9]]
    plain = run_engine_core(_engine(llama_dir, block_size=16), prompts, GREEDY,
                            arrival_gap_steps=12)
    for spec in (NGRAM, _draft(draft_dir)):
        run = run_engine_core(_engine(llama_dir, spec, block_size=16), prompts, GREEDY,
                              arrival_gap_steps=12)
        assert run.prefix_hits > 0 and run.spec_draft_tokens > 0
        assert run.tokens == plain.tokens
