"""Startup time: `sluice serve` to its first `/health` 200, and `LLM(model)` construction.

    python benchmarks/measure_startup.py [--model reference|demo|DIR|FILE.gguf|org/name] [--runs 3]

Each run is a fresh process. The C++ CPU kernels were built by `pip install` (a machine whose
CPU cannot run the prebuilt ones compiles them once on its first start, ~1-2 min). All runs
share one new, empty `SLUICE_CACHE_DIR`, so the first run is a first start after install: a
.gguf model's converted config and tokenizer are built then and reused by the later runs.
Prints every run and the median of the later runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

LLM_SNIPPET = """
import sys, time
start = time.perf_counter()
from sluice import LLM
llm = LLM(sys.argv[1] or None, enable_prefix_caching=False)
print(time.perf_counter() - start)
llm.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_ready_s(model: str | None, timeout_s: float = 300.0) -> float:
    """Seconds from launching `sluice serve [model]` to the first 200 from /health (model None:
    the built-in demo model)."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sluice.entrypoints.cli", "serve",
                             *([model] if model else []), "--host", "127.0.0.1",
                             "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"sluice serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"no /health 200 within {timeout_s} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def llm_ready_s(model: str | None) -> float:
    """Seconds to import sluice and construct `LLM(model)`, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", LLM_SNIPPET, model or ""], check=True,
                         capture_output=True, text=True, env=dict(os.environ))
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference",
                        help="'reference', 'demo' (the built-in demo model), a directory, a "
                             ".gguf file or a hub id")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.model == "demo":
        model = None
    elif args.model == "reference":
        from sluice.bench.reference_model import resolve_model
        model = resolve_model(args.model)
    else:
        model = args.model
    with tempfile.TemporaryDirectory(prefix="sluice-startup-") as cache_dir:
        os.environ["SLUICE_CACHE_DIR"] = cache_dir   # empty: the first run is a first start
        serve = [serve_ready_s(model) for _ in range(args.runs)]
        llm = [llm_ready_s(model) for _ in range(args.runs)]
    for name, runs in (("sluice serve -> /health 200", serve), ("LLM(model)", llm)):
        later = runs[1:] or runs
        print(f"{name:<28} first {runs[0]:5.2f} s   later median "
              f"{statistics.median(later):5.2f} s   runs " + " ".join(f"{r:.2f}" for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
