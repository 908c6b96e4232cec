"""A checkpoint stored quantized: config.json's `quantization_config` (or the sidecar file an
older AutoGPTQ / AutoAWQ / ModelOpt checkpoint keeps it in) read into a
`CheckpointQuantization`.

Five formats are read:

* compressed-tensors (llm-compressor): W8A8 int8 and W4A16 int4, see
  `sluice.model.compressed_tensors`; FP8 weights (format float-quantized), see
  `sluice.model.fp8_checkpoint`;
* FP8 (`quant_method` 'fp8': transformers' FineGrainedFP8, the format Qwen's, DeepSeek's and
  vLLM's FP8 checkpoints use): e4m3 weights with a scale per block of `weight_block_size`
  or per tensor; see `sluice.model.fp8_checkpoint`;
* NVIDIA ModelOpt FP8 (`quant_method` 'modelopt' or hf_quant_config.json: `quant_algo` FP8,
  FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO): the same e4m3 weights with a scale per tensor,
  channel or 128 x 128 block; see `sluice.model.fp8_checkpoint`;
* GPTQ (AutoGPTQ / GPTQModel / optimum, `quant_method` 'gptq'): 4- or 8-bit weights packed
  along the input dimension, zero points, scales per group or per channel, activation order
  (`desc_act`) through `g_idx`; see `sluice.model.gptq_awq`;
* AWQ (AutoAWQ, `quant_method` 'awq', version 'gemm'): 4-bit weights packed along the output
  dimension in AWQ's interleaved order, with zero points; see `sluice.model.gptq_awq`.

A compressed-tensors, FP8 or ModelOpt config may carry a `kv_cache_scheme` (compressed-tensors
also as its only quantization, over float weights; ModelOpt's `kv_cache_quant_algo` 'FP8'
likewise): static fp8 KV-cache scales per layer, read by `sluice.model.attention.kv_scales`.

Anything else -- another method, a field value these readers would misread -- is a
ModelLoadError naming the field: nothing quantized is ever loaded as if it were float. Fields
that only describe how the quantization was computed (damp_percent, true_sequential, dataset,
...) do not change what the tensors mean and are not read. No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.errors import ModelLoadError

#: what `checkpoint_quantization` reads, for its error messages
SUPPORTED_CHECKPOINT_QUANTIZATION = (
    "compressed-tensors W8A8 int8 (format int-quantized or naive-quantized: int8 weights, "
    "symmetric, a scale per output channel or per tensor; int8 activations, dynamic) and "
    "W4A16 int4 (format pack-quantized: int4 weights, symmetric or with zero points, a scale "
    "per output channel or per group of a multiple of 32 inputs, any actorder; 16-bit "
    "activations); GPTQ (bits 4 or 8, checkpoint_format gptq or "
    "gptq_v2, any group_size, desc_act, no per-module `dynamic` overrides); AWQ (bits 4, "
    "version gemm, zero_point true); FP8 e4m3 weights (quant_method fp8: a scale per "
    "weight_block_size block or per tensor, activation_scheme dynamic or static; "
    "compressed-tensors format float-quantized: a scale per channel, tensor or block; ModelOpt "
    "quant_algo FP8, FP8_PER_CHANNEL_PER_TOKEN or FP8_PB_WO), run "
    "with float activations; a kv_cache_scheme of static fp8 scales per tensor (a k_scale and "
    "v_scale per layer, used with --kv-cache-dtype fp8)")

#: the sidecar files older checkpoints keep their quantization config in: file -> quant_method
SIDECAR_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq",
                   "hf_quant_config.json": "modelopt"}


@dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint stored quantized, as sluice reads it.

    `method`: 'compressed-tensors', 'gptq', 'awq', 'fp8' or 'modelopt' (the format; the
    fp8 schemes are read by `sluice.model.fp8_checkpoint` whatever the method).
    `scheme`: 'w8a8-int8' (int8 weights, int8 activations), 'w4a16-int4' (int4 weights,
    16-bit activations), 'w8a16-int8' (GPTQ 8-bit: int8 weights, 16-bit activations),
    'w8a8-fp8' (e4m3 weights, the checkpoint made for e4m3 activations) or 'w8a16-fp8' (e4m3
    weights, 16-bit activations); sluice runs both fp8 schemes with float activations, as
    vLLM does on hardware without fp8 products.
    `weight_strategy` 'channel', 'tensor', 'group' (`group_size` inputs share a scale) or
    'block' (a scale per `block_shape` = (rows, inputs) tile of the weight).
    `symmetric`: no zero points (GPTQ: zero points stored, all at the midpoint, checked).
    `act_order`: GPTQ `desc_act` / compressed-tensors `actorder` 'group': groups follow a
    stored per-input group index (`g_idx`, `weight_g_idx`) instead of runs of inputs.
    `zero_point_offset`: added to each stored zero point (GPTQ's original format stores them
    minus one)."""
    method: str
    scheme: str
    weight_strategy: str
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False
    zero_point_offset: int = 0
    block_shape: tuple[int, int] | None = None

    @property
    def fp8_weights(self) -> bool:
        """e4m3 weights (the fp8 schemes: `sluice.model.fp8_checkpoint` reads them)."""
        return self.scheme.endswith("-fp8")


