"""`--structured-outputs-config`: the grammar backend's settings, vLLM's keys. No torch.

    '{"backend": "guidance", "disable_any_whitespace": false, "disable_additional_properties": false}'

* `backend`: "guidance" (llguidance) or "auto" (the same: it is the only backend built in).
  "xgrammar" and "outlines" are refused with the reason; "lm-format-enforcer" likewise.
* `disable_any_whitespace`: JSON output without free whitespace (compact), for every request.
* `disable_additional_properties`: every object schema without `additionalProperties` is
  treated as closed (`false`), for every request.
* `disable_fallback`: accepted (there is one backend, so there is never a fallback).

Unknown keys, and vLLM's reasoning keys (sluice has no reasoning parser), are a `ConfigError`
naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.config_json import decode_json_object
from sluice.errors import ConfigError

FLAG = "--structured-outputs-config"
BACKENDS = ("guidance", "auto")
_NOT_AVAILABLE = {
    "xgrammar": "xgrammar needs triton and an unpinned torch, which this CPU build does not "
                "install; sluice uses llguidance (JSON schema, regex, Lark and GBNF grammars)",
    "outlines": "outlines is not installed; sluice uses llguidance",
    "lm-format-enforcer": "lm-format-enforcer is not installed; sluice uses llguidance",
}
_REASONING_KEYS = ("reasoning_parser", "reasoning_parser_plugin", "enable_in_reasoning")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    backend: str = "guidance"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False


_TYPES: dict[str, tuple[type, ...]] = {
    "backend": (str,), "disable_any_whitespace": (bool,),
    "disable_additional_properties": (bool,), "disable_fallback": (bool,),
    **{key: (str, bool, type(None)) for key in _REASONING_KEYS},
}


def parse_structured_outputs_config(text: str | None) -> StructuredOutputsConfig:
    """The flag's JSON object as a `StructuredOutputsConfig` (defaults when None/empty)."""
    if not text:
        return StructuredOutputsConfig()
    raw = decode_json_object(FLAG, text, '{"backend": "guidance"}', _TYPES)
    for key in _REASONING_KEYS:
        if raw.pop(key, None) not in (None, False, ""):
            raise ConfigError(f"{FLAG}: {key} is not supported (sluice has no reasoning "
                              "parser); leave it out.")
    backend = raw.get("backend", "guidance")
    if backend in _NOT_AVAILABLE:
        raise ConfigError(f"{FLAG}: backend {backend!r} is not available ({_NOT_AVAILABLE[backend]})."
                          f" Fix: use \"guidance\" or \"auto\".")
    if backend not in BACKENDS:
        raise ConfigError(f"{FLAG}: unknown backend {backend!r}; choose one of "
                          f"{', '.join(BACKENDS)}.")
    return StructuredOutputsConfig(**raw)
