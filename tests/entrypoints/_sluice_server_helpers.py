"""Helpers for the entrypoint tests: a `sluice serve` subprocess on a free port.

(Named uniquely so that `import _sluice_server_helpers` cannot collide with another test
folder's helper module.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "test-key-123"
STARTUP_DEADLINE_S = 180.0
COMMON_FLAGS = ("--kv-cache-memory", "64MiB", "--max-model-len", "256", "--max-num-seqs", "8")
_LAUNCH = "import sys; from sluice.entrypoints.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    """The test environment minus SLUICE_* settings that would change the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_cli(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run `sluice ARGS` to completion, capturing output."""
    return subprocess.run([sys.executable, "-c", _LAUNCH, *args], capture_output=True,
                          text=True, timeout=timeout, env=server_env())


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class ServerProcess:
    """One `sluice serve` subprocess; its stderr goes to `log_path`."""

    def __init__(self, model_dir: Path, flags: tuple[str, ...], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, "serve", str(model_dir), "--host", "127.0.0.1",
             "--port", str(self.port), *flags],
            stdout=self._log, stderr=subprocess.STDOUT, env=server_env())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE_S) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice serve exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"sluice serve not healthy after {deadline_s} s:\n"
                           f"{self.log()[-3000:]}")

    def engine_pids(self) -> list[int]:
        """The engine-core child process(es) (multiprocessing spawn children, not the
        resource tracker)."""
        import psutil
        pids = []
        for child in psutil.Process(self.pid).children(recursive=True):
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "resource_tracker" not in cmdline:
                pids.append(child.pid)
        return pids

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode
