"""Startup time: `sluice serve` to its first `/health` 200, and `LLM(model)` construction.

    python benchmarks/measure_startup.py [--model reference] [--runs 3]

Each run is a fresh process (the CPU kernels are already compiled and cached: the first start
on a new machine also compiles them once, ~40 s). Prints every run and the median.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

LLM_SNIPPET = """
import sys, time
start = time.perf_counter()
from sluice import LLM
llm = LLM(sys.argv[1], enable_prefix_caching=False)
print(time.perf_counter() - start)
llm.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_ready_s(model: str, timeout_s: float = 120.0) -> float:
    """Seconds from launching `sluice serve` to the first 200 from /health."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sluice.entrypoints.cli", "serve", model,
                             "--host", "127.0.0.1", "--port", str(port)],
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


def llm_ready_s(model: str) -> float:
    """Seconds to import sluice and construct `LLM(model)`, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", LLM_SNIPPET, model], check=True,
                         capture_output=True, text=True, env=dict(os.environ))
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    from sluice.bench.reference_model import resolve_model
    model = resolve_model(args.model)
    serve = [serve_ready_s(model) for _ in range(args.runs)]
    llm = [llm_ready_s(model) for _ in range(args.runs)]
    for name, runs in (("sluice serve -> /health 200", serve), ("LLM(model)", llm)):
        print(f"{name:<28} median {statistics.median(runs):5.2f} s   runs "
              + " ".join(f"{r:.2f}" for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
