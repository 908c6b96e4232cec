"""Structured output (JSON schema, regex, choice, Lark/GBNF grammar, structural tags), engine
side and torch-free, on llguidance.

    config.py   --structured-outputs-config (vLLM's keys; backend "guidance" | "auto")
    grammar.py  StructuredOutputsParams → llguidance grammar text; the tokenizer-free check the
                API server runs on every request (a 400 naming the field)
    backend.py  the lazily built llguidance tokenizer; compile a constraint into a matcher
    manager.py  compiled-grammar cache, compilation off the engine loop, one matcher per
                request, the step's bitmask, advancing matchers with sampled tokens
    output.py   GrammarOutput: the step's bitmask as it travels to the sampling rank

The worker side is `sluice.sample` (the bitmask becomes a logits mask applied before every
other sampling stage). See docs/structured_output.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sluice.structured_output.output import GrammarOutput

if TYPE_CHECKING:
    from sluice.config import EngineConfig
    from sluice.hf_config import ModelSpec
    from sluice.structured_output.manager import StructuredOutputManager

__all__ = ["GrammarOutput", "make_manager"]


def make_manager(config: EngineConfig, spec: ModelSpec) -> StructuredOutputManager:
    """The engine core's manager for `config` (cheap: nothing is built until the first
    structured request)."""
    from sluice.structured_output.backend import GuidanceBackend
    from sluice.structured_output.config import parse_structured_outputs_config
    from sluice.structured_output.manager import StructuredOutputManager
    so_config = parse_structured_outputs_config(config.model.structured_outputs_config)
    backend = GuidanceBackend(so_config, config.model.tokenizer or spec.path,
                              spec.vocab_size, spec.eos_token_ids)
    return StructuredOutputManager(backend)
