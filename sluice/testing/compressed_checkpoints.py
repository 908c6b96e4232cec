"""Checkpoints in compressed-tensors' layouts as llm-compressor writes them (round to nearest,
symmetric), for tests and benchmarks (`benchmarks/make_compressed_checkpoint.py`); the format
`sluice.model.compressed_tensors` reads. Each decoder linear weight W [out, in] is stored as

    W8A8 (int-quantized): weight = round(W / s) in [-127, 127] int8, s = max_k |W[n, k]| / 127
        per output channel (`weight_scale` bf16 [out, 1]); activations: dynamic per-token int8
    W4A16 (pack-quantized): q = round(W / s) in [-8, 7] with s = max |W| / 7.5 over each group
        of `group_size` inputs (`weight_scale` bf16 [out, in / group_size]), packed eight per
        int32 (`weight_packed` [out, in / 8], value 8j + i in bits 4i.., stored as q + 8) with
        `weight_shape`; activations stay 16-bit

and config.json gains the matching `quantization_config`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

#: the decoder linear weights quantized (HF names: `...{name}.weight`)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def compressed_tensors_config(fmt: str, weights: dict, input_activations: dict | None,
                              **changes) -> dict:
    """llm-compressor's quantization_config of a compressed-tensors checkpoint in format `fmt`:
    one config group over every Linear but the LM head, with these weights' and input
    activations' quantization args (None: not quantized); `changes` replace top-level keys."""
    group = {"targets": ["Linear"], "weights": weights, "input_activations": input_activations,
             "output_activations": None}
    config = {"quant_method": "compressed-tensors", "format": fmt,
              "quantization_status": "compressed", "ignore": ["lm_head"],
              "kv_cache_scheme": None, "config_groups": {"group_0": group}}
    config.update(changes)
    return config


def w4a16_config(group_size: int | None = 128, symmetric: bool = True, **changes) -> dict:
    """llm-compressor's quantization_config of an int4 W4A16 (pack-quantized) checkpoint:
    per group of `group_size` inputs, or per channel for None; with zero points unless
    `symmetric`."""
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "group" if group_size else "channel", "group_size": group_size,
               "actorder": None, "observer": "minmax"}
    return compressed_tensors_config("pack-quantized", weights, None, **changes)


def w8a8_config(strategy: str = "channel", **changes) -> dict:
    """llm-compressor's quantization_config of an int8 W8A8 (dynamic per-token) checkpoint."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": strategy, "group_size": None, "observer": "minmax"}
    activations = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                   "strategy": "token", "group_size": None}
    return compressed_tensors_config("int-quantized", weights, activations, **changes)


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `model_dir`, by name."""
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def quantize_linears(tensors: dict[str, torch.Tensor], quantize_one
                      ) -> tuple[dict, dict]:
    """(tensors with each decoder linear weight `...X.weight` replaced by the tensors
    `quantize_one(name, W float32)` names by suffix (`...X.qweight`, ...), the same with each
    such weight as the oracle it returns)."""
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        if not (name.endswith(".weight") and name.split(".")[-2] in LINEARS):
            quantized[name] = dequantized[name] = w
            continue
        stored, dequantized[name] = quantize_one(name, w.float())
        quantized.update({name[:-len("weight")] + key: t for key, t in stored.items()})
    return quantized, dequantized


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


def pack(values: torch.Tensor, bits: int, dim: int,
         order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned values < 2^bits [r, c] -> int32 words, p = 32 / bits values each along `dim`:
    value j of a run of p goes to slot order[j] (default j), bits bits * slot .. ."""
    per = 32 // bits
    slots = order or tuple(range(per))
    v = values.to(torch.int64) & ((1 << bits) - 1)
    rows, cols = v.shape
    # runs of p along `dim` as the middle (dim 0) or last (dim 1) axis
    v = v.view(rows // per, per, cols) if dim == 0 else v.view(rows, cols // per, per)
    words = torch.zeros(v.shape[0], v.shape[2] if dim == 0 else v.shape[1], dtype=torch.int64)
    for j in range(per):
        words |= (v[:, j, :] if dim == 0 else v[:, :, j]) << (bits * slots[j])
    return torch.from_numpy(words.numpy().astype(np.uint32).view(np.int32))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values [rows, cols] in [-8, 7] (cols a multiple of 8) -> int32 [rows, cols / 8]:
    value 8j + i of a row in bits 4i .. 4i + 3 of word j, stored as q + 8."""
    return pack(q.to(torch.int64) + 8, 4, dim=1)


def quantize_w4a16(tensors: dict[str, torch.Tensor], group_size: int | None,
                   symmetric: bool = True) -> tuple[dict, dict, dict]:
    """A float checkpoint's tensors -> (its W4A16 tensors (module doc; asymmetric: scale =
    (max - min) / 15 per group, zero point z = -8 - round(min / scale), q = round(W / scale) +
    z, `weight_zero_point` packed along the output dimension); the same with every quantized
    weight as float32 (q - z) * scale; {weight name: (q int8 [out, in], float32 scale [out,
    groups], int8 z [out, groups])})."""
    quantized, dequantized, parts = {}, {}, {}
    for name, w in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            w = w.float()
            n, k = w.shape
            g = group_size or k
            groups = w.view(n, k // g, g)
            if symmetric:
                scale = (groups.abs().amax(dim=2) / 7.5).clamp_min(1e-8).to(torch.bfloat16)
                zero = torch.zeros(scale.shape, dtype=torch.int8)
            else:
                low, high = groups.amin(dim=2), groups.amax(dim=2)
                scale = ((high - low) / 15).clamp_min(1e-8).to(torch.bfloat16)
                zero = (-8 - torch.round(low / scale.float())).clamp(-8, 7).to(torch.int8)
            q = torch.round(groups / scale.float().unsqueeze(2)) + zero.unsqueeze(2)
            q = q.clamp(-8, 7).to(torch.int8).view(n, k)
            base = name[:-len("weight")]
            quantized[base + "weight_packed"] = pack_int4(q)
            quantized[base + "weight_scale"] = scale
            quantized[base + "weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            if not symmetric:
                packed_zero = pack_int4(zero.t().contiguous()).t()    # [out / 8, groups]
                quantized[base + "weight_zero_point"] = packed_zero.contiguous()
            dequantized[name] = ((q.float().view(n, k // g, g) - zero.float().unsqueeze(2))
                                 * scale.float().unsqueeze(2)).view(n, k)
            parts[name] = (q, scale.float(), zero)
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
