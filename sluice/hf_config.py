"""Read a Hugging Face model directory's `config.json` into a `ModelSpec`, and its optional
`generation_config.json` (extra EOS ids; default sampling parameters, `generation_defaults`).

This is the only module that parses HF configs (a stored-quantized checkpoint's
`quantization_config`: `sluice.model_spec.quantization_config`). It checks that the directory
looks like an HF model before anything heavy starts, and raises `ModelLoadError` naming the
path and problem.
No torch.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sluice.errors import ConfigError, ModelLoadError
from sluice.model_spec.gguf import GGUF_MARKER
from sluice.model_spec.quantization_config import (CheckpointQuantization,
                                                  read_checkpoint_quantization)

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; `scaling` holds the HF `rope_scaling` dict minus its type."""
    theta: float = 10000.0
    rope_type: str = "default"
    scaling: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts of one checkpoint, as our model code needs them."""
    path: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    attention_bias: bool        # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool               # per-head RMSNorm on q and k (Qwen3)
    hidden_act: str
    torch_dtype: str | None     # the checkpoint's dtype, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    sliding_window: int | None = None
    quantization: CheckpointQuantization | None = None  # a stored-quantized checkpoint
    # a compressed-tensors kv_cache_scheme: the checkpoint's layers carry fp8 KV-cache scales,
    # and `--kv-cache-dtype auto` stores fp8_e4m3 (vLLM's rule)
    fp8_kv_cache: bool = False
    # a GGUF file's sidecar directory (`sluice.model_spec.gguf`): the weights are the file's
    gguf: bool = False

    def auto_kv_cache_dtype(self, quantization: str | None, float32_weights: bool) -> str | None:
        """What `--kv-cache-dtype auto` stores where the checkpoint decides it, for a model run
        with `--quantization` `quantization` and float32 weights or not (`--dtype`); None: the
        model's dtype.

        * 'fp8_e4m3' for a checkpoint that declares fp8 KV-cache scales (`fp8_kv_cache`), as
          vLLM resolves auto;
        * 'float16' for a GGUF file run with llama.cpp's numerics (int8 activations: its
          default mode, `gguf_quant.llama_cpp_numerics`, and `--quantization int8`) in float32
          (a GGUF file's `--dtype auto`): llama.cpp's default K/V type, at half the float32
          cache's bytes per token. `--quantization gguf` (float activations, the closest to
          the float model) keeps the model's dtype."""
        if self.fp8_kv_cache:
            return "fp8_e4m3"
        if self.gguf and quantization in (None, "int8") and float32_weights:
            return "float16"
        return None


AUTO_KV_CACHE_REASONS = {
    "fp8_e4m3": "the checkpoint declares fp8 KV-cache scales",
    "float16": "a GGUF file with int8 activations, llama.cpp's K/V type; --kv-cache-dtype "
               "float32 for a float32 cache"}
"""Why `ModelSpec.auto_kv_cache_dtype` chose each cache (the worker's log line)."""



def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; a model directory in Hugging Face format "
                             "needs config.json, *.safetensors and tokenizer files.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def _rope_spec(cfg: dict, path: Path) -> RopeSpec:
    # transformers 5 moves theta/scaling into `rope_parameters`; older configs use rope_theta
    # and rope_scaling. Accept both.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.pop("rope_type", merged.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"{path}: rope_scaling type '{rope_type}' is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    if rope_type in ("linear", "dynamic", "llama3") and "factor" not in merged:
        raise ModelLoadError(f"{path}: rope_scaling of type '{rope_type}' needs a 'factor'.")
    return RopeSpec(theta=theta, rope_type=rope_type, scaling=merged)


