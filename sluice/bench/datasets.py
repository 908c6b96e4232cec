"""Benchmark workloads: seeded random requests and JSON workload files. No torch (numpy only).

A workload is a list of `BenchRequest`s: the prompt as token ids plus the exact number of tokens to
generate. Every backend runs them greedily with EOS ignored, so all backends produce exactly
`sum(output_len)` tokens and their throughputs are comparable.

Random workloads follow vLLM's `random` dataset: prompt lengths are drawn uniformly from the
inclusive range `[input_len * (1 - range_ratio), input_len * (1 + range_ratio)]` (or an explicit
`input_len_range=(min, max)`), and prompt token ids uniformly from the vocabulary minus the
special tokens. The same seed always yields the same workload.

JSON workload files hold a list of objects, one per request:

    [{"prompt_token_ids": [17, 242, 9], "output_len": 128},
     {"prompt": "Some text to tokenize", "output_len": 64}]
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sluice.errors import SluiceError


class WorkloadError(SluiceError, ValueError):
    """A workload definition (random-workload arguments or a JSON file) is invalid."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the workloads use."""

    all_special_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: prompt token ids and the exact number of tokens to generate.

    `prompt` keeps the original text when the request came from a JSON `"prompt"` entry.
    """
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def input_len_bounds(input_len: int, range_ratio: float = 0.0) -> tuple[int, int]:
    """vLLM's definition: `[int(input_len * (1 - r)), int(input_len * (1 + r))]`, inclusive."""
    if input_len < 1:
        raise WorkloadError(f"input_len must be at least 1, got {input_len}.")
    if not (0.0 <= range_ratio < 1.0):
        raise WorkloadError(f"range_ratio must be in [0, 1), got {range_ratio}.")
    low = max(1, int(input_len * (1.0 - range_ratio)))
    return low, int(input_len * (1.0 + range_ratio))


def allowed_token_ids(vocab_size: int, special_token_ids: Iterable[int] = ()) -> np.ndarray:
    """The ids `[0, vocab_size)` minus the special ones, as a sorted int64 array."""
    if vocab_size < 1:
        raise WorkloadError(f"vocab_size must be at least 1, got {vocab_size}.")
    mask = np.ones(vocab_size, dtype=bool)
    special = [t for t in special_token_ids if 0 <= t < vocab_size]
    mask[special] = False
    allowed = np.flatnonzero(mask).astype(np.int64)
    if allowed.size == 0:
        raise WorkloadError(f"no token ids left in [0, {vocab_size}) after removing the "
                            f"special tokens {sorted(special)}.")
    return allowed


def random_requests(num_prompts: int, output_len: int, vocab_size: int, seed: int = 0, *,
                    input_len: int | None = None, range_ratio: float = 0.0,
                    input_len_range: tuple[int, int] | None = None,
                    tokenizer: Tokenizer | None = None,
                    special_token_ids: Iterable[int] = ()) -> list[BenchRequest]:
    """`num_prompts` random requests, reproducible from `seed`.

    Give either `input_len_range=(min, max)` or `input_len` (+ `range_ratio`); prompt lengths are
    uniform over the inclusive range. Token ids are uniform over `[0, vocab_size)` minus special
    tokens; with a `tokenizer`, the range is also capped at the tokenizer's size (a model's
    embedding table may be larger than its tokenizer) and its special ids are excluded.
    """
    if num_prompts < 1:
        raise WorkloadError(f"num_prompts must be at least 1, got {num_prompts}.")
    if output_len < 1:
        raise WorkloadError(f"output_len must be at least 1, got {output_len}.")
    if (input_len is None) == (input_len_range is None):
        raise WorkloadError("give exactly one of input_len (with range_ratio) or "
                            "input_len_range=(min, max).")
    if input_len_range is not None:
        low, high = input_len_range
        if not (1 <= low <= high):
            raise WorkloadError(f"input_len_range must satisfy 1 <= min <= max, got "
                                f"({low}, {high}).")
    else:
        assert input_len is not None
        low, high = input_len_bounds(input_len, range_ratio)

    special = set(special_token_ids)
    if tokenizer is not None:
        vocab_size = min(vocab_size, len(tokenizer))
        special.update(tokenizer.all_special_ids)
    allowed = allowed_token_ids(vocab_size, special)

    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, size=num_prompts)
    requests = []
    for length in lengths:
        ids = allowed[rng.integers(0, allowed.size, size=int(length))]
        requests.append(BenchRequest(prompt_token_ids=ids.tolist(), output_len=output_len))
    return requests


def load_json_workload(path: str | Path, tokenizer: Tokenizer | None = None,
                       vocab_size: int | None = None) -> list[BenchRequest]:
    """Read a JSON list of `{"prompt_token_ids": [...] | "prompt": str, "output_len": int}`.

    `"prompt"` entries are tokenized with `tokenizer` (required if any are present). With
    `vocab_size`, token ids are checked to lie in `[0, vocab_size)`. Errors name the file and the
    entry index.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise WorkloadError(f"workload file {str(path)!r} does not exist.") from None
    except OSError as e:
        raise WorkloadError(f"cannot read workload file {str(path)!r}: {e.strerror}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                            f"{e.msg}.") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of requests, got "
                            f"{type(data).__name__}.")
    if not data:
        raise WorkloadError(f"{path}: the workload is empty.")
    return [_parse_entry(entry, f"{path}: entry {i}", tokenizer, vocab_size)
            for i, entry in enumerate(data)]


def _parse_entry(entry: Any, where: str, tokenizer: Tokenizer | None,
                 vocab_size: int | None) -> BenchRequest:
    if not isinstance(entry, dict):
        raise WorkloadError(f"{where}: expected an object, got {type(entry).__name__}.")
    output_len = entry.get("output_len")
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
        raise WorkloadError(f"{where}: 'output_len' must be a positive integer, got "
                            f"{output_len!r}.")
    has_ids, has_text = "prompt_token_ids" in entry, "prompt" in entry
    if has_ids == has_text:
        raise WorkloadError(f"{where}: give exactly one of 'prompt_token_ids' or 'prompt'.")
    prompt: str | None = None
    if has_text:
        prompt = entry["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise WorkloadError(f"{where}: 'prompt' must be a non-empty string.")
        if tokenizer is None:
            raise WorkloadError(f"{where}: has a text 'prompt' but no tokenizer was given; "
                                "use 'prompt_token_ids' or pass a tokenizer.")
        ids = list(tokenizer.encode(prompt))
    else:
        ids = entry["prompt_token_ids"]
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise WorkloadError(f"{where}: 'prompt_token_ids' must be a list of non-negative "
                                "integers.")
    if not ids:
        raise WorkloadError(f"{where}: the prompt is empty.")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise WorkloadError(f"{where}: token id {max(ids)} is outside the vocabulary "
                            f"[0, {vocab_size}).")
    return BenchRequest(prompt_token_ids=ids, output_len=output_len, prompt=prompt)


def workload_summary(requests: list[BenchRequest]) -> dict[str, int]:
    """Counts describing a workload (for reports)."""
    prompt_lens = [r.prompt_len for r in requests]
    return {
        "num_requests": len(requests),
        "total_prompt_tokens": sum(prompt_lens),
        "total_output_tokens": sum(r.output_len for r in requests),
        "min_prompt_len": min(prompt_lens),
        "max_prompt_len": max(prompt_lens),
    }
