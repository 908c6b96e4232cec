"""N-gram (prompt lookup) proposer: engine-side, torch-free.

For a request whose tokens so far are t_0..t_{L-1}, find the longest suffix t_{L-n}..t_{L-1}
with `min_n <= n <= max_n` that also occurs earlier in the tokens, and propose the (up to) k
tokens that followed its most recent earlier occurrence: if t_i..t_{i+n-1} equals the suffix
(i + n <= L - 1, i.e. at least one token follows it), the proposal is t_{i+n}..t_{i+n+k-1}
(cut at L). No match: no proposal. Text that the answer copies from the prompt (code edits,
quotes, retrieval answers) is proposed correctly and verified in one forward.

Cost: O(L * n) comparisons per request per step (numpy, ~tens of microseconds at L = 4096).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    """`propose(tokens)` -> at most `num_speculative_tokens` proposed next tokens."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int,
                 prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({prompt_lookup_min}) <= "
                             f"prompt_lookup_max ({prompt_lookup_max})")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got "
                             f"{num_speculative_tokens}")
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, tokens: Sequence[int] | np.ndarray, max_tokens: int | None = None
                ) -> list[int]:
        """Proposed continuation of `tokens` (empty when no n-gram matches); at most
        `max_tokens` (default k) tokens."""
        limit = self.k if max_tokens is None else min(self.k, max_tokens)
        arr = np.asarray(tokens, dtype=np.int64)
        length = len(arr)
        if limit <= 0:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = arr[length - n:]
            windows = sliding_window_view(arr[:length - 1], n)   # starts 0..L-1-n
            starts = np.flatnonzero((windows == suffix).all(axis=1))
            if len(starts):
                begin = int(starts[-1]) + n
                return arr[begin:begin + limit].tolist()
        return []
