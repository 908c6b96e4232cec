"""Speculative decoding's rejection sampler (sluice.sample.rejection): emitted tokens follow the
target distribution exactly, whatever the proposer's distribution; greedy rows emit exactly the
target's argmax tokens.

The distribution tests use a tiny vocabulary whose target distribution p_j at each position is
fixed (independent of the tokens before it), so every emitted token at position j must be
distributed as p_j. 40,000 rows are sampled in one vectorised call with a fixed seed and a
chi-square goodness-of-fit test is applied at significance level 0.001 (a correct sampler fails
it with probability 0.1 % for a random seed; with the fixed seed the outcome is deterministic).
A wrong rule — e.g. emitting the proposer's token unconditionally, or resampling from p instead
of the residual — fails these tests by hundreds of standard deviations.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from sluice.sample.rejection import rejection_sample

ALPHA = 1e-3
ROWS = 40_000
P = torch.tensor(dtype=torch.float64, data=[[0.50, 0.25, 0.15, 0.10],     # target p_0
                  [0.05, 0.05, 0.60, 0.30],     # p_1
                  [0.25, 0.25, 0.25, 0.25]])    # p_2 (the bonus position with k = 2)
Q = torch.tensor(dtype=torch.float64, data=[[0.10, 0.20, 0.30, 0.40],     # proposer q_0: far from p_0
                  [0.70, 0.10, 0.10, 0.10]])    # q_1


def _emitted(deterministic: bool, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    k = Q.shape[0]
    if deterministic:   # an n-gram-like proposer: always the same tokens, q one-hot
        drafts = torch.tensor([[0, 2]]).expand(ROWS, k).contiguous()
        draft_probs = None
    else:
        drafts = torch.stack([torch.multinomial(Q[j], ROWS, replacement=True, generator=g)
                              for j in range(k)], dim=1)
        draft_probs = Q.unsqueeze(0).expand(ROWS, k, 4).contiguous()
    uniforms = torch.rand(ROWS, k + 1, generator=g)
    target = P.unsqueeze(0).expand(ROWS, k + 1, 4).contiguous()
    return rejection_sample(target, drafts, torch.full((ROWS,), k), uniforms, draft_probs)


def _assert_distributed_as(tokens: list[int], p: torch.Tensor) -> None:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(p)).double()
    expected = p.double() / p.double().sum() * counts.sum()
    result = chisquare(counts.numpy(), expected.numpy())
    assert result.pvalue > ALPHA, (counts.tolist(), expected.tolist(), result.pvalue)


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-model", "ngram"])
def test_every_emitted_position_follows_the_target(deterministic):
    out = _emitted(deterministic)
    assert all(1 <= len(t) <= 3 for t in out)
    for j in range(3):
        tokens = [t[j] for t in out if len(t) > j]
        assert len(tokens) > 1000, (j, len(tokens))   # every position is reached often
        _assert_distributed_as(tokens, P[j])


def test_a_wrong_rule_is_caught():
    """The check itself has power: the proposer's own tokens are not distributed as p_0."""
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(Q[0], ROWS, replacement=True, generator=g).tolist()
    counts = torch.bincount(torch.tensor(drafts), minlength=4).double()
    assert chisquare(counts.numpy(), (P[0].double() * ROWS).numpy()).pvalue < 1e-100


def test_acceptance_rate_matches_the_overlap():
    """The expected number of accepted first drafts is sum_x min(p_0(x), q_0(x))."""
    out = _emitted(deterministic=False)
    accepted_first = sum(len(t) >= 2 for t in out) / ROWS
    overlap = torch.minimum(P[0], Q[0]).sum().item()
    assert abs(accepted_first - overlap) < 4 * (overlap * (1 - overlap) / ROWS) ** 0.5


def test_greedy_rows_accept_exactly_the_argmax_prefix():
    k = 3
    argmax = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [9, 6, 7], [1, 2, 0]])
    num_draft = torch.tensor([3, 3, 3, 2])
    probs = torch.full((4, k + 1, 10), 0.1)
    out = rejection_sample(probs, drafts, num_draft, torch.rand(4, k + 1),
                           greedy=torch.ones(4, dtype=torch.bool), target_argmax=argmax)
    assert out == [[5, 6, 7, 8], [5, 6], [5], [1, 2, 3]]


def test_rows_with_fewer_or_no_drafts():
    """num_draft 0 emits one token from p_0; padding past num_draft is never emitted."""
    probs = torch.zeros(2, 3, 4)
    probs[:, 0, 2] = 1.0                       # p_0 certain: token 2
    probs[:, 1, 1] = 1.0                       # p_1 certain: token 1
    probs[:, 2, 3] = 1.0
    drafts = torch.tensor([[2, 99], [0, 0]])   # row 0: one real draft (2), then padding
    out = rejection_sample(probs, drafts, torch.tensor([1, 0]), torch.rand(2, 3))
    assert out == [[2, 1], [2]]
