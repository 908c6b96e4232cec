"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct (Llama architecture, Q4_1 with
a Q8_0 embedding, tied LM head), loaded by sluice the way the engine does (`prepare_gguf` ->
sidecar directory -> the normal loader) and by Hugging Face transformers from the same file
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, float32).

Both dequantize the same blocks to the same float32 weights (transformers through gguf-py too),
so the models differ only in the order of floating-point operations (fused QKV and gate/up
GEMMs, paged SDPA) over 30 layers.

* Logits, teacher-forced over prompt + HF's continuation: observed max |diff| ~2e-4 on logits of
  magnitude up to ~30 (float32 rounding, ~1e-5 relative, amplified by depth); `LOGITS_ATOL`
  = 3e-3 leaves >10x headroom and is still >100x below what a real mistake moves (a wrong RoPE
  theta, a skipped norm, an unpermuted Q/K: differences of order 1-10).
* Greedy continuations (32 tokens per prompt, EOS ignored) must be token-identical; at a first
  difference (possible only where two candidates tie to rounding), HF's logit gap between its
  token and sluice's must be below `NEAR_TIE` = 1e-3, i.e. within a few times the logits'
  observed disagreement, and the comparison stops there since the contexts differ.

The parity table (prompt, tokens compared, identical or the gap) is printed; run with -s.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from _sluice_model_helpers import PagedRunner, load_ours
from sluice.frontend.tokenizer import load_tokenizer
from sluice.model_spec.gguf import inspect_gguf, prepare_gguf

MAX_NEW = 32
LOGITS_ATOL = 3e-3
NEAR_TIE = 1e-3
CHAT_PROMPTS = ["What is the capital of France?",
                "Write a Python function that reverses a string.",
                "Give me three tips for staying focused while studying.",
                "Translate 'good morning' into Spanish and German."]
TEXT_PROMPTS = ["The history of the Roman Empire begins",
                "def fibonacci(n):\n    ",
                "Q: What is 17 times 23?\nA:",
                "Once upon a time, in a small village by the sea,"]


@dataclass
class Reference:
    label: str
    prompt_ids: list[int]
    tokens: list[int]              # HF greedy continuation
    step_logits: torch.Tensor      # [MAX_NEW, vocab]: HF logits that chose each token
    full_logits: torch.Tensor      # [len(prompt) + MAX_NEW - 1, vocab], teacher-forced


@pytest.fixture(scope="module")
def sidecar(smollm2_gguf, tmp_path_factory):
    return prepare_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2-sidecar"))


@pytest.fixture(scope="module")
def prompts(sidecar) -> list[tuple[str, list[int]]]:
    tok = load_tokenizer(sidecar)
    out = [(f"chat: {p}", tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]),
                                     add_special_tokens=False)) for p in CHAT_PROMPTS]
    return out + [(f"text: {p!r}", tok.encode(p)) for p in TEXT_PROMPTS]


def hf_greedy(model, prompts: list[list[int]], pad_id: int) -> tuple[list[list[int]],
                                                                       torch.Tensor]:
    """Greedy continuations of all prompts as one left-padded batch with HF's KV cache,
    EOS ignored: (tokens per prompt, logits [batch, MAX_NEW, vocab] that chose them)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    steps = []
    for _ in range(MAX_NEW):
        logits = out.logits[:, -1].float()
        steps.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(nxt, attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    step_logits = torch.stack(steps, dim=1)
    return step_logits.argmax(-1).tolist(), step_logits


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    """HF transformers' model from the same GGUF file (float32), loaded once per module."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent),
                                                gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_reference(hf_model, sidecar, prompts) -> list[Reference]:
    """HF transformers on the same GGUF file: greedy continuations (one batch) and, per prompt
    unpadded, teacher-forced logits; computed once per test run."""
    model = hf_model
    pad_id = load_tokenizer(sidecar).eos_token_id
    refs = []
    with torch.inference_mode():
        tokens, step_logits = hf_greedy(model, [ids for _, ids in prompts], pad_id)
        for (label, ids), toks, steps in zip(prompts, tokens, step_logits):
            full = model(torch.tensor([ids + toks[:-1]])).logits[0].float()
            refs.append(Reference(label, ids, toks, steps, full))
    return refs


def test_hf_and_sluice_read_the_same_model(smollm2_gguf, sidecar):
    from transformers import AutoConfig, AutoTokenizer

    info = inspect_gguf(smollm2_gguf)
    assert info.architecture == "llama" and info.tensor_types == {"Q4_1": 210, "Q8_0": 1,
                                                                   "F32": 61}
    hf_cfg = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings"):
        assert info.config[key] == getattr(hf_cfg, key), key
    assert info.config["rms_norm_eps"] == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)
    hf_tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok = load_tokenizer(sidecar)
    for text in ["Hello, world!", "  indented\n\tcode()", "naïve café 漢字", "<|im_start|>x"]:
        assert tok.encode(text) == hf_tok.encode(text), text
    chat = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(chat) == hf_tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)


