"""Session fixtures: tiny random-weight models in real HF format, built locally (no network).

`tiny_tokenizer_dir` trains one byte-level BPE tokenizer per session; `tiny_model_dir(arch)`
builds (once per session and arch) a model of that architecture sharing it. `llama_dir` is the
common default for engine tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from sluice.testing.tiny_models import build_tokenizer
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer_dir):
    """Call with (name, TinyModelSpec, **build_model kwargs) -> directory; cached by name."""
    from sluice.testing.tiny_models import build_model
    cache: dict[str, Path] = {}

    def make(name: str, spec=None, **kwargs) -> Path:
        if name not in cache:
            cache[name] = build_model(tmp_path_factory.mktemp(name), spec,
                                      tokenizer_dir=tiny_tokenizer_dir, **kwargs)
        return cache[name]
    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory):
    """Call with an architecture name -> a tiny model directory of that architecture."""
    from sluice.testing.tiny_models import TinyModelSpec

    def get(arch: str = "LlamaForCausalLM") -> Path:
        spec = TinyModelSpec(architecture=arch)
        if arch == "Qwen3ForCausalLM":
            spec.extra["head_dim"] = 16
        return tiny_model_factory(arch, spec)
    return get


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("LlamaForCausalLM")


@pytest.fixture(scope="session")
def cpu_ops():
    """sluice's compiled CPU operators (built on first use); the test skips without a
    compiler."""
    from sluice.model.cpu_ops import load_cpu_ops
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("no C++ compiler: the CPU operators cannot be built here")
    return ops
