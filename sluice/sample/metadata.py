"""SamplingMetadata: one step's sampling parameters as batch tensors, built once per step.

Contract: the model runner describes each batch row (one row per request that samples this
step, in the order of the logits rows) with a `SamplingRow` and calls `build_sampling_metadata`
once per step. The result is read-only for the sampler and valid for that step only (it
captures `len(output_token_ids)` for min_tokens and the output-token counts for penalties).

Flags let the sampler skip whole stages; a tensor field is `None` exactly when no row needs
that stage, so the common case (all greedy, nothing else) costs one `argmax`.

Sparse token sets use flat indices into the logits viewed as one vector::

    flat index = row * vocab_size + token_id        (logits.view(-1)[flat] is logits[row, token])

`seen_token_index` (prompt + output tokens of rows with a repetition penalty) and
`output_token_index` (output tokens of rows with a frequency or presence penalty) keep one entry
per token occurrence, so a token's count is its multiplicity: the sampler applies frequency
penalties with one vectorised `index_add_` (a scatter-add) over them. No [num_rows, vocab]
count tensor is allocated and the builder never loops over tokens in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sluice.sampling_params import SamplingParams

TokenIds = Sequence[int] | torch.Tensor


@dataclass(slots=True)
class SamplingRow:
    """What the model runner knows about one batch row.

    `prompt_token_ids` / `output_token_ids`: lists, or 1-D integer tensors (a runner may cache
    the prompt as a tensor to make repetition penalties cheap). `output_token_ids` are the
    tokens sampled so far, NOT including the one this step samples. `generator`: the request's
    own generator, from `request_generator(params, device)` when the request arrived, kept for
    the request's lifetime; `None` for unseeded (or greedy) requests.
    """
    params: SamplingParams
    prompt_token_ids: TokenIds
    output_token_ids: TokenIds
    eos_token_id: int | None = None
    generator: torch.Generator | None = None


@dataclass(slots=True, kw_only=True)
class SamplingMetadata:
    """The batch's sampling parameters; per-row tensors have shape [num_rows].

    A row is greedy when `temperature < 1e-5` or `top_k == 1` (the same thing). Greedy rows
    carry neutral values (temperature 1, top-k off, top-p 1, min-p 0) in the random-path tensors.
    """
    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None = None          # bool; set only for mixed batches
    temperature: torch.Tensor | None = None          # float32; None when no division is needed
    top_k: torch.Tensor | None = None                # long; vocab_size = off; None if unused
    max_top_k: int = 0                               # largest top_k among rows that use top-k
    top_p: torch.Tensor | None = None                # float32; None if unused
    min_p: torch.Tensor | None = None                # float32; None if unused
    # Seeded random rows: row -> that request's generator. Every other random row draws from
    # `shared_generator` (None = torch's default generator of the device).
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    shared_generator: torch.Generator | None = None
    # Penalties (see the module docstring for the flat-index layout).
    no_penalties: bool = True
    repetition_penalties: torch.Tensor | None = None  # float32 [num_rows]
    seen_token_index: torch.Tensor | None = None      # long, flat, one per occurrence
    frequency_penalties: torch.Tensor | None = None   # float32 [num_rows]
    presence_penalties: torch.Tensor | None = None    # float32 [num_rows]
    output_token_index: torch.Tensor | None = None    # long, flat, one per occurrence
    # allowed_token_ids as (rows, drop mask [len(rows), vocab], True = masked); bad words
    # banned this step as (rows, token_ids) to mask.
    allowed_token_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    bad_words_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    # logit_bias as (rows, token_ids, bias values); min_tokens as (rows, token_ids) to mask.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    # Largest `logprobs` among rows that asked for logprobs; None when no row did.
    max_num_logprobs: int | None = None
    # Structured output: (rows, drop mask [len(rows), vocab], True = not allowed by the
    # request's grammar); set by the model runner from the step's `GrammarOutput`
    # (`sample.grammar.grammar_mask`). Applied before every other stage.
    grammar_mask: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def no_logits_processing(self) -> bool:
        """True when logits go to sampling unchanged: no row uses allowed_token_ids, has a bad
        word to ban this step, logit_bias, min_tokens (still unmet) or a penalty. A new
        feature that edits logits must be added here, or the greedy fast path skips it."""
        return (self.no_penalties and self.logit_bias is None and self.min_tokens_mask is None
                and self.allowed_token_mask is None and self.bad_words_mask is None
                and self.grammar_mask is None)

    @property
    def is_plain_greedy(self) -> bool:
        """True when the whole step is one argmax over the raw logits: every row greedy, no
        logprobs, and `no_logits_processing` (so no grammar mask, allowed_token_ids,
        bad_words, logit_bias, min_tokens or penalties). This is the one gate of the greedy
        fast paths (the `Sampler`'s plain argmax and the model runner's `greedy_tokens`
        screen, which support none of those features); a step with any of them, e.g. one row
        with a structured-output grammar, steps aside to the full sampler."""
        return self.all_greedy and self.no_logits_processing and self.max_num_logprobs is None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed` on `device`."""
    return torch.Generator(device=device).manual_seed(seed)


