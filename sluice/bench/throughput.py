"""`sluice bench throughput`: offline throughput of sluice and/or HF transformers on one workload.

    sluice bench throughput reference --backend both \\
        --num-prompts 64 --input-len-min 64 --input-len-max 256 --output-len 128 --seed 0

(or `python -m sluice.bench.throughput ...`). Every request is greedy, ignores EOS and generates
exactly `output_len` tokens on every backend; the timer covers generation only. Prints vLLM's
line "Throughput: X requests/s, Y total tokens/s, Z output tokens/s" per backend and, with
`--backend both` (sluice first, then HF, same process, same workload), a side-by-side table with
the sluice/hf ratios. `--json PATH` writes the report built by `run_benchmark`. `--roofline`
then measures the fp32 GEMM peak (the faster of `torch.mm` and oneDNN's packed-weight linear,
the engine's thread count) and prints each
backend's fraction of the compute roofline (`sluice/bench/roofline.py` states the formulas).

Engine options are the generated config flags (`config_sources.add_engine_args`, all sections
but `server`), passed to `LLM(model, **kwargs)` as the values that differ from the defaults;
prefix caching is OFF unless `--enable-prefix-caching` is given (random prompts share no
prefixes). `--seed` is the engine seed and also seeds the random workload. `sluice bench`
(`sluice/bench/cli.py`) registers this with `add_parser(subparsers)`; `run(args)` executes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from sluice.bench.backends import BackendResult, run_hf, run_sluice
from sluice.bench.datasets import (BenchRequest, load_json_workload, random_requests,
                                   workload_summary)
from sluice.bench.reference_model import REFERENCE_NAME, resolve_model
from sluice.bench.roofline import (DEFAULT_GEMM_REPEATS, DEFAULT_GEMM_SIZE, format_roofline_line,
                                   measure_gemm_peak, roofline_report, workload_flops)
from sluice.config import SECTIONS, EngineConfig
from sluice.errors import ConfigError, SluiceError

DEFAULT_NUM_PROMPTS = 64
DEFAULT_INPUT_LEN_RANGE = (64, 256)
DEFAULT_OUTPUT_LEN = 128
ENGINE_SECTIONS = [s for s in SECTIONS if s != "server"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the engine flags and the benchmark's own flags to `parser`."""
    from sluice.config_sources import add_engine_args
    add_engine_args(parser, sections=ENGINE_SECTIONS, positional_model=True)
    bench = parser.add_argument_group("benchmark options")
    bench.add_argument("--backend", choices=("sluice", "hf", "both"), default="sluice",
                       help="What to run; 'both' runs sluice then HF on the same workload and "
                       "prints the sluice/hf ratios. MODEL may be "
                       f"'{REFERENCE_NAME}': the benchmark reference model, built once into "
                       "~/.cache/sluice/reference-model. [default: sluice]")
    bench.add_argument("--num-prompts", type=int, default=None, metavar="N",
                       help=f"Number of requests (default {DEFAULT_NUM_PROMPTS}; with "
                       "--dataset: the first N entries, default all).")
    bench.add_argument("--input-len-min", type=int, default=None, metavar="N",
                       help="Shortest random prompt, inclusive "
                       f"[default: {DEFAULT_INPUT_LEN_RANGE[0]}]")
    bench.add_argument("--input-len-max", type=int, default=None, metavar="N",
                       help="Longest random prompt, inclusive "
                       f"[default: {DEFAULT_INPUT_LEN_RANGE[1]}]")
    bench.add_argument("--input-len", type=int, default=None, metavar="L",
                       help="vLLM-style alternative to --input-len-min/max: prompt lengths "
                       "uniform in [L*(1-R), L*(1+R)] with R = --range-ratio.")
    bench.add_argument("--range-ratio", type=float, default=0.0, metavar="R",
                       help="Spread of prompt lengths around --input-len, in [0, 1). "
                       "[default: 0]")
    bench.add_argument("--output-len", type=int, default=None, metavar="N",
                       help=f"Exact tokens generated per request (default {DEFAULT_OUTPUT_LEN}; "
                       "with --dataset it overrides each entry's output_len).")
    bench.add_argument("--dataset", type=Path, default=None, metavar="JSON",
                       help='JSON workload file: a list of {"prompt_token_ids": [...] or '
                       '"prompt": str, "output_len": int}.')
    bench.add_argument("--hf-batch-size", type=int, default=None, metavar="N",
                       help="Static batch size of the HF backend (default: all requests in one "
                       "batch).")
    bench.add_argument("--disable-detokenize", action="store_true",
                       help="Do not detokenize sluice outputs (as vLLM's flag).")
    bench.add_argument("--disable-tqdm", action="store_true", help="No progress bar (sluice).")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH",
                       help="Write the results as JSON to PATH.")
    bench.add_argument("--roofline", action="store_true",
                       help="After the run(s), measure the fp32 GEMM peak (the faster of "
                       f"torch.mm and oneDNN's packed linear, {DEFAULT_GEMM_SIZE}^3, the "
                       "engine's --num-threads) and print each "
                       "backend's fraction of the compute roofline: the model's FLOPs for "
                       "this workload / peak, over the elapsed time.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `throughput` on the `bench` group's subparsers; sets `bench_run=run`."""
    parser = subparsers.add_parser(
        "throughput", help="Offline throughput of sluice and/or HF transformers.",
        description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(bench_run=run)
    return parser


# ---------------------------------------------------------------------------------------------

def engine_config_from_bench_args(args: argparse.Namespace) -> EngineConfig:
    """The validated engine config: MODEL or --model (`reference` resolved, built if needed),
    prefix caching off unless asked for, then flags > --config > SLUICE_* > defaults."""
    from sluice.config_sources import MODEL_POSITIONAL_DEST, engine_config_from_args
    pos, opt = getattr(args, MODEL_POSITIONAL_DEST, None), getattr(args, "model", None)
    if pos and opt and pos != opt:
        raise ConfigError(f"--model: the positional MODEL ({pos!r}) and --model ({opt!r}) "
                          "disagree. Fix: give the model only once.")
    if not (pos or opt):
        raise ConfigError(f"--model: no model given. Fix: pass a model directory or "
                          f"'{REFERENCE_NAME}'.")
    args = argparse.Namespace(**vars(args))
    args.model = resolve_model(pos or opt)
    setattr(args, MODEL_POSITIONAL_DEST, None)
    if args.enable_prefix_caching is None:
        args.enable_prefix_caching = False
    return engine_config_from_args(args)


def engine_kwargs(cfg: EngineConfig) -> dict[str, Any]:
    """Flat `LLM(model, **kwargs)`: every field whose value differs from its default."""
    from sluice.config import field_specs
    from sluice.config_sources import flat_config
    specs = field_specs()
    derived = {"served_model_name": (cfg.model.model,)}  # the default a config build derives
    return {name: value for name, value in flat_config(cfg, redact=False).items()
            if name != "model" and specs[name].section != "server"
            and value != specs[name].default and value != derived.get(name)}


def _load_tokenizer(model: str) -> Any | None:
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(model)
    except Exception:  # no tokenizer files: prompts are token ids anyway
        return None


def _model_vocab_size(model: str) -> int:
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--model: cannot read vocab_size from {model}/config.json ({e}). "
                          "Fix: pass a model directory in Hugging Face format or a .gguf "
                          "file.") from None


def _model_dir(model: str) -> str:
    """The HF-format directory holding `model`'s config and tokenizer: `model` itself, or the
    converted sidecar of a .gguf file (`sluice.model_spec.resolve.resolve_model`)."""
    if Path(model).is_file():
        from sluice.model_spec.resolve import resolve_model as resolve_local
        return str(resolve_local(model))
    return model


def build_workload(args: argparse.Namespace, model: str, seed: int) -> list[BenchRequest]:
    """The requests described by the workload flags."""
    model = _model_dir(model)
    tokenizer = _load_tokenizer(model)
    vocab_size = _model_vocab_size(model)
    if args.dataset is not None:
        requests = load_json_workload(args.dataset, tokenizer=tokenizer, vocab_size=vocab_size)
        if args.num_prompts is not None:
            if not (1 <= args.num_prompts <= len(requests)):
                raise ConfigError(f"--num-prompts: {args.num_prompts} is not in [1, "
                                  f"{len(requests)}] (the requests in {args.dataset}).")
            requests = requests[:args.num_prompts]
        if args.output_len is not None:
            requests = [dataclasses.replace(r, output_len=args.output_len) for r in requests]
        return requests
    if args.input_len is not None:
        if args.input_len_min is not None or args.input_len_max is not None:
            raise ConfigError("--input-len: give --input-len (+ --range-ratio) or "
                              "--input-len-min/--input-len-max, not both.")
        length: dict[str, Any] = {"input_len": args.input_len, "range_ratio": args.range_ratio}
    else:
        low = args.input_len_min if args.input_len_min is not None else DEFAULT_INPUT_LEN_RANGE[0]
        high = args.input_len_max if args.input_len_max is not None else \
            DEFAULT_INPUT_LEN_RANGE[1]
        length = {"input_len_range": (low, high)}
    num = DEFAULT_NUM_PROMPTS if args.num_prompts is None else args.num_prompts
    out_len = DEFAULT_OUTPUT_LEN if args.output_len is None else args.output_len
    return random_requests(num, out_len, vocab_size, seed, tokenizer=tokenizer, **length)


def _environment() -> dict[str, Any]:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected backend(s); returns the report (also what `--json` writes).

    Keys: `model`, `backend`, `workload` (counts, seed, dataset), `engine_kwargs`,
    `hf_batch_size`, `environment`, `results` (backend name -> `BackendResult.to_dict()`), and
    with both backends `sluice_over_hf` (ratios of the three rates) and `num_identical_outputs`
    (requests whose greedy tokens agree); with `--roofline`, `roofline` (`roofline_section`).
    """
    cfg = engine_config_from_bench_args(args)
    model = str(cfg.model.model)
    if args.backend in ("hf", "both") and Path(model).is_file():
        raise ConfigError(f"--backend {args.backend}: HF transformers runs a model directory in "
                          f"Hugging Face format, not the GGUF file {model}. Fix: --backend "
                          "sluice, or pass an HF directory.")
    requests = build_workload(args, model, cfg.model.seed)
    kwargs = engine_kwargs(cfg)
    results: dict[str, BackendResult] = {}
    if args.backend in ("sluice", "both"):
        results["sluice"] = run_sluice(requests, model, kwargs,
                                       detokenize=not args.disable_detokenize,
                                       use_tqdm=not args.disable_tqdm)
        print_result(results["sluice"])
    if args.backend in ("hf", "both"):
        hf_dtype = "float32" if cfg.model.dtype == "auto" else cfg.model.dtype
        results["hf"] = run_hf(requests, model, batch_size=args.hf_batch_size, dtype=hf_dtype)
        print_result(results["hf"])
    report: dict[str, Any] = {
        "model": model, "backend": args.backend,
        "workload": {**workload_summary(requests), "seed": cfg.model.seed,
                     "dataset": str(args.dataset) if args.dataset else None},
        "engine_kwargs": kwargs, "hf_batch_size": args.hf_batch_size,
        "environment": _environment(),
        "results": {name: r.to_dict() for name, r in results.items()},
    }
    if getattr(args, "roofline", False):
        report["roofline"] = roofline_section(cfg, requests, results)
    if len(results) == 2:
        s, h = report["results"]["sluice"], report["results"]["hf"]
        report["sluice_over_hf"] = {k: s[k] / h[k] for k in _RATIO_KEYS}
        report["num_identical_outputs"] = sum(
            a == b for a, b in zip(results["sluice"].output_token_ids,
                                   results["hf"].output_token_ids))
    return report


_RATIO_KEYS = ("requests_per_second", "tokens_per_second", "output_tokens_per_second")


def roofline_section(cfg: EngineConfig, requests: list[BenchRequest],
                     results: dict[str, BackendResult]) -> dict[str, Any]:
    """Measure the GEMM peak once (threads: `--num-threads`, else the affinity CPU count, as
    the CPU platform does), count the workload's FLOPs and print one roofline line per backend.

    Returns {"gemm": {"peak_gflops", "size", "repeats", "num_threads", "dtype"}, "flops":
    `workload_flops(...)`, "backends": {name: `roofline_report(...)`}}.
    """
    from sluice.hf_config import load_model_spec
    from sluice.platform.host import affinity_cpus

    spec = load_model_spec(cfg.model.model)
    flops = workload_flops(spec, [r.prompt_len for r in requests],
                           [r.output_len for r in requests])
    threads = cfg.device.num_threads or affinity_cpus()
    peak = measure_gemm_peak(threads, DEFAULT_GEMM_SIZE, DEFAULT_GEMM_REPEATS)
    backends_report = {}
    for name, result in results.items():
        backends_report[name] = roofline_report(flops["total"], result.elapsed_time, peak)
        print(format_roofline_line(name, backends_report[name], DEFAULT_GEMM_SIZE, threads))
    sys.stdout.flush()
    return {"gemm": {"peak_gflops": peak, "size": DEFAULT_GEMM_SIZE,
                     "repeats": DEFAULT_GEMM_REPEATS, "num_threads": threads,
                     "dtype": "float32"},
            "flops": flops, "backends": backends_report}


def print_result(result: BackendResult) -> None:
    """vLLM's summary lines for one backend."""
    d = result.to_dict()
    print(f"[{result.backend}] Throughput: {d['requests_per_second']:.2f} requests/s, "
          f"{d['tokens_per_second']:.2f} total tokens/s, "
          f"{d['output_tokens_per_second']:.2f} output tokens/s")
    print(f"[{result.backend}] Elapsed time: {d['elapsed_time']:.2f} s")
    print(f"[{result.backend}] Total num prompt tokens:  {d['total_prompt_tokens']}")
    print(f"[{result.backend}] Total num output tokens:  {d['total_output_tokens']}")
    sys.stdout.flush()


def format_side_by_side(report: dict[str, Any]) -> str:
    """The sluice vs hf table of a `--backend both` report."""
    s, h, r = report["results"]["sluice"], report["results"]["hf"], report["sluice_over_hf"]
    rows = [("requests/s", "requests_per_second"), ("total tokens/s", "tokens_per_second"),
            ("output tokens/s", "output_tokens_per_second")]
    lines = [f"{'':<18}{'sluice':>12}{'hf':>12}{'sluice/hf':>12}"]
    for label, key in rows:
        lines.append(f"{label:<18}{s[key]:>12.2f}{h[key]:>12.2f}{r[key]:>11.2f}x")
    lines.append(f"{'elapsed s':<18}{s['elapsed_time']:>12.2f}{h['elapsed_time']:>12.2f}")
    n = report["workload"]["num_requests"]
    lines.append(f"identical greedy outputs: {report['num_identical_outputs']}/{n} requests")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run `sluice bench throughput`; returns the exit code. Errors propagate as `ConfigError`
    (bad flags, exit 2 in the CLI) or other `SluiceError`s (exit 1)."""
    report = run_benchmark(args)
    if "sluice_over_hf" in report:
        print(format_side_by_side(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m sluice.bench.throughput`)."""
    parser = argparse.ArgumentParser(prog="sluice bench throughput",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SluiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
