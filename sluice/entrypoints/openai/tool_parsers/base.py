"""The tool-parser contract (vLLM's shape, so that a vLLM-style plugin ports by changing its
imports) and the registry. No torch.

A `ToolParser` turns what the model wrote into OpenAI tool calls:

* `extract_tool_calls(model_output, request)` → `ExtractedToolCallInformation`: the calls and
  the text outside them (`content`, None when empty). Text it cannot parse comes back whole as
  content with `tools_called=False` (never an exception: the client gets the text, as vLLM).
* `extract_tool_calls_streaming(previous_text, current_text, delta_text, previous_token_ids,
  current_token_ids, delta_token_ids, request)` → the `DeltaMessage` to send for this step, or
  None to send nothing yet. One parser instance serves one choice of one request, so it may
  keep state between calls.
* `finish_streaming(text, request)` (sluice's addition): called once after the last delta;
  returns what is still unsent (a vLLM-style plugin that sends everything in its deltas keeps
  the default, None). Text that turns out not to parse after a call's first delta went out
  (the output was cut off by max_tokens) cannot be taken back: the stream then ends with the
  call as sent, and the finish_reason says why.
* `adjust_request(request)` may change the request before sampling (vLLM's hook);
  `skip_special_tokens` says whether special tokens stay in the text (False for parsers whose
  markers are special tokens).

`IncrementalToolParser` implements both modes from one function, `parse(text, final)`: given the
text so far it returns the content and calls, where (unless `final`) every string is a prefix
of what the finished text will give. Streaming then sends the difference from what was sent:
the content that grew, and per call first `{index, id, type, function.name}` (once the name is
known) and then argument fragments. So the streamed pieces add up to the non-streaming result.

`ToolParserManager` maps names to parser classes: `@ToolParserManager.register_module("name")`
registers one, `import_tool_parser(path)` runs a user's file (which registers its parsers),
`get_tool_parser(name)` looks one up.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sluice.entrypoints.openai.protocol import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                FunctionCall, ToolCall)
from sluice.entrypoints.openai.tool_parsers.json_scan import ObjectScan, ScanError, scan_object
from sluice.errors import ConfigError


def tool_call_id() -> str:
    """A fresh tool-call id, as vLLM: `chatcmpl-tool-<hex>`."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ExtractedToolCallInformation:
    """The result of `extract_tool_calls` (vLLM's name and fields)."""

    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None = None


@dataclass
class ParsedCall:
    """One call found by `IncrementalToolParser.parse`: `name` None while not yet known;
    `arguments` the JSON text of the arguments (a prefix of it while streaming)."""

    name: str | None
    arguments: str = ""