def _stored_config(cfg: dict, path: Path) -> tuple[Path, Any] | None:
    """(the file it came from, the quantization config): config.json's (`cfg`, read from
    `path`) `quantization_config`, else a sidecar file's (SIDECAR_CONFIGS, its method added);
    None for a float checkpoint."""
    qc = cfg.get("quantization_config")
    if qc is not None:
        return path, qc
    for name, method in SIDECAR_CONFIGS.items():
        sidecar = path.parent / name
        if sidecar.is_file():
            return sidecar, {"quant_method": method, **_read_sidecar(sidecar)}
    return None


def read_checkpoint_quantization(cfg: dict, path: Path
                                 ) -> tuple[CheckpointQuantization | None, bool]:
    """(`checkpoint_quantization`, whether the config declares fp8 KV-cache scales:
    `_declares_fp8_kv_cache`) of one checkpoint, its quantization config (a sidecar file
    included) read once."""
    stored = _stored_config(cfg, path)
    if stored is None:
        return None, False
    return _quantization(*stored), _declares_fp8_kv_cache(stored[1])


def checkpoint_quantization(cfg: dict, path: Path) -> CheckpointQuantization | None:
    """config.json's (`cfg`, read from `path`) `quantization_config`, or else a sidecar file's
    (SIDECAR_CONFIGS) as a CheckpointQuantization; None for a float checkpoint; ModelLoadError
    naming the method or field sluice does not read."""
    return read_checkpoint_quantization(cfg, path)[0]


