"""`--quantization int8`: the decoder's linear weights quantized to 8 bits at load.

`quantize_linear_layers(model, ops)` runs once the float checkpoint is loaded (the loader,
before `process_weights_after_loading`). Every decoder linear layer (`LinearBase`: the
q/k/v, o, gate/up and down projections) whose local `in_features` is a multiple of 32 has its
float weight [out, in] replaced by int8 values in llama.cpp's Q8_0 blocks, quantized by
gguf-py: along each output channel (row n), every 32 consecutive weights k = 32b .. 32b + 31
share one fp16 scale

    d[n, b] = max_k |W[n, k]| / 127,   q[n, k] = round(W[n, k] / d[n, b])  in [-127, 127]

(34 bytes per 32 weights: 8.5 bits per weight, 27% of float32), and the layer takes the
`GgufBlockLinearMethod` of type Q8_0 with int8 activations: the C++ `gguf_linear` for up to 8
rows (decode) quantizes each activation row per 32-element block the same way (xd = max / 127)
and computes llama.cpp's integer dot products (vpmaddubsw/vpmaddwd, int32 per block, one FMA
per block with d * xd: 1.1-1.9x the float-activation kernel at one row, by CPU and file); more rows
(prefill) run dequantized panels + sgemm with float activations — except on an x86 CPU with
AVX2 or AVX512-VNNI, where the layers' blocks are regrouped in place at load and every row
count runs int8 activations on vpdpbusd or its AVX2 form (`gguf_linear`'s VNNI_PACKED_FLAG;
csrc/vnni_linear.cpp). The fused decode stack runs
these layers. A scale per 32 weights rather than one per output channel costs 6% more memory
and keeps the error of a channel with one large weight local to its block.

Why per 32 values and not per token / per channel (vLLM's W8A8): per-token int8 activations
were measured on SmolLM2-135M-Instruct's held-out perplexity at +2.8% with 127 levels and
+11.9% with the 63 levels that AVX2's int16-saturating u8 x s8 products leave to oneDNN
(20.95 -> 21.53 / 23.44): activation outliers need finer scales than a token's. Per-block
activations with per-block weights: +0.62% (21.08) with every forward on the int8 path.

A GGUF model keeps its file's blocks (`sluice.model.gguf_quant` with mode 'int8'): its
Q4_0/Q4_1/Q8_0/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K blocks, the LM head's included, compute with int8
activations in decode steps, and only linear layers the file stores in another form are quantized here.

The embedding and the LM head of a float checkpoint stay float (as vLLM's int8 schemes keep them), as does a layer
whose in_features is not a multiple of 32 (a row-parallel shard) — logged with the count.
"""

from __future__ import annotations

import logging
from types import ModuleType

import numpy as np
import torch
from torch import nn

from sluice.model.layers.gguf_linear import BLOCK_TYPES, GgufBlockLinearMethod
from sluice.model.layers.linear import LinearBase

logger = logging.getLogger(__name__)

INT8_BLOCK_TYPE = "Q8_0"


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """float [N, K] (K a multiple of 32) -> uint8 Q8_0 blocks [N, K / 32 * 34], by gguf-py."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    values = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    blocks = quantize(np.ascontiguousarray(values), GGMLQuantizationType[INT8_BLOCK_TYPE])
    return torch.from_numpy(np.ascontiguousarray(blocks))


def quantize_linear_layers(model: nn.Module, ops: ModuleType | None) -> int:
    """Give the loaded `model`'s decoder linear layers Q8_0 int8 weights (module doc); returns
    how many were quantized."""
    block = BLOCK_TYPES[INT8_BLOCK_TYPE]
    method = GgufBlockLinearMethod(ops, INT8_BLOCK_TYPE, int8_activations=True,
                                   bf16_products=True)
    quantized, left_float = 0, 0
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        weight = module.weight
        if weight.dtype == torch.uint8:  # already blocks
            continue
        if module.in_features % block.block_elems:
            left_float += 1
            continue
        blocks = quantize_q8_0(weight).to(weight.device)
        module.weight = nn.Parameter(blocks, requires_grad=False)
        module.linear_method = method
        quantized += 1
    logger.info("int8: %d linear layers quantized to int8 (Q8_0 blocks, int8 activations up to "
                "8 rows)%s; embedding and LM head float%s.", quantized,
                "" if ops is not None else " run by the pure-torch reference (no C++ kernels)",
                f"; {left_float} layers left float (in_features not a multiple of "
                f"{block.block_elems})" if left_float else "")
    return quantized
