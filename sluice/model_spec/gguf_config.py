"""GGUF metadata -> the config.json and generation_config.json of a sidecar directory. No torch.

Keys read (`<arch>` = general.architecture), and the HF field each becomes:

    <arch>.embedding_length               hidden_size
    <arch>.feed_forward_length            intermediate_size
    <arch>.block_count                    num_hidden_layers
    <arch>.attention.head_count           num_attention_heads
    <arch>.attention.head_count_kv        num_key_value_heads   (default: head_count)
    <arch>.attention.key_length           head_dim              (default: hidden / heads)
    <arch>.rope.dimension_count           must equal head_dim (partial RoPE is not supported)
    <arch>.context_length                 max_position_embeddings
    <arch>.attention.layer_norm_rms_epsilon  rms_norm_eps
    <arch>.rope.freq_base                 rope_theta            (default: 10000)
    <arch>.rope.scaling.type/.factor      rope_scaling linear   (others are refused)
    tensor rope_freqs.weight              rope_scaling llama3   (fitted, see `llama3_rope_scaling`)
    tensor token_embd.weight rows         vocab_size
    no tensor output.weight               tie_word_embeddings
    tensor blk.0.attn_q.bias              attention_bias
    tokenizer.ggml.{bos,eos,padding}_token_id   bos/eos/pad_token_id

Every failure is a `ModelLoadError` naming the file and the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.errors import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader

# llama.cpp's converter writes no llama3 RoPE parameters, only the resulting per-frequency
# factors; these are the values every Llama 3.x release uses (fitted when they do not match).
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _int(reader: GGUFReader, key: str, path: Path, default: int | None = None) -> int:
    from sluice.model_spec.gguf import field_value

    value = field_value(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{path}: metadata key {key} is "
                             f"{'missing' if value is None else f'not an integer ({value!r})'}.")
    return value


def _float(reader: GGUFReader, key: str, path: Path, default: float | None = None) -> float:
    from sluice.model_spec.gguf import field_value

    value = field_value(reader, key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ModelLoadError(f"{path}: metadata key {key} is "
                             f"{'missing' if value is None else f'not a number ({value!r})'}.")
    return float(value)


def _dominant_dtype(reader: GGUFReader) -> str:
    """The float dtype that holds the weights without loss: float32/float16/bfloat16 for
    files of that type, float32 for quantized files (a block's fp16 scale times its integer,
    plus its fp16 minimum, is exact in float32, not in bfloat16)."""
    from collections import Counter

    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    top = counts.most_common(1)[0][0] if counts else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(top, "float32")


def hf_config(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """The config.json dict (in the shape `sluice.hf_config` reads) of a validated reader."""
    from sluice.model_spec.gguf import GGUF_ARCHITECTURES, field_value

    arch = field_value(reader, "general.architecture")
    p = f"{arch}."
    hidden = _int(reader, p + "embedding_length", path)
    heads = _int(reader, p + "attention.head_count", path)
    kv_heads = _int(reader, p + "attention.head_count_kv", path, heads)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ModelLoadError(f"{path}: attention.head_count ({heads}) must be a positive "
                             f"multiple of attention.head_count_kv ({kv_heads}).")
    head_dim = _int(reader, p + "attention.key_length", path, hidden // heads)
    value_dim = _int(reader, p + "attention.value_length", path, head_dim)
    rope_dim = _int(reader, p + "rope.dimension_count", path, head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ModelLoadError(f"{path}: key length {head_dim}, value length {value_dim} and "
                             f"rope.dimension_count {rope_dim} must be equal; partial RoPE and "
                             "distinct value heads are not supported.")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: tensor token_embd.weight is missing.")
    has_bias = "blk.0.attn_q.bias" in tensors
    o_bias_expected = has_bias and arch != "qwen2"      # sluice: Qwen2 biases q/k/v only
    if ("blk.0.attn_output.bias" in tensors) != o_bias_expected:
        which = "with" if has_bias else "without"
        raise ModelLoadError(f"{path}: attention biases on q/k/v {which} an o_proj bias are "
                             f"not supported for architecture {arch}.")
    theta = _float(reader, p + "rope.freq_base", path, 10000.0)
    max_pos = _int(reader, p + "context_length", path, 2048)
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGUF dims: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": _int(reader, p + "feed_forward_length", path),
        "num_hidden_layers": _int(reader, p + "block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": _float(reader, p + "attention.layer_norm_rms_epsilon", path),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, path, arch, theta, head_dim, tensors),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": has_bias,
        "hidden_act": "silu",
        "torch_dtype": _dominant_dtype(reader),
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = field_value(reader, f"tokenizer.ggml.{gguf_key}")
        if isinstance(value, int):
            config[hf_key] = value
    return config


def generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """bos id and the end-of-generation ids llama.cpp stops on (eos, eot, eom), from the
    scalar metadata `GGUFInfo.metadata`."""
    out: dict[str, Any] = {}
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if isinstance(bos, int):
        out["bos_token_id"] = bos
    eos: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and value not in eos:
            eos.append(value)
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    pad = metadata.get("tokenizer.ggml.padding_token_id")
    if isinstance(pad, int):
        out["pad_token_id"] = pad
    return out


def _rope_scaling(reader: GGUFReader, path: Path, arch: str, theta: float, head_dim: int,
                  tensors: dict[str, Any]) -> dict[str, Any] | None:
    from sluice.model_spec.gguf import field_value

    kind = field_value(reader, f"{arch}.rope.scaling.type")
    scaling: dict[str, Any] | None = None
    if kind == "linear":
        scaling = {"rope_type": "linear",
                   "factor": _float(reader, f"{arch}.rope.scaling.factor", path)}
    elif kind not in (None, "none"):
        raise ModelLoadError(f"{path}: RoPE scaling type {kind!r} ({arch}.rope.scaling.type) is "
                             "not supported; supported: none, linear, llama3.")
    freqs = tensors.get("rope_freqs.weight")
    if freqs is None:
        return scaling
    if scaling is not None or freqs.tensor_type.name != "F32" or \
            int(freqs.n_elements) != head_dim // 2:
        raise ModelLoadError(f"{path}: tensor rope_freqs.weight ({freqs.tensor_type.name}, "
                             f"{int(freqs.n_elements)} values) is not Llama-3 RoPE factors for "
                             f"head_dim {head_dim}; not supported.")
    return llama3_rope_scaling([float(x) for x in freqs.data.reshape(-1)], theta, head_dim, path)


def llama3_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_position_embeddings: int
                   ) -> list[float]:
    """llama.cpp's `rope_freqs` for HF's llama3 rope_scaling: per frequency i in [0, D/2),
    the divisor of inv_freq_i = theta^(-2i/D):

        wavelen < orig/high          -> 1            (high frequencies kept)
        wavelen > orig/low           -> factor       (low frequencies divided by factor)
        otherwise, s = (orig/wavelen - low) / (high - low):  1 / ((1 - s)/factor + s)
    """
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original_max_position_embeddings / high_freq_factor:
            out.append(1.0)
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            out.append(factor)
        else:
            s = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - s) / factor + s))
    return out


def llama3_rope_scaling(freq_factors: list[float], theta: float, head_dim: int,
                        path: Path) -> dict[str, Any] | None:
    """HF's llama3 `rope_scaling` reproducing `freq_factors` (see `llama3_factors`): factor is
    their maximum; the Llama 3.x defaults for the rest if they reproduce the factors, else
    low/high fitted (least squares) on the blended frequencies, with
    original_max_position_embeddings 8192 (only the ratios orig/low and orig/high matter).
    Raises `ModelLoadError` if nothing reproduces them to 1e-4 relative."""
    factor = max(freq_factors)
    if factor <= 1.0 + 1e-6 and min(freq_factors) >= 1.0 - 1e-6:
        return None
    candidates = [dict(LLAMA3_DEFAULTS)]
    orig = LLAMA3_DEFAULTS["original_max_position_embeddings"]
    xs, ss = [], []          # orig / wavelen = low + s * (high - low), for blended frequencies
    for i, f in zip(range(0, head_dim, 2), freq_factors):
        if 1.0 + 1e-6 < f < factor * (1 - 1e-6):
            xs.append(orig / (2 * math.pi * theta ** (i / head_dim)))
            ss.append((1 / f - 1 / factor) / (1 - 1 / factor))
    if len(xs) >= 2:
        ms, mx = sum(ss) / len(ss), sum(xs) / len(xs)
        var = sum((s - ms) ** 2 for s in ss)
        if var > 0:
            slope = sum((s - ms) * (x - mx) for s, x in zip(ss, xs)) / var
            low = mx - slope * ms
            candidates.append({"low_freq_factor": float(f"{low:.6g}"),   # 127.99998 -> 128
                               "high_freq_factor": float(f"{low + slope:.6g}"),
                               "original_max_position_embeddings": orig})
    for params in candidates:
        if params["high_freq_factor"] <= params["low_freq_factor"] or \
                params["low_freq_factor"] <= 0:
            continue
        rebuilt = llama3_factors(theta, head_dim, factor, **params)
        if all(abs(a - b) <= 1e-4 * max(abs(b), 1.0) for a, b in zip(rebuilt, freq_factors)):
            return {"rope_type": "llama3", "factor": factor, **params}
    raise ModelLoadError(f"{path}: tensor rope_freqs.weight holds RoPE frequency factors that "
                         "match no Llama-3 rope_scaling; not supported.")
