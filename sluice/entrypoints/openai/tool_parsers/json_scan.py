"""Find the members of a JSON object (or the objects of a JSON array) in text that may still be
growing, without decoding it: the tool-call parsers need the raw text of a call's `arguments`
while the model is still writing it. No torch.

Offsets are into the scanned text. For an object starting at `pos`:

```
{"name": "f", "arguments": {"city": "Pa
^pos             value_start ^          ^ len(text): value_end None (not finished yet)
```

A member is `(key, value_start, value_end)`; `value_end` is None while the value is not
finished, and `value_start` is None while even its first character has not arrived. A scalar
(number, true, false, null) at the very end of the text counts as finished only when `final`
(more digits may follow). The scan checks structure (quotes, brackets, colons, commas), not the
grammar of scalars: callers that need a valid value `json.loads` the finished object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_WS = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(r"[-+0-9.eEa-zA-Z]+")
_CONTAINER_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]]|"', re.DOTALL)


class ScanError(ValueError):
    """The text cannot be the start of a JSON object/array of the expected shape."""


@dataclass
class ObjectScan:
    """What `scan_object` found: `members` in order; `end` is the offset just past the closing
    brace, or None while the object is not finished."""

    members: list[tuple[str, int | None, int | None]] = field(default_factory=list)
    end: int | None = None

    def get(self, key: str) -> tuple[int | None, int | None] | None:
        """(value_start, value_end) of the first member named `key`, or None."""
        for name, start, end in self.members:
            if name == key:
                return start, end
        return None


def skip_ws(text: str, pos: int) -> int:
    """The first offset at or after `pos` that is not JSON whitespace."""
    return _WS.match(text, pos).end()  # type: ignore[union-attr]


def value_end(text: str, pos: int, final: bool) -> int | None:
    """The offset just past the JSON value starting at `pos` (not whitespace), or None when the
    text ends inside it. Raises `ScanError` for text that cannot start a value."""
    first = text[pos]
    if first == '"':
        match = _STRING.match(text, pos)
        return match.end() if match else None
    if first in "{[":
        depth = 0
        for match in _CONTAINER_TOKENS.finditer(text, pos):
            token = match.group()
            if token == '"':
                return None  # an unterminated string
            if token in "{[":
                depth += 1
            elif token in "}]":
                depth -= 1
                if depth == 0:
                    return match.end()
        return None
    match = _SCALAR.match(text, pos)
    if match is None:
        raise ScanError(f"unexpected {first!r} at offset {pos}")
    if match.end() == len(text) and not final:
        return None
    return match.end()


def scan_object(text: str, pos: int, final: bool) -> ObjectScan:
    """Scan the object whose `{` is at `pos` (see the module docstring). Raises `ScanError`
    when the text so far cannot be such an object."""
    if text[pos:pos + 1] != "{":
        raise ScanError(f"expected '{{' at offset {pos}")
    scan = ObjectScan()
    i = skip_ws(text, pos + 1)
    n = len(text)
    while i < n:
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if scan.members:
            if text[i] != ",":
                raise ScanError(f"expected ',' or '}}' at offset {i}")
            i = skip_ws(text, i + 1)
            if i >= n:
                return scan
        if text[i] != '"':
            raise ScanError(f"expected a key at offset {i}")
        match = _STRING.match(text, i)
        if match is None:
            return scan  # the key is still arriving
        key = json.loads(match.group())
        i = skip_ws(text, match.end())
        if i >= n:
            return scan
        if text[i] != ":":
            raise ScanError(f"expected ':' at offset {i}")
        i = skip_ws(text, i + 1)
        if i >= n:
            scan.members.append((key, None, None))
            return scan
        end = value_end(text, i, final)
        scan.members.append((key, i, end))
        if end is None:
            return scan
        i = skip_ws(text, end)
    return scan


def scan_array_of_objects(text: str, pos: int, final: bool) -> tuple[list[ObjectScan], int | None]:
    """Scan the array whose `[` is at `pos`, every element an object: (the element scans, the
    offset past `]` or None while unfinished). Raises `ScanError` otherwise."""
    if text[pos:pos + 1] != "[":
        raise ScanError(f"expected '[' at offset {pos}")
    scans: list[ObjectScan] = []
    i = skip_ws(text, pos + 1)
    n = len(text)
    while i < n:
        if text[i] == "]":
            return scans, i + 1
        if scans:
            if text[i] != ",":
                raise ScanError(f"expected ',' or ']' at offset {i}")
            i = skip_ws(text, i + 1)
            if i >= n:
                break
        scan = scan_object(text, i, final)
        scans.append(scan)
        if scan.end is None:
            break
        i = skip_ws(text, scan.end)
    return scans, None


def partial_prefix_len(text: str, token: str) -> int:
    """The length of the longest end of `text` that is a proper start of `token` (what a stream
    must hold back: it may become `token`)."""
    for size in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:size]):
            return size
    return 0