def request_generator(params: SamplingParams, device: torch.device | str = "cpu",
                      num_output_tokens: int = 0) -> torch.Generator | None:
    """The generator for a request, or None when it needs none (no seed, or greedy).

    Call once when the request arrives, and keep it for the request's lifetime. The sampler
    draws exactly one number per step from a seeded random row's generator, so a request that
    comes back after preemption with `num_output_tokens` already generated gets a generator
    advanced past those draws, and continues the same random stream.
    """
    if params.seed is None or params.is_greedy or params.top_k == 1:
        return None
    generator = make_generator(params.seed, device)
    if num_output_tokens:
        if torch.device(device).type == "cpu":  # one bulk draw == n single draws on CPU
            torch.empty(num_output_tokens, dtype=torch.float64).uniform_(generator=generator)
        else:
            one = torch.empty(1, dtype=torch.float64, device=device)
            for _ in range(num_output_tokens):
                one.uniform_(generator=generator)
    return generator


def is_greedy(params: SamplingParams) -> bool:
    """Whether rows of `params` decode greedily: temperature < 1e-5 or top_k == 1."""
    return params.is_greedy or params.top_k == 1


def build_sampling_metadata(rows: Sequence[SamplingRow], vocab_size: int,
                            device: torch.device | str = "cpu", *,
                            shared_generator: torch.Generator | None = None) -> SamplingMetadata:
    """Turn one step's rows into a `SamplingMetadata` on `device`.

    Python passes over the rows read scalars only; token lists are touched only for rows that
    use penalties (converted to tensors and concatenated).
    `shared_generator` feeds every unseeded random row (None = torch's default generator).
    """
    greedy = [is_greedy(r.params) for r in rows]
    num_greedy = sum(greedy)
    max_num_logprobs = max((r.params.logprobs for r in rows if r.params.logprobs is not None),
                           default=None)
    md = SamplingMetadata(num_rows=len(rows), vocab_size=vocab_size,
                          all_greedy=num_greedy == len(rows), all_random=num_greedy == 0,
                          max_num_logprobs=max_num_logprobs, shared_generator=shared_generator)
    if not md.all_greedy:
        _fill_random_params(md, rows, greedy, device)
    _fill_logits_processing(md, rows, device)
    return md


def _fill_random_params(md: SamplingMetadata, rows: Sequence[SamplingRow], greedy: list[bool],
                        device: torch.device | str) -> None:
    """Temperature, top-k, top-p, min-p and generators; greedy rows get neutral values."""
    vocab_size = md.vocab_size
    temps: list[float] = []
    top_ks: list[int] = []
    top_ps: list[float] = []
    min_ps: list[float] = []
    for i, (row, is_greedy) in enumerate(zip(rows, greedy)):
        p = row.params
        if is_greedy:
            temps.append(1.0)
            top_ks.append(vocab_size)
            top_ps.append(1.0)
            min_ps.append(0.0)
            continue
        temps.append(p.temperature)
        top_ks.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
        top_ps.append(p.top_p)
        min_ps.append(p.min_p)
        if row.generator is not None:
            md.generators[i] = row.generator
    if not md.all_random:
        md.greedy_mask = torch.tensor(greedy, dtype=torch.bool, device=device)
    if any(t != 1.0 for t in temps):
        md.temperature = _f32(temps, device)
    md.max_top_k = max((k for k in top_ks if k < vocab_size), default=0)
    if md.max_top_k:
        md.top_k = torch.tensor(top_ks, dtype=torch.long, device=device)
    if any(p < 1.0 for p in top_ps):
        md.top_p = _f32(top_ps, device)
    if any(p > 0.0 for p in min_ps):
        md.min_p = _f32(min_ps, device)


