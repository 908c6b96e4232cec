"""Perplexity of held-out text through sluice's prompt logprobs (tests and benchmarks).

The text is the demo model's held-out CPython documentation (`heldout.txt` beside its weights,
never trained on), scored as independent prompts of whole paragraphs of about PROMPT_CHARS
characters (~300 tokens) each.
"""

from __future__ import annotations

import math
from typing import Any

PROMPT_CHARS = 1000


def heldout_prompts(limit: int | None = None) -> list[str]:
    """The held-out text as prompts of whole paragraphs (module doc); the first `limit`."""
    from sluice.config_sources import default_model_path
    text = (default_model_path() / "heldout.txt").read_text(encoding="utf-8")
    prompts: list[str] = []
    for para in text.strip().split("\n\n"):
        if prompts and len(prompts[-1]) + len(para) + 2 <= PROMPT_CHARS:
            prompts[-1] += "\n\n" + para
        else:
            prompts.append(para)
    return prompts[:limit]


def engine_perplexity(llm: Any, prompts: list[str]) -> tuple[float, list[list[int]]]:
    """exp(-mean logprob) of every prompt token after each prompt's first, from `llm`'s (an
    `LLM`) prompt logprobs; also returns the prompts' token ids."""
    from sluice.sampling_params import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)
    total, count = 0.0, 0
    for out in outputs:
        ids = out.prompt_token_ids
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
        assert out.prompt_logprobs[0] is None
        for token_id, position in zip(ids[1:], out.prompt_logprobs[1:]):
            assert token_id in position, "prompt logprobs must include the actual prompt token"
            total += position[token_id].logprob
            count += 1
    return math.exp(-total / count), [out.prompt_token_ids for out in outputs]
