"""Int8 W8A8 checkpoints as llm-compressor writes them (compressed-tensors, `format`
int-quantized): for tests and benchmarks (`benchmarks/make_w8a8_checkpoint.py`), the format
`sluice.model.checkpoint_int8` reads. Each decoder linear weight W [out, in] is stored as

    weight = round(W / scale) in [-127, 127] (int8),  weight_scale = max_k |W[n, k]| / 127 (bf16,
    [out, 1])

and config.json gains the `quantization_config` of dynamic per-token int8 activations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

#: the decoder linear weights quantized (HF names: `...{name}.weight`)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def w8a8_config(strategy: str = "channel", **changes) -> dict:
    """llm-compressor's quantization_config of an int8 W8A8 (dynamic per-token) checkpoint."""
    group = {"targets": ["Linear"], "output_activations": None,
             "weights": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
                         "strategy": strategy, "group_size": None, "observer": "minmax"},
             "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                   "dynamic": True, "strategy": "token", "group_size": None}}
    config = {"quant_method": "compressed-tensors", "format": "int-quantized",
              "quantization_status": "compressed", "ignore": ["lm_head"],
              "kv_cache_scheme": None, "config_groups": {"group_0": group}}
    config.update(changes)
    return config


def quantize_w8a8(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """A float checkpoint's tensors -> (its W8A8 tensors: each decoder linear weight as int8 per
    output channel + a bf16 `weight_scale` [out, 1]; the same with every such weight as float32
    q * scale; {weight name: (q, float32 scale)})."""
    quantized, dequantized, parts = {}, {}, {}
    for name, w in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            w = w.float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 127).to(torch.bfloat16)
            q = torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)
            quantized[name] = q
            quantized[name[:-len("weight")] + "weight_scale"] = scale
            dequantized[name] = q.float() * scale.float()
            parts[name] = (q, scale.float())
        else:
            quantized[name] = dequantized[name] = w
    return quantized, dequantized, parts


def write_checkpoint(src: Path, dst: Path, quantization_config: dict | None,
                     tensors: dict[str, torch.Tensor], torch_dtype: str | None = None) -> Path:
    """`src`'s config and tokenizer files (config.json with `quantization_config` and
    `torch_dtype` set where given) and `tensors` as dst/model.safetensors."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "sluice_gguf.json"))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    if torch_dtype is not None:
        config["torch_dtype"] = torch_dtype
    (dst / "config.json").write_text(json.dumps(config))
    return dst
