"""Tool-call parsers for `--enable-auto-tool-choice --tool-call-parser NAME` (vLLM's names and
plugin API): `ToolParser` (the contract), `ToolParserManager` (the registry; a
`--tool-parser-plugin` file registers its own parsers with it), one module per parser. No torch.
"""

from sluice.entrypoints.openai.tool_parsers.base import (ExtractedToolCallInformation,
                                                        IncrementalToolParser, ParsedCall,
                                                        ParsedOutput, ToolParser,
                                                        ToolParserManager, tool_call_id)
from sluice.entrypoints.openai.tool_parsers.hermes import Hermes2ProToolParser
from sluice.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

__all__ = ["ExtractedToolCallInformation", "Hermes2ProToolParser", "IncrementalToolParser",
           "Llama3JsonToolParser", "ParsedCall", "ParsedOutput", "ToolParser",
           "ToolParserManager", "tool_call_id"]
