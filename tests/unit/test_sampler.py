"""Sampler behaviour: greedy, top-k/top-p/min-p, seeds, penalties, bias, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from sluice.sample import (Sampler, SamplingRow, build_sampling_metadata,
                           compute_prompt_logprobs, make_generator, request_generator,
                           to_token_logprobs, to_token_logprobs_list)
from sluice.sample.filters import apply_top_k_top_p
from sluice.sample.sampler import apply_logits_processing
from sluice.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(60)

NEG_INF = float("-inf")


def row(prompt=(1, 2), output=(), eos=None, seed=None, **params) -> SamplingRow:
    generator = make_generator(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), eos, generator)


def sample(logits: torch.Tensor, rows: list[SamplingRow], shared_seed: int | None = 0):
    shared = make_generator(shared_seed) if shared_seed is not None else None
    md = build_sampling_metadata(rows, logits.shape[-1], "cpu", shared_generator=shared)
    return Sampler()(logits.clone(), md)


def processed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    md = build_sampling_metadata(rows, logits.shape[-1], "cpu")
    return apply_logits_processing(logits.clone(), md)


def sampled_set(logits_row: torch.Tensor, n: int = 4000, **params) -> tuple[set[int], list[int]]:
    """Sample one row n times (as n identical batch rows); the tokens seen and their counts."""
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    tokens = sample(logits, [row(**params) for _ in range(n)]).sampled_token_ids
    counts = torch.bincount(tokens, minlength=logits.shape[-1]).tolist()
    return {t for t, c in enumerate(counts) if c}, counts


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs) if p > 0)


# --- greedy and top-k ------------------------------------------------------------------------

def test_all_greedy_is_a_plain_argmax_and_leaves_logits_alone():
    logits = torch.randn(16, 50, generator=make_generator(0))
    md = build_sampling_metadata([row(temperature=0.0) for _ in range(16)], 50, "cpu")
    assert md.is_plain_greedy and md.temperature is None and md.top_k is None
    before = logits.clone()
    out = Sampler()(logits, md)
    assert out.logprobs is None
    assert torch.equal(out.sampled_token_ids, before.argmax(-1))
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy_on_random_logits():
    logits = torch.randn(64, 100, generator=make_generator(1)) * 3
    rows = [row(temperature=1.0, top_k=1, seed=i if i % 2 else None) for i in range(64)]
    assert torch.equal(sample(logits, rows).sampled_token_ids, logits.argmax(-1))
    # The filter itself (used for k > 1) also keeps exactly the argmax when k = 1,
    # with and without the top-p (sort) path.
    ones = torch.ones(64, dtype=torch.long)
    for top_p in (None, torch.full((64,), 0.9)):
        kept = apply_top_k_top_p(logits.clone(), ones, 1, top_p)
        assert torch.equal(torch.isfinite(kept).sum(-1), ones)
        assert torch.equal(kept.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("with_top_p", [False, True])
def test_top_k_keeps_each_rows_k_largest(with_top_p):
    vocab = 40
    logits = torch.randn(3, vocab, generator=make_generator(2))
    top_k = torch.tensor([2, 7, vocab])  # vocab = disabled
    top_p = torch.ones(3) if with_top_p else None
    kept = apply_top_k_top_p(logits.clone(), top_k, 7, top_p)
    for i, k in enumerate(top_k.tolist()):
        expected = set(logits[i].topk(k).indices.tolist())
        assert set(torch.isfinite(kept[i]).nonzero().flatten().tolist()) == expected
        finite = torch.isfinite(kept[i])
        assert torch.equal(kept[i][finite], logits[i][finite])  # survivors unchanged


def test_top_k_sampling_only_returns_top_k_tokens():
    logits = torch.randn(30, generator=make_generator(3))
    seen, _ = sampled_set(logits, n=3000, top_k=4)
    assert seen == set(logits.topk(4).indices.tolist())


def test_greedy_and_random_rows_mix_in_one_batch():
    logits = torch.zeros(6, 20)
    logits[:, 7] = 0.5  # argmax, but far from certain at temperature 1
    rows = [row(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    rows += [row(temperature=1.0) for _ in range(200)]
    logits = torch.cat([logits, torch.zeros(200, 20)])
    tokens = sample(logits, rows).sampled_token_ids
    assert tokens[[0, 2, 4]].tolist() == [7, 7, 7]
    assert len(set(tokens[6:].tolist())) > 5


# --- seeds -----------------------------------------------------------------------------------

TARGET = dict(temperature=0.9, top_p=0.95, top_k=20, frequency_penalty=0.1, seed=1234)


def run_seeded(batch_kind: str, steps: int = 8, seed: int = 1234, vocab: int = 64) -> list[int]:
    """Sample the target request for several steps inside a batch of the given kind."""
    step_logits = torch.randn(steps, vocab, generator=make_generator(99))
    kind_seed = {"alone": 0, "mixed": 1, "seeded": 2}[batch_kind]
    other_logits = torch.randn(steps, 8, vocab, generator=make_generator(kind_seed))
    target = row(**{**TARGET, "seed": seed})
    others = {
        "alone": [],
        "mixed": [row(), row(temperature=0.0), row(seed=7, top_p=0.5), row(min_p=0.1),
                  row(top_k=1000, top_p=0.8, repetition_penalty=1.3)],
        "seeded": [row(seed=11), row(seed=12, temperature=0.3)],
    }[batch_kind]
    position = len(others) // 2 + 1 if others else 0
    outputs: list[int] = []
    for s in range(steps):
        target.output_token_ids = list(outputs)
        rows = others[:position] + [target] + others[position:]
        logits = other_logits[s, :len(rows)].clone()
        logits[position] = step_logits[s]
        shared = make_generator(1000 * kind_seed + s)  # the shared stream differs per batch
        md = build_sampling_metadata(rows, vocab, "cpu", shared_generator=shared)
        outputs.append(int(Sampler()(logits, md).sampled_token_ids[position]))
    return outputs


@pytest.mark.parametrize("vocab", [64, 5000])
def test_seeded_request_is_reproducible_and_independent_of_its_batch(vocab):
    alone = run_seeded("alone", vocab=vocab)
    assert run_seeded("alone", vocab=vocab) == alone
    assert run_seeded("mixed", vocab=vocab) == alone
    assert run_seeded("seeded", vocab=vocab) == alone
    assert len(set(alone)) > 1


def test_different_seeds_give_different_sequences():
    first = run_seeded("alone", steps=12, seed=1)
    second = run_seeded("alone", steps=12, seed=2)
    assert first != second


def test_seeded_request_resumes_its_stream_after_preemption():
    vocab, steps = 50, 10
    step_logits = torch.randn(steps, vocab, generator=make_generator(15))
    params = SamplingParams(seed=77, temperature=0.8)
    assert request_generator(SamplingParams(temperature=0.0, seed=1)) is None
    assert request_generator(SamplingParams()) is None

    def run(generator, first_step):
        tokens = []
        for s in range(first_step, steps):
            r = SamplingRow(params, [1], [], None, generator)
            md = build_sampling_metadata([r], vocab, "cpu")
            tokens.append(int(Sampler()(step_logits[s:s + 1].clone(), md).sampled_token_ids))
        return tokens

    full = run(request_generator(params), 0)
    assert run(request_generator(params, num_output_tokens=4), 4) == full[4:]


# --- temperature -----------------------------------------------------------------------------

def test_temperature_to_zero_becomes_greedy():
    logits = torch.randn(200, 50, generator=make_generator(4))
    md = build_sampling_metadata([row(temperature=1e-6)] * 200, 50, "cpu")
    assert md.all_greedy
    assert torch.equal(Sampler()(logits.clone(), md).sampled_token_ids, logits.argmax(-1))
    # A small but random-path temperature: gap 0.5 / T=0.01 makes the argmax certain.
    spaced = torch.arange(50, dtype=torch.float32).flip(0) * 0.5
    spaced = spaced[torch.randperm(50, generator=make_generator(5))]
    seen, _ = sampled_set(spaced, n=500, temperature=0.01)
    assert seen == {int(spaced.argmax())}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_distribution_matches_softmax(temperature):
    logits = torch.randn(10, generator=make_generator(6))
    _, counts = sampled_set(logits, n=20000, temperature=temperature)
    probs = torch.softmax(logits / temperature, -1).tolist()
    assert chi_square(counts, probs) < 33.7  # df = 9, p = 1e-4


def test_seeded_rows_sample_from_softmax_too():
    vocab, n = 6, 3000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    rows = [row(seed=s) for s in range(n)]
    tokens = sample(logits.expand(n, vocab).contiguous(), rows).sampled_token_ids
    counts = torch.bincount(tokens, minlength=vocab).tolist()
    assert chi_square(counts, torch.softmax(logits, -1).tolist()) < 25.7  # df = 5, p = 1e-4


# --- top-p and min-p -------------------------------------------------------------------------

PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("top_p, nucleus", [(0.3, {0}), (0.65, {0, 1}), (0.75, {0, 1, 2}),
                                            (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_exactly_the_nucleus(top_p, nucleus):
    perm = torch.tensor([2, 0, 3, 1])  # token perm[i] has probability PROBS[i]
    logits = torch.empty(4)
    logits[perm] = PROBS.log()
    seen, counts = sampled_set(logits, n=4000, top_p=top_p)
    assert seen == {int(perm[i]) for i in nucleus}
    kept = torch.zeros(4)
    kept[perm[sorted(nucleus)]] = PROBS[sorted(nucleus)]
    assert chi_square(counts, (kept / kept.sum()).tolist()) < 21.1  # df <= 3, p = 1e-4


@pytest.mark.parametrize("top_p, nucleus", [(0.8, {0, 1, 2}), (0.75, {0, 1})])
def test_top_p_applies_to_the_top_k_renormalised_distribution(top_p, nucleus):
    # After top_k=3 the probabilities are 0.444, 0.333, 0.222.
    seen, _ = sampled_set(PROBS.log(), n=3000, top_k=3, top_p=top_p)
    assert seen == nucleus


@pytest.mark.parametrize("min_p, kept", [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.0, {0, 1, 2, 3})])
def test_min_p_drops_tokens_below_fraction_of_top(min_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    seen, counts = sampled_set(probs.log(), n=4000, min_p=min_p)
    assert seen == kept
    renorm = torch.where(probs >= min_p * probs.max(), probs, torch.zeros(4))
    assert chi_square(counts, (renorm / renorm.sum()).tolist()) < 21.1


# --- penalties, logit_bias, min_tokens -------------------------------------------------------

def hand_penalised(logits: list[float], prompt: list[int], output: list[int], rep: float,
                   freq: float, pres: float) -> list[float]:
    result = list(logits)
    for t in set(prompt) | set(output):
        result[t] = result[t] / rep if result[t] > 0 else result[t] * rep
    for t in set(output):
        result[t] -= freq * output.count(t) + pres
    return result


def test_penalties_change_logits_exactly_as_specified():
    raw = [2.0, -1.0, 0.5, -0.25, 3.0, -2.0, 1.5, 0.0]
    logits = torch.tensor([raw] * 4)
    prompt, output = [1, 2, 2, 6], [2, 3, 3, 5, 3]
    cases = [dict(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3),
             dict(repetition_penalty=0.8),
             dict(frequency_penalty=-0.5),
             dict()]
    rows = [row(prompt=prompt, output=output, **c) for c in cases]
    got = processed(logits, rows)
    for i, c in enumerate(cases):
        want = hand_penalised(raw, prompt, output, c.get("repetition_penalty", 1.0),
                              c.get("frequency_penalty", 0.0), c.get("presence_penalty", 0.0))
        torch.testing.assert_close(got[i], torch.tensor(want), rtol=0, atol=1e-6)
    assert not torch.equal(got[0], logits[0]) and torch.equal(got[3], logits[3])


def test_presence_penalty_alone_and_token_tensors_accepted():
    logits = torch.zeros(1, 6)
    r = SamplingRow(SamplingParams(presence_penalty=1.0), torch.tensor([0, 1]),
                    torch.tensor([4, 4, 4, 2]))
    assert processed(logits, [r])[0].tolist() == [0.0, 0.0, -1.0, 0.0, -1.0, 0.0]


def test_logit_bias_forces_and_forbids_tokens():
    logits = torch.randn(50, 30, generator=make_generator(8))
    tokens = sample(logits, [row(logit_bias={5: 100.0}) for _ in range(50)]).sampled_token_ids
    assert tokens.tolist() == [5] * 50
    top = logits.argmax(-1)
    second = logits.topk(2).indices[:, 1]
    rows = [row(temperature=0.0, logit_bias={int(t): -100.0}) for t in top]
    assert torch.equal(sample(logits, rows).sampled_token_ids, second)
    got = processed(logits[:1], [row(logit_bias={3: 1.5, 7: -2.0})])[0]
    want = logits[0].clone()
    want[3] += 1.5
    want[7] -= 2.0
    torch.testing.assert_close(got, want)


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0]])  # eos = 0, stop token = 1
    params = dict(temperature=0.0, min_tokens=3, stop_token_ids=[1])
    for n_out, expected in [(0, 2), (2, 2), (3, 0), (5, 0)]:
        rows = [row(output=[3] * n_out, eos=0, **params)]
        assert sample(logits, rows).sampled_token_ids.tolist() == [expected]
    got = processed(logits, [row(output=[3], eos=0, **params)])[0]
    assert got[:2].tolist() == [NEG_INF, NEG_INF] and got[2:].tolist() == [3.0, 0.0, 0.0]
    # ignore_eos: EOS is not a stop, so it is not blocked; stop tokens still are.
    got = processed(logits, [row(output=[3], eos=0, ignore_eos=True, **params)])[0]
    assert got[:2].tolist() == [5.0, NEG_INF]
    # Random sampling never emits a blocked token either.
    n = 2000
    rows = [row(output=[], eos=0, min_tokens=1, stop_token_ids=[1]) for _ in range(n)]
    tokens = sample(logits.expand(n, 5).contiguous(), rows).sampled_token_ids
    assert not bool(((tokens == 0) | (tokens == 1)).any())


# --- logprobs --------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_ranks_and_sorted_top_k():
    vocab = 40
    logits = torch.randn(5, vocab, generator=make_generator(9)) * 2
    rows = [row(logprobs=3, temperature=0.7, repetition_penalty=1.3, output=[1, 2]),
            row(logprobs=0, temperature=0.0, logit_bias={4: 50.0}),
            row(),
            row(logprobs=5, top_p=0.5, seed=3),
            row(logprobs=2, frequency_penalty=2.0, output=[int(logits[4].argmax())] * 3)]
    out = sample(logits, rows)
    lp = out.logprobs
    assert lp is not None and lp.token_ids.shape == (5, 6)
    raw = torch.log_softmax(logits, -1)
    tokens = out.sampled_token_ids
    assert torch.equal(lp.token_ids[:, 0], tokens)
    torch.testing.assert_close(lp.logprobs[:, 0], raw.gather(1, tokens[:, None])[:, 0])
    want_ranks = (raw > raw.gather(1, tokens[:, None])).sum(-1) + 1
    assert torch.equal(lp.ranks[:, 0], want_ranks)
    assert lp.ranks[1, 0] > 1 or tokens[1] == logits[1].argmax()  # biased pick, raw rank
    top_lp, top_ids = raw.topk(5, -1)
    assert torch.equal(lp.token_ids[:, 1:], top_ids)
    torch.testing.assert_close(lp.logprobs[:, 1:], top_lp)
    assert bool((lp.logprobs[:, 1:-1] >= lp.logprobs[:, 2:]).all())
    assert lp.ranks[:, 1:].tolist() == [[1, 2, 3, 4, 5]] * 5

    first = to_token_logprobs(lp, 0, 3)
    assert first.token_ids == lp.token_ids[0, :4].tolist() and len(first.logprobs) == 4
    assert first.ranks[1:] == [1, 2, 3]
    second = to_token_logprobs(lp, 1, 0)
    assert second.token_ids == [4] and len(second.ranks) == 1
    batch = to_token_logprobs_list(lp, [3, 0, 0, 5, 2])
    assert batch[0] == first and batch[1] == second and len(batch[3].token_ids) == 6


def test_greedy_rows_with_logprobs_have_rank_one():
    logits = torch.randn(8, 20, generator=make_generator(10))
    lp = sample(logits, [row(temperature=0.0, logprobs=2)] * 8).logprobs
    assert lp.ranks[:, 0].tolist() == [1] * 8
    assert torch.equal(lp.token_ids[:, 0], lp.token_ids[:, 1])


def test_prompt_logprobs():
    logits = torch.randn(6, 25, generator=make_generator(11))
    targets = torch.tensor([3, 0, 24, 7, 7, 1])
    lp = compute_prompt_logprobs(logits, targets, 2)
    raw = torch.log_softmax(logits, -1)
    assert torch.equal(lp.token_ids[:, 0], targets)
    torch.testing.assert_close(lp.logprobs[:, 0], raw[torch.arange(6), targets])
    assert torch.equal(lp.ranks[:, 0], (raw > raw[torch.arange(6), targets][:, None]).sum(-1) + 1)
    entries = to_token_logprobs_list(lp, 2)
    assert len(entries) == 6 and all(len(e.token_ids) == 3 for e in entries)
    assert math.isclose(entries[2].logprobs[0], float(raw[2, 24]), rel_tol=1e-6)
    none = compute_prompt_logprobs(logits, targets, 0)
    assert none.token_ids.shape == (6, 1)


# --- metadata --------------------------------------------------------------------------------

def test_metadata_flags_skip_unused_stages():
    v = 50
    md = build_sampling_metadata([row(), row(top_k=v + 5), row(top_k=-1)], v, "cpu")
    assert md.all_random and md.temperature is None and md.top_k is None and md.top_p is None
    assert md.min_p is None and md.no_penalties and md.no_logits_processing
    assert md.max_num_logprobs is None and md.generators == {}
    md = build_sampling_metadata([row(min_tokens=2, output=[1, 2], eos=0, stop_token_ids=[3])],
                                 v, "cpu")
    assert md.min_tokens_mask is None  # already satisfied
    md = build_sampling_metadata([row(temperature=0.0, seed=5), row(seed=6, top_k=3)], v, "cpu")
    assert list(md.generators) == [1] and md.max_top_k == 3
    assert md.top_k.tolist() == [v, 3] and md.greedy_mask.tolist() == [True, False]


def test_non_contiguous_logits_are_accepted():
    full = torch.randn(4, 60, generator=make_generator(12))
    view = full[:, :50]
    rows = [row(repetition_penalty=1.2, output=[1], logprobs=1) for _ in range(4)]
    out = Sampler()(view, build_sampling_metadata(rows, 50, "cpu"))
    assert out.sampled_token_ids.max() < 50
    torch.testing.assert_close(out.logprobs.logprobs[:, 1], torch.log_softmax(view, -1).amax(-1))


# --- the fast paths agree with the simple references -----------------------------------------

def test_top_p_candidate_path_matches_full_sort(monkeypatch):
    from sluice.sample import filters
    vocab = 20000
    scales = [0.05, 0.05, 1.0, 3.0, 3.0, 8.0, 8.0, 2.0]  # flat ... peaked rows
    logits = torch.randn(len(scales), vocab, generator=make_generator(13))
    logits *= torch.tensor(scales).unsqueeze(1)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.3, 0.9, 1.0, 0.99])
    top_k = torch.tensor([vocab, vocab, vocab, 300, vocab, vocab, 40, vocab])
    sorted_rows: list[int] = []
    reference = filters.top_k_top_p_by_sort

    def counting_sort(sub, k, p):
        sorted_rows.append(sub.shape[0])
        return reference(sub, k, p)

    monkeypatch.setattr(filters, "top_k_top_p_by_sort", counting_sort)
    fast = filters.apply_top_k_top_p(logits.clone(), top_k, 300, top_p)
    slow = reference(logits.clone(), top_k, top_p)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(slow))
    # Rows 5, 6 resolve on 256 candidates, 2, 3, 4 on 4096; only the flat row 0 and the
    # p = 0.99 row 7 need the full sort.
    assert sorted_rows == [2]
    assert torch.isfinite(fast[1]).all() and int(torch.isfinite(fast[6]).sum()) == 40
    kept = torch.isfinite(fast).sum(-1)
    assert 1 <= int(kept[5]) < 4096 < int(kept[0])


def test_top_k_top_p_fuzz_against_full_sort():
    from sluice.sample.filters import top_k_top_p_by_sort
    g = make_generator(14)
    for _ in range(10):
        vocab = int(torch.randint(300, 9000, (1,), generator=g))
        logits = torch.randn(6, vocab, generator=g) * torch.rand(6, 1, generator=g) * 10
        top_k = torch.randint(1, 6000, (6,), generator=g).clamp(max=vocab)
        top_k[torch.rand(6, generator=g) < 0.4] = vocab
        top_p = torch.rand(6, generator=g) * 0.99 + 0.01
        top_p[torch.rand(6, generator=g) < 0.2] = 1.0
        max_top_k = int(top_k[top_k < vocab].max()) if bool((top_k < vocab).any()) else 0
        top_k_arg = top_k if max_top_k else None
        fast = apply_top_k_top_p(logits.clone(), top_k_arg, max_top_k, top_p)
        slow = top_k_top_p_by_sort(logits.clone(), top_k_arg, top_p)
        assert torch.equal(torch.isfinite(fast), torch.isfinite(slow))


def _reference_inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    cdf = weights.double().cumsum(-1)
    return torch.searchsorted(cdf, uniform.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)


def test_inverse_cdf_keeps_the_tail_and_never_picks_zero_weights():
    from sluice.sample.sampler import sample_from_weights
    vocab = 5000
    # A dominant token, then a tail of tokens each far below float32 resolution near 1.0.
    weights = torch.zeros(vocab)
    weights[3] = 1.0
    weights[1500:4990] = 2e-8
    weights[4990:] = torch.tensor([0, 5e-8, 0, 0, 1e-8, 0, 3e-8, 0, 0, 1e-8])
    tail = float(weights[4:].double().sum())
    uniform = 1.0 - torch.tensor([0.9, 0.5, 0.1, 0.01, 0.001, 1e-9]).double() * tail
    got = sample_from_weights(weights.expand(6, vocab).clone(), uniform)
    want = _reference_inverse_cdf(weights.expand(6, vocab), uniform)
    assert torch.equal(got, want) and bool((got >= 1500).all())
    assert bool((weights[got] > 0).all())
    # Exact block boundaries and u = 0 still land on positive-weight tokens.
    weights = torch.zeros(2 * 1024 + 5)
    weights[[1030, 2050]] = 1.0
    uniform = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0 - 2 ** -52], dtype=torch.float64)
    got = sample_from_weights(weights.expand(5, -1).clone(), uniform)
    assert got.tolist() == [1030, 1030, 2050, 2050, 2050]


def test_large_vocab_distribution_matches_softmax():
    vocab, n = 3000, 20000
    logits = torch.full((vocab,), -30.0)
    hot = torch.tensor([0, 1023, 1024, 2047, 2500, 2999])  # block edges and the short last block
    logits[hot] = torch.tensor([0.0, 0.5, -0.5, 1.0, 0.2, -1.0])
    tokens = sample(logits.expand(n, vocab).contiguous(), [row() for _ in range(n)]
                    ).sampled_token_ids
    counts = torch.bincount(tokens, minlength=vocab)
    assert int(counts[hot].sum()) == n
    probs = torch.softmax(logits[hot], -1).tolist()
    assert chi_square(counts[hot].tolist(), probs) < 25.7  # df = 5, p = 1e-4
