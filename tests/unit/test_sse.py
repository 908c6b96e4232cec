"""Server-sent events stay one line per event for clients that split lines like
str.splitlines (httpx's `aiter_lines`, the soak client's reader): generated text may hold
U+0085 / U+2028 / U+2029, which such readers take for line ends."""

import json

from httpx._decoders import LineDecoder

from sluice.entrypoints.openai.serving import sse


def test_line_breaking_characters_are_escaped_and_round_trip():
    text = "a\u2028b\u0085c\u2029d\nE"
    event = sse(json.dumps({"choices": [{"delta": {"content": text}}]}, ensure_ascii=False))
    lines = [line for line in LineDecoder().decode(event) if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):])["choices"][0]["delta"]["content"] == text
    assert sse('{"x": "plain é"}') == 'data: {"x": "plain é"}\n\n'    # nothing else changes
