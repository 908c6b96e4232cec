"""Structured output's cost (issue 17): W1-like offline throughput with a JSON schema on every
request vs none, alternating rounds in one run; the engine-side mask cost per step; and the
grammar compile time of the 20 test schemas.

    python benchmarks/structured_output.py [--model DIR] [--rounds 3] [--num-prompts 64]

* Throughput: the same random-token prompts (64..256 tokens, seeded) each round; "schema"
  rounds constrain every request with SCHEMA (bounded, so the grammar ends each output;
  ignore_eos, the grammar's end finishes it); "none" rounds generate, unconstrained, exactly as
  many tokens per request as the schema warm-up run gave that request (ignore_eos), so both
  rounds do the same work with the same batch sizes step by step and differ only by the grammar
  (bitmask, mask, the full sampler instead of the greedy argmax). Greedy, prefix caching off,
  the engine in this process (the default `LLM`).
* Mask cost per step: `StructuredOutputManager.grammar_output` for --num-prompts requests of
  SCHEMA at a mid-output state, timed alone (what the engine core adds per step, overlapped with
  the forward under the mp executor), plus the worker side (bitmask → logits mask).
* Compile time: each of the 20 schemas of tests/entrypoints/test_structured_output.py,
  compiled cold (cache off) with the model's tokenizer already built; and the tokenizer build.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "name", "tags"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                         "name": {"type": "string", "maxLength": 40},
                         "tags": {"type": "array", "maxItems": 6,
                                  "items": {"type": "string", "maxLength": 12}},
                         "kind": {"enum": ["a", "b", "c"]}}}
ROOT = Path(__file__).resolve().parents[1]


def test_schemas() -> list[dict]:
    path = ROOT / "tests" / "entrypoints" / "test_structured_output.py"
    spec = importlib.util.spec_from_file_location("_so_schemas", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCHEMAS


def throughput(args: argparse.Namespace) -> None:
    from sluice import LLM, SamplingParams
    from sluice.sampling_params import StructuredOutputsParams
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 4000, int(rng.integers(64, 257))).tolist()
               for _ in range(args.num_prompts)]
    kw = dict(enable_prefix_caching=False, kv_cache_memory="1GiB", max_model_len=1024,
              structured_outputs_config='{"disable_any_whitespace": true}')
    llm = LLM(args.model, **kw) if args.model else LLM(**kw)
    plain = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    schema = plain.with_updates(max_tokens=4 * args.output_len,
                                structured_outputs=StructuredOutputsParams(json=SCHEMA))
    warm = llm.generate([{"prompt_token_ids": p} for p in prompts], schema, use_tqdm=False)
    plain = [plain.with_updates(max_tokens=len(o.outputs[0].token_ids)) for o in warm]
    rates: dict[str, list[float]] = {"none": [], "schema": []}
    for r in range(args.rounds):
        for name, params in (("none", plain), ("schema", schema)):
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(tokens / elapsed)
            print(f"round {r} {name:6s}: {tokens:6d} output tokens in {elapsed:6.2f}s = "
                  f"{tokens / elapsed:7.1f} tok/s")
    none, cons = statistics.median(rates["none"]), statistics.median(rates["schema"])
    print(f"median output tok/s: none {none:.1f}, schema {cons:.1f} "
          f"(schema/none {cons / none:.3f}, overhead {100 * (1 - cons / none):.1f}%)")


def mask_and_compile(args: argparse.Namespace) -> None:
    import torch
    import sluice
    from sluice.core.request import Request
    from sluice.hf_config import load_model_spec
    from sluice.sample.grammar import grammar_mask
    from sluice.sampling_params import SamplingParams, StructuredOutputsParams
    from sluice.step import SchedulerOutput
    from sluice.structured_output.backend import GuidanceBackend
    from sluice.structured_output.config import StructuredOutputsConfig
    from sluice.structured_output.manager import StructuredOutputManager
    model = args.model or str(Path(sluice.__file__).parent / "assets" / "demo_model")
    spec = load_model_spec(model)
    backend = GuidanceBackend(StructuredOutputsConfig(disable_any_whitespace=True), spec.path,
                              spec.vocab_size, spec.eos_token_ids)
    start = time.perf_counter()
    backend.tokenizer
    print(f"llguidance tokenizer build: {time.perf_counter() - start:.2f}s "
          f"(vocab {spec.vocab_size}; once, lazily, on the first structured request)")
    times = []
    for schema in test_schemas():
        start = time.perf_counter()
        backend.compile(StructuredOutputsParams(json=schema))
        times.append(time.perf_counter() - start)
    print(f"compile, 20 schemas: total {sum(times) * 1e3:.1f} ms, median "
          f"{statistics.median(times) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms")
    manager = StructuredOutputManager(backend)
    reqs = {}
    prefix = [int(t) for t in backend.tokenizer.tokenize_str('{"id":12,"name":"ab')]
    for i in range(args.num_prompts):
        r = Request(f"r{i}", [1, 2], SamplingParams(
            structured_outputs=StructuredOutputsParams(json=SCHEMA)), None, 0.0)
        manager.hold(r)
        reqs[r.request_id] = r
    while manager.num_waiting:
        manager.wait_for_any(5)
        manager.take_ready()
    for rid, r in reqs.items():
        manager._matchers[rid].consume_tokens(prefix)
        r.num_computed_tokens = r.num_tokens
    so = SchedulerOutput(num_scheduled_tokens={rid: 1 for rid in reqs},
                         total_num_scheduled_tokens=len(reqs))
    engine, worker = [], []
    rows = {rid: i for i, rid in enumerate(reqs)}
    for _ in range(50):
        start = time.perf_counter()
        g = manager.grammar_output(so, reqs)
        engine.append(time.perf_counter() - start)
        start = time.perf_counter()
        grammar_mask(g, rows, spec.vocab_size, torch.device("cpu"))
        worker.append(time.perf_counter() - start)
    print(f"mask per step, {len(reqs)} rows: engine side (bitmask) "
          f"{statistics.median(engine) * 1e3:.2f} ms, worker side (bitmask -> logits mask) "
          f"{statistics.median(worker) * 1e3:.2f} ms (median of 50)")
    manager.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model dir (default: the demo model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    mask_and_compile(args)
    if not args.skip_throughput:
        throughput(args)


if __name__ == "__main__":
    main()
