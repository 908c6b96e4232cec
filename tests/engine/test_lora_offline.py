"""Offline LoRA: `LLM(..., enable_lora=True, max_loras=...)` with `lora_request=` on `generate`
and `chat` (one for all prompts, a list of one per prompt, None for the base model). A mixed
batch [a, base, b, a] with --max-loras 1 (so the scheduler must make b wait) gives each prompt
the greedy tokens it gets alone. Adapters are PEFT directories written with safetensors' numpy
API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from _sluice_engine_helpers import make_config
from sluice import LLM, SamplingParams
from sluice.lora.request import LoRARequest

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello there", "The quick brown fox"]


def write_adapter(directory: Path, model_dir: Path, seed: int, rank: int = 4) -> str:
    """A PEFT adapter on q_proj and down_proj with random A and B (shapes from config.json)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * (cfg.get("head_dim")
                                          or hidden // cfg["num_attention_heads"])
    shapes = {"self_attn.q_proj": (q_out, hidden), "mlp.down_proj": (hidden, inter)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (out, inp) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, inp)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32)
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank,
        "target_modules": ["q_proj", "down_proj"], "bias": "none"}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return str(directory)


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(config=make_config(llama_dir, enable_lora=True, max_loras=1,
                                max_lora_rank=8)) as engine:
        yield engine


@pytest.fixture(scope="module")
def loras(llama_dir, tmp_path_factory) -> tuple[LoRARequest, LoRARequest]:
    root = tmp_path_factory.mktemp("offline-adapters")
    return (LoRARequest("a", 1, write_adapter(root / "a", llama_dir, seed=1)),
            LoRARequest("b", 2, write_adapter(root / "b", llama_dir, seed=2)))


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_mixed_batch_equals_each_alone(llm, loras):
    a, b = loras
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    mixed = tokens(llm.generate(PROMPTS, params, lora_request=[a, None, b, a], use_tqdm=False))
    alone = [tokens(llm.generate([p], params, lora_request=lora, use_tqdm=False))[0]
             for p, lora in zip(PROMPTS, [a, None, b, a])]
    assert mixed == alone
    assert mixed[0] == mixed[3]
    base = tokens(llm.generate(PROMPTS[0], params, use_tqdm=False))[0]
    assert base != mixed[0]   # the adapter changes the output
    all_a = tokens(llm.generate(PROMPTS[:2], params, lora_request=a, use_tqdm=False))
    assert all_a[0] == mixed[0]


def test_chat_with_adapter(llm, loras):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    messages = [{"role": "user", "content": "hi"}]
    with_a = llm.chat(messages, params, lora_request=loras[0], use_tqdm=False)
    base = llm.chat(messages, params, use_tqdm=False)
    assert tokens(with_a) != tokens(base)


def test_bad_lora_requests_are_value_errors(llm, loras, tmp_path):
    params = SamplingParams(max_tokens=1)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(PROMPTS, params, lora_request=[loras[0]], use_tqdm=False)
    with pytest.raises(ValueError, match="already names the adapter"):
        llm.generate("x", params, use_tqdm=False,
                     lora_request=LoRARequest("c", 1, loras[1].lora_path))
    with pytest.raises(ValueError, match=str(tmp_path)):
        llm.generate("x", params, use_tqdm=False,
                     lora_request=LoRARequest("d", 9, str(tmp_path)))
