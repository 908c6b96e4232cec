"""Build a model and fill its weights from safetensors files, a GGUF file (or random 'dummy'
weights).

Safetensors: `model.safetensors.index.json` (sharded; its weight_map names the shards) if
present, else `model.safetensors`, else every `*.safetensors` in the directory. Files are opened
with `safe_open` (memory-mapped) and handed to the model as `LazyTensor`s (`get_slice`
handles): each parameter's weight loader reads only its rank's slice (tensor parallelism: no
rank reads the rows or columns other ranks hold), copied once into its (fused) parameter,
converting dtype on the way (e.g. a bf16 checkpoint into float32 parameters on CPU).
GGUF: a sidecar directory (`sluice.model_spec.gguf.prepare_gguf`) holds the marker
`sluice_gguf.json` naming the .gguf file; its tensors are dequantized one at a time by
`sluice.model.gguf_weights.iterate_gguf`. Under tensor parallelism each rank dequantizes a
whole tensor and then keeps its slice (quantized blocks do not split on arbitrary rows): one
tensor's float32 copy at a time, never the whole model. Linear weights of the types sluice's
kernels run (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) keep their blocks instead
(`--quantization`, see `sluice.model.gguf_quant`): their layers get a `GgufBlockLinearMethod`
right after the model is built and are filled with the file's bytes.
A checkpoint stored quantized (compressed-tensors W8A8 / W4A16, GPTQ, AWQ:
`ModelSpec.quantization`) keeps its integers as Q8_0 / Q4_0 / Q4_1 blocks where the block
kernels run (`sluice.model.quantized_checkpoint`), else is dequantized exactly as it loads; an
FP8 checkpoint's e4m3 weights are dequantized as they load, or kept as F8_E4M3 blocks under
`--quantization fp8` (`sluice.model.fp8_checkpoint`).
Under pipeline parallelism the model skips the tensors of other stages' layers (safetensors:
never read; GGUF: dequantized and dropped).
Every failure is a `ModelLoadError` naming the path and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from sluice.config import LoRAConfig
from sluice.errors import ConfigError, ModelLoadError
from sluice.hf_config import ModelSpec
from sluice.model.fused_decode import install_fused_decode
from sluice.model.host_memory import place_parameters_in_huge_pages
from sluice.model.layers.layer_ops import LayerOps, building_with, select_layer_ops
from sluice.model.layers.linear import LazyTensor
from sluice.model.layers.linear_method import process_weights_after_loading
from sluice.model.models.registry import get_model_class
from sluice.model_spec.gguf import GGUF_MARKER, read_marker

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
#: `--quantization` values naming a stored format (vLLM's names): accepted for such a
#: checkpoint only, they keep the format's own (float) activations
STORED_FORMAT_MODES = ("compressed-tensors", "gptq", "awq", "fp8", "modelopt")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_dtype(config_dtype: str, spec: ModelSpec, device: torch.device | str) -> torch.dtype:
    """'auto' -> on CPU the platform's rule (`CpuPlatform.default_dtype`: a bf16 checkpoint
    stays bf16 where the CPU multiplies bf16 natively, else float32), the checkpoint's dtype
    (float32 if unknown) elsewhere; an explicit name maps to that dtype."""
    if config_dtype == "auto":
        if torch.device(device).type == "cpu":
            from sluice.platform.cpu import CpuPlatform
            return CpuPlatform().default_dtype(spec.torch_dtype)
        return _DTYPES.get(spec.torch_dtype or "float32", torch.float32)
    if config_dtype not in _DTYPES:
        raise ConfigError(f"--dtype {config_dtype!r} is not supported; choose auto, float32, "
                          "bfloat16 or float16.")
    return _DTYPES[config_dtype]


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files to read, validated to exist."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index "
                                 f"(need a 'weight_map' object): {e}") from None
        files = [model_dir / s for s in shards]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} references missing shard file(s): "
                                 f"{', '.join(absent)}; re-download the model.")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} holds no *.safetensors weight files.")
    return files


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, LazyTensor]]:
    """(name, lazy tensor) for every tensor, memory-mapped on CPU: nothing is read until the
    consumer narrows or materializes it (valid until the iterator moves to the next file).

    A corrupt or truncated file raises ModelLoadError naming it."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, LazyTensor(f.get_slice(name))
        except SafetensorError as e:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({e}); it may be "
                                 "truncated or corrupt — re-download it.") from None
        except OSError as e:
            raise ModelLoadError(f"cannot read {path}: {e}") from None


