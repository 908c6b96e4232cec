"""A real pretrained model end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF file (fetched
once by the `smollm2_gguf` fixture), through `LLM.chat`, and the same weights as a hub id read
from a local Hugging Face cache tree with HF_HUB_OFFLINE=1.

The hub tree is built here from the converted files: the GGUF's sidecar (config, tokenizer,
chat template) plus its tensors dequantized to float32 safetensors, so the two sources hold the
same numbers and must give the same greedy tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sluice import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at",
           "Once upon a time, in a small village,"]
ENGINE = {"max_model_len": 1024, "kv_cache_memory": "128MiB", "max_num_seqs": 8}
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    llm = LLM(model=str(smollm2_gguf), **ENGINE)
    yield llm
    llm.shutdown()


def test_chat_answers_berlin(smollm2):
    out = smollm2.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Berlin" in out.outputs[0].text, out.outputs[0].text


def test_served_name_is_what_the_user_typed(smollm2, smollm2_gguf):
    assert smollm2.config.model.served_model_name == (str(smollm2_gguf),)


@pytest.fixture(scope="module")
def hub_cache(smollm2_gguf, tmp_path_factory) -> Path:
    """A Hugging Face cache tree holding SmolLM2 as safetensors converted from the GGUF."""
    from sluice.model.gguf_weights import iterate_gguf
    from sluice.model_spec.gguf import GGUF_MARKER, prepare_gguf

    sidecar = prepare_gguf(smollm2_gguf)
    cache = tmp_path_factory.mktemp("hf-hub")
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in sidecar.iterdir():
        if f.is_file() and f.name != GGUF_MARKER:
            shutil.copy(f, snapshot / f.name)
    tensors = {name: t.contiguous() for name, t in iterate_gguf(smollm2_gguf, torch.float32)}
    save_file(tensors, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def test_hub_id_from_local_cache_matches_the_gguf(smollm2_gguf, hub_cache, monkeypatch):
    """The file with float activations and a float32 cache (`--quantization gguf`, whose
    results equal the float model's up to summation order; its default mode computes as
    llama.cpp, int8 activations over a float16 cache) against its float32 copy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = SamplingParams(temperature=0, max_tokens=16)
    with LLM(model=str(smollm2_gguf), quantization="gguf", **ENGINE) as gguf:
        want = [o.outputs[0].token_ids for o in gguf.generate(PROMPTS, params, use_tqdm=False)]
    # the cached checkpoint is bf16, which `--dtype auto` keeps in bf16 on a CPU with native
    # bf16 products; the GGUF engine computes in float32, so compare in float32
    hub = LLM(model=HUB_ID, download_dir=str(hub_cache), dtype="float32", **ENGINE)
    assert Path(hub.config.model.model).parent.parent.name == "models--" + \
        HUB_ID.replace("/", "--")
    assert hub.config.model.served_model_name == (HUB_ID,)
    got = [o.outputs[0].token_ids for o in hub.generate(PROMPTS, params, use_tqdm=False)]
    assert got == want
