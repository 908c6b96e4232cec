"""Checkpoints with FP8 (e4m3) linear weights, as transformers' FineGrainedFP8 quantizer,
vLLM's Fp8Config exports and llm-compressor's FP8 schemes write them, for tests; the formats
`sluice.model.fp8_checkpoint` reads. Each decoder linear weight W [out, in] becomes

    q = e4m3(W / s) (round to nearest, saturating at +-448), s = max |W| / 448 over its block
    (R x C weights: `weight_block_size` / `block_structure`), its output channel, or the tensor

with s stored as `weight_scale_inv` (quant_method fp8 with blocks, float32), else
`weight_scale` (float32 for quant_method fp8, the given dtype for compressed-tensors). W' =
float32(q) * s is the weight the checkpoint means (`dequantized`)."""

from __future__ import annotations

import torch

from sluice.testing.compressed_checkpoints import compressed_tensors_config, quantize_linears

E4M3_MAX = 448.0


def fp8_config(block: tuple[int, int] | None = (128, 128), activation_scheme: str = "dynamic",
               **changes) -> dict:
    """transformers' / vLLM's `quant_method` 'fp8' quantization_config: block scales of
    `block` [rows, inputs], or per tensor for None."""
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": activation_scheme}
    if block is not None:
        config["weight_block_size"] = list(block)
    config.update(changes)
    return config


def float_quantized_config(strategy: str = "channel", block: tuple[int, int] | None = None,
                           activations: bool = True, **changes) -> dict:
    """llm-compressor's compressed-tensors quantization_config of an FP8 checkpoint (format
    float-quantized): weights per `strategy` ('block' with `block`), dynamic per-token fp8
    activations (FP8-dynamic) or none (`activations` False: W8A16)."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": strategy, "group_size": None, "observer": "minmax",
               "block_structure": list(block) if block else None}
    acts = ({"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
             "strategy": "token", "group_size": None} if activations else None)
    return compressed_tensors_config("float-quantized", weights, acts, **changes)


def quantize_fp8(tensors: dict[str, torch.Tensor], block: tuple[int, int] | None = None,
                 per_channel: bool = False, scale_name: str = "weight_scale",
                 scale_dtype: torch.dtype = torch.float32,
                 input_scale: bool = False) -> tuple[dict, dict]:
    """A float checkpoint's tensors -> (its FP8 tensors (module doc: scales per `block`, per
    output channel, or per tensor, named `scale_name`, stored in `scale_dtype`; with
    `input_scale` a float32 static `input_scale` per layer too), the same with every FP8
    weight as the float32 weight it means)."""
    def one(name: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        n, k = w.shape
        if block is not None:
            r, c = block
            grid = torch.nn.functional.pad(w.abs(), (0, -k % c, 0, -n % r))
            amax = grid.view(grid.shape[0] // r, r, grid.shape[1] // c, c).amax(dim=(1, 3))
        elif per_channel:
            amax = w.abs().amax(dim=1, keepdim=True)
        else:
            amax = w.abs().amax()
        scale = (amax / E4M3_MAX).clamp_min(1e-12).to(scale_dtype)
        full = scale.float()
        if block is not None:
            full = full.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
        q = (w / full).to(torch.float8_e4m3fn)
        stored = {"weight": q, scale_name: scale}
        if input_scale:
            stored["input_scale"] = torch.tensor(0.05, dtype=torch.float32)
        return stored, q.float() * full

    return quantize_linears(tensors, one)
