"""`--tool-call-parser hermes`: Hermes 2 Pro, Qwen 2.5/3 and most chat models trained on the
Hermes function-calling format, which write each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several calls are several blocks; the last block may lack `</tool_call>` (the model stopped
there). `content` is the text outside the blocks, with the whitespace that touches a block left
out; a call's `arguments` is the raw JSON text of its `arguments` value (`{}` when absent). A
block whose body is not such an object makes the whole output plain content. Special tokens
stay in the text (`<tool_call>` is one in several tokenizers), as vLLM's parser asks. No torch.
"""

from __future__ import annotations

from sluice.entrypoints.openai.tool_parsers.base import (IncrementalToolParser, ParsedCall,
                                                        ParsedOutput, ToolParserManager,
                                                        call_from_object)
from sluice.entrypoints.openai.tool_parsers.json_scan import (ScanError, partial_prefix_len,
                                                             skip_ws)

START, END = "<tool_call>", "</tool_call>"


def join_content(segments: list[str], num_calls: int, final: bool) -> str:
    """The text outside the calls: `segments[k]` lies between call k-1 and call k (the last
    one after the last call). Whitespace touching a call is dropped; unless `final`, so is the
    last segment's trailing whitespace (a call may follow it)."""
    if num_calls == 0 and final:
        return "".join(segments)
    parts = []
    for k, segment in enumerate(segments):
        if k > 0:
            segment = segment.lstrip()
        if k < len(segments) - 1 or not final:
            segment = segment.rstrip()
        parts.append(segment)
    return "".join(parts)


@ToolParserManager.register_module("hermes")
class Hermes2ProToolParser(IncrementalToolParser):
    """See the module docstring."""

    skip_special_tokens = False

    def parse(self, text: str, final: bool) -> ParsedOutput:
        segments: list[str] = []
        calls: list[ParsedCall] = []
        i = 0
        while True:
            start = text.find(START, i)
            if start < 0:
                tail = text[i:]
                if not final:
                    tail = tail[:len(tail) - partial_prefix_len(tail, START)]
                segments.append(tail)
                break
            segments.append(text[i:start])
            body_start = start + len(START)
            stop = text.find(END, body_start)
            body = text[body_start:stop if stop >= 0 else len(text)]
            pos = skip_ws(body, 0)
            if pos == len(body):
                if final or stop >= 0:
                    return ParsedOutput(text, ok=False)  # an empty block
                break
            try:
                call, end = call_from_object(body, pos, final or stop >= 0, ("arguments",))
            except (ScanError, ValueError):
                return ParsedOutput(join_content(segments, len(calls), False), calls, ok=False)
            if (final or stop >= 0) and (end is None or body[end:].strip()):
                return ParsedOutput(join_content(segments, len(calls), False), calls, ok=False)
            calls.append(call)
            if stop < 0:
                if not final:
                    # the call is still arriving; hold back a partial end marker after it
                    return ParsedOutput(join_content(segments, len(calls), False), calls)
                segments.append("")
                break
            i = stop + len(END)
        return ParsedOutput(join_content(segments, len(calls), final), calls)
