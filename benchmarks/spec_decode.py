"""Speculative decoding (n-gram) vs plain decoding, side by side in one run.

    python benchmarks/spec_decode.py                          # the demo model
    python benchmarks/spec_decode.py --model ~/.cache/sluice-tests/SmolLM2-135M-Instruct.Q4_1.gguf

Two engines of the same model live in this process, one plain and one with
`--speculative-config '{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2,
"prompt_lookup_max": 4}'` (disable_by_batch_size at its default); each round runs every
workload on both, alternating which goes first, and the table reports medians over rounds:

* **copy**: single-request greedy decoding of prompts whose answer largely repeats them
  (rewrite a code snippet with one change; for a base model, the snippet and its first lines
  again). TPOT = (time of the whole generation - TTFT) / (tokens - 1), TTFT from a 1-token
  generation of the same prompt. Up to `--copy-output-len` tokens (EOS ends it earlier).
* **random**: the same single-request measurement on W1-style random token prompts.
* **W1**: offline throughput, 64 random prompts of 64..256 tokens, 128 output tokens each
  (ignore EOS), seed 0 — `sluice bench throughput`'s W1.

Acceptance figures come from the speculative engine's counters (drafts, accepted, mean
acceptance length = 1 + accepted / drafts) per workload. The greedy token ids of both engines
are compared on every single-request run (they must be identical).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

CODE = '''def moving_average(values, window):
    """Return the moving averages of `values` over `window` items."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result
