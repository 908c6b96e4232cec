"""The step's grammar bitmask (`sluice.structured_output.GrammarOutput`) as a logits mask.

The engine core sends one bitmask row per request that samples this step and has a grammar;
`grammar_mask` maps those rows onto the sampling rows (by request id) and returns
`(rows, drop)` for `SamplingMetadata.grammar_mask`: `drop[i, t]` is True when token t is not
allowed in sampling row `rows[i]`. The sampler applies it before every other stage, so the
greedy fast paths step aside (`SamplingMetadata.is_plain_greedy`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from sluice.structured_output.output import GrammarOutput


def grammar_mask(grammar_output: GrammarOutput | None, row_of: Mapping[str, int],
                 vocab_size: int, device: torch.device | str
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(rows, drop)` for the requests of `grammar_output` that sample in this batch
    (`row_of`: request id → sampling row); None when there are none."""
    if grammar_output is None:
        return None
    keep = [(i, row_of[rid]) for i, rid in enumerate(grammar_output.request_ids)
            if rid in row_of]
    if not keep:
        return None
    allowed = grammar_output.allowed(vocab_size)
    if len(keep) < len(grammar_output.request_ids):
        allowed = allowed[[i for i, _ in keep]]
    drop = torch.from_numpy(np.logical_not(allowed))
    rows = torch.tensor([r for _, r in keep], dtype=torch.long, device=device)
    return rows, drop.to(device)