def test_logits_match_transformers(sidecar, hf_reference):
    model = load_ours(sidecar)
    runner = PagedRunner(model)
    for i, ref in enumerate(hf_reference):
        runner.add(str(i), ref.prompt_ids + ref.tokens[:-1])
    out = runner.step([(str(i), len(r.prompt_ids) + MAX_NEW - 1)
                       for i, r in enumerate(hf_reference)])
    worst = 0.0
    for i, ref in enumerate(hf_reference):
        diff = (out[str(i)] - ref.full_logits).abs().max().item()
        worst = max(worst, diff)
        assert diff <= LOGITS_ATOL, (ref.label, diff)
    print(f"\nSmolLM2 logits: max |sluice - HF| = {worst:.2e} over "
          f"{sum(len(r.prompt_ids) + MAX_NEW - 1 for r in hf_reference)} positions")


def _first_difference_is_a_near_tie(ours: list[int], ref_tokens: list[int],
                                    ref_step_logits: torch.Tensor) -> int | None:
    """Index of the first token where `ours` differs from HF's (None: identical), asserting
    that HF's logit gap there is a near-tie (see the module docstring)."""
    first = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), None)
    if first is not None:
        logits = ref_step_logits[first]
        gap = float(logits[ref_tokens[first]] - logits[ours[first]])
        assert gap <= NEAR_TIE, (first, gap)
    return first


def test_greedy_continuations_match_transformers(sidecar, hf_reference):
    """Through the engine (`sluice.LLM` on the sidecar directory, its kernels on the file's
    blocks with float activations: `--quantization gguf`; the default's int8 activations on a
    x86 CPU with AVX2 or AVX512-VNNI are llama.cpp's numerics, held to a perplexity bound in
    test_int8_quant)."""
    from sluice.frontend.llm import LLM
    from sluice.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    with LLM(str(sidecar), kv_cache_memory="128MiB", max_model_len=512,
             quantization="gguf") as llm:
        outputs = llm.generate([r.prompt_ids for r in hf_reference], params, use_tqdm=False)
    rows, identical = [], 0
    for ref, output in zip(hf_reference, outputs):
        ours = list(output.outputs[0].token_ids)
        assert len(ours) == MAX_NEW
        first = _first_difference_is_a_near_tie(ours, ref.tokens, ref.step_logits)
        if first is None:
            identical += 1
            rows.append(f"{ref.label[:60]:<60} {MAX_NEW:>3}  identical")
            continue
        rows.append(f"{ref.label[:60]:<60} {first + 1:>3}  differs at {first} (near-tie)")
    print("\n" + "\n".join([f"{'prompt':<60} {'n':>3}  result"] + rows))
    assert identical >= len(hf_reference) // 2, rows


def test_lora_adapter_on_the_real_model_matches_peft(sidecar, hf_model, hf_reference,
                                                     tmp_path):
    """A PEFT adapter (rank 8 on q/v/down, random B) on SmolLM2: sluice's greedy continuation
    with the adapter equals PEFT's (up to a near-tie), and a base-model request in the same
    batch still equals plain HF's. Runs last: PEFT injects its layers into `hf_model` and
    `unload()` takes them out again."""
    peft = pytest.importorskip("peft")
    from sluice.frontend.llm import LLM
    from sluice.lora.request import LoRARequest
    from sluice.sampling_params import SamplingParams

    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    try:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.02)
        model.save_pretrained(str(tmp_path))
        adapter_ids = hf_reference[0].prompt_ids
        pad_id = load_tokenizer(sidecar).eos_token_id
        with torch.inference_mode():
            ref_tokens, ref_logits = hf_greedy(model, [adapter_ids], pad_id)
    finally:
        model.unload()
    assert ref_tokens[0] != hf_reference[0].tokens   # the adapter changes the answer

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    adapter = LoRARequest("real", 1, str(tmp_path))
    base = hf_reference[1]
    with LLM(str(sidecar), kv_cache_memory="128MiB", max_model_len=512, enable_lora=True,
             max_lora_rank=8) as llm:
        outputs = llm.generate([adapter_ids, base.prompt_ids], params, use_tqdm=False,
                               lora_request=[adapter, None])
    ours = [list(o.outputs[0].token_ids) for o in outputs]
    _first_difference_is_a_near_tie(ours[0], ref_tokens[0], ref_logits[0])
    _first_difference_is_a_near_tie(ours[1], base.tokens, base.step_logits)
