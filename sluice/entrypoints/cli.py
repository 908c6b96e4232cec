"""The `sluice` command: `sluice {serve,generate,chat,bench,env,router} [options]`.

Each subcommand lives in its own module, named in SUBCOMMANDS, that provides

    def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser
        # calls subparsers.add_parser("<name>", help=..., description=...) and adds its flags,
        # usually config_sources.add_engine_args(parser, ...) plus its own
    def run(args: argparse.Namespace) -> int
        # builds the config with config_sources.engine_config_from_args(args); returns the exit code

Only the module of the subcommand being run is imported (the others are listed by name and
help text), so `sluice --help` and `sluice env` stay fast; modules must import torch lazily.
A ConfigError from any subcommand prints `error: <problems>` and exits 2; any other SluiceError
prints `error: <message>` and exits 1; neither prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

from sluice.errors import ConfigError, SluiceError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("sluice.entrypoints.serve_cmd", "Start the OpenAI-compatible HTTP server."),
    "generate": ("sluice.entrypoints.generate_cmd", "Generate completions for prompts offline."),
    "chat": ("sluice.entrypoints.chat_cmd", "Chat in the terminal with a running server."),
    "bench": ("sluice.bench.cli", "Benchmark throughput and latency."),
    "env": ("sluice.entrypoints.env_report", "Print the hardware and software environment."),
    "router": ("sluice.entrypoints.router.cli",
               "Route OpenAI requests over several sluice serve workers (KV-aware)."),
}
"""name → (module providing add_parser/run, one-line help)."""

_PROG = "sluice"
_LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and
    substitutions that turn `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def closest_flag(arg: str, options: list[str]) -> str | None:
    """The option string nearest to `arg` by edit distance, if it is close: at most a quarter
    of the flag's length (and at least 1, at most 3) edits; ties go to the first listed."""
    name = arg.split("=", 1)[0].lstrip("-")
    best, best_distance = None, None
    for option in options:
        distance = edit_distance(name, option.lstrip("-"))
        if best_distance is None or distance < best_distance:
            best, best_distance = option, distance
    if best is None or best_distance > min(3, max(1, len(name) // 4)):
        return None
    return best


class SluiceArgumentParser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (`--max-num` never means `--max-num-seqs`) and
    with a "did you mean" for misspelt flags.

    A subcommand's parser reports its own unrecognized arguments (argparse would leave them to
    the top-level parser), so the error shows `sluice <command>`'s usage and the suggestion is
    one of that command's flags."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != _PROG:  # a subcommand: nothing may be left over
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras

    def _option_strings(self) -> list[str]:
        found = list(self._option_string_actions)
        if self._subparsers is not None:
            for action in self._subparsers._group_actions:
                for sub in (getattr(action, "choices", None) or {}).values():
                    if isinstance(sub, SluiceArgumentParser):
                        found += sub._option_strings()
        return found

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            options = self._option_strings()
            hints = []
            for arg in message.split(":", 1)[1].split():
                if arg.startswith("-"):
                    near = closest_flag(arg, options)
                    if near:
                        hints.append(f"{arg.split('=', 1)[0]}: did you mean {near}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (tests and redirections swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str = "info") -> None:
    """Send the `sluice` loggers to stderr at `level`; idempotent (subcommands call it again
    with `config.observability.log_level`). Records still propagate to the root logger.
    The handler is recognised by class name: under `python -m sluice.entrypoints.cli` this
    module is loaded twice (`__main__` and `sluice.entrypoints.cli`), with two classes."""
    logger = logging.getLogger("sluice")
    if not any(type(h).__name__ == _StderrHandler.__name__ for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first non-option argument)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def _load(name: str) -> ModuleType:
    module_name = SUBCOMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise SluiceError(f"`sluice {name}` is not available in this build ({module_name} "
                              "is missing).") from None
        raise


def build_parser(chosen: str | None = None) -> tuple[argparse.ArgumentParser,
                                                    ModuleType | None]:
    """The top-level parser; only `chosen`'s module is imported and adds its real parser."""
    from sluice import __version__
    parser = SluiceArgumentParser(
        prog=_PROG, description="sluice: an LLM inference and serving engine.",
        epilog="Run `sluice <command> --help` for the options of a command. Engine options "
               "also come from --config FILE and SLUICE_<OPTION> environment variables.")
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=SluiceArgumentParser)
    module = None
    for name, (_, help_text) in SUBCOMMANDS.items():
        if name == chosen:
            module = _load(name)
            module.add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser, module


def _print_error(error: SluiceError) -> None:
    print(f"error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sluice` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_logging(os.environ.get("SLUICE_LOG_LEVEL", "info"))
    chosen = _chosen(argv)
    try:
        parser, module = build_parser(chosen)
    except SluiceError as e:
        _print_error(e)
        return 1
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if module is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        _print_error(e)
        return 2
    except SluiceError as e:
        _print_error(e)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sluice env --json | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
