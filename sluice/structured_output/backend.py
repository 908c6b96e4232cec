"""The llguidance backend, engine side: the tokenizer llguidance needs, and compilation of a
`StructuredOutputsParams` into a matcher. Torch-free.

* The `LLTokenizer` is built once, lazily, from the model's Hugging Face fast tokenizer
  (`tokenizer_path`: `--tokenizer`, else the model directory; a hub id or a .gguf model was
  resolved to a local directory holding tokenizer.json before the engine started). Building it
  costs ~1 s for a 150k vocabulary, so startup never pays for it: the first structured request
  does (on the compile thread, not the engine loop). `n_vocab` is the model's logits width
  (`ModelSpec.vocab_size`), so the bitmask has one bit per logits column; ids the tokenizer
  lacks are never allowed. EOS: the model's EOS ids (generation_config / config.json), allowed
  only where the grammar may end.
* `compile(params)` builds the template `LLMatcher` of one constraint (grammar text from
  `grammar.grammar_text`); the manager caches templates and hands each request a `deep_copy`.
  A constraint that does not compile with this tokenizer raises `InvalidRequestError`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from sluice.errors import InvalidRequestError, ModelLoadError
from sluice.sampling_params import StructuredOutputsParams
from sluice.structured_output.config import StructuredOutputsConfig
from sluice.structured_output.grammar import grammar_text

logger = logging.getLogger(__name__)


class GuidanceBackend:
    def __init__(self, config: StructuredOutputsConfig, tokenizer_path: str, vocab_size: int,
                 eos_token_ids: Sequence[int]):
        self.config = config
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The `llguidance.LLTokenizer` (built on first use; thread-safe)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build_tokenizer()
            return self._tokenizer

    def _build_tokenizer(self) -> Any:
        start = time.perf_counter()
        import llguidance.hf
        from transformers import PreTrainedTokenizerFast   # no torch import
        try:
            hf = PreTrainedTokenizerFast.from_pretrained(self.tokenizer_path,
                                                         local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"structured output: could not load the tokenizer in "
                                 f"{self.tokenizer_path!r}: {type(e).__name__}: {e}") from e
        eos = self.eos_token_ids or None
        tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=eos)
        logger.info("structured output: llguidance tokenizer built in %.2fs",
                    time.perf_counter() - start)
        return tokenizer

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The template `llguidance.LLMatcher` for `params`; raises `InvalidRequestError`
        naming `structured_outputs.<kind>` when it does not compile."""
        from llguidance import LLMatcher
        text = grammar_text(params, self.config)
        matcher = LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            kind = params.kind
            raise InvalidRequestError(f"structured_outputs.{kind} does not compile: "
                                      f"{matcher.get_error()}",
                                      param=f"structured_outputs.{kind}")
        return matcher
