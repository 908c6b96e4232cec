"""Held-out perplexity of one model over each `--kv-cache-dtype`, side by side.

    python benchmarks/kv_cache_perplexity.py                          # the demo model, float32
    python benchmarks/kv_cache_perplexity.py --model DIR --dtype bfloat16
    python benchmarks/kv_cache_perplexity.py --kv-cache-dtypes auto,fp8_e4m3 --prompts 48

Each cache dtype gets a fresh `LLM(model, dtype=..., kv_cache_dtype=...)` scoring the demo
model's held-out text (`sluice.testing.perplexity`: whole-paragraph prompts of ~300 tokens,
prompt logprobs) and prints its perplexity and the change against the first dtype listed.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory or GGUF file "
                        "(default: the built-in demo model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8_e4m3,fp8_e5m2",
                        help="comma-separated --kv-cache-dtype values; the first is the base")
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts scored")
    parser.add_argument("--kernels", default="auto", help="sluice's --kernels")
    args = parser.parse_args(argv)

    from sluice import LLM
    from sluice.testing.perplexity import engine_perplexity, heldout_prompts

    prompts = heldout_prompts(args.prompts)
    base = None
    for kv in [x.strip() for x in args.kv_cache_dtypes.split(",") if x.strip()]:
        start = time.perf_counter()
        with LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv, kv_cache_memory="512MiB",
                 max_model_len=1024, kernels=args.kernels) as llm:
            ppl, _ = engine_perplexity(llm, prompts)
        base = ppl if base is None else base
        print(f"--dtype {args.dtype} --kv-cache-dtype {kv}: perplexity {ppl:.4f} "
              f"({100 * (ppl / base - 1):+.2f}%)  [{time.perf_counter() - start:.1f} s]",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
