"""Tool calling on /v1/chat/completions, as vLLM: from a request's `tools`, `tool_choice` and
`parallel_tool_calls` to a `ToolPlan`, and from the model's text back to OpenAI tool calls.

Modes (`tool_choice`; absent means "auto" with tools, "none" without):
* "none": the template sees the tools; the text is returned as content, nothing is parsed.
* "auto": the server's parser (`--enable-auto-tool-choice --tool-call-parser NAME`, or one a
  `--tool-parser-plugin` file registers) finds calls in what the model chose to write; without
  those flags a 400 (naming `tool_choice`, or `tools` when tool_choice was left out).
* "required": the output is constrained (structured output) to a JSON array of
  `{"name", "parameters"}` objects, one anyOf branch per tool, `minItems` 1 and, with
  `parallel_tool_calls: false`, `maxItems` 1; every element becomes a call.
* named (`{"type": "function", "function": {"name": N}}`): the output is constrained to N's
  `parameters` schema and is the arguments of one call to N. An N not in `tools` is a 400
  naming tool_choice.
Both constrained modes ask for compact JSON (`disable_any_whitespace`).
A constrained call that still does not parse (the output hit max_tokens) comes back as plain
content with the engine's finish_reason; text a parser cannot parse likewise. A message with
calls has `finish_reason: "tool_calls"`; `parallel_tool_calls: false` keeps only the first call
(auto). Streaming sends each call as `tool_calls` deltas: `{index, id, type, function.name}`
first, then argument fragments (`ToolStream`). No torch.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from sluice.config import ServerConfig
from sluice.entrypoints.openai.protocol import (ChatCompletionRequest, ChatTool, DeltaMessage,
                                                NamedToolChoice, ToolCall)
from sluice.entrypoints.openai.tool_parsers import (IncrementalToolParser, ParsedCall,
                                                    ParsedOutput, ToolParser, ToolParserManager)
from sluice.entrypoints.openai.tool_parsers.base import call_from_scan
from sluice.entrypoints.openai.tool_parsers.json_scan import (ScanError,
                                                             scan_array_of_objects, skip_ws)
from sluice.errors import ConfigError, InvalidRequestError
from sluice.sampling_params import SamplingParams, StructuredOutputsParams
from sluice.structured_output.grammar import check_structured_outputs

logger = logging.getLogger(__name__)

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
"""The schema of a function declared without `parameters`."""


# ---------------------------------------------------------------------------------------------
# The server's parser

@functools.lru_cache(maxsize=None)
def _parser_class(name: str, plugin: str | None) -> type[ToolParser]:
    if plugin is not None:
        ToolParserManager.import_tool_parser(plugin)
    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError as e:
        raise ConfigError([f"--tool-call-parser: {e.args[0]}. Fix: pick a registered name, or "
                           "register yours with --tool-parser-plugin FILE."]) from None


def server_tool_parser(server: ServerConfig) -> type[ToolParser] | None:
    """The parser class for "auto" (None without --enable-auto-tool-choice). Loads the
    --tool-parser-plugin file once; a bad plugin or name is a `ConfigError` (the server checks
    this at startup, see `serve_cmd`)."""
    if not server.enable_auto_tool_choice or server.tool_call_parser is None:
        return None
    return _parser_class(server.tool_call_parser, server.tool_parser_plugin)


# ---------------------------------------------------------------------------------------------
# Request → plan

def _hoist_defs(parameters: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`parameters` without its `$defs`, which join `defs` (the array schema's root, where
    `#/$defs/...` references resolve). Two tools defining one name differently is a 400."""
    parameters = dict(parameters)
    for name, value in (parameters.pop("$defs", None) or {}).items():
        if name in defs and defs[name] != value:
            raise InvalidRequestError(f"Tools define $defs/{name} differently; tool_choice "
                                      "'required' needs one meaning per name.", param="tools")
        defs[name] = value
    return parameters