def weight_source(model_dir: str | Path, load_format: str
                  ) -> Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor | LazyTensor]]
                                ] | None:
    """What `load_model` reads for `load_format` in `model_dir`, validated before the model is
    built: a function dtype -> (name, tensor) iterator, or None for dummy weights.

        dummy                          -> None
        gguf, or auto + GGUF marker    -> iterate_gguf(the marked file)
        safetensors, or auto           -> iterate_safetensors(safetensors_files(model_dir))
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format '{load_format}' is not supported; "
                             f"choose {', '.join(LOAD_FORMATS)}.")
    if load_format == "dummy":
        return None
    gguf_file = read_marker(model_dir)
    if gguf_file is not None and load_format in ("auto", "gguf"):
        from sluice.model.gguf_weights import iterate_gguf
        return lambda dtype: iterate_gguf(gguf_file, dtype)
    if gguf_file is not None:
        raise ModelLoadError(f"{model_dir} is the sidecar of GGUF file {gguf_file} and holds no "
                             "safetensors; use --load-format auto or gguf.")
    if load_format == "gguf":
        raise ModelLoadError(f"--load-format gguf needs a .gguf file, but {model_dir} has no "
                             f"{GGUF_MARKER}; pass the .gguf file itself.")
    files = safetensors_files(model_dir)
    return lambda dtype: iterate_safetensors(files)


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Seeded random weights (same values on every device): norms 1, others N(0, 0.02).
    Under tensor parallelism every rank draws its (equal-shaped) shards from the same sequence,
    so replicated parameters agree across ranks; the model is valid but not the TP=1 one (nor,
    with pipeline stages, each holding some layers, the PP=1 one)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02,
                                                                            generator=gen)
            param.data.copy_(values)


def load_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto", *, max_model_len: int | None = None,
               attn_backend: str | None = None, layer_ops: str | LayerOps = "torch",
               seed: int = 0, layer_range: tuple[int, int] | None = None,
               lora: LoRAConfig | None = None, quantization: str | None = None) -> nn.Module:
    """Build `spec.architecture` on `device` in `dtype` and load its weights; returns the
    model in eval mode with requires_grad off, its layers computing with `layer_ops`
    ('torch' or 'cpu', see `sluice.model.layers.layer_ops`, resolved for this dtype and device
    by `select_layer_ops` before the model is built; or a ready `LayerOps`). `load_format`:
    'auto'/'safetensors' read the checkpoint, 'dummy' fills seeded random weights without
    touching files; 'gguf' (or 'auto' on a GGUF sidecar directory) reads the GGUF file the
    directory's marker names. `layer_range` (a pipeline stage's decoder layers; default all)
    builds and loads only that stage's part of the model (see the model interface). With
    `lora.enable_lora` the decoder projections are wrapped in `LoRALinearMethod`s
    (`sluice.lora.layers.wrap_lora_layers`: `lora.max_loras` zeroed adapter slots of rank
    `lora.max_lora_rank` each) right after the model is built, before the fast paths read
    the layers' methods (the fused decode stack then runs only steps without adapter tokens).
    `quantization` (`ModelConfig.quantization`: None, 'gguf', 'none', 'int8' or one of
    STORED_FORMAT_MODES) says which GGUF linear
    weights keep their blocks (`sluice.model.gguf_quant`); 'int8' quantizes the decoder's
    linear weights to int8 Q8_0 blocks once loaded (`sluice.model.int8_quant`).

    Order: layer ops chosen -> model built (each linear layer takes its `LinearMethod`; GGUF
    layers that keep their blocks, and a compressed-tensors checkpoint's layers, take a
    `GgufBlockLinearMethod`; a GPTQ / AWQ one's likewise) ->
    weights placed and loaded -> int8 quantization (`--quantization int8`) ->
    `process_weights_after_loading` (packed copies, the greedy
    screen) -> the fused decode stack where it supports every layer."""
    weights = weight_source(spec.path, load_format)
    model_cls = get_model_class(spec.architecture)
    device = torch.device(device)
    ops = (layer_ops if isinstance(layer_ops, LayerOps)
           else select_layer_ops(layer_ops, dtype, device))
    weight_dtype, dtype = dtype, ops.model_dtype(dtype)  # 16-bit weights, float32 compute
    with torch.device(device), building_with(ops):
        model = model_cls(spec, dtype, max_model_len=max_model_len, attn_backend=attn_backend,
                          layer_range=layer_range)
    gguf_file = read_marker(spec.path) if load_format in ("auto", "gguf") else None
    if gguf_file is None and quantization == "gguf":
        raise ConfigError(f"--quantization gguf needs a GGUF model (a .gguf file); {spec.path} "
                          f"is not one (--load-format {load_format}).")
    if quantization in STORED_FORMAT_MODES and (spec.quantization is None
                                                or spec.quantization.method != quantization
                                                or gguf_file is not None):
        stored = "a float checkpoint" if spec.quantization is None or gguf_file is not None \
            else f"a {spec.quantization.method} checkpoint"
        hint = (" sluice does not quantize weights to fp8 at load; --quantization int8 makes "
                "8-bit weights of any checkpoint." if quantization == "fp8" else "")
        raise ConfigError(f"--quantization {quantization} needs a {quantization} checkpoint "
                          f"(config.json's quantization_config); {spec.path} is {stored}. "
                          f"Leave --quantization unset for the model's own weights.{hint}")
    if gguf_file is not None:
        from sluice.model.gguf_quant import keep_gguf_blocks
        from sluice.model.gguf_weights import iterate_gguf
        from sluice.model_spec.gguf import gguf_reader
        reader = gguf_reader(gguf_file)  # the header parsed once for both steps
        plan = keep_gguf_blocks(model, reader, quantization, ops.cpu_ops, dtype, device,
                                lora_enabled=lora is not None and lora.enable_lora,
                                bf16_products=weight_dtype == torch.bfloat16)
        weights = lambda dtype: iterate_gguf(reader, dtype, plan.kept,  # noqa: E731
                                             plan.requantized, plan.transcoded)
    if spec.quantization is not None and weights is not None and gguf_file is None:
        weights = _compressed_source(model, spec, weights, quantization, ops, dtype, device,
                                     lora, weight_dtype)
    if weight_dtype != dtype:
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if embed is not None and hasattr(embed, "store_weight_in"):
            embed.store_weight_in(weight_dtype)
    if quantization == "int8" and lora is not None and lora.enable_lora:
        raise ConfigError("--quantization int8 with --enable-lora: LoRA adapters need the base "
                          "weights in float. Fix: drop one of the two.")
    if lora is not None and lora.enable_lora:
        from sluice.lora.layers import wrap_lora_layers
        wrap_lora_layers(model, lora.max_loras, lora.max_lora_rank, dtype)
    if device.type == "cpu":  # before the weights are written: parameters are re-pointed
        place_parameters_in_huge_pages(model)
    if weights is None:
        init_dummy_weights(model, seed)
    else:
        with torch.no_grad():
            model.load_weights(weights(dtype))
    model.requires_grad_(False)
    if quantization == "int8":
        from sluice.model.int8_quant import quantize_linear_layers
        quantize_linear_layers(model, ops.cpu_ops)
    process_weights_after_loading(model)
    install_fused_decode(model, ops.cpu_ops)
    return model.eval()


def _compressed_source(model: nn.Module, spec: ModelSpec, weights: Callable,
                       quantization: str | None, ops: LayerOps, dtype: torch.dtype,
                       device: torch.device, lora: LoRAConfig | None,
                       weight_dtype: torch.dtype) -> Callable:
    """The weight source of a checkpoint stored quantized (`sluice.model.quantized_checkpoint`;
    compressed-tensors, GPTQ, AWQ): its layers keep their blocks where the block kernels run
    them (C++ operators, float32 compute, CPU), unless `--quantization none` or LoRA asks for
    float weights. W8A8 layers take int8 activations; weight-only ones (W4A16, GPTQ 8-bit)
    too (llama.cpp's Q4_0 / Q8_0 numerics), as a GGUF file's blocks do by default
    (`gguf_quant.llama_cpp_numerics`) and under `--quantization int8`; `--quantization
    compressed-tensors|gptq|awq` (vLLM's names for the format) keeps their float activations.
    FP8 weights (`quant_method` fp8 or modelopt, compressed-tensors float-quantized) are
    dequantized to the model's dtype, for its fast float GEMMs (`--quantization int8` then makes
    int8 blocks of them). Only when `--quantization` names the stored format (fp8 / modelopt /
    compressed-tensors) do they stay e4m3, as F8_E4M3 blocks with float activations (~1.1 bytes
    per weight) where the kernels run: on a CPU without fp8 products those save memory, not
    time."""
    from sluice.model import compressed_tensors, fp8_checkpoint, gptq_awq
    from sluice.model.gguf_quant import blocks_wanted, llama_cpp_numerics
    from sluice.model.quantized_checkpoint import quantized_weight_source
    scheme = spec.quantization
    mode = None if quantization in STORED_FORMAT_MODES else quantization  # 'gguf': refused
    fp8 = scheme.fp8_weights
    keep = blocks_wanted(mode, ops.cpu_ops, dtype, device,
                         lora_enabled=lora is not None and lora.enable_lora)
    fp8_by_default = fp8 and quantization != scheme.method   # dequantized for the float GEMMs
    keep = keep and not fp8_by_default
    int8_activations = not fp8 and (scheme.scheme == "w8a8-int8" or quantization == "int8"
                                    or llama_cpp_numerics(quantization, ops.cpu_ops))
    reader = (fp8_checkpoint if fp8
              else compressed_tensors if scheme.method == "compressed-tensors" else gptq_awq)
    stored = reader.read(safetensors_files(spec.path), scheme)
    why = (f"FP8 weights run dequantized unless --quantization {scheme.method}"
           if fp8_by_default else None)
    return quantized_weight_source(model, stored, weights, keep, int8_activations,
                                   ops.cpu_ops, dtype, weight_dtype == torch.bfloat16, why)
