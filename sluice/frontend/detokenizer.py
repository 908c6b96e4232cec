"""Incremental detokenization and stop strings, per sample. No torch.

Two layers:

* `IncrementalDetokenizer` turns a growing token sequence into text deltas. It never emits a
  fragment of a multi-byte UTF-8 character: a byte-level token may carry half of 'é' or a
  quarter of '🙂', and decoding it alone yields U+FFFD. Bookkeeping over the token list:

      ids:  [ context | ... emitted ... |  pending (not yet shown)  ]
              prefix_offset ^   read_offset ^              len(ids) ^

  Each step decodes `ids[prefix_offset:]` and compares it with the cached
  `decode(ids[prefix_offset:read_offset])`. When the new text is longer and does not end in
  U+FFFD (an incomplete character), the extra characters are the delta and both offsets
  advance (`prefix_offset = read_offset`, `read_offset = len(ids)`); otherwise the tokens stay
  pending. A window that ends in a complete character ends on a character boundary of the full
  decode too (UTF-8 is self-synchronising), so the concatenated deltas plus `flush()` equal
  `tokenizer.decode(ids)` (for byte-level BPE always; with SentencePiece byte fallback whenever
  the bytes are valid UTF-8, since its decoder replaces a whole invalid byte run). Keeping one
  already-emitted token (or the last prompt tokens) in the window preserves the leading space
  that SentencePiece decoders strip from a first token.

* `StopStringDetokenizer` accumulates the sample's text, matches `SamplingParams.stop`, and
  holds back the longest tail that could still become a stop string, so a stream never shows a
  stop string's prefix that is later cut. `text` only ever grows (a stable prefix of the final
  text), which is what lets DELTA outputs be simple slices of it.
"""

from __future__ import annotations

from typing import Sequence

from sluice.frontend.tokenizer import Tokenizer
from sluice.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context before the first output token (as in vLLM).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text deltas for one sequence of output tokens (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._decode = tokenizer.backend.decode
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        context_text = self._text(context)
        if context_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character; deltas would not line up with it. Start clean.
            context, context_text = [], ""
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = context_text

    def _text(self, ids: list[int]) -> str:
        return self._decode(ids, skip_special_tokens=self._skip) if ids else ""

    @property
    def num_pending_tokens(self) -> int:
        """Tokens added whose text has not been emitted yet."""
        return len(self._ids) - self._read_offset

    def add_token(self, token_id: int) -> str:
        """Append one token; return the newly completed text ("" while a character is split)."""
        self._ids.append(token_id)
        text = self._text(self._ids[self._prefix_offset:])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        delta = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._text(self._ids[self._prefix_offset:self._read_offset])
        return delta

    def flush(self) -> str:
        """At the end of the sequence: the pending text, U+FFFD included for bytes that never
        completed a character. Further `add_token` calls start after it."""
        if self._read_offset == len(self._ids):
            return ""
        text = self._text(self._ids[self._prefix_offset:])
        delta = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._text(self._ids[self._prefix_offset:self._read_offset])
        return delta


class StopStringDetokenizer:
    """One sample's output text with stop-string matching and hold-back.

    Drive it with `add_token(id)` for every output token that should show as text (the caller
    skips a final EOS / stop token unless `include_stop_str_in_output`), then `finish()` once.
    `add_token`/`finish` return the matched stop string when one appears; the text is then cut
    before it (or after it with `include_stop_str_in_output`) and the detokenizer is done.
    Stop strings are not looked for while the number of output tokens is <= `min_tokens`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] | None,
                 params: SamplingParams):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                             params.skip_special_tokens)
        self._stops: list[str] = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._max_hold = 0 if self._include_stop or not self._stops else \
            max(len(s) for s in self._stops) - 1
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._text = ""   # all text decoded so far (after a stop match: the final text)
        self._held = 0    # characters at the end of `_text` not shown yet
        self.done = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The text that may be shown: everything but the held-back tail. Only ever grows."""
        return self._text[:len(self._text) - self._held] if self._held else self._text

    def add_token(self, token_id: int) -> str | None:
        """Add one output token's text; return the stop string it completed, if any."""
        assert not self.done, "add_token after the sample finished"
        self._num_tokens += 1
        return self._append(self._detok.add_token(token_id))

    def finish(self) -> str | None:
        """End of the sample: flush incomplete characters, match stop strings in them, release
        the held-back tail. Returns the stop string matched in the flushed text, if any."""
        if self.done:
            return None
        matched = self._append(self._detok.flush())
        self._held = 0
        self.done = True
        return matched

    def _append(self, delta: str) -> str | None:
        if not delta:
            return None
        start = len(self._text)
        self._text += delta
        if self._stops and self._num_tokens > self._min_tokens:
            matched = self._match_stop(start)
            if matched is not None:
                return matched
        if self._max_hold:
            self._held = self._partial_stop_len()
        return None

    def _match_stop(self, new_start: int) -> str | None:
        """Find the earliest stop string that ends inside the text added at `new_start`."""
        best_pos, best = -1, None
        for stop in self._stops:
            pos = self._text.find(stop, max(0, new_start - len(stop) + 1))
            if pos != -1 and (best is None or pos < best_pos):
                best_pos, best = pos, stop
        if best is None:
            return None
        cut = best_pos + len(best) if self._include_stop else best_pos
        self._text = self._text[:cut]
        self._held = 0
        self.done = True
        self.stop_reason = best
        return best

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._text
        for k in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self._stops):
                return k
        return 0