def required_schema(tools: Sequence[ChatTool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of tool_choice "required": an array of calls, each `{"name": one tool's
    name, "parameters": that tool's schema}` and nothing else (see the module docstring)."""
    defs: dict[str, Any] = {}
    branches = []
    for tool in tools:
        parameters = _hoist_defs(tool.function.parameters or EMPTY_PARAMETERS, defs)
        branches.append({"properties": {"name": {"type": "string",
                                                 "enum": [tool.function.name]},
                                        "parameters": parameters},
                         "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools: `mode` is "none", "auto", "required" or "named";
    `parser_class` (auto), `function_name` (named), `schema` (required, named: the constraint
    set on the sampling parameters); `parallel` from parallel_tool_calls (default true)."""

    mode: str = "none"
    parser_class: type[ToolParser] | None = None
    function_name: str | None = None
    schema: dict[str, Any] | None = None
    parallel: bool = True

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """`params` with the plan's constraint (a 400 naming tool_choice if the request already
        constrains the output, naming tools if a parameters schema does not compile) and the
        parser's special-token need."""
        if self.schema is not None:
            if params.structured_outputs is not None:
                raise InvalidRequestError(
                    f"tool_choice {self._choice_text()} constrains the output itself; it cannot "
                    "be combined with response_format or structured_outputs.",
                    param="tool_choice")
            # Compact JSON: the calls are read by programs, and a weak model let loose on
            # "any whitespace" can spend its whole max_tokens on it.
            constraint = StructuredOutputsParams(json=self.schema, disable_any_whitespace=True)
            try:
                check_structured_outputs(constraint)
            except InvalidRequestError as e:
                raise InvalidRequestError(
                    f"tools: a function's parameters schema does not compile for tool_choice "
                    f"{self._choice_text()}: {e.message}", param="tools") from None
            params = params.with_updates(structured_outputs=constraint)
        if self.parser_class is not None and not self.parser_class.skip_special_tokens:
            params = params.with_updates(skip_special_tokens=False)
        return params

    def _choice_text(self) -> str:
        return f"'{self.function_name}'" if self.mode == "named" else f"'{self.mode}'"

    def new_parser(self, tokenizer: Any) -> ToolParser | None:
        """A fresh parser for one choice (None in mode "none")."""
        if self.mode == "auto":
            assert self.parser_class is not None
            return self.parser_class(tokenizer)
        if self.mode == "named":
            assert self.function_name is not None
            return NamedCallParser(self.function_name)
        if self.mode == "required":
            return RequiredCallsParser()
        return None

    def message(self, text: str, tokenizer: Any, request: Any
                ) -> tuple[str | None, list[ToolCall] | None]:
        """(content, tool calls or None) of a finished choice's `text`."""
        parser = self.new_parser(tokenizer)
        if parser is None:
            return text, None
        try:
            info = parser.extract_tool_calls(text, request)
        except Exception:  # noqa: BLE001 - a plugin's bug must not turn into a 500
            logger.exception("Tool parser %s failed; answering the text as content",
                             type(parser).__name__)
            return text, None
        if not info.tools_called or not info.tool_calls:
            return text, None
        calls = info.tool_calls if self.parallel or self.mode != "auto" else info.tool_calls[:1]
        return info.content, calls

    def stream(self, tokenizer: Any, request: Any) -> "ToolStream | None":
        """The per-choice streaming state (None in mode "none")."""
        parser = self.new_parser(tokenizer)
        if parser is None:
            return None
        return ToolStream(parser, request, single_call=self.mode == "auto" and not self.parallel)


def plan_tools(body: ChatCompletionRequest, server: ServerConfig) -> ToolPlan:
    """Check the request's tool fields and say how to serve them (see the module docstring).
    Raises `InvalidRequestError` naming tool_choice or tools."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    parallel = body.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan(parallel=parallel)
    if not tools:
        raise InvalidRequestError("tool_choice needs tools.", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        tool = next((t for t in tools if t.function.name == name), None)
        if tool is None:
            raise InvalidRequestError(
                f"tool_choice names the function {name!r}, which is not in tools (tools: "
                f"{', '.join(t.function.name for t in tools)}).", param="tool_choice")
        return ToolPlan("named", function_name=name,
                        schema=tool.function.parameters or EMPTY_PARAMETERS, parallel=parallel)
    if choice == "required":
        return ToolPlan("required", schema=required_schema(tools, parallel), parallel=parallel)
    parser_class = server_tool_parser(server)
    if parser_class is None:
        param = "tool_choice" if body.tool_choice is not None else "tools"
        raise InvalidRequestError(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
            "set on the server (tool_choice is \"auto\" when tools are sent without it); send "
            'tool_choice "none", "required" or a named function instead.', param=param)
    return ToolPlan("auto", parser_class=parser_class, parallel=parallel)


# ---------------------------------------------------------------------------------------------
# Parsers of the constrained modes

class NamedCallParser(IncrementalToolParser):
    """tool_choice naming one function: the whole output is that call's arguments."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        arguments = text.strip()
        if final:
            try:
                json.loads(arguments)
            except ValueError:
                return ParsedOutput(text, ok=False)
        if not arguments:
            return ParsedOutput("")
        return ParsedOutput("", [ParsedCall(self.name, arguments)])


class RequiredCallsParser(IncrementalToolParser):
    """tool_choice "required": the output is a JSON array of {"name", "parameters"}."""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        pos = skip_ws(text, 0)
        if pos == len(text):
            return ParsedOutput("", ok=not final)
        try:
            scans, end = scan_array_of_objects(text, pos, final)
            if final and (end is None or text[end:].strip() or not scans):
                return ParsedOutput(text, ok=False)
            calls = [call_from_scan(text, scan_start(text, pos, scans, k), scan,
                                    final or scan.end is not None, ("parameters",))
                     for k, scan in enumerate(scans)]
        except (ScanError, ValueError):
            return ParsedOutput("", ok=False)
        return ParsedOutput("", calls)


def scan_start(text: str, pos: int, scans: list, k: int) -> int:
    """The offset of the `k`th element's `{` in the array at `text[pos]`."""
    if k == 0:
        return skip_ws(text, pos + 1)
    previous_end = scans[k - 1].end
    return skip_ws(text, skip_ws(text, previous_end) + 1)  # past the ','


# ---------------------------------------------------------------------------------------------
# Streaming

@dataclass
class ToolStream:
    """One streamed choice's tool-call state: `feed` each text delta, `finish` once at the end;
    `called` tells whether any call was sent (finish_reason "tool_calls"). A parser that raises
    is logged and the rest of the text goes out as content. With `single_call` only call 0 is
    sent (parallel_tool_calls false)."""

    parser: ToolParser
    request: Any
    single_call: bool = False
    called: bool = False
    _text: str = ""
    _token_ids: list[int] = field(default_factory=list)
    _failed: bool = False

    def feed(self, delta_text: str, delta_token_ids: Sequence[int]) -> DeltaMessage | None:
        previous_text, previous_ids = self._text, list(self._token_ids)
        self._text += delta_text
        self._token_ids.extend(delta_token_ids)
        if self._failed:
            return DeltaMessage(content=delta_text) if delta_text else None
        try:
            delta = self.parser.extract_tool_calls_streaming(
                previous_text, self._text, delta_text, previous_ids, self._token_ids,
                list(delta_token_ids), self.request)
        except Exception:  # noqa: BLE001 - a plugin's bug must not end the stream
            logger.exception("Tool parser %s failed while streaming; sending the text as "
                             "content", type(self.parser).__name__)
            self._failed = True
            return DeltaMessage(content=delta_text) if delta_text else None
        return self._filter(delta)

    def finish(self) -> DeltaMessage | None:
        if self._failed:
            return None
        try:
            return self._filter(self.parser.finish_streaming(self._text, self.request))
        except Exception:  # noqa: BLE001
            logger.exception("Tool parser %s failed finishing a stream",
                             type(self.parser).__name__)
            return None

    def _filter(self, delta: DeltaMessage | None) -> DeltaMessage | None:
        if delta is None or not delta.tool_calls:
            return delta
        pieces = [p for p in delta.tool_calls if not self.single_call or p.index == 0]
        self.called = self.called or bool(pieces)
        if not pieces and delta.content is None:
            return None
        return DeltaMessage(role=delta.role, content=delta.content, tool_calls=pieces or None)
