"""PEFT LoRA adapters: read and check `adapter_config.json` + `adapter_model.safetensors`.

Two entry points:

    check_adapter(path, spec, max_lora_rank) -> AdapterConfig
        cheap (the JSON config and the safetensors header only; no tensor is read): raises
        `InvalidRequestError` (param "lora_path") saying what is wrong — missing files, an
        unsupported PEFT feature, a rank above `max_lora_rank`, an unknown target module, a
        tensor of the wrong shape for `spec`. The API server's 400s come from here.
    load_adapter(path, spec, max_lora_rank, dtype) -> LoRAAdapter
        `check_adapter`, then the tensors: per (decoder layer, HF projection) the pair
        A [r, in] and B [out, r] with the scaling folded into B (B * scaling), so that
        delta(x) = x @ A.T @ B.T.

Tensor names (what `save_pretrained` writes; the adapter name is stripped):

    base_model.model.model.layers.{N}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{N}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

Scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` /
`alpha_pattern` (per-module r and alpha) are honoured by module-name suffix, as PEFT matches
them. Shapes (full, unsharded model): q: [H*D, hidden], k/v: [Hkv*D, hidden], o: [hidden, H*D],
gate/up: [I, hidden], down: [hidden, I] — A is [r, in], B is [out, r].

Refused with a clear error: DoRA (`use_dora`), `modules_to_save`, LoRA biases (`bias` other
than "none", `lora_bias`), `fan_in_fan_out`, `layer_replication`, embedding / lm_head targets,
and any module other than the seven projections above; `adapter_model.bin` (pickle) — save
the adapter with safetensors.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.errors import InvalidRequestError
from sluice.hf_config import ModelSpec

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: the HF projections an adapter may target, and the decoder sub-module holding each
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(\w+)\.lora_(A|B)(?:\.\w+)?\.weight$")
_PARAM = "lora_path"


def _error(path: str | Path, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"LoRA adapter {path}: {message}", param=_PARAM)


@dataclass(frozen=True)
class AdapterConfig:
    """What `adapter_config.json` and the safetensors header say about one adapter.

    `rank` is the config's `r`; `ranks[(layer, proj)]` the rank of each adapted module (from
    the tensors' shapes) and `scalings[(layer, proj)]` its factor (alpha / r, or alpha /
    sqrt(r) with rsLoRA). `target_modules` the HF projection names that carry weights."""

    path: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    ranks: dict[tuple[int, str], int] = field(default_factory=dict)
    scalings: dict[tuple[int, str], float] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=self.rank)


def load_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed `adapter_config.json` of adapter directory `path`; InvalidRequestError
    when the directory, the file or its JSON is missing or bad."""
    directory = Path(path)
    if not str(path) or not directory.is_dir():
        raise _error(path, "no such directory (a PEFT adapter directory holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise _error(path, f"{CONFIG_FILE} is missing")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _error(path, f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _error(path, f"{CONFIG_FILE} must hold a JSON object")
    return data


def _check_features(path: str | Path, cfg: dict[str, Any]) -> None:
    """Refuse the PEFT features sluice does not apply (module doc)."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _error(path, f"peft_type {peft_type!r} is not supported; only LORA adapters are")
    if cfg.get("use_dora"):
        raise _error(path, "DoRA adapters (use_dora: true) are not supported")
    if cfg.get("modules_to_save"):
        raise _error(path, f"modules_to_save {cfg['modules_to_save']!r} is not supported "
                           "(only low-rank deltas on the q/k/v/o/gate/up/down projections)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise _error(path, f"LoRA biases (bias: {cfg.get('bias')!r}, lora_bias: "
                           f"{cfg.get('lora_bias')!r}) are not supported; use bias 'none'")
    if cfg.get("fan_in_fan_out"):
        raise _error(path, "fan_in_fan_out: true (Conv1D-style transposed weights) is not "
                           "supported")
    if cfg.get("layer_replication"):
        raise _error(path, "layer_replication is not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(map(str, targets)) - set(PROJECTIONS))
        if unknown:
            raise _error(path, f"target module(s) {', '.join(unknown)} are not supported; "
                               f"supported: {', '.join(PROJECTIONS)}")


def _read_safetensors_header(path: str | Path, file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header length")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _error(path, f"{WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise _error(path, f"{WEIGHTS_FILE} has a malformed header")
    header.pop("__metadata__", None)
    return header


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that the module's
    full name (e.g. 'model.layers.3.self_attn.q_proj') ends with (or matches as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of each HF projection of the full (unsharded) model `spec`."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def check_adapter(path: str, spec: ModelSpec, max_lora_rank: int) -> AdapterConfig:
    """Validate adapter directory `path` against base model `spec` without reading tensors
    (module doc); raises InvalidRequestError naming the problem."""
    cfg = load_adapter_config(path)
    _check_features(path, cfg)
    directory = Path(path)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        hint = (" (adapter_model.bin is not supported: re-save the adapter with "
                "save_pretrained(..., safe_serialization=True))"
                if (directory / "adapter_model.bin").is_file() else "")
        raise _error(path, f"{WEIGHTS_FILE} is missing{hint}")
    try:
        rank = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise _error(path, f"r ({cfg.get('r')!r}) and lora_alpha ({cfg.get('lora_alpha')!r}) "
                           "must be numbers") from None
    use_rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    header = _read_safetensors_header(path, weights)
    shapes = module_shapes(spec)
    found: dict[tuple[int, str], dict[str, list[int]]] = {}
    for key, info in header.items():
        match = _KEY.match(key)
        if match is None:
            what = ("embedding / lm_head adapters are not supported"
                    if "embed" in key or "lm_head" in key else
                    "not a LoRA A/B weight of a q/k/v/o/gate/up/down projection")
            raise _error(path, f"tensor {key!r}: {what}")
        layer, parent, proj, ab = int(match[1]), match[2], match[3], match[4]
        if PROJECTIONS.get(proj) != parent:
            raise _error(path, f"tensor {key!r}: unknown target module {parent}.{proj}; "
                               f"supported: {', '.join(PROJECTIONS)}")
        if layer >= spec.num_hidden_layers:
            raise _error(path, f"tensor {key!r}: layer {layer} does not exist (the base model "
                               f"has {spec.num_hidden_layers} layers)")
        found.setdefault((layer, proj), {})[ab] = list(info.get("shape", []))
    if not found:
        raise _error(path, f"{WEIGHTS_FILE} holds no LoRA weights")
    ranks: dict[tuple[int, str], int] = {}
    scalings: dict[tuple[int, str], float] = {}
    for (layer, proj), pair in sorted(found.items()):
        name = f"model.layers.{layer}.{PROJECTIONS[proj]}.{proj}"
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise _error(path, f"{name}: {missing} weight is missing")
        a_shape = pair["A"]
        r = a_shape[0] if len(a_shape) == 2 else int(_pattern_value(rank_pattern, name, rank))
        out_features, in_features = shapes[proj]
        want_a, want_b = [r, in_features], [out_features, r]
        if pair["A"] != want_a or pair["B"] != want_b:
            raise _error(path, f"{name}: wrong shapes lora_A {pair['A']} / lora_B {pair['B']}; "
                               f"the base model needs {want_a} / {want_b} (rank {r})")
        if r > max_lora_rank:
            raise _error(path, f"rank {r} ({name}) is above --max-lora-rank {max_lora_rank}")
        a = float(_pattern_value(alpha_pattern, name, alpha))
        ranks[(layer, proj)] = r
        scalings[(layer, proj)] = a / math.sqrt(r) if use_rslora else a / r
    return AdapterConfig(
        path=str(path), rank=rank, lora_alpha=alpha, use_rslora=use_rslora,
        target_modules=tuple(p for p in PROJECTIONS if any(k[1] == p for k in found)),
        base_model_name_or_path=cfg.get("base_model_name_or_path"), ranks=ranks,
        scalings=scalings)


@dataclass
class LoRAAdapter:
    """A loaded adapter in CPU memory: `weights[(layer, proj)] = (A [r, in], B [out, r])`,
    full (unsharded) shapes, `B` already multiplied by the module's scaling."""

    config: AdapterConfig
    weights: dict[tuple[int, str], "tuple[torch.Tensor, torch.Tensor]"]

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.weights.values() for t in pair)


def load_adapter(path: str, spec: ModelSpec, max_lora_rank: int,
                 dtype: "torch.dtype") -> LoRAAdapter:
    """Check and read adapter `path` (module doc) into CPU tensors of `dtype`."""
    import torch
    from safetensors import SafetensorError, safe_open

    config = check_adapter(path, spec, max_lora_rank)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    tensors: dict[tuple[int, str, str], torch.Tensor] = {}
    try:
        with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _KEY.match(key)
                assert match is not None, key  # check_adapter accepted every key
                tensors[(int(match[1]), match[3], match[4])] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise _error(path, f"cannot read {WEIGHTS_FILE}: {e}") from None
    for (layer, proj), scaling in config.scalings.items():
        a = tensors[(layer, proj, "A")].to(torch.float32)
        b = tensors[(layer, proj, "B")].to(torch.float32) * scaling
        weights[(layer, proj)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return LoRAAdapter(config, weights)
