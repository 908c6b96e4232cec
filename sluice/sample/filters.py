"""Truncation filters for random sampling: top-k, top-p (nucleus), min-p. All work in place on
temperature-scaled float32 logits [num_rows, vocab] and set dropped tokens to -inf.

Semantics per row (each filter keeps at least the most likely token):

* top-k: keep the k largest logits (tokens tied with the k-th are kept too); k >= vocab = off.
* top-p: after top-k, keep the smallest set of most likely tokens whose probability (renormalised
  over the top-k survivors) is >= p; a token is dropped when the tokens ranked above it already
  hold >= p. p = 1 = off.
* min-p: keep tokens with probability >= min_p * (the row's top probability).

A full sort of a 150k vocabulary costs ~25 ms per row on one CPU core, so top-p first looks at the
`topk` of a few hundred candidates: when those candidates already hold >= p of the row's
probability, the nucleus is among them and the row is done. Only rows with a flatter
distribution move on to more candidates and, at last, to a full sort.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")
# Candidate counts tried in turn before a full sort. Fixed sizes (not derived from the batch)
# keep each row's arithmetic, and so a seeded request's tokens, independent of its batch.
TOP_P_CANDIDATES: tuple[int, ...] = (256, 4096)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Apply top-k then top-p in place; `top_k`/`top_p` [num_rows] or None when unused.

    `top_k[i] >= vocab` disables top-k for row i and `max_top_k` is the largest enabled k;
    `top_p[i] == 1` disables top-p for row i.
    """
    if top_p is None:
        if top_k is not None:
            _apply_top_k_only(logits, top_k, max_top_k)
        return logits
    vocab_size = logits.shape[-1]
    rows: torch.Tensor | None = None  # None = every row; else the unresolved rows' indices
    sub, sub_k, sub_p = logits, top_k, top_p
    for candidates in TOP_P_CANDIDATES:
        if candidates >= vocab_size:
            break
        resolved = _top_k_top_p_from_candidates(sub, sub_k, sub_p, candidates)
        if rows is not None:
            logits[rows] = sub
        if bool(resolved.all()):
            return logits
        pending = (~resolved).nonzero().squeeze(1)
        rows = pending if rows is None else rows[pending]
        sub, sub_p = logits[rows], top_p[rows]
        sub_k = None if top_k is None else top_k[rows]
    sub = top_k_top_p_by_sort(sub, sub_k, sub_p)
    if rows is not None:
        logits[rows] = sub
    return logits


def top_k_top_p_by_sort(logits: torch.Tensor, top_k: torch.Tensor | None,
                        top_p: torch.Tensor) -> torch.Tensor:
    """Reference top-k + top-p over a full ascending sort of each row (exact, slow on CPU)."""
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_index = logits.sort(dim=-1)
    if top_k is not None:
        kth_index = (vocab_size - top_k.clamp(max=vocab_size)).unsqueeze(1)
        kth_largest = sorted_logits.gather(1, kth_index)
        sorted_logits.masked_fill_(sorted_logits < kth_largest, _NEG_INF)
    # Ascending cumulative mass <= 1 - p  <=>  the tokens above already hold >= p.
    cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, sorted_index, sorted_logits)


def _top_k_top_p_from_candidates(logits: torch.Tensor, top_k: torch.Tensor | None,
                                 top_p: torch.Tensor, candidates: int) -> torch.Tensor:
    """Filter the rows whose kept set lies within their `candidates` largest logits (in place)
    and return which rows were resolved: rows with top-k <= candidates, rows without top-k whose
    candidates hold >= p, rows with neither filter. Other rows are left unchanged."""
    num_rows, vocab_size = logits.shape
    values = logits.topk(candidates, dim=-1).values  # descending
    position = torch.arange(candidates, device=logits.device)
    if top_k is not None:
        has_k = top_k < vocab_size
        k_fits = top_k <= candidates
        values.masked_fill_(position >= top_k.unsqueeze(1), _NEG_INF)
        # Probabilities renormalised over the top-k survivors, else over the whole row.
        log_norm = values.logsumexp(dim=-1)
        if not bool(has_k.all()):
            log_norm = torch.where(has_k, log_norm, logits.logsumexp(dim=-1))
        num_kept_k = torch.where(has_k, top_k, 0)
    else:
        has_k = k_fits = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
        log_norm = logits.logsumexp(dim=-1)
        num_kept_k = torch.zeros(num_rows, dtype=torch.long, device=logits.device)
    probs = (values - log_norm.unsqueeze(1)).exp_()
    mass_above = probs.cumsum(dim=-1) - probs
    no_top_p = top_p >= 1.0
    num_kept_p = (mass_above < top_p.unsqueeze(1)).sum(dim=-1)
    if top_k is not None:  # rounding must never let top-p reach past the k-th token
        num_kept_p = torch.where(has_k, torch.minimum(num_kept_p, top_k), num_kept_p)
    num_kept = torch.where(no_top_p, num_kept_k, num_kept_p)  # 0 = keep everything
    nucleus_fits = (mass_above[:, -1] + probs[:, -1] >= top_p) | no_top_p
    resolved = torch.where(has_k, k_fits, nucleus_fits)
    threshold = values.gather(1, (num_kept - 1).clamp(min=0, max=candidates - 1).unsqueeze(1))
    threshold.masked_fill_(((num_kept == 0) | ~resolved).unsqueeze(1), _NEG_INF)
    logits.masked_fill_(logits < threshold, _NEG_INF)
    return resolved


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Top-k without a sort: one `topk(max_top_k)` gives every row's threshold."""
    vocab_size = logits.shape[-1]
    top_values = logits.topk(max_top_k, dim=-1).values  # descending
    kth_largest = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    kth_largest.masked_fill_((top_k >= vocab_size).unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth_largest, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with probability below min_p * (the row's top probability), in place.

    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); min_p = 0 keeps everything.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill_(logits < threshold, _NEG_INF)