@dataclass
class ParsedOutput:
    """What `IncrementalToolParser.parse` found. `ok` False: the text is not (or cannot become)
    the parser's format; then a final parse answers the whole text as content, and a stream
    sends nothing more for the calls."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)
    ok: bool = True


def call_from_object(body: str, pos: int, final: bool, args_keys: tuple[str, ...]
                     ) -> tuple[ParsedCall, int | None]:
    """The call in the JSON object at `body[pos]` (`{"name": ..., <args key>: ...}`) and the
    offset past the object (None while unfinished). Unless `final`, `name` is None until its
    string is finished and `arguments` is what has arrived. Raises `ScanError` for an object
    that is not a call."""
    scan = scan_object(body, pos, final)
    return call_from_scan(body, pos, scan, final, args_keys), scan.end


def call_from_scan(body: str, pos: int, scan: ObjectScan, final: bool,
                   args_keys: tuple[str, ...]) -> ParsedCall:
    """The call in the object `scan` found at `body[pos]` (see `call_from_object`)."""
    if final:
        if scan.end is None:
            raise ScanError("unfinished call")
        value = json.loads(body[pos:scan.end])
        if not isinstance(value.get("name"), str):
            raise ScanError("a call needs a string 'name'")
    name: str | None = None
    where = scan.get("name")
    if where is not None and where[1] is not None:
        name = json.loads(body[where[0]:where[1]])
        if not isinstance(name, str):
            raise ScanError("a call needs a string 'name'")
    arguments = ""
    for key in args_keys:
        where = scan.get(key)
        if where is not None and where[0] is not None:
            arguments = body[where[0]:where[1] if where[1] is not None else len(body)]
            break
    else:
        if scan.end is not None:
            arguments = "{}"
    return ParsedCall(name, arguments)


class ToolParser:
    """Base of the tool parsers (see the module docstring)."""

    skip_special_tokens: bool = True

    def __init__(self, tokenizer: Any = None):
        self.model_tokenizer = tokenizer

    def adjust_request(self, request: Any) -> Any:
        return request

    def extract_tool_calls(self, model_output: str, request: Any
                           ) -> ExtractedToolCallInformation:
        raise NotImplementedError

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str,
                                     delta_text: str, previous_token_ids: Sequence[int],
                                     current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any
                                     ) -> DeltaMessage | None:
        raise NotImplementedError

    def finish_streaming(self, text: str, request: Any) -> DeltaMessage | None:
        return None


class IncrementalToolParser(ToolParser):
    """A parser defined by `parse(text, final)` (see the module docstring)."""

    def __init__(self, tokenizer: Any = None):
        super().__init__(tokenizer)
        self._sent_content = ""
        self._sent_args: list[str] = []
        self._stopped = False

    def parse(self, text: str, final: bool) -> ParsedOutput:
        raise NotImplementedError

    def extract_tool_calls(self, model_output: str, request: Any
                           ) -> ExtractedToolCallInformation:
        parsed = self.parse(model_output, final=True)
        if not parsed.ok or not parsed.calls:
            return ExtractedToolCallInformation(False, [], model_output)
        calls = [ToolCall(id=tool_call_id(),
                          function=FunctionCall(name=c.name or "", arguments=c.arguments))
                 for c in parsed.calls]
        return ExtractedToolCallInformation(True, calls, parsed.content or None)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str,
                                     delta_text: str, previous_token_ids: Sequence[int],
                                     current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any
                                     ) -> DeltaMessage | None:
        return self._delta(self.parse(current_text, final=False))

    def finish_streaming(self, text: str, request: Any) -> DeltaMessage | None:
        parsed = self.parse(text, final=True)
        if not parsed.ok or not parsed.calls:
            if self._sent_args:
                return None  # calls went out and cannot be taken back: the text stays unsent
            parsed = ParsedOutput(text)
        return self._delta(parsed)

    def _delta(self, parsed: ParsedOutput) -> DeltaMessage | None:
        """What to send so that the sent content and calls become `parsed`'s (only growth is
        sent; a part that does not extend what was sent is left alone)."""
        content = None
        if parsed.content.startswith(self._sent_content) \
                and len(parsed.content) > len(self._sent_content):
            content = parsed.content[len(self._sent_content):]
            self._sent_content = parsed.content
        pieces: list[DeltaToolCall] = []
        if not parsed.ok:
            self._stopped = True
        for index, call in enumerate(parsed.calls if not self._stopped else ()):
            if index < len(self._sent_args):
                sent = self._sent_args[index]
                if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                    pieces.append(DeltaToolCall(index=index, function=DeltaFunctionCall(
                        arguments=call.arguments[len(sent):])))
                    self._sent_args[index] = call.arguments
                continue
            if call.name is None:
                break
            pieces.append(DeltaToolCall(index=index, id=tool_call_id(), type="function",
                                        function=DeltaFunctionCall(name=call.name,
                                                                   arguments=call.arguments)))
            self._sent_args.append(call.arguments)
        if content is None and not pieces:
            return None
        return DeltaMessage(content=content, tool_calls=pieces or None)


class ToolParserManager:
    """The registry of tool parsers by name (vLLM's class of the same name)."""

    tool_parsers: dict[str, type[ToolParser]] = {}

    @classmethod
    def register_module(cls, name: str | list[str] | None = None, force: bool = True,
                        module: type[ToolParser] | None = None) -> Any:
        """Register `module` under `name` (a string or several), or decorate a class with it.
        Without a name the class's own name is used."""
        def register(parser: type[ToolParser]) -> type[ToolParser]:
            names = [parser.__name__] if name is None else \
                [name] if isinstance(name, str) else list(name)
            for each in names:
                if not force and each in cls.tool_parsers:
                    raise KeyError(f"tool parser {each!r} is already registered")
                cls.tool_parsers[each] = parser
            return parser

        return register(module) if module is not None else register

    @classmethod
    def get_tool_parser(cls, name: str) -> type[ToolParser]:
        """The parser class registered as `name`; `KeyError` naming the known ones."""
        if name not in cls.tool_parsers:
            raise KeyError(f"tool parser {name!r} is not registered; known: "
                           f"{', '.join(sorted(cls.tool_parsers))}")
        return cls.tool_parsers[name]

    @classmethod
    def import_tool_parser(cls, plugin_path: str) -> None:
        """Run the Python file `plugin_path` (its module registers its parsers). A missing
        file or one that fails to import is a `ConfigError` naming --tool-parser-plugin."""
        path = Path(plugin_path).expanduser()
        if not path.is_file():
            raise ConfigError([f"--tool-parser-plugin: {plugin_path!r} is not a file. Fix: "
                               "give the path of a Python file that registers a tool parser."])
        name = f"sluice_tool_parser_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - reported as a startup error
            sys.modules.pop(name, None)
            raise ConfigError([f"--tool-parser-plugin: importing {plugin_path!r} failed: "
                               f"{type(e).__name__}: {e}"]) from e
