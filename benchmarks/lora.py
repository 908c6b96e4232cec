"""Multi-LoRA's cost (issue 18): W1 on the reference model with no LoRA, one adapter for every
request, and 4 adapters mixed, alternating rounds in one run.

    python benchmarks/lora.py [--model DIR] [--rounds 2] [--num-prompts 64] [--output-len 128]
                              [--base-on-lora-engine]

* Workload: W1 (benchmarks/README.md): --num-prompts random-token prompts of 64..256 tokens
  (seed 0, `sluice.bench.datasets.random_requests`), exactly --output-len greedy tokens each
  (ignore_eos), prefix caching off, the engine in this process (the default `LLM`).
* Adapters: 4 PEFT adapters made by `peft` on the reference model (rank 16, lora_alpha 32, all
  seven projections q/k/v/o/gate/up/down, random lora_B), cached next to the model
  (`<model>-lora/adapter{i}`).
* Modes, each round in this order, the same prompts every time:
    none     an engine without --enable-lora (the plain W1 run: fused decode stack on)
    one      an engine with --enable-lora --max-loras 4: every request with adapter 0
    mixed4   the same engine: request i with adapter i % 4 (4 adapters in every step)
    base     (--base-on-lora-engine) the LoRA engine with no adapter on any request
* Reported: per mode the best output tokens/s over the rounds (the least disturbed run: these
  machines are shared) and the overhead ratio of the best times (elapsed / `none`'s; the aim
  for mixed4 is <= 1.3x), plus each round's ratio to the same round's `none`. `--json` writes
  the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, num: int = 4, rank: int = 16) -> list[Path]:
    """`num` PEFT adapters of `rank` on all projections of `model_dir` (built once, cached)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = model_dir.parent / f"{model_dir.name}-lora"
    paths = []
    for i in range(num):
        path = root / f"adapter{i}-r{rank}"
        if not (path / "adapter_model.safetensors").is_file():
            torch.manual_seed(i)
            base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                    target_modules=ALL))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.02)
            model.save_pretrained(str(path))
        paths.append(path)
    return paths


def timed_generate(llm, prompts, params, lora) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir (default: the reference model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-cache-memory", default="2GiB")
    parser.add_argument("--base-on-lora-engine", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from sluice import LLM, SamplingParams
    from sluice.bench.datasets import random_requests
    from sluice.bench.reference_model import ensure_reference_model
    from sluice.lora.request import LoRARequest

    model = Path(args.model) if args.model else ensure_reference_model()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    requests = random_requests(args.num_prompts, args.output_len, vocab, 0,
                               input_len_range=(64, 256))
    prompts = [list(r.prompt_token_ids) for r in requests]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.output_len)
    adapters = [LoRARequest(f"adapter{i}", i + 1, str(p))
                for i, p in enumerate(make_adapters(model))]
    common = dict(enable_prefix_caching=False, kv_cache_memory=args.kv_cache_memory)
    plain = LLM(str(model), **common)
    lora = LLM(str(model), enable_lora=True, max_loras=4, max_lora_rank=16, **common)
    modes = {"none": (plain, None), "one": (lora, adapters[0]),
             "mixed4": (lora, [adapters[i % 4] for i in range(len(prompts))])}
    if args.base_on_lora_engine:
        modes["base"] = (lora, None)
    for llm, req in modes.values():   # warm-up (adapters loaded, first-shape costs paid)
        timed_generate(llm, prompts[:8], SamplingParams(temperature=0.0, ignore_eos=True,
                                                        max_tokens=4),
                       req if not isinstance(req, list) else req[:8])
    elapsed: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for mode, (llm, req) in modes.items():
            seconds, tokens[mode] = timed_generate(llm, prompts, params, req)
            elapsed[mode].append(seconds)
            print(f"round {r} {mode:7s} {seconds:7.2f} s  "
                  f"{tokens[mode] / seconds:8.1f} output tokens/s", flush=True)
    plain.shutdown()
    lora.shutdown()
    report = {"model": str(model), "rounds": args.rounds, "num_prompts": args.num_prompts,
              "output_len": args.output_len, "modes": {}}
    print(f"\n{'mode':8s} {'output tok/s (best)':>20s} {'overhead vs none':>17s} "
          f"{'per round':>10s}")
    for mode in modes:
        best = min(elapsed[mode])
        ratio = best / min(elapsed["none"])
        rounds = [s / n for s, n in zip(elapsed[mode], elapsed["none"])]
        report["modes"][mode] = {"elapsed_s": elapsed[mode], "output_tokens": tokens[mode],
                                 "output_tokens_per_s": tokens[mode] / best,
                                 "overhead_vs_none": ratio, "round_ratios": rounds}
        print(f"{mode:8s} {tokens[mode] / best:20.1f} {ratio:16.2f}x "
              f"{' '.join(f'{r:.2f}' for r in rounds):>10s}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