'''

INSTRUCT_PROMPTS = [
    "Rewrite this code with one change: rename the function to rolling_mean. Reply with the "
    "code only.\n\n" + CODE,
    "Rewrite this code with one change: the error message should say 'window must be at least "
    "1'. Reply with the code only.\n\n" + CODE,
    "Copy this text exactly, then stop.\n\nThe with statement is used to wrap the execution of "
    "a block with methods defined by a context manager. This allows common try, except, "
    "finally usage patterns to be encapsulated for convenient reuse.",
]
BASE_PROMPTS = [
    CODE + "\n\n# The same function, unchanged:\n\n" + CODE[:120],
    "The with statement is used to wrap the execution of a block with methods defined by a "
    "context manager. This allows common try, except, finally usage patterns to be "
    "encapsulated for convenient reuse.\n\nThe with statement is used to wrap",
    CODE + "\n" + CODE[:200],
]


def _engine_counters(llm: Any) -> tuple[int, int, int]:
    """(drafts, draft tokens, accepted) of the speculative engine since it started."""
    planner = llm.client.engine.scheduler.speculation
    if planner is None:
        return 0, 0, 0
    t = planner.totals
    return t.num_drafts, t.num_draft_tokens, t.num_accepted_tokens


def _prompts(llm: Any, instruct: bool) -> list[list[int]]:
    tok = llm.get_tokenizer()
    if instruct and tok.chat_template:
        return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}],
                                                   add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
                for p in INSTRUCT_PROMPTS]
    return [tok.encode(p) for p in BASE_PROMPTS]


def _single(llm: Any, prompt: list[int], max_tokens: int, ignore_eos: bool
            ) -> tuple[float, float, list[int]]:
    """(TTFT s, TPOT s, token ids) of one greedy request."""
    from sluice.sampling_params import SamplingParams
    inputs = [{"prompt_token_ids": prompt}]
    start = time.perf_counter()
    llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                              ignore_eos=ignore_eos), use_tqdm=False)
    total = time.perf_counter() - start
    tokens = list(out[0].outputs[0].token_ids)
    return ttft, (total - ttft) / max(len(tokens) - 1, 1), tokens


def _w1(llm: Any, requests: list[Any]) -> float:
    """Output tokens per second of the W1 batch."""
    from sluice.sampling_params import SamplingParams
    inputs = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: demo)")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copy-output-len", type=int, default=160)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--w1-prompts", type=int, default=64)
    parser.add_argument("--skip-w1", action="store_true")
    parser.add_argument("--engine-args", default="{}",
                        help="JSON object of extra engine options for both engines")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    from sluice.bench.datasets import random_requests
    from sluice.frontend.llm import LLM

    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
            "prompt_lookup_max": 4}
    common = {"enable_prefix_caching": False, **json.loads(args.engine_args)}
    model = args.model
    engines = {"plain": LLM(model, **common),
               "ngram": LLM(model, speculative_config=spec, **common)}
    plain = engines["plain"]
    instruct = bool(model)   # the demo model is a base model; --model: an instruct model
    copy_prompts = _prompts(plain, instruct)
    vocab = plain.client.ready.vocab_size
    random_prompts = [r.prompt_token_ids for r in
                      random_requests(3, args.random_output_len, vocab, 1,
                                      tokenizer=plain.tokenizer.hf, input_len_range=(64, 256))]
    w1 = random_requests(args.w1_prompts, 128, vocab, 0, tokenizer=plain.tokenizer.hf,
                         input_len_range=(64, 256))

    results: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    counters: dict[str, list[int]] = {}
    for name, llm in engines.items():   # warm-up, and the greedy tokens must agree
        for prompt in copy_prompts[:1] + random_prompts[:1]:
            _single(llm, prompt, 8, ignore_eos=True)
    mismatches = 0
    for round_index in range(args.rounds):
        order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
        for workload in ("copy", "random", "W1"):
            if workload == "W1" and args.skip_w1:
                continue
            tokens_by_engine: dict[str, list[list[int]]] = {}
            for name in order:
                llm = engines[name]
                before = _engine_counters(llm)
                gc.collect()
                if workload == "W1":
                    results[name].setdefault("W1 out tok/s", []).append(_w1(llm, w1))
                else:
                    prompts = copy_prompts if workload == "copy" else random_prompts
                    out_len = (args.copy_output_len if workload == "copy"
                               else args.random_output_len)
                    ttfts, tpots, toks = [], [], []
                    for prompt in prompts:
                        ttft, tpot, tokens = _single(llm, prompt, out_len,
                                                     ignore_eos=workload == "random")
                        ttfts.append(ttft)
                        tpots.append(tpot)
                        toks.append(tokens)
                    tokens_by_engine[name] = toks
                    results[name].setdefault(f"{workload} TPOT ms", []).append(
                        1000 * statistics.mean(tpots))
                    results[name].setdefault(f"{workload} TTFT ms", []).append(
                        1000 * statistics.mean(ttfts))
                after = _engine_counters(llm)
                if name == "ngram":
                    c = counters.setdefault(workload, [0, 0, 0])
                    for i in range(3):
                        c[i] += after[i] - before[i]
            if len(tokens_by_engine) == 2 and tokens_by_engine["plain"] != tokens_by_engine["ngram"]:
                mismatches += 1
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    rows = sorted(results["plain"])
    print(f"\nmodel: {model or 'demo'}; k={args.k}; rounds={args.rounds}; medians")
    print(f"| metric | plain | ngram | plain / ngram |")
    print("|---|---:|---:|---:|")
    summary: dict[str, Any] = {"model": model or "demo", "k": args.k, "rounds": args.rounds,
                               "results": results, "counters": counters,
                               "greedy_mismatches": mismatches}
    for row in rows:
        a, b = statistics.median(results["plain"][row]), statistics.median(results["ngram"][row])
        print(f"| {row} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    print("\n| workload | drafts | draft tokens | accepted | acceptance rate | mean acceptance "
          "length |")
    print("|---|---:|---:|---:|---:|---:|")
    for workload, (drafts, draft_tokens, accepted) in counters.items():
        rate = accepted / draft_tokens if draft_tokens else 0.0
        mean_len = 1 + accepted / drafts if drafts else 0.0
        print(f"| {workload} | {drafts} | {draft_tokens} | {accepted} | {rate:.1%} | "
              f"{mean_len:.2f} |")
    print(f"\ngreedy token mismatches between the engines: {mismatches}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    for llm in engines.values():
        llm.shutdown()
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