def read_generation_config(directory: str | Path) -> dict[str, Any]:
    """`directory/generation_config.json` as a dict; {} when the file is absent or unreadable
    (it is optional). The one place that reads a model's generation config."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("Ignoring %s: not readable JSON.", path)
        return {}
    return data if isinstance(data, dict) else {}


# generation_config.json keys that become default SamplingParams (max_new_tokens -> max_tokens),
# with the check each value must pass; as vLLM's `--generation-config auto`.
_GENERATION_DEFAULTS: dict[str, tuple[str, Any]] = {
    "repetition_penalty": ("repetition_penalty", lambda v: _is_number(v) and 0 < v <= 2),
    "temperature": ("temperature", lambda v: _is_number(v) and 0 <= v <= 100),
    "top_k": ("top_k", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1),
    "top_p": ("top_p", lambda v: _is_number(v) and 0 < v <= 1),
    "min_p": ("min_p", lambda v: _is_number(v) and 0 <= v <= 1),
    "max_new_tokens": ("max_tokens",
                       lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@functools.lru_cache(maxsize=16)
def _generation_defaults(mode: str, model_dir: str | None) -> tuple[tuple[str, Any], ...]:
    if mode == "vllm":
        return ()
    if mode == "auto":
        if model_dir is None:
            return ()
        directory = Path(model_dir)
    else:
        directory = Path(mode)
        if not (directory / "generation_config.json").is_file():
            raise ConfigError([f"--generation-config: {mode!r} holds no generation_config.json;"
                               " allowed: auto, vllm, or a directory holding one."])
    found: dict[str, Any] = {}
    for key, value in read_generation_config(directory).items():
        if key not in _GENERATION_DEFAULTS or value is None:
            continue
        name, ok = _GENERATION_DEFAULTS[key]
        if ok(value):
            found[name] = value
        else:
            logger.warning("Ignoring %s=%r in %s/generation_config.json: out of range.",
                           key, value, directory)
    if found:
        logger.info("Default sampling parameters from %s/generation_config.json: %s (pass "
                    "--generation-config vllm to use sluice's defaults instead).",
                    directory, ", ".join(f"{k}={v}" for k, v in found.items()))
    return tuple(found.items())


def generation_defaults(mode: str, model_dir: str | None) -> dict[str, Any]:
    """The model's default sampling parameters, as `SamplingParams` keywords, per
    `--generation-config` `mode`: 'auto' reads `model_dir`'s generation_config.json, 'vllm'
    gives {} (sluice's own defaults), anything else is a directory holding the file
    (`ConfigError` when it holds none). Keys: temperature, top_p, top_k, min_p,
    repetition_penalty, max_tokens (from max_new_tokens); out-of-range values are ignored with
    a warning. They apply where a request leaves a field unset. Read once per (mode, dir)."""
    return dict(_generation_defaults(mode, model_dir))


def _eos_ids(cfg: dict, model_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [read_generation_config(model_dir).get("eos_token_id"), cfg.get("eos_token_id")]
    for value in sources:
        if isinstance(value, int):
            value = [value]
        for token_id in value or []:
            if token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Parse `model_dir/config.json` and check the directory holds weights.

    Raises `ModelLoadError` for a missing directory, a missing/corrupt config, an unsupported
    architecture or no weights (`*.safetensors` files, or the marker of a GGUF sidecar
    directory, see `sluice.model_spec.gguf`).
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelLoadError(f"Model path {model_dir} does not exist; pass a local directory in "
                             "Hugging Face format (config.json, *.safetensors, tokenizer).")
    if not model_dir.is_dir():
        raise ModelLoadError(f"Model path {model_dir} is not a directory; pass a directory in "
                             "Hugging Face format (config.json, *.safetensors, tokenizer).")
    path = model_dir / "config.json"
    cfg = _read_json(path)
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        if cfg.get("auto_map"):
            raise ModelLoadError(
                f"{path}: architecture {archs or 'missing'} needs code from the model repository "
                f"(its config has an auto_map), and sluice runs only its native architectures "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}): it never runs remote code, with or "
                "without --trust-remote-code.")
        raise ModelLoadError(f"{path}: architecture {archs or 'missing'} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (sluice runs only "
                             "these native architectures, never code from a model repository, "
                             "with or without --trust-remote-code).")
    if not any(model_dir.glob("*.safetensors")) and not (model_dir / GGUF_MARKER).is_file():
        raise ModelLoadError(f"{model_dir} holds no *.safetensors weight files (nor a "
                             f"{GGUF_MARKER} naming a GGUF file).")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if not isinstance(cfg.get(k), int)]
    if missing:
        raise ModelLoadError(f"{path}: missing or non-integer fields: {', '.join(missing)}.")
    num_heads = cfg["num_attention_heads"]
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    if num_heads % num_kv_heads:
        raise ModelLoadError(f"{path}: num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads}).")
    is_qwen2 = arch == "Qwen2ForCausalLM"
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch ==
                                                    "MistralForCausalLM") else None
    quantization, fp8_kv_cache = read_checkpoint_quantization(cfg, path)
    return ModelSpec(
        path=str(model_dir.resolve()),
        architecture=arch,
        model_type=cfg.get("model_type", ""),
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_spec(cfg, path),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", is_qwen2)),
        qk_norm=arch == "Qwen3ForCausalLM",
        hidden_act=cfg.get("hidden_act", "silu"),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        eos_token_ids=_eos_ids(cfg, model_dir),
        bos_token_id=cfg.get("bos_token_id"),
        sliding_window=sliding,
        quantization=quantization,
        fp8_kv_cache=fp8_kv_cache,
        gguf=(model_dir / GGUF_MARKER).is_file(),
    )
