"""KV-cache scales for a float checkpoint, as llm-compressor's static fp8 `kv_cache_scheme`
calibrates them, for tests and benchmarks (`benchmarks/make_compressed_checkpoint.py
--kv-scales`): run calibration text through HF transformers and keep, per layer,

    k_scale = max |key| / 448,  v_scale = max |value| / 448

over the keys (after RoPE, as the KV cache holds them) and values of every token, so that
k / k_scale and v / v_scale fill e4m3's range. Stored as float32 scalars named
`model.layers.N.self_attn.k_scale` / `v_scale`, the names `sluice.model.attention.kv_scales`
(and vLLM) read."""

from __future__ import annotations

from pathlib import Path

import re

import torch

from sluice.testing.fp8_checkpoints import E4M3_MAX


def kv_cache_scheme() -> dict:
    """llm-compressor's `kv_cache_scheme` of static per-tensor fp8 scales."""
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
            "symmetric": True, "group_size": None, "observer": "minmax"}


def calibrate_kv_scales(hf_model: torch.nn.Module, token_lists: list[list[int]]
                        ) -> dict[str, torch.Tensor]:
    """The scales (module doc) of `hf_model` (a transformers causal LM in eval mode) over
    the calibration prompts, each run alone; float32 [] tensors by checkpoint name."""
    amax: dict[str, float] = {}
    with torch.inference_mode():
        for ids in token_lists:
            out = hf_model(torch.tensor([ids]), use_cache=True)
            cache = out["cache"] if "cache" in out else out["past_key_values"]  # (older names)
            for layer, entry in enumerate(cache.layers):
                for which, x in (("k", entry.keys), ("v", entry.values)):
                    name = f"model.layers.{layer}.self_attn.{which}_scale"
                    amax[name] = max(amax.get(name, 0.0), float(x.float().abs().max()))
    return {name: torch.tensor(value / E4M3_MAX, dtype=torch.float32)
            for name, value in amax.items()}


def hf_model_of(config_dir: Path, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A float32 transformers model of `config_dir`'s config.json holding `tensors` (float
    ones; a tied LM head follows the embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(
        {name: t.float() for name, t in tensors.items()}, strict=False)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"tensors do not fit {config_dir}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def modelopt_names(scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same scales under NVIDIA ModelOpt's names (`self_attn.k_proj.k_scale`, ...)."""
    return {re.sub(r"\.self_attn\.([kv])_scale$", r".self_attn.\1_proj.\1_scale", name): value
            for name, value in scales.items()}
