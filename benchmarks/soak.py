"""Soak a live `sluice serve`: rounds of concurrent clients (completions and chat, streamed and
not, random lengths, random early disconnects) and, after each round, the RSS of the API-server
process and of the engine-core process. Memory that keeps growing round after round is a leak
(or an allocator that never gives memory back); memory that stays flat is the goal.

    python benchmarks/soak.py                                  # demo model, 5 x 20 s x 64 clients
    python benchmarks/soak.py MODEL_DIR --rounds 30 --seconds 20 --clients 64
    python benchmarks/soak.py --serve-args "--kv-cache-memory 1GiB" --disconnect-fraction 0.3

The server runs on 127.0.0.1 on a free port and is stopped with SIGTERM at the end. The load
generator is `sluice.bench.soak` (shared with tests/entrypoints/test_soak.py). Exit status 1 if
any request got a 5xx or the server failed.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time

import httpx

from sluice import event_loop
from sluice.bench.soak import RoundResult, SoakConfig, engine_processes, rss_breakdown, soak
from sluice.platform.host import free_ports

_LAUNCH = "import sys; from sluice.entrypoints.cli import main; sys.exit(main())"


def start_server(model: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    """`sluice serve [MODEL] --host 127.0.0.1 --port PORT EXTRA...` (output to our stderr)."""
    cmd = [sys.executable, "-c", _LAUNCH, "serve", *([model] if model else []),
           "--host", "127.0.0.1", "--port", str(port), *extra]
    return subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)


def wait_healthy(url: str, proc: subprocess.Popen, deadline_s: float = 300.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"error: sluice serve exited with {proc.returncode} at startup")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"error: sluice serve not healthy after {deadline_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None,
                   help="Model directory or hub id. [default: the built-in demo model]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20.0, help="Seconds per round.")
    p.add_argument("--clients", type=int, default=64, help="Concurrent clients.")
    p.add_argument("--disconnect-fraction", type=float, default=0.15,
                   help="Fraction of requests abandoned early. [default: 0.15]")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="max_tokens is uniform in [1, N]. [default: 128]")
    p.add_argument("--prompt-words", type=int, default=200,
                   help="Prompt length in words, uniform in [1, N]. [default: 200]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true",
                   help="Also print each process's RSS by mapping kind after each round "
                        "(brk heap, large anonymous mappings, other anonymous, files).")
    p.add_argument("--serve-args", default="",
                   help="Extra flags for `sluice serve`, one shell-quoted string.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = SoakConfig(rounds=args.rounds, seconds=args.seconds, clients=args.clients,
                        disconnect_fraction=args.disconnect_fraction,
                        max_tokens=(1, args.max_tokens), prompt_words=(1, args.prompt_words),
                        seed=args.seed)
    port = free_ports("127.0.0.1")[0]
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port, shlex.split(args.serve_args))
    results: list[RoundResult] = []
    try:
        wait_healthy(url, proc)
        engines = engine_processes(proc.pid)
        print(f"server pid {proc.pid}, engine pid(s) {[e.pid for e in engines]}; "
              f"{config.rounds} rounds x {config.seconds:g} s x {config.clients} clients",
              flush=True)

        def report(r: RoundResult) -> None:
            print(r.line(), flush=True)
            if args.breakdown:
                for name, pid in [("API server", proc.pid)] + [("engine", e.pid)
                                                              for e in engines]:
                    parts = rss_breakdown(pid)
                    print(f"    {name:10s} " + "  ".join(f"{k} {v / 2**20:7.1f}"
                                                      for k, v in parts.items()) + " MiB",
                          flush=True)

        results = event_loop.run(soak(url, proc.pid, config, on_round=report))
    finally:
        code = stop_server(proc)
    print(f"server exit status {code}")
    for r in results:
        for sample in r.error_samples:
            print(f"  round {r.index}: {sample}")
    if len(results) >= 2:
        first, last = results[0], results[-1]
        print(f"RSS change round 0 -> {last.index}: API server "
              f"{(last.api_rss - first.api_rss) / 2**20:+.1f} MiB, engine "
              f"{(last.engine_rss - first.engine_rss) / 2**20:+.1f} MiB")
    return 1 if code != 0 or any(r.errors_5xx for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
