"""KV-cache scales: the per-layer `k_scale` / `v_scale` an FP8 checkpoint carries for an fp8 KV
cache (llm-compressor's `kv_cache_scheme`, quant_method fp8 with static KV scales, NVIDIA
ModelOpt), read as vLLM reads them.

An fp8 cache (`--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`) then stores fp8(k / k_scale) and
fp8(v / v_scale), and attention reads k = stored * k_scale, v = stored * v_scale. Any other
cache stores k and v themselves and the scales are not used: vLLM's rule (its
`BaseKVCacheMethod` sets them to 1 unless the cache is fp8), since a bf16 / float32 cache holds
the values more precisely than any scaled fp8 one. A checkpoint without scales, or a model
with an fp8 cache and no scales, stores with scale 1.

Checkpoint names, per decoder layer (prefix `model.layers.N.self_attn.`):

    k_scale, v_scale                        llm-compressor / vLLM (the current names)
    k_proj.k_scale, v_proj.v_scale          NVIDIA ModelOpt
    k_proj.output_scale, v_proj.output_scale   older compressed-tensors checkpoints
    kv_scale                                AutoFP8 (deprecated): one scale for both
    q_scale, prob_scale                     fp8 attention's query / softmax scales, for GPU
                                            kernels that multiply fp8 queries; read past, as
                                            vLLM's CPU backend does (sluice's attention
                                            computes in float32)

Each scale is one positive finite number (shape [] or [1]); per-head or per-channel scales
(a `kv_cache_scheme` of strategy 'attn_head') are a ModelLoadError naming the tensor: vLLM 0.32
runs them on GPU attention backends only, its CPU attention takes per-tensor scales.

How the kernels apply them (`Attention.forward`, the fused decode stack): nothing in the
attention kernels changes. With k' = k / k_scale and v' = v / v_scale written to the cache,
softmax(q . k * s) v = v_scale * softmax(q . k' * (s * k_scale)) v', so the layer hands the
backend k', v' and the softmax scale s * k_scale, and multiplies its output by v_scale. The
division is a multiplication by `inverse(scale)` (float32), in Python and C++ alike, so both
write the same cache bytes.
"""

from __future__ import annotations

import math
import re

import torch

from sluice.errors import ModelLoadError
from sluice.model.attention.kv_cache import FP8_KV_DTYPES

#: checkpoint name -> (layer, which scale: 'k', 'v' or 'kv' for both); see the module doc
_KV_SCALE_NAME = re.compile(
    r"model\.layers\.(\d+)\.self_attn\."
    r"(?:(k|v|kv)_scale|(k)_proj\.k_scale|(v)_proj\.v_scale|(k|v)_proj\.output_scale)$")

#: the fp8 caches by their `--kv-cache-dtype` names
FP8_CACHE_NAMES = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}

#: fp8 attention's scales (module doc): read past
FP8_ATTENTION_SCALE_SUFFIXES = (".self_attn.q_scale", ".self_attn.prob_scale")


def kv_scale_target(name: str) -> tuple[int, str] | None:
    """(layer index, 'k' | 'v' | 'kv') for a checkpoint's KV-cache scale tensor, else None."""
    match = _KV_SCALE_NAME.fullmatch(name)
    if match is None:
        return None
    which = next(group for group in match.groups()[1:] if group is not None)
    return int(match.group(1)), which


def scale_value(name: str, tensor: torch.Tensor) -> float:
    """The one positive finite number a per-tensor scale holds; ModelLoadError naming `name`
    otherwise."""
    if tensor.numel() != 1:
        raise ModelLoadError(
            f"{name}: a KV-cache scale of shape {tuple(tensor.shape)}; sluice reads one scale "
            "per layer (shape [] or [1]), as vLLM's CPU attention does, not per-head or "
            "per-channel scales.")
    value = float(tensor.reshape(()).to(torch.float64))
    if not (math.isfinite(value) and value > 0):
        raise ModelLoadError(f"{name}: a KV-cache scale of {value}; a positive finite "
                             "number is expected.")
    return value


def inverse(scale: float) -> float:
    """1 / scale rounded to float32: what k and v are multiplied by before they are stored
    (`torch` multiplies a float32 tensor by a Python float in float32; the C++ stack
    likewise), so the Python and C++ cache writes agree bit for bit."""
    return float(torch.tensor(1.0 / scale, dtype=torch.float32))


def kv_scales_note(model: torch.nn.Module, cache_dtype: torch.dtype) -> str | None:
    """A log line saying whether `model`'s KV-cache scales (if it has any) are used with a
    `cache_dtype` cache; None for a model without scales."""
    from sluice.model.attention.layer import Attention   # (it imports this module)

    scaled = sum(isinstance(m, Attention) and m.has_kv_scales for m in model.modules())
    if not scaled:
        return None
    cache = FP8_CACHE_NAMES.get(cache_dtype, str(cache_dtype).removeprefix("torch."))
    if cache_dtype in FP8_KV_DTYPES:
        return f"{cache} KV cache with the checkpoint's KV-cache scales ({scaled} layers)."
    return (f"the checkpoint's KV-cache scales ({scaled} layers) apply to an fp8 KV cache "
            f"only (--kv-cache-dtype fp8); this {cache} cache stores keys and values unscaled.")
