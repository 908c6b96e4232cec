"""`--tool-call-parser llama3_json`: Llama 3.1/3.2/3.3 with JSON-based tool calling, which
write a call as `{"name": "get_weather", "parameters": {"city": "Paris"}}` (or `"arguments"`),
optionally after `<|python_tag|>`, several calls separated by `;`.

The calls start where the output starts with `{` (after whitespace) or at `<|python_tag|>`;
the text before the tag is the content, everything after it must be calls. An output that is
not of this form is plain content. No torch.
"""

from __future__ import annotations

from sluice.entrypoints.openai.tool_parsers.base import (IncrementalToolParser, ParsedCall,
                                                        ParsedOutput, ToolParserManager,
                                                        call_from_object)
from sluice.entrypoints.openai.tool_parsers.json_scan import (ScanError, partial_prefix_len,
                                                             skip_ws)

TAG = "<|python_tag|>"
ARGS_KEYS = ("parameters", "arguments")


@ToolParserManager.register_module("llama3_json")
class Llama3JsonToolParser(IncrementalToolParser):
    """See the module docstring."""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        tag = text.find(TAG)
        if tag >= 0:
            content, i = text[:tag].rstrip(), tag + len(TAG)
        else:
            first = skip_ws(text, 0)
            if text[first:first + 1] != "{":
                if final:
                    return ParsedOutput(text)
                held = text[:len(text) - partial_prefix_len(text, TAG)]
                return ParsedOutput(held.rstrip())
            content, i = "", first
        calls: list[ParsedCall] = []
        while True:
            i = skip_ws(text, i)
            if calls and text[i:i + 1] == ";":
                i = skip_ws(text, i + 1)
            if i >= len(text):
                break
            try:
                call, end = call_from_object(text, i, final, ARGS_KEYS)
            except (ScanError, ValueError):
                return ParsedOutput(content, calls, ok=False)
            calls.append(call)
            if end is None:
                break
            i = end
        if final and not calls:
            return ParsedOutput(text, ok=False)
        return ParsedOutput(content, calls)
