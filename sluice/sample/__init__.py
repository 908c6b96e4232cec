"""Sampling: batch logits -> tokens (greedy, temperature, top-k/top-p/min-p, penalties, seeds,
logprobs). Imports torch; never imports `core/`.

Per step the model runner builds a `SamplingMetadata` with `build_sampling_metadata` and calls
a `Sampler` on the logits of the rows that sample; `sampler.py` draws the order of operations.
"""

from sluice.sample.logprobs import (LogprobsTensors, compute_prompt_logprobs, to_token_logprobs,
                                    to_token_logprobs_list)
from sluice.sample.metadata import (SamplingMetadata, SamplingRow, build_sampling_metadata,
                                    make_generator, request_generator)
from sluice.sample.sampler import Sampler, SamplerOutput

__all__ = [
    "LogprobsTensors", "Sampler", "SamplerOutput", "SamplingMetadata", "SamplingRow",
    "build_sampling_metadata", "compute_prompt_logprobs", "make_generator",
    "request_generator", "to_token_logprobs", "to_token_logprobs_list",
]