def _quantization(path: Path, qc: Any) -> CheckpointQuantization | None:
    """`checkpoint_quantization` of the config `qc` read from `path`."""
    if not isinstance(qc, dict):
        raise _unsupported(path, f"= {qc!r}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc, path)
    if method == "gptq":
        return _gptq(qc, path)
    if method == "awq":
        return _awq(qc, path)
    if method == "fp8":
        return _fp8(qc, path)
    if method == "modelopt":
        return _modelopt(qc, path)
    raise _unsupported(path, f"quant_method {method!r}")


def _declares_fp8_kv_cache(qc: Any) -> bool:
    """Whether a quantization config (checked by `_quantization`) declares fp8 KV-cache scales
    per layer, which vLLM then uses for `--kv-cache-dtype auto` too: a compressed-tensors
    `kv_cache_scheme`, or ModelOpt's `kv_cache_quant_algo` 'FP8' (or its `kv_cache_scheme`).
    An FP8 config's AutoFP8-style 'static' scheme does not change vLLM's auto."""
    if not isinstance(qc, dict):
        return False
    if qc.get("quant_method") == "compressed-tensors":
        return isinstance(qc.get("kv_cache_scheme"), dict)
    if qc.get("quant_method") == "modelopt":
        inner = _modelopt_fields(qc)
        return (isinstance(inner.get("kv_cache_scheme"), dict)
                or str(inner.get("kv_cache_quant_algo") or "").upper() == "FP8")
    return False


def _read_sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read the quantization config: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: a quantization config must be a JSON object.")
    return data


def _unsupported(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: quantization_config {what} is not supported; sluice reads "
        f"{SUPPORTED_CHECKPOINT_QUANTIZATION}. Load the float checkpoint instead (with "
        "--quantization int8 for int8 weights) or a GGUF file.")


# ---------------------------------------------------------------------------------------------
# GPTQ and AWQ

def _group_size(qc: dict, path: Path, keys: tuple[str, ...]) -> int | None:
    """The group size under the first of `keys` present: None for -1 (a scale per output
    channel), else a positive int; ModelLoadError otherwise."""
    key = next((k for k in keys if k in qc), keys[0])
    group = qc.get(key, -1)
    if not isinstance(group, int) or isinstance(group, bool) or (group != -1 and group <= 0):
        raise _unsupported(path, f"{key} = {group!r}")
    return None if group == -1 else group


def _gptq(qc: dict, path: Path) -> CheckpointQuantization:
    """GPTQ: `bits` 4 or 8, `group_size`, `sym`, `desc_act`, `checkpoint_format` ('gptq':
    zero points stored minus one; 'gptq_v2': as they are); per-module `dynamic` overrides are
    refused (one scheme for every layer)."""
    bits = qc.get("bits")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise _unsupported(path, f"bits = {bits!r}")
    group = _group_size(qc, path, ("group_size",))
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(path, f"checkpoint_format = {fmt!r}")
    if qc.get("dynamic"):
        raise _unsupported(path, "dynamic (per-module quantization overrides)")
    for key in ("sym", "desc_act"):
        if not isinstance(qc.get(key, False), bool):
            raise _unsupported(path, f"{key} = {qc.get(key)!r}")
    return CheckpointQuantization(
        "gptq", "w4a16-int4" if bits == 4 else "w8a16-int8",
        "group" if group else "channel", group, symmetric=qc.get("sym", True),
        act_order=qc.get("desc_act", False), zero_point_offset=1 if fmt == "gptq" else 0)


def _awq(qc: dict, path: Path) -> CheckpointQuantization:
    """AWQ (AutoAWQ's keys and transformers' spellings): 4 bits, version 'gemm', zero points."""
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4 or isinstance(bits, bool):
        raise _unsupported(path, f"bits = {bits!r}")
    group = _group_size(qc, path, ("group_size", "q_group_size"))
    version = qc.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise _unsupported(path, f"version = {version!r} (AWQ's 'gemm' layout is read)")
    if qc.get("zero_point", True) is not True:
        raise _unsupported(path, f"zero_point = {qc.get('zero_point')!r}")
    return CheckpointQuantization("awq", "w4a16-int4", "group" if group else "channel", group,
                                  symmetric=False)


# ---------------------------------------------------------------------------------------------
# FP8

def _block_shape(value: Any, path: Path, where: str) -> tuple[int, int]:
    """A [rows, inputs] block of positive ints as a tuple; ModelLoadError naming `where`."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _unsupported(path, f"{where} = {value!r}")
    return int(value[0]), int(value[1])


def _fp8(qc: dict, path: Path) -> CheckpointQuantization:
    """quant_method 'fp8': `fmt` 'e4m3' (float8_e4m3fn weights), `weight_block_size` [rows,
    inputs] (a float32 `weight_scale_inv` per block: W = weight * scale) or absent (a
    `weight_scale` per tensor), `activation_scheme` 'dynamic' or 'static' (an `input_scale`
    per layer: calibration for fp8 activations, which sluice does not use)."""
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _unsupported(path, f"fmt = {fmt!r} (e4m3 weights are read)")
    activations = qc.get("activation_scheme", "dynamic")
    if activations not in ("dynamic", "static"):
        raise _unsupported(path, f"activation_scheme = {activations!r}")
    block = qc.get("weight_block_size")
    if block is not None:
        block = _block_shape(block, path, "weight_block_size")
    _kv_cache_scheme(qc, path)
    return CheckpointQuantization("fp8", "w8a8-fp8", "block" if block else "tensor",
                                  block_shape=block)


#: ModelOpt's FP8 `quant_algo`s -> (weight strategy, block shape): one e4m3 `weight_scale`
#: per tensor (with a static `input_scale`, read past), per output channel (dynamic per-token
#: activations), per 128 x 128 block (weight-only)
MODELOPT_FP8_ALGOS = {"FP8": ("tensor", None), "FP8_PER_CHANNEL_PER_TOKEN": ("channel", None),
                      "FP8_PB_WO": ("block", (128, 128))}


def _modelopt_fields(qc: dict) -> dict:
    """A ModelOpt config's fields: config.json's `quantization_config` holds them itself, the
    legacy hf_quant_config.json under `quantization`."""
    inner = qc.get("quantization", qc)
    return inner if isinstance(inner, dict) else {}


def _modelopt(qc: dict, path: Path) -> CheckpointQuantization:
    """NVIDIA ModelOpt's FP8 checkpoints (`quant_method` 'modelopt', or hf_quant_config.json):
    `quant_algo` one of MODELOPT_FP8_ALGOS (e4m3 weights, `weight_scale` float32), read by
    `sluice.model.fp8_checkpoint` like quant_method fp8; `kv_cache_quant_algo` absent or 'FP8'
    (a `k_proj.k_scale` / `v_proj.v_scale` per layer, `sluice.model.attention.kv_scales`), or
    a `kv_cache_scheme` as compressed-tensors'. Layers in `exclude_modules` / `ignore` are
    stored in float and load as such."""
    inner = _modelopt_fields(qc)
    algo = str(inner.get("quant_algo") or "").upper()
    if algo not in MODELOPT_FP8_ALGOS:
        raise _unsupported(path, f"quant_algo = {inner.get('quant_algo')!r} (ModelOpt "
                                 f"{', '.join(MODELOPT_FP8_ALGOS)} are read)")
    kv = inner.get("kv_cache_quant_algo")
    if kv is not None and str(kv).upper() != "FP8":
        raise _unsupported(path, f"kv_cache_quant_algo = {kv!r}")
    _kv_cache_scheme(inner, path)
    strategy, block = MODELOPT_FP8_ALGOS[algo]
    return CheckpointQuantization("modelopt", "w8a8-fp8" if algo != "FP8_PB_WO" else "w8a16-fp8",
                                  strategy, block_shape=block)


# ---------------------------------------------------------------------------------------------
# compressed-tensors

#: compressed-tensors `actorder` values: calibration order only, the stored format unchanged
#: ('static' is an alias of 'weight') / groups follow a stored `weight_g_idx` ('dynamic' is an
#: alias of 'group'; True means 'group')
STATIC_ACTORDERS = (None, False, "weight", "static")
GROUP_ACTORDERS = (True, "group", "dynamic")


def _check_kind(args: Any, path: Path, where: str, bits: int, kind: str) -> dict:
    """`args` (a compressed-tensors quantization-args object) as a dict of `bits`-bit values
    of type `kind` ('int' / 'float'); else ModelLoadError naming `where` and the field."""
    if not isinstance(args, dict):
        raise _unsupported(path, f"{where} = {args!r}")
    for key, value in {"num_bits": bits, "type": kind}.items():
        if args.get(key) != value:
            raise _unsupported(path, f"{where}.{key} = {args.get(key)!r}")
    return args


def _int_scheme(args: Any, path: Path, where: str, bits: int, strategies: tuple[str, ...],
                dynamic: bool, zero_points: bool = False
                ) -> tuple[str, int | None, bool, bool]:
    """(strategy, group_size, symmetric, act_order) of a compressed-tensors quantization-args
    object that is `bits`-bit int, symmetric (or not, where `zero_points` are read), with
    `dynamic` scales, a strategy in `strategies`, a group size (a multiple of 32) only for
    'group', and an `actorder` that leaves the format as it is or (strategy 'group' only)
    stores each input's group (act_order True); else ModelLoadError naming `where` and the
    field."""
    args = _check_kind(args, path, where, bits, "int")
    symmetric = args.get("symmetric", True)
    if symmetric is not True and not (zero_points and symmetric is False):
        raise _unsupported(path, f"{where}.symmetric = {symmetric!r}")
    if bool(args.get("dynamic", False)) != dynamic:
        raise _unsupported(
            path, f"{where}.dynamic = {args.get('dynamic')!r} ("
            f"{'dynamic' if dynamic else 'static'} scales expected)")
    strategy, group = args.get("strategy"), args.get("group_size")
    actorder = args.get("actorder")
    actorder = actorder.lower() if isinstance(actorder, str) else actorder
    act_order = actorder in GROUP_ACTORDERS and strategy == "group"
    if actorder not in STATIC_ACTORDERS and not act_order:
        raise _unsupported(path, f"{where}.actorder = {args.get('actorder')!r}")
    # 'group' needs a positive multiple of 32 inputs per scale, the others no group size
    grouped = isinstance(group, int) and group > 0 and group % 32 == 0
    if strategy not in strategies or not (grouped if strategy == "group" else group is None):
        raise _unsupported(path, f"{where}.strategy = {strategy!r}, group_size = {group!r}")
    return strategy, group, symmetric, act_order


def _float_scheme(args: Any, path: Path, where: str, strategies: tuple[str, ...],
                  dynamic: bool | None) -> tuple[str, tuple[int, int] | None]:
    """(strategy, block shape) of a compressed-tensors quantization-args object that is 8-bit
    float (e4m3), symmetric, with `dynamic` scales (None: either), a strategy in
    `strategies` ('block' with its `block_structure`); else ModelLoadError naming `where` and
    the field."""
    args = _check_kind(args, path, where, 8, "float")
    if args.get("symmetric", True) is not True:
        raise _unsupported(path, f"{where}.symmetric = {args.get('symmetric')!r}")
    if dynamic is not None and bool(args.get("dynamic", False)) != dynamic:
        raise _unsupported(path, f"{where}.dynamic = {args.get('dynamic')!r}")
    strategy = args.get("strategy")
    if strategy not in strategies:
        raise _unsupported(path, f"{where}.strategy = {strategy!r}")
    if strategy == "block":
        return strategy, _block_shape(args.get("block_structure"), path,
                                      f"{where}.block_structure")
    return strategy, None


def _kv_cache_scheme(qc: dict, path: Path) -> None:
    """Checks a `kv_cache_scheme` (absent: nothing to check): static fp8 scales, one per
    tensor -- a `k_scale` and a `v_scale` per layer, which `sluice.model.attention.kv_scales`
    reads -- as compressed-tensors quantization args, or AutoFP8's 'static'; ModelLoadError
    naming the field otherwise (per-head scales, dynamic ones, int8)."""
    scheme = qc.get("kv_cache_scheme")
    if scheme is None or scheme == "static":
        return
    _float_scheme(scheme, path, "kv_cache_scheme", ("tensor",), dynamic=False)


def _group_scheme(group: Any, path: Path, where: str, fmt: str) -> CheckpointQuantization:
    """What one config group of a `fmt` checkpoint stores."""
    ct = "compressed-tensors"
    if not isinstance(group, dict):
        raise _unsupported(path, f"{where} = {group!r}")
    if group.get("targets") != ["Linear"]:
        raise _unsupported(path, f"{where}.targets = {group.get('targets')!r} (['Linear'] "
                                 "expected)")
    if group.get("output_activations") is not None:
        raise _unsupported(path, f"{where}.output_activations")
    weights, activations = group.get("weights"), group.get("input_activations")
    if fmt == "float-quantized" or (fmt == "naive-quantized" and isinstance(weights, dict)
                                    and weights.get("type") == "float"):
        strategy, block = _float_scheme(weights, path, f"{where}.weights",
                                        ("channel", "tensor", "block"), dynamic=False)
        if activations is not None:
            _float_scheme(activations, path, f"{where}.input_activations",
                          ("token", "tensor", "group"), dynamic=None)
        return CheckpointQuantization(ct, "w8a16-fp8" if activations is None else "w8a8-fp8",
                                      strategy, block_shape=block)
    if fmt == "pack-quantized":
        if activations is not None:
            raise _unsupported(
                path, f"{where}.input_activations of a pack-quantized (W4A16) checkpoint")
        strategy, group_size, symmetric, act_order = _int_scheme(
            weights, path, f"{where}.weights", 4, ("channel", "group"), dynamic=False,
            zero_points=True)
        return CheckpointQuantization(ct, "w4a16-int4", strategy, group_size, symmetric,
                                      act_order=act_order)
    strategy = _int_scheme(weights, path, f"{where}.weights", 8, ("channel", "tensor"),
                           dynamic=False)[0]
    _int_scheme(activations, path, f"{where}.input_activations", 8, ("token", "tensor"),
                dynamic=True)
    return CheckpointQuantization(ct, "w8a8-int8", strategy)


def _compressed_tensors(qc: dict, path: Path) -> CheckpointQuantization | None:
    """The config groups' one scheme; None for a checkpoint whose only quantization is its
    `kv_cache_scheme` (float weights plus KV-cache scales)."""
    _kv_cache_scheme(qc, path)
    groups = qc.get("config_groups")
    if not groups and qc.get("kv_cache_scheme") is not None:
        return None
    fmt = qc.get("format")
    if fmt not in ("int-quantized", "naive-quantized", "pack-quantized", "float-quantized"):
        raise _unsupported(path, f"format {fmt!r}")
    if not isinstance(groups, dict) or not groups:
        raise _unsupported(path, f"config_groups = {groups!r}")
    schemes = {_group_scheme(group, path, f"config_groups.{name}", fmt)
               for name, group in groups.items()}
    if len(schemes) > 1:
        raise _unsupported(path, f"config groups of different schemes "
                                 f"{sorted(map(str, schemes))}")
    return schemes.pop()
