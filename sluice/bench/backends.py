"""Throughput backends: run one workload to completion and time generation only.

Contract shared by every backend: each request is decoded greedily with EOS ignored and exactly
`request.output_len` new tokens; model loading happens before the timer starts; the returned
`BackendResult` holds the elapsed seconds of generation, the token counts, and each request's
output token ids in input order. A backend that produces a different number of tokens raises
`BenchmarkError` instead of reporting a misleading throughput.

* `run_sluice`: the offline `LLM` API (one `generate` call over all requests, continuous batching).
* `run_hf`: Hugging Face transformers `generate` with static batching (left-padded batches of
  `batch_size` consecutive requests; a batch also ends where `output_len` changes).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice.bench.datasets import BenchRequest
from sluice.errors import SluiceError


class BenchmarkError(SluiceError):
    """A backend did not generate exactly the requested tokens (or could not run)."""


@dataclass
class BackendResult:
    """Timing and counts of one backend over one workload."""
    backend: str
    elapsed_time: float
    num_requests: int
    total_prompt_tokens: int
    total_output_tokens: int
    output_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def total_num_tokens(self) -> int:
        return self.total_prompt_tokens + self.total_output_tokens

    def to_dict(self) -> dict[str, Any]:
        """vLLM's throughput-report keys, plus prompt/output token totals."""
        t = self.elapsed_time
        return {
            "backend": self.backend,
            "elapsed_time": t,
            "num_requests": self.num_requests,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_output_tokens": self.total_output_tokens,
            "total_num_tokens": self.total_num_tokens,
            "requests_per_second": self.num_requests / t,
            "tokens_per_second": self.total_num_tokens / t,
            "output_tokens_per_second": self.total_output_tokens / t,
        }


def _check_lengths(backend: str, requests: Sequence[BenchRequest],
                   outputs: Sequence[Sequence[int]]) -> None:
    if len(outputs) != len(requests):
        raise BenchmarkError(f"{backend}: got {len(outputs)} outputs for {len(requests)} "
                             "requests.")
    for i, (req, out) in enumerate(zip(requests, outputs)):
        if len(out) != req.output_len:
            raise BenchmarkError(f"{backend}: request {i} generated {len(out)} tokens, "
                                 f"expected exactly {req.output_len}.")


def _result(backend: str, elapsed: float, requests: Sequence[BenchRequest],
            outputs: list[list[int]]) -> BackendResult:
    _check_lengths(backend, requests, outputs)
    return BackendResult(
        backend=backend, elapsed_time=elapsed, num_requests=len(requests),
        total_prompt_tokens=sum(r.prompt_len for r in requests),
        total_output_tokens=sum(len(o) for o in outputs), output_token_ids=outputs)


# ---------------------------------------------------------------------------------------------
# sluice

def _default_llm_factory(model: str, **engine_kwargs: Any) -> Any:
    from sluice.frontend.llm import LLM
    return LLM(model, **engine_kwargs)


def run_sluice(requests: Sequence[BenchRequest], model: str,
               engine_kwargs: dict[str, Any] | None = None, *, detokenize: bool = True,
               use_tqdm: bool = True,
               llm_factory: Callable[..., Any] | None = None) -> BackendResult:
    """Time one `LLM.generate` over all requests (engine start-up excluded).

    `engine_kwargs` are flat config field names (`max_num_seqs=...`). `llm_factory(model,
    **engine_kwargs)` replaces the `LLM` constructor (tests inject a fake).
    """
    from sluice.sampling_params import SamplingParams

    factory = llm_factory or _default_llm_factory
    llm = factory(model, **(engine_kwargs or {}))
    try:
        prompts = [list(r.prompt_token_ids) for r in requests]
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.output_len,
                                 detokenize=detokenize) for r in requests]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    return _result("sluice", elapsed, requests, [list(o.outputs[0].token_ids) for o in outputs])


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers

def hf_batches(requests: Sequence[BenchRequest], batch_size: int | None) -> list[range]:
    """Index ranges of consecutive requests: at most `batch_size` each (None: unbounded), and
    one `output_len` per batch so that every row generates exactly its own length."""
    limit = len(requests) if batch_size is None else batch_size
    if limit < 1:
        raise BenchmarkError(f"HF batch size must be at least 1, got {batch_size}.")
    batches, start = [], 0
    for i in range(1, len(requests) + 1):
        if (i == len(requests) or i - start == limit
                or requests[i].output_len != requests[start].output_len):
            batches.append(range(start, i))
            start = i
    return batches


def load_hf_model(model: str, dtype: str = "float32") -> tuple[Any, int, int | None]:
    """Load `AutoModelForCausalLM` in eval mode; returns (model, pad_token_id, eos_token_id)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    hf_model.eval()
    cfg = hf_model.config
    eos = cfg.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    return hf_model, (pad if pad is not None else 0), eos


def _hf_generate_batch(hf_model: Any, batch: list[BenchRequest], pad_token_id: int,
                       eos_token_id: int | None) -> list[list[int]]:
    """Left-pad one batch and generate exactly `output_len` tokens per row."""
    import torch

    width = max(r.prompt_len for r in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, req in enumerate(batch):
        input_ids[row, width - req.prompt_len:] = torch.tensor(req.prompt_token_ids)
        attention_mask[row, width - req.prompt_len:] = 1
    output_len = batch[0].output_len
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=pad_token_id,
            eos_token_id=eos_token_id, temperature=None, top_p=None, top_k=None)
    new = out[:, width:]
    if new.shape[1] != output_len:
        raise BenchmarkError(f"hf: generated {new.shape[1]} tokens per row, expected "
                             f"{output_len}.")
    if eos_token_id is not None and bool((new == eos_token_id).any()):
        raise BenchmarkError("hf: a row stopped at EOS before output_len (min_new_tokens "
                             "was not honoured).")
    return new.tolist()


def run_hf(requests: Sequence[BenchRequest], model: str, *, batch_size: int | None = None,
           dtype: str = "float32", hf_model: tuple[Any, int, int | None] | None = None
           ) -> BackendResult:
    """Time HF `generate` over all requests with static batching (model loading excluded).

    `hf_model` is an already loaded `load_hf_model(...)` tuple (to reuse a model across runs).
    """
    loaded = hf_model or load_hf_model(model, dtype)
    model_obj, pad_token_id, eos_token_id = loaded
    batches = hf_batches(requests, batch_size)
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for idx in batches:
        outputs.extend(_hf_generate_batch(model_obj, [requests[i] for i in idx], pad_token_id,
                                          eos_token_id))
    elapsed = time.perf_counter() - start
    return _result("hf", elapsed, requests, outputs)
