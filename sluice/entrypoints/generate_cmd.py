"""`sluice generate [MODEL] --prompt TEXT ...`: offline completions with the `LLM` API.

    sluice generate ./my-model --prompt "The capital of France is" --max-tokens 32
    echo "Once upon a time" | sluice generate --temperature 0

Engine options are the generated config flags (all sections but `server`); sampling options are
their own group. `--seed` is the engine's seed and, when given, also each request's seed, so a
run is reproducible regardless of batching. Prints one completion per prompt.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sluice.config import SECTIONS
from sluice.errors import ConfigError, InvalidRequestError

_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sluice.config_sources import add_engine_args
    parser = subparsers.add_parser(
        "generate", help="Generate completions for prompts offline.",
        description="Load a model and print the completion of each prompt (reads one prompt "
                    "from stdin when no --prompt is given).")
    add_engine_args(parser, sections=[s for s in SECTIONS if s != "server"],
                    positional_model=True)
    group = parser.add_argument_group("sampling options")
    group.add_argument("--prompt", "-p", action="append", metavar="TEXT", default=None,
                       help="A prompt; repeat for several prompts.")
    group.add_argument("--max-tokens", type=int, default=None, metavar="N",
                       help="Maximum tokens to generate per prompt. [default: 16]")
    group.add_argument("--temperature", type=float, default=None, metavar="T",
                       help="Sampling temperature; 0 is greedy. [default: 1.0]")
    group.add_argument("--top-p", type=float, default=None, metavar="P",
                       help="Nucleus sampling probability mass in (0, 1]. [default: 1.0]")
    group.add_argument("--top-k", type=int, default=None, metavar="K",
                       help="Sample from the K most likely tokens; 0 disables. [default: 0]")
    group.add_argument("--ignore-eos", action="store_true", default=False,
                       help="Keep generating past the end-of-sequence token.")
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt values, else the whole of stdin when it is not a terminal."""
    if args.prompt:
        return list(args.prompt)
    if not sys.stdin.isatty():
        text = sys.stdin.read().rstrip("\n")
        if text:
            return [text]
    raise ConfigError("--prompt: no prompt was given. Fix: pass --prompt TEXT (repeatable) or "
                      "pipe the prompt on stdin.")


def sampling_params_from_args(args: argparse.Namespace, seed: int | None = None) -> Any:
    """SamplingParams from the sampling flags (and the per-request `seed`); invalid values
    become a ConfigError naming the flag."""
    from sluice.sampling_params import SamplingParams
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in _SAMPLING_FLAGS
                              if getattr(args, k, None) is not None}
    if args.ignore_eos:
        kwargs["ignore_eos"] = True
    if seed is not None:
        kwargs["seed"] = seed
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as e:
        flag = "--" + (e.param or "prompt").replace("_", "-")
        raise ConfigError(f"{flag}: {e.message} Fix: pass a value in the allowed range.") \
            from None


def run(args: argparse.Namespace) -> int:
    from sluice.config_sources import engine_config_from_args
    from sluice.entrypoints.cli import configure_logging

    engine_config = engine_config_from_args(args)
    configure_logging(engine_config.observability.log_level)
    seed = engine_config.model.seed if getattr(args, "seed", None) is not None else None
    params = sampling_params_from_args(args, seed)
    prompts = read_prompts(args)
    from sluice.frontend.llm import LLM
    llm = LLM(config=engine_config)
    try:
        outputs = llm.generate(prompts, params)
    finally:
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        if len(prompts) > 1:
            print(f"=== [{i + 1}/{len(prompts)}] {prompt}")
        print(output.outputs[0].text, flush=True)
    return 0
