"""The n-gram proposer: longest suffix first, most recent earlier occurrence, cut at k, at
the end of the tokens and at `max_tokens`; nothing when no n-gram of the allowed sizes
repeats."""

from __future__ import annotations

import pytest

from sluice.spec_decode.ngram import NgramProposer


def test_copies_what_followed_the_suffix():
    p = NgramProposer(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    #        0  1  2  3  4  5  6  7  8
    tokens = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert p.propose(tokens) == [8, 9, 1]


def test_longest_match_wins_over_a_more_recent_shorter_one():
    p = NgramProposer(3, 1, 3)
    # suffix [2, 3] occurs at 0 (followed by 10) ; [3] alone occurs more recently at 5 (-> 11)
    tokens = [2, 3, 10, 4, 4, 3, 11, 2, 3]
    assert p.propose(tokens) == [10, 4, 4]


def test_most_recent_occurrence_of_the_same_length():
    p = NgramProposer(2, 2, 2)
    tokens = [1, 2, 30, 31, 1, 2, 40, 41, 1, 2]
    assert p.propose(tokens) == [40, 41]


def test_cut_at_the_end_and_at_max_tokens():
    p = NgramProposer(5, 1, 2)
    assert p.propose([7, 8, 9, 7, 8]) == [9, 7, 8]
    assert p.propose([7, 8, 9, 7, 8], max_tokens=1) == [9]
    assert p.propose([7, 8, 9, 7, 8], max_tokens=0) == []


@pytest.mark.parametrize("tokens", [[], [1], [1, 2, 3, 4], [1, 2, 3, 1]])
def test_no_match_of_the_allowed_sizes(tokens):
    assert NgramProposer(3, 2, 4).propose(tokens) == []


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        NgramProposer(3, 3, 2)
    with pytest.raises(ValueError):
        NgramProposer(0, 1, 2)
