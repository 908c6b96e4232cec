"""`--speculative-config`: vLLM's JSON keys for speculative decoding. No torch.

    '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}'
    '{"model": "PATH_OR_HUB_ID", "num_speculative_tokens": 4}'     (a draft model: method draft_model)

Keys (as vLLM's `SpeculativeConfig`):
* `method`: "ngram" or "draft_model" (the default when `model` is given); vLLM's other methods
  (eagle, eagle3, medusa, mtp, suffix, ...) are refused by name.
* `num_speculative_tokens` (required, >= 1): tokens proposed per step.
* `prompt_lookup_min` / `prompt_lookup_max` (ngram): the n-gram sizes tried, longest first.
  Missing both: 5 and 5; one missing: it takes the other's value (vLLM's rule).
* `model` (draft_model): a local directory, .gguf file or hub id; it must share the target's
  tokenizer vocabulary (checked when the engine starts).
* `draft_tensor_parallel_size`: only 1 (the draft runs unsharded in the driver; a draft model
  with -tp > 1 or with a KV connector is refused for now).
* `disable_by_batch_size`: speculation is skipped in a step whose running batch holds at least
  this many requests (large batches are compute-bound; verifying proposals then costs more
  than it saves). Default: 4 (sluice's; vLLM never disables by default). Pass a large
  number to always speculate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from sluice.config_json import decode_json_object
from sluice.errors import ConfigError

if TYPE_CHECKING:
    from sluice.config import EngineConfig

FLAG = "--speculative-config"
METHODS = ("ngram", "draft_model")
_OTHER_VLLM_METHODS = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "suffix",
                       "deepseek_mtp")
_DEFAULT_LOOKUP = 5
DEFAULT_DISABLE_BY_BATCH_SIZE = 4
_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,), "model": (str,), "num_speculative_tokens": (int,),
    "prompt_lookup_min": (int,), "prompt_lookup_max": (int,),
    "draft_tensor_parallel_size": (int,), "disable_by_batch_size": (int,),
}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = _DEFAULT_LOOKUP
    prompt_lookup_max: int = _DEFAULT_LOOKUP
    model: str | None = None
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE


def parse_speculative_config(text: str | Mapping[str, Any] | None) -> SpeculativeConfig | None:
    """The flag's value (JSON text or a dict, as `LLM(speculative_config={...})` passes it) as
    a `SpeculativeConfig`; None when `text` is None or empty. Raises `ConfigError` naming the
    key."""
    if not text:
        return None
    data = decode_json_object(FLAG, text, '{"method": "ngram", "num_speculative_tokens": 4}',
                              _TYPES)
    method = data.get("method") or ("draft_model" if "model" in data else None)
    if method is None:
        raise ConfigError(f"{FLAG}: give \"method\": \"ngram\", or a draft \"model\".")
    if method in _OTHER_VLLM_METHODS:
        raise ConfigError(f"{FLAG}: method {method!r} is not supported; sluice speculates "
                          f"with {' or '.join(METHODS)}.")
    if method not in METHODS:
        raise ConfigError(f"{FLAG}: unknown method {method!r}; choose one of "
                          f"{', '.join(METHODS)}.")
    problems = []
    k = data.get("num_speculative_tokens")
    if k is None or k < 1:
        problems.append(f"{FLAG}: num_speculative_tokens is required and must be >= 1.")
    if method == "draft_model" and not data.get("model"):
        problems.append(f"{FLAG}: method draft_model needs \"model\".")
    if method == "ngram" and "model" in data:
        problems.append(f"{FLAG}: method ngram takes no \"model\".")
    lo, hi = data.get("prompt_lookup_min"), data.get("prompt_lookup_max")
    if method != "ngram" and (lo is not None or hi is not None):
        problems.append(f"{FLAG}: prompt_lookup_min/max apply to method ngram only.")
    lo, hi = (lo or hi or _DEFAULT_LOOKUP), (hi or lo or _DEFAULT_LOOKUP)
    if not 1 <= lo <= hi:
        problems.append(f"{FLAG}: need 1 <= prompt_lookup_min ({lo}) <= prompt_lookup_max "
                        f"({hi}).")
    if data.get("draft_tensor_parallel_size", 1) != 1:
        problems.append(f"{FLAG}: draft_tensor_parallel_size must be 1.")
    batch = data.get("disable_by_batch_size")
    if batch is not None and batch < 1:
        problems.append(f"{FLAG}: disable_by_batch_size must be >= 1, got {batch}.")
    if problems:
        raise ConfigError(problems)
    return SpeculativeConfig(method=method, num_speculative_tokens=k, prompt_lookup_min=lo,
                             prompt_lookup_max=hi, model=data.get("model"),
                             disable_by_batch_size=(DEFAULT_DISABLE_BY_BATCH_SIZE
                                                    if batch is None else batch))


def with_draft_model(text: str, model: str) -> str:
    """The flag's JSON `text` with its draft "model" replaced by `model` (the resolved local
    directory, `model_spec.resolve`)."""
    data = json.loads(text)
    data["model"] = model
    return json.dumps(data)


def speculative_problems(cfg: "EngineConfig") -> list[str]:
    """The flag's own problems and what this version cannot combine it with."""
    try:
        spec = parse_speculative_config(cfg.scheduler.speculative_config)
    except ConfigError as e:
        return e.problems
    problems = []
    if spec is not None and spec.method == "draft_model":
        if cfg.parallel.tensor_parallel_size > 1:
            problems.append(f"{FLAG}: a draft model does not run with tensor parallelism "
                            f"(-tp {cfg.parallel.tensor_parallel_size}) yet. Fix: use method "
                            "ngram, or -tp 1.")
        if cfg.cache.kv_transfer_config is not None:
            problems.append(f"{FLAG}: a draft model does not run with --kv-transfer-config "
                            "(loaded KV has no draft KV). Fix: use method ngram.")
    if spec is not None and cfg.parallel.pipeline_parallel_size > 1:
        problems.append(f"{FLAG}: speculative decoding does not run with pipeline parallelism "
                        f"(-pp {cfg.parallel.pipeline_parallel_size}) yet. Fix: drop one of "
                        f"the two.")
    return problems
