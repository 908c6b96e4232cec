"""Rejection sampling for speculative decoding: accept a prefix of the proposed (draft) tokens
so that the emitted tokens follow exactly the target model's distribution.

One request row `b` proposes `num_draft[b]` <= k tokens d_0..d_{n-1}; the target model's
forward over [last token, d_0, ..., d_{n-1}] gives its distributions p_0..p_n (p_j: the next
token after d_{j-1}, already processed: penalties, temperature, top-k/top-p, masks — the same
processing the non-speculative sampler applies, so both sample the same distribution). The
proposer drew d_j from q_j (`draft_probs`; None for a deterministic proposer such as n-gram
lookup, where q_j is one-hot on d_j).

Rule per row (Leviathan et al. / Chen et al., the rule vLLM uses)::

    for j in 0..n-1:   accept d_j with probability min(1, p_j(d_j) / q_j(d_j))
                       (uniform u_j: accept when u_j * q_j(d_j) < p_j(d_j))
    r = the number of leading accepted drafts (the first rejection stops the row)
    r < n: emit d_0..d_{r-1}, then one token drawn from max(0, p_r - q_r), renormalised
    r = n: emit all n drafts, then a bonus token drawn from p_n

so a row emits r + 1 tokens (1..n+1). Each emitted token has exactly the target distribution
given the tokens before it. Greedy rows (temperature 0) accept while d_j equals the target's
argmax and then emit the target's argmax at position r: token for token what plain greedy
decoding gives.

Randomness: row b uses `uniforms[b, 0..k-1]` for its acceptance tests and `uniforms[b, k]` for
its final draw (the caller draws them from the request's own generator when seeded), so a
seeded request stays reproducible whatever the batch around it.
"""

from __future__ import annotations

import torch

from sluice.sample.sampler import sample_from_weights


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor,
                     num_draft: torch.Tensor, uniforms: torch.Tensor,
                     draft_probs: torch.Tensor | None = None,
                     greedy: torch.Tensor | None = None,
                     target_argmax: torch.Tensor | None = None) -> list[list[int]]:
    """The tokens each row emits (r + 1 of them, see the module docstring).

    Shapes (R rows, k = the most drafts of any row, V vocabulary):
      target_probs   [R, k+1, V] float, the processed target distributions p_0..p_k (rows
                     with fewer drafts ignore positions past num_draft); unused by greedy rows
      draft_token_ids [R, k] long (entries past num_draft are ignored)
      num_draft      [R] long, 0..k
      uniforms       [R, k+1] float in [0, 1)
      draft_probs    [R, k, V] float, q_0..q_{k-1}; None: a deterministic proposer
      greedy         [R] bool, rows decoded greedily (None: none)
      target_argmax  [R, k+1] long, the target's greedy tokens (required when a row is greedy)
    """
    num_rows, k = draft_token_ids.shape
    positions = torch.arange(k, device=draft_token_ids.device)
    valid = positions.unsqueeze(0) < num_draft.unsqueeze(1)                  # [R, k]
    drafts = torch.where(valid, draft_token_ids, 0)
    p_draft = target_probs[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_draft = (torch.ones_like(p_draft) if draft_probs is None
               else draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1))
    accepted = (uniforms[:, :k] * q_draft < p_draft) & valid
    if greedy is not None and bool(greedy.any()):
        greedy_accepted = (drafts == target_argmax[:, :k]) & valid
        accepted = torch.where(greedy.unsqueeze(1), greedy_accepted, accepted)
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)         # r, [R]

    rows = torch.arange(num_rows, device=draft_token_ids.device)
    final_dist = target_probs[rows, num_accepted].to(torch.float32)           # p_r, [R, V]
    rejected = num_accepted < num_draft
    if bool(rejected.any()):
        at = num_accepted.clamp(max=max(k - 1, 0))
        if draft_probs is None:
            q_r = torch.zeros_like(final_dist)
            q_r[rows, drafts[rows, at]] = 1.0
        else:
            q_r = draft_probs[rows, at].to(torch.float32)
        residual = (final_dist - q_r).clamp_(min=0.0)
        # p_r == q_r makes the rejection impossible; guard the empty residual all the same
        usable = rejected & (residual.sum(dim=-1) > 0)
        final_dist = torch.where(usable.unsqueeze(1), residual, final_dist)
    final = sample_from_weights(final_dist.contiguous(), uniforms[:, k].to(torch.float64))
    if greedy is not None and bool(greedy.any()):
        final = torch.where(greedy, target_argmax[rows, num_accepted], final)

    out: list[list[int]] = []
    for b, (r, token) in enumerate(zip(num_accepted.tolist(), final.tolist())):
        out.append(draft_token_ids[b, :r].tolist() + [token])
    return out
