"""Checkpoints whose linear weights are stored in FP8 (e4m3): `quant_method` 'fp8'
(transformers' FineGrainedFP8 and vLLM's Fp8Config: Qwen's, DeepSeek's, RedHatAI's FP8
checkpoints) and compressed-tensors 'float-quantized' (llm-compressor's FP8 / FP8-dynamic).

Each quantized linear layer X is stored as `X.weight` float8_e4m3fn [out, in] with

    fp8, weight_block_size [R, C]:  X.weight_scale_inv float32 [ceil(out / R), ceil(in / C)]
    fp8, no block size:             X.weight_scale [] or [1] (one per tensor)
    compressed-tensors:             X.weight_scale [out, 1] (channel), [1] (tensor) or
                                    [ceil(out / R), ceil(in / C)] (block, block_structure)

    W[n, k] = weight[n, k] * scale[n / R, k / C]    (per channel: scale[n]; per tensor: scale)

(`weight_scale_inv` is multiplied, as transformers and vLLM do: the name is the quantizer's,
the inverse of the scale it divided by). A checkpoint made for fp8 activations may also store
`X.input_scale` (static activation scales): sluice multiplies float activations, so those are
read past, as vLLM does on hardware without fp8 products.

`read` gives the `quantized_checkpoint.StoredQuantization` of such a checkpoint: the scales
read up front, as float32 [out, in / 32] (the scale of each 32-input run of each output
channel: block scales repeated over the rows and runs they cover; per channel / tensor
[out or 1, 1]), and each weight's e4m3 values as it streams past.

By default every weight is dequantized as it loads, W = float32(weight) * scale (float32(e4m3)
is exact; one rounding of the product, as transformers' dequantization), then the model's
dtype: the float paths' GEMMs (oneDNN's bf16 on CPUs with bf16 products) are the fastest this
CPU has for W (`--quantization int8` then makes its own int8 blocks of W). With
`--quantization fp8` (or `compressed-tensors` for such a checkpoint: vLLM's names of the
format), where the C++ block kernels run, a layer keeps its fp8 bytes instead, as
`gguf_linear`'s F8_E4M3 blocks (a float32 d and 32 e4m3 values, 9 bits per weight:
`quantized_checkpoint.to_blocks`), run by `GgufBlockLinearMethod` with float activations: e4m3
widened exactly in registers, products and sums in float32, d applied per block, so results
equal F.linear on W up to summation order. That keeps the file's memory (SmolLM2 on an AMD
EPYC with AVX-512-BF16: single-request TPOT as the dequantized bf16 model's, batched W1 ~0.5x
its throughput: benchmarks/RESULTS.md). Block scales whose input runs are not whole 32-input
runs (block columns not a multiple of 32, or a layer's inputs not) are read as a per-input
group index instead, and the whole checkpoint is dequantized.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sluice.errors import ModelLoadError
from sluice.hf_config import CheckpointQuantization
from sluice.model.layers.gguf_linear import F8_BLOCK_TYPE
from sluice.model.layers.linear import LazyTensor, materialize
from sluice.model.quantized_checkpoint import BLOCK, WEIGHT_SUFFIX, StoredQuantization

#: the scale tensors, by suffix (`weight_scale_inv`: quant_method fp8 with blocks)
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
INPUT_SCALE_SUFFIX = ".input_scale"   # static fp8 activation scales: not used
FP8_WEIGHT_DTYPE = torch.float8_e4m3fn


def read(files: list[Path], scheme: CheckpointQuantization) -> StoredQuantization:
    """The checkpoint's FP8 weights (module doc) as a StoredQuantization: scales read now, each
    as float32 [out or 1, groups] (`_row_scales`); values checked to be e4m3 as the weights
    stream. ModelLoadError for a scale whose shape does not fit its weight and the scheme, or
    for an fp8 tensor without a scale."""
    from safetensors import safe_open

    names: list[str] = []
    raw_scales: dict[str, tuple[str, torch.Tensor]] = {}
    shapes: dict[str, list[int]] = {}
    consumed: set[str] = set()
    fp8: list[str] = []           # tensors stored in an 8-bit float type
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(INPUT_SCALE_SUFFIX):
                    consumed.add(name)
                    continue
                suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
                if suffix is not None:
                    consumed.add(name)
                    raw_scales[name[:-len(suffix)] + WEIGHT_SUFFIX] = (name, f.get_tensor(name))
                    continue
                names.append(name)
                handle = f.get_slice(name)
                shapes[name] = list(handle.get_shape())
                if handle.get_dtype().startswith("F8"):
                    fp8.append(name)
    unscaled = [name for name in fp8 if name not in raw_scales]
    if unscaled:
        raise ModelLoadError(f"{unscaled[0]}: an FP8 tensor without a weight scale "
                             f"({', '.join(SCALE_SUFFIXES)}): its values cannot be read.")
    scales: dict[str, torch.Tensor] = {}
    group_of_input: dict[str, torch.Tensor] = {}
    for weight, (stored, scale) in raw_scales.items():
        if weight not in shapes or len(shapes[weight]) != 2:
            raise ModelLoadError(f"{stored}: a weight scale without a 2-D weight {weight}.")
        out, inputs = shapes[weight]
        scales[weight], groups = _row_scales(stored, scale.to(torch.float32), out, inputs,
                                             scheme)
        if groups is not None:
            group_of_input[weight] = groups

    def values(stored: str, tensor: torch.Tensor | LazyTensor
               ) -> tuple[str, torch.Tensor] | None:
        if stored not in scales:
            return None
        q = materialize(tensor)
        if q.dtype != FP8_WEIGHT_DTYPE:
            raise ModelLoadError(f"{stored}: an FP8 weight (it has a scale) stored as "
                                 f"{q.dtype}, not {FP8_WEIGHT_DTYPE}.")
        return stored, q

    strategy = (f"{scheme.block_shape[0]}x{scheme.block_shape[1]} blocks"
                if scheme.block_shape else f"per {scheme.weight_strategy}")
    return StoredQuantization(f"{scheme.method} {scheme.scheme} ({strategy})",
                              None if group_of_input else F8_BLOCK_TYPE, names, scales, values,
                              group_of_input=group_of_input, consumed=consumed,
                              why_float="block scales that do not cover whole 32-input runs")


def _row_scales(name: str, scale: torch.Tensor, out: int, inputs: int,
                scheme: CheckpointQuantization) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stored scale of an [out, inputs] weight -> (float32 [out or 1, groups], None) or, for
    blocks that do not cover whole 32-input runs, (rows, each input's group int64 [inputs]).
    Blocks of R rows and C inputs, scales [ceil(out / R), ceil(inputs / C)]: rows repeated R
    times (the last block's cut); with C and inputs multiples of 32 each block column
    repeated C / 32 times (the last cut: group g = 32-input run g, in block column
    g * 32 // C), else input k in group k // C."""
    if scheme.block_shape is None:
        if scale.numel() == 1:
            return scale.reshape(1, 1), None
        if scheme.weight_strategy == "channel" and scale.numel() == out:
            return scale.reshape(out, 1), None
        expect = "one value" if scheme.weight_strategy == "tensor" else f"[{out}, 1]"
        raise ModelLoadError(f"{name}: shape {tuple(scale.shape)}; a per-"
                             f"{scheme.weight_strategy} scale of a [{out}, {inputs}] weight "
                             f"is {expect}.")
    rows, cols = scheme.block_shape
    grid = (-(-out // rows), -(-inputs // cols))
    if tuple(scale.shape) != grid:
        raise ModelLoadError(f"{name}: shape {tuple(scale.shape)}; {rows}x{cols} blocks of a "
                             f"[{out}, {inputs}] weight need scales {list(grid)}.")
    scale = scale.repeat_interleave(rows, dim=0)[:out]
    if cols % BLOCK == 0 and inputs % BLOCK == 0:
        runs = scale.repeat_interleave(cols // BLOCK, dim=1)[:, :inputs // BLOCK]
        return runs.contiguous(), None
    return scale.contiguous(), torch.arange(inputs) // cols
