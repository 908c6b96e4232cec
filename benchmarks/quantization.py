"""Weight precisions of one model side by side in one run: float32, int8, the GGUF file's blocks.

    python benchmarks/quantization.py                       # the demo model: fp32 vs int8
    python benchmarks/quantization.py --model ~/.cache/sluice-tests/SmolLM2-135M-Instruct.Q4_1.gguf

One engine per variant lives in this process (`--variants`, a JSON object name -> engine
options; default fp32 = `--quantization none`, int8 = `--quantization int8`, and for a .gguf
model also gguf = its blocks kept, the default (int8 activations for every block type:
every step on an x86 CPU with AVX2 or AVX512-VNNI, else up to 8 rows), and gguf-float = its blocks with
float activations, `--quantization gguf`); each round runs every workload on every engine,
rotating which goes first, and the table reports medians over rounds:

* **TPOT / TTFT**: single-request greedy decoding of 3 random-token prompts of 64..256 tokens,
  `--output-len` tokens each (ignore EOS); TPOT = (generation time - TTFT) / (tokens - 1).
* **W1**: offline throughput, 64 random prompts of 64..256 tokens, 128 output tokens each
  (ignore EOS), seed 0 — `sluice bench throughput`'s W1.
* **perplexity**: exp(-mean prompt logprob) over the demo model's held-out CPython
  documentation (`sluice/assets/demo_model/heldout.txt`, ~1000-character prompts; the first
  `--ppl-prompts`), once per variant (deterministic), with its ratio to the first variant, on
  a separate engine of that variant that computes at most 8 tokens per step (one request at a
  time, chunked prefill), so every forward takes the decode-sized kernels (int8's int8
  activations run up to 8 rows; prefill-sized steps compute in float).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from spec_decode import _single, _w1

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: demo)")
    parser.add_argument("--variants", default=None,
                        help="JSON object: variant name -> engine options")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--w1-prompts", type=int, default=64)
    parser.add_argument("--ppl-prompts", type=int, default=8)
    parser.add_argument("--kv-cache-memory", default="2GiB",
                        help="KV cache of each engine (several share this machine's memory)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    from sluice.bench.datasets import random_requests
    from sluice.frontend.llm import LLM
    from sluice.testing.perplexity import engine_perplexity, heldout_prompts

    model = args.model
    variants: dict[str, dict[str, Any]] = (
        json.loads(args.variants) if args.variants else
        {"fp32": {"quantization": "none"}, "int8": {"quantization": "int8"},
         **({"gguf": {}, "gguf-float": {"quantization": "gguf"}}
            if model and model.endswith(".gguf") else {})})
    engines = {name: LLM(model, enable_prefix_caching=False,
                         kv_cache_memory=args.kv_cache_memory, **opts)
               for name, opts in variants.items()}
    first = next(iter(engines.values()))
    vocab = first.client.ready.vocab_size
    single = [r.prompt_token_ids for r in random_requests(
        3, args.output_len, vocab, 1, tokenizer=first.tokenizer.hf, input_len_range=(64, 256))]
    w1 = random_requests(args.w1_prompts, 128, vocab, 0, tokenizer=first.tokenizer.hf,
                         input_len_range=(64, 256))
    ppl_prompts = heldout_prompts(args.ppl_prompts)

    results: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    for name, opts in variants.items():   # perplexity is deterministic: once, 8-token steps
        with LLM(model, kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=8,
                 max_num_seqs=1, max_model_len=1024, **opts) as llm:
            results[name]["perplexity"] = [engine_perplexity(llm, ppl_prompts)[0]]
    for llm in engines.values():   # warm-up
        _single(llm, single[0], 8, ignore_eos=True)
    names = list(engines)
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            llm = engines[name]
            gc.collect()
            runs = [_single(llm, p, args.output_len, ignore_eos=True) for p in single]
            results[name].setdefault("TTFT ms", []).append(
                1000 * statistics.mean(r[0] for r in runs))
            results[name].setdefault("TPOT ms", []).append(
                1000 * statistics.mean(r[1] for r in runs))
            gc.collect()
            results[name].setdefault("W1 out tok/s", []).append(_w1(llm, w1))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    base = names[0]
    print(f"\nmodel: {model or 'demo'}; rounds={args.rounds}; medians; ratios to {base}")
    print("| metric | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for row in ("W1 out tok/s", "TPOT ms", "TTFT ms", "perplexity"):
        ref = statistics.median(results[base][row])
        cells = []
        for name in names:
            v = statistics.median(results[name][row])
            cells.append(f"{v:.2f}" + (f" ({v / ref:.3f}x)" if name != base else ""))
        print(f"| {row} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"model": model or "demo", "variants": variants,
                                         "results": results}, indent=2))
    for llm in engines.values():
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
