"""Probe a live `sluice serve` with the requests that used to knock it over (issue 12) and print
a table: the status each got, how long it took, and the slowest /health answer meanwhile.

    python benchmarks/probe_bad_requests.py                   # this checkout, the demo model
    python benchmarks/probe_bad_requests.py --sluice-root /tmp/old-checkout --timeout 15

The server is started with `--api-key` (the key is sent except where a case says "no key").
`--sluice-root` runs another checkout's sluice (to compare before/after in one sitting); a case
that gets no answer within `--timeout` seconds prints "no answer".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import psutil

KEY = "probe-key"
USER = [{"role": "user", "content": "hi"}]
BOMB = "{% for i in range(1500) %}{% for j in range(1500) %}x{% endfor %}{% endfor %}"


@dataclass
class Case:
    name: str
    path: str
    body: object | bytes
    auth: bool = True


CASES = [
    Case("n = 100000, max_tokens 1", "/v1/completions",
         {"prompt": "x", "n": 100000, "max_tokens": 1}),
    Case("seed 2**70", "/v1/completions", {"prompt": "x", "seed": 2**70}),
    Case("top_k 2**70", "/v1/completions", {"prompt": "x", "top_k": 2**70}),
    Case("priority 2**70", "/v1/completions", {"prompt": "x", "priority": 2**70}),
    Case("lone surrogate in prompt", "/v1/completions", {"prompt": "ab \ud800 cd"}),
    Case("lone surrogate in chat content", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "ab \ud800 cd"}]}),
    Case("lone surrogate in /tokenize", "/tokenize", {"prompt": "ab \ud800 cd"}),
    Case("chat_template_kwargs add_generation_prompt", "/v1/chat/completions",
         {"messages": USER, "max_tokens": 2,
          "chat_template_kwargs": {"add_generation_prompt": True}}),
    Case("/tokenize 100,000 nested [", "/tokenize", b"[" * 100_000),
    Case("20 MB prompt", "/v1/completions", {"prompt": "word " * 4_000_000}),
    Case("/tokenize 20 MB", "/tokenize", {"prompt": "word " * 4_000_000}),
    Case("request chat_template 1500x1500 loops", "/v1/chat/completions",
         {"messages": USER, "max_tokens": 1, "chat_template": BOMB}),
    Case("/tokenize with template bomb, no key", "/tokenize",
         {"messages": USER, "chat_template": BOMB}, auth=False),
    Case("/tokenize, no key", "/tokenize", {"prompt": "hello"}, auth=False),
    Case("/detokenize, no key", "/detokenize", {"tokens": [5, 6]}, auth=False),
    Case('tools "garbage"', "/v1/chat/completions",
         {"messages": USER, "max_tokens": 2, "tools": "garbage"}),
    Case('tool_choice {"type": 5}', "/v1/chat/completions",
         {"messages": USER, "max_tokens": 2, "tool_choice": {"type": 5}}),
    Case('response_format {"type": "nonsense"}', "/v1/chat/completions",
         {"messages": USER, "max_tokens": 2, "response_format": {"type": "nonsense"}}),
    Case('response_format "json"', "/v1/chat/completions",
         {"messages": USER, "max_tokens": 2, "response_format": "json"}),
    # last: on unbounded servers it grows the API server by ~1 GB per 10 s until cut off
    Case("n = 2**70", "/v1/completions", {"prompt": "x", "n": 1180591620717411303424}),
]


class HealthPoller(threading.Thread):
    """Polls /health every 50 ms; `worst_s` is the slowest answer (or wait) seen."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url + "/health"
        self.worst_s = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=120.0) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    client.get(self.url)
                except httpx.HTTPError:
                    pass
                self.worst_s = max(self.worst_s, time.monotonic() - start)
                self.stop.wait(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: str | None, model: list[str], port: int) -> subprocess.Popen:
    env = dict(os.environ)
    if root:  # `python -c` puts the working directory first on sys.path: run from `root`
        root = os.path.abspath(root)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    launch = "import sys; from sluice.entrypoints.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", launch, "serve", *model, "--port", str(port),
                             "--api-key", KEY], env=env, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_healthy(url: str, proc: subprocess.Popen, deadline_s: float = 300.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become healthy")


def probe(url: str, case: Case, timeout_s: float) -> tuple[str, float, float]:
    """(status or 'no answer', seconds, slowest /health seconds) for one case."""
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    headers = {"Content-Type": "application/json"}
    if case.auth:
        headers["Authorization"] = f"Bearer {KEY}"
    poller = HealthPoller(url)
    poller.start()
    start = time.monotonic()
    try:
        response = httpx.post(url + case.path, content=content, headers=headers,
                              timeout=timeout_s)
        outcome = str(response.status_code)
    except httpx.TimeoutException:
        outcome = "no answer"
    except httpx.HTTPError as e:
        outcome = type(e).__name__
    elapsed = time.monotonic() - start
    poller.stop.set()
    poller.join(timeout=120.0)
    return outcome, elapsed, poller.worst_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sluice-root", help="checkout whose sluice package to run")
    parser.add_argument("--model", nargs="*", default=[], help="model argument(s) for serve")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.sluice_root, args.model, port)
    try:
        wait_healthy(url, proc)
        server = psutil.Process(proc.pid)
        print("| case | status | seconds | slowest /health (s) | API server RSS after (MB) |")
        print("|---|---|---|---|---|")
        for case in CASES:
            status, seconds, worst = probe(url, case, args.timeout)
            rss = server.memory_info().rss / 2**20
            print(f"| {case.name} | {status} | {seconds:.2f} | {worst:.2f} | {rss:.0f} |",
                  flush=True)
    finally:
        proc.kill()
        proc.wait()
        for child in psutil.Process().children(recursive=True):
            child.kill()


if __name__ == "__main__":
    main()
