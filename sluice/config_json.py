"""JSON-object flags (`--kv-events-config`, `--kv-transfer-config`,
`--structured-outputs-config`): decoding and the key/type checks they share. No torch.

Each flag's module declares its keys and their accepted types and keeps its own value rules
(ranges, choices); this module turns the flag's text into a dict whose keys are all known and
whose values have an accepted type, or raises one `ConfigError` listing every problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sluice.errors import ConfigError


def decode_json_object(flag: str, text: str | Mapping[str, Any], example: str,
                       types: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """`text` (JSON text, or an already decoded mapping) as a dict whose keys are in `types`
    and whose values are instances of the key's types. A bool is accepted only where `bool`
    itself is listed (JSON `true` is never an integer here). Raises `ConfigError` naming
    `flag` and every offending key; `example` (a JSON object) goes in the not-JSON message."""
    data: Any = text
    if isinstance(text, str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag}: not valid JSON ({e.msg} at character {e.pos}); pass "
                              f"an object such as '{example}'.") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{flag}: expected a JSON object, got {type(data).__name__}.")
    problems = []
    for key, value in data.items():
        if key not in types:
            problems.append(f"{flag}: unknown key {key!r}; known keys: {', '.join(types)}.")
        elif not isinstance(value, types[key]) or (isinstance(value, bool)
                                                     and bool not in types[key]):
            problems.append(f"{flag}: {key} has the wrong type ({type(value).__name__}: "
                            f"{value!r}).")
    if problems:
        raise ConfigError(problems)
    return dict(data)
