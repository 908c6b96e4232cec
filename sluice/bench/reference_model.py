"""The benchmark reference model: a ~56M-parameter random-weight Llama in Hugging Face format.

LlamaForCausalLM, hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate 1408, vocab 32000,
max_position_embeddings 2048, untied embeddings, float32, seeded weights; the tokenizer is the
locally trained BPE of `sluice.testing.tiny_models` (2048 tokens; benchmark prompts are token
ids, so a tokenizer smaller than the embedding table is fine). Building needs no network.

`ensure_reference_model(dir)` is idempotent: a stamp file written last records the spec and seed;
a directory with a matching stamp is reused, anything else is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from sluice.testing.tiny_models import TinyModelSpec, build_model

REFERENCE_NAME = "reference"
STAMP_FILE = "sluice-reference.json"
DEFAULT_SEED = 0


def reference_spec() -> TinyModelSpec:
    """The reference model's shape."""
    return TinyModelSpec(
        architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=512,
        intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        initializer_range=0.02)


def default_reference_dir() -> Path:
    """`$XDG_CACHE_HOME/sluice/reference-model`, i.e. `~/.cache/sluice/reference-model`."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sluice" / "reference-model"


def _stamp(seed: int) -> dict:
    return {"spec": asdict(reference_spec()), "seed": seed, "dtype": "float32"}


def is_built(out_dir: str | Path, seed: int = DEFAULT_SEED) -> bool:
    """True if `out_dir` holds a complete reference model built with `seed`."""
    stamp = Path(out_dir) / STAMP_FILE
    try:
        return json.loads(stamp.read_text()) == _stamp(seed)
    except (OSError, ValueError):
        return False


def ensure_reference_model(out_dir: str | Path | None = None, seed: int = DEFAULT_SEED,
                           force: bool = False) -> Path:
    """Build the reference model into `out_dir` (default: the user cache) unless already there.

    The model is built in a sibling temporary directory and moved into place, so an interrupted
    build never leaves a directory that looks complete. Returns the model directory.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_reference_dir()
    if not force and is_built(out_dir, seed):
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(tmp, reference_spec(), seed=seed, dtype="float32")
    (tmp / STAMP_FILE).write_text(json.dumps(_stamp(seed), indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def resolve_model(model: str) -> str:
    """Map the name `reference` to the cached reference model (building it once); other values
    are returned unchanged."""
    if model == REFERENCE_NAME and not Path(model).exists():
        return str(ensure_reference_model())
    return model