def _fill_logits_processing(md: SamplingMetadata, rows: Sequence[SamplingRow],
                            device: torch.device | str) -> None:
    """logit_bias, min_tokens and penalties; only rows that use one are looked at closely."""
    seen_rows: list[int] = []
    seen_parts: list[torch.Tensor] = []
    out_rows: list[int] = []
    out_parts: list[torch.Tensor] = []
    bias_rows: list[int] = []
    bias_tokens: list[int] = []
    bias_values: list[float] = []
    mt_rows: list[int] = []
    mt_tokens: list[int] = []
    allowed_rows: list[int] = []
    allowed_lists: list[list[int]] = []
    bad_rows: list[int] = []
    bad_tokens: list[int] = []
    for i, row in enumerate(rows):
        p = row.params
        if p.allowed_token_ids:
            allowed_rows.append(i)
            allowed_lists.append(p.allowed_token_ids)
        if p.bad_words_token_ids:
            banned = banned_bad_word_tokens(p.bad_words_token_ids, row.output_token_ids)
            bad_rows += [i] * len(banned)
            bad_tokens += banned
        if p.repetition_penalty != 1.0:
            seen_rows += (i, i)
            seen_parts.append(_cpu_long(row.prompt_token_ids))
            seen_parts.append(_cpu_long(row.output_token_ids))
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            out_rows.append(i)
            out_parts.append(_cpu_long(row.output_token_ids))
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_tokens += p.logit_bias.keys()
            bias_values += p.logit_bias.values()
        if p.min_tokens and len(row.output_token_ids) < p.min_tokens:
            blocked = list(p.stop_token_ids)
            if row.eos_token_id is not None and not p.ignore_eos:
                blocked.append(row.eos_token_id)
            mt_rows += [i] * len(blocked)
            mt_tokens += blocked

    if seen_parts:
        md.repetition_penalties = _f32([r.params.repetition_penalty for r in rows], device)
        md.seen_token_index = _flat_index(seen_rows, seen_parts, md.vocab_size, device)
    if out_parts:
        md.frequency_penalties = _f32([r.params.frequency_penalty for r in rows], device)
        md.presence_penalties = _f32([r.params.presence_penalty for r in rows], device)
        md.output_token_index = _flat_index(out_rows, out_parts, md.vocab_size, device)
    md.no_penalties = not (seen_parts or out_parts)
    if bias_rows:
        md.logit_bias = (torch.tensor(bias_rows, dtype=torch.long, device=device),
                         torch.tensor(bias_tokens, dtype=torch.long, device=device),
                         _f32(bias_values, device))
    if mt_rows:
        md.min_tokens_mask = (torch.tensor(mt_rows, dtype=torch.long, device=device),
                              torch.tensor(mt_tokens, dtype=torch.long, device=device))
    if allowed_rows:
        drop = torch.ones(len(allowed_rows), md.vocab_size, dtype=torch.bool)
        lengths = torch.tensor([len(a) for a in allowed_lists], dtype=torch.long)
        local = torch.repeat_interleave(torch.arange(len(allowed_rows)), lengths)
        drop[local, torch.tensor([t for a in allowed_lists for t in a], dtype=torch.long)] = False
        md.allowed_token_mask = (torch.tensor(allowed_rows, dtype=torch.long, device=device),
                                 drop.to(device))
    if bad_rows:
        md.bad_words_mask = (torch.tensor(bad_rows, dtype=torch.long, device=device),
                             torch.tensor(bad_tokens, dtype=torch.long, device=device))


def banned_bad_word_tokens(bad_words_token_ids: Sequence[Sequence[int]],
                           output_token_ids: TokenIds) -> list[int]:
    """The tokens a row may not sample now: the last token of every bad word whose other
    tokens are the last tokens of the output so far (a one-token word is always banned).
    Only the output is matched, not the prompt, as in vLLM."""
    banned: list[int] = []
    num_output = len(output_token_ids)
    tails: dict[int, list[int]] = {}
    for word in bad_words_token_ids:
        prefix_len = len(word) - 1
        if prefix_len > num_output:
            continue
        if prefix_len:
            tail = tails.get(prefix_len)
            if tail is None:
                tail = output_token_ids[num_output - prefix_len:]
                tail = tails[prefix_len] = (tail.tolist() if isinstance(tail, torch.Tensor)
                                            else list(tail))
            if tail != list(word[:-1]):
                continue
        banned.append(word[-1])
    return banned


def _f32(values: list[float], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _cpu_long(token_ids: TokenIds) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.to(device="cpu", dtype=torch.long)
    # numpy converts a list of ints ~3x faster than torch.tensor.
    return torch.from_numpy(np.asarray(token_ids, dtype=np.int64))


def _flat_index(row_ids: list[int], parts: list[torch.Tensor], vocab_size: int,
                device: torch.device | str) -> torch.Tensor:
    """Flat indices `row * vocab_size + token` for every token of `parts[j]` (row row_ids[j])."""
    lengths = torch.tensor([t.numel() for t in parts], dtype=torch.long)
    rows = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.long), lengths)
    tokens = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    assert tokens.numel() == 0 or (int(tokens.min()) >= 0 and int(tokens.max()) < vocab_size), \
        "token id outside the vocabulary"
    return (rows * vocab_size + tokens).to(device)
