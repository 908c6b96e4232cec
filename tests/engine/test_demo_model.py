"""The built-in demo model (`sluice/assets/demo_model`) through sluice's own engine.

1. It is a language model, not noise: its perplexity on held-out CPython documentation
   (`heldout.txt`, never trained on), computed from sluice's prompt logprobs, is far below that
   of a random-weight model of the same shape and tokenizer (which sits near the vocabulary
   size, ~4096), and it agrees with HF transformers' perplexity on the same tokens.
2. sluice's greedy output equals HF transformers' greedy output token for token.

Rebuild the model with `python tools/train_demo_model.py` (see its README.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sluice.config_sources import default_model_path
from sluice.testing.perplexity import engine_perplexity, heldout_prompts

DEMO_DIR = default_model_path()
HAVE_DEMO = (DEMO_DIR / "config.json").is_file() and any(DEMO_DIR.glob("*.safetensors"))

pytestmark = pytest.mark.skipif(
    not HAVE_DEMO, reason=f"demo model absent at {DEMO_DIR}; build it with "
                          "`python tools/train_demo_model.py`")

MAX_PPL_RATIO = 0.05
"""The demo model's held-out perplexity must be below this fraction of the random model's.
A random model of this shape is close to uniform over the 4096-token vocabulary (perplexity
~4200 here); the trained model scores ~67 on these prompts (a ratio of ~0.016; 47.5 on all
held-out documents in 256-token windows, see the model's README). 0.05 (perplexity ~210) leaves
3x slack for other CPUs and torch versions while still failing for an untrained, half-trained
(perplexity ~160 after 5% of training) or wrongly loaded model."""

GREEDY_PROMPTS = ("The json module", "Return a list of", "class Decimal",
                  "The with statement is used to", "If the file does not exist,")
CHAT = [{"role": "user", "content": "What does json.dumps do?"}]
MAX_NEW_TOKENS = 32


def _hf_perplexity(model_dir: Path, prompts: list[str]) -> tuple[float, list[list[int]]]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count, all_ids = 0.0, 0, []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += -F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
            all_ids.append(ids[0].tolist())
    return math.exp(-total / count), all_ids


@pytest.fixture(scope="module")
def demo_llm():
    from sluice.frontend.llm import LLM

    # float32 pinned: these tests compare with HF transformers in float32 (`--dtype auto` would
    # keep the bf16 checkpoint in bf16 on a CPU with native bf16 products)
    llm = LLM(str(DEMO_DIR), kv_cache_memory="256MiB", dtype="float32")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory) -> Path:
    """Same config and tokenizer as the demo model, weights drawn by transformers (seed 0)."""
    from sluice.testing.tiny_models import TinyModelSpec, build_model

    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    spec = TinyModelSpec(
        architecture=cfg["architectures"][0], vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        initializer_range=cfg.get("initializer_range", 0.02))
    return build_model(tmp_path_factory.mktemp("demo_random"), spec, seed=0,
                       tokenizer_dir=DEMO_DIR)


def test_demo_model_perplexity_far_below_random(demo_llm, random_model_dir):
    from sluice.frontend.llm import LLM

    prompts = heldout_prompts()
    demo_ppl, demo_ids = engine_perplexity(demo_llm, prompts)
    with LLM(str(random_model_dir), kv_cache_memory="256MiB") as random_llm:
        random_ppl, _ = engine_perplexity(random_llm, prompts)
    num_tokens = sum(len(ids) - 1 for ids in demo_ids)
    print(f"\nheld-out perplexity over {num_tokens} tokens ({len(prompts)} prompts): demo model "
          f"{demo_ppl:.2f}, random weights of the same shape {random_ppl:.1f} "
          f"(ratio {demo_ppl / random_ppl:.4f})")
    assert demo_ppl < MAX_PPL_RATIO * random_ppl, (demo_ppl, random_ppl)

    # The engine's logprobs are the model's: HF transformers agrees on the same tokens.
    hf_ppl, hf_ids = _hf_perplexity(DEMO_DIR, prompts)
    assert demo_ids == hf_ids
    assert math.log(demo_ppl) == pytest.approx(math.log(hf_ppl), abs=1e-3), (demo_ppl, hf_ppl)


MAX_INT8_PPL_INCREASE = 0.02
"""`--quantization int8` (int8 Q8_0 weights, int8 activations for up to 8 rows; tests/model/
test_int8_quant.py): held-out perplexity within 2% of float32 with at most 8 tokens per step,
so that every forward quantizes its activations (observed +0.07%)."""


def test_demo_model_int8_perplexity_within_2_percent(demo_llm):
    from sluice.frontend.llm import LLM

    prompts = heldout_prompts()
    ppl, ids = engine_perplexity(demo_llm, prompts)
    with LLM(str(DEMO_DIR), kv_cache_memory="256MiB", quantization="int8",
             max_num_batched_tokens=8, max_num_seqs=1) as int8_llm:
        int8_ppl, int8_ids = engine_perplexity(int8_llm, prompts)
    assert int8_ids == ids
    assert int8_ppl != ppl                        # the int8 weights were used
    assert int8_ppl <= ppl * (1 + MAX_INT8_PPL_INCREASE), (int8_ppl, ppl)


MAX_BF16_PPL_CHANGE = 0.01
"""`--dtype bfloat16` (bf16 weights over float32 activations, `sluice.model.layers.half_linear`):
held-out perplexity within 1% of float32 (the issue's bound). The demo checkpoint is stored in
bf16, so its weights are exact and only the summation order differs — or, on a CPU with native
bf16 GEMMs, the rounding of prefill activations to bf16 at the GEMM input."""


def test_demo_model_bf16_perplexity_within_1_percent(demo_llm):
    from sluice.frontend.llm import LLM

    prompts = heldout_prompts()
    ppl, ids = engine_perplexity(demo_llm, prompts)
    with LLM(str(DEMO_DIR), kv_cache_memory="256MiB", dtype="bfloat16") as bf16_llm:
        bf16_ppl, bf16_ids = engine_perplexity(bf16_llm, prompts)
    assert bf16_ids == ids
    assert abs(bf16_ppl / ppl - 1) <= MAX_BF16_PPL_CHANGE, (bf16_ppl, ppl)


MAX_FP8_KV_PPL_INCREASE = {"fp8_e4m3": 0.01, "fp8_e5m2": 0.03}
"""`--kv-cache-dtype fp8_e4m3` / `fp8_e5m2` (one byte per cached value, scale 1, saturated):
held-out perplexity at most 1% / 3% above the float32 cache's (e4m3 keeps 3 mantissa bits, e5m2
2). Measured: the demo model +0.2% / +0.04%, SmolLM2 bf16 +0.6% / +2-2.7% (docs/architecture.md,
"KV cache sizing")."""


@pytest.mark.parametrize("kv_cache_dtype", sorted(MAX_FP8_KV_PPL_INCREASE))
def test_demo_model_fp8_kv_cache_perplexity(demo_llm, kv_cache_dtype):
    import torch

    from sluice.frontend.llm import LLM

    prompts = heldout_prompts()
    ppl, ids = engine_perplexity(demo_llm, prompts)
    with LLM(str(DEMO_DIR), kv_cache_memory="256MiB", dtype="float32",
             kv_cache_dtype=kv_cache_dtype) as fp8_llm:
        fp8_ppl, fp8_ids = engine_perplexity(fp8_llm, prompts)
        caches = fp8_llm.client.engine.executor.worker.model_runner.kv_caches
        assert {c.dtype for c in caches} == {getattr(torch, kv_cache_dtype.replace(
            "e4m3", "e4m3fn").replace("fp8", "float8"))}
    assert fp8_ids == ids
    assert fp8_ppl != ppl                          # the fp8 cache was read
    assert fp8_ppl <= ppl * (1 + MAX_FP8_KV_PPL_INCREASE[kv_cache_dtype]), (fp8_ppl, ppl)


def _hf_greedy(model, tokenizer, prompt_ids: list[int]) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def _assert_same_greedy(sluice_ids: list[int], hf_ids: list[int], eos_ids: set[int],
                        what: str) -> None:
    # sluice runs with ignore_eos so it always makes MAX_NEW_TOKENS; HF may stop at an EOS id.
    assert sluice_ids[:len(hf_ids)] == hf_ids, what
    if len(hf_ids) < MAX_NEW_TOKENS:
        assert hf_ids and hf_ids[-1] in eos_ids, what


def test_demo_model_greedy_matches_transformers(demo_llm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sluice.sampling_params import SamplingParams

    hf_tok = AutoTokenizer.from_pretrained(str(DEMO_DIR))
    hf_model = AutoModelForCausalLM.from_pretrained(str(DEMO_DIR), dtype=torch.float32).eval()
    eos_ids = set(hf_model.generation_config.eos_token_id or [])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)

    outputs = demo_llm.generate(list(GREEDY_PROMPTS), params, use_tqdm=False)
    for prompt, out in zip(GREEDY_PROMPTS, outputs):
        prompt_ids = hf_tok(prompt).input_ids
        assert out.prompt_token_ids == prompt_ids, prompt
        hf_ids = _hf_greedy(hf_model, hf_tok, prompt_ids)
        _assert_same_greedy(out.outputs[0].token_ids, hf_ids, eos_ids, prompt)
        print(f"\n{prompt!r} -> {out.outputs[0].text!r}")

    # The chat template shipped with the model goes through the same path.
    [chat_out] = demo_llm.chat(CHAT, params, use_tqdm=False)
    chat_text = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = hf_tok(chat_text, add_special_tokens=False).input_ids
    assert chat_out.prompt_token_ids == prompt_ids
    hf_ids = _hf_greedy(hf_model, hf_tok, prompt_ids)
    _assert_same_greedy(chat_out.outputs[0].token_ids, hf_ids, eos_ids, "chat")


def test_demo_model_directory_is_complete():
    """What the model card promises is there, and the weights stay small enough to ship."""
    from sluice.hf_config import load_model_spec

    spec = load_model_spec(DEMO_DIR)
    assert spec.architecture == "LlamaForCausalLM"
    assert spec.torch_dtype in ("bfloat16", "float16")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "heldout.txt", "README.md", "LICENSE-DATA.txt"):
        assert (DEMO_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir() if f.is_file())
    assert size < 26 * 1024 * 1024, f"demo model is {size / 1e6:.1f} MB"
    assert "Python Software Foundation" in (DEMO_DIR / "LICENSE-DATA.txt").read_text()
