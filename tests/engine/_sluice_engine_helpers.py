"""Engine-tier helpers: HF transformers greedy references and a direct EngineCore driver.

(Named uniquely, not `conftest`: test modules import it, and `from conftest import ...` picks
whichever conftest.py pytest put on sys.path first, so `pytest tests/engine tests/entrypoints`
failed to collect.)"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

PROMPTS = [
    "The function returns",
    "A list is a mutable sequence type that",
    "x",
    "In Python, the with statement is used to wrap the execution of a block with methods "
    "defined by a context manager. This allows common try except finally usage patterns",
    "Raises an exception when",
    "The import system",
]


@functools.lru_cache(maxsize=8)
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation of one unpadded prompt (ignoring EOS)."""
    model = _hf_model(str(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             pad_token_id=3)
    return out[0, len(prompt_ids):].tolist()


@dataclass
class CoreRun:
    """Tokens per request and summed scheduler stats from driving an EngineCore directly."""
    tokens: dict[str, list[int]] = field(default_factory=dict)
    num_cached_tokens: dict[str, int] = field(default_factory=dict)
    preemptions: int = 0
    prefix_hits: int = 0
    max_running: int = 0
    spec_draft_tokens: int = 0   # speculative decoding: drafts proposed / accepted
    spec_accepted_tokens: int = 0


def run_engine_core(engine, prompts: list[list[int]], params, arrival_gap_steps: int = 0,
                    ) -> CoreRun:
    """Feed `prompts` to `engine` (one every `arrival_gap_steps` steps), step to completion."""
    from sluice.messages import EngineCoreRequest
    run = CoreRun()
    pending = [EngineCoreRequest(str(i), list(p), params, 0, time.monotonic())
               for i, p in enumerate(prompts)]
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and (arrival_gap_steps == 0 or step % arrival_gap_steps == 0):
            batch = pending if arrival_gap_steps == 0 else pending[:1]
            for request in batch:
                engine.add_request(request)
            pending = pending[len(batch):]
        outputs = engine.step()
        step += 1
        stats = outputs.scheduler_stats
        if stats is not None:
            run.preemptions += stats.num_preemptions
            run.prefix_hits += stats.prefix_cache_hits
            run.max_running = max(run.max_running, stats.num_running_reqs)
            run.spec_draft_tokens += stats.spec_decode_num_draft_tokens
            run.spec_accepted_tokens += stats.spec_decode_num_accepted_tokens
        for out in outputs.outputs:
            run.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.num_cached_tokens:
                run.num_cached_tokens[out.request_id] = out.num_cached_tokens
    return run


def make_config(model, **overrides):
    """A small engine config for process tests (64 MiB KV, 256 tokens, 8 sequences)."""
    from sluice.config_sources import build_engine_config
    values = {"model": str(model), "kv_cache_memory": "64MiB", "max_model_len": 256,
              "max_num_seqs": 8}
    values.update(overrides)
    return build_engine_config(overrides=values)


def engine_children() -> list:
    """Live spawned children of this process (not multiprocessing's resource tracker)."""
    import psutil
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(
                    child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found
