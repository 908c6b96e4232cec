"""`GrammarOutput`: one step's token bitmask, engine core → the sampling rank. Torch-free.

    bitmask  int32 [num_rows, num_words] (C order, as bytes on the wire), num_words =
             ceil(vocab_size / 32); row i constrains `request_ids[i]`:
             token t is allowed  ⇔  (bitmask[i, t // 32] >> (t % 32)) & 1

It is the layout of `llguidance.numpy.allocate_token_bitmask`. Only requests that sample this
step have a row (a partial prefill chunk samples nothing, so it has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GrammarOutput:
    request_ids: list[str]
    bitmask: bytes
    num_words: int

    @classmethod
    def from_array(cls, request_ids: list[str], bitmask: np.ndarray) -> "GrammarOutput":
        assert bitmask.dtype == np.int32 and bitmask.shape[0] == len(request_ids)
        return cls(request_ids, bitmask.tobytes(), int(bitmask.shape[1]))

    def array(self) -> np.ndarray:
        """The bitmask as int32 [len(request_ids), num_words] (a read-only view)."""
        return np.frombuffer(self.bitmask, dtype=np.int32).reshape(len(self.request_ids),
                                                                    self.num_words)

    def allowed(self, vocab_size: int) -> np.ndarray:
        """bool [len(request_ids), vocab_size]: True where the token is allowed (columns past
        the bitmask's width are not)."""
        bits = np.unpackbits(self.array().view(np.uint8), axis=1, bitorder="little")
        if bits.shape[1] >= vocab_size:
            return bits[:, :vocab_size].astype(bool)
        out = np.zeros((bits.shape[0], vocab_size), dtype=bool)
        out[:, :bits.shape[1]] = bits
        return out
