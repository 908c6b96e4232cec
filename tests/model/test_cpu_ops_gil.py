"""sluice's C++ operators release the GIL while they run (the engine's I/O threads must keep
moving during a step)."""

from __future__ import annotations

import threading
import time

import torch


def test_tiled_linear_lets_other_python_threads_run(cpu_ops):
    x, w = torch.randn(64, 512), torch.randn(32000, 512)
    out = torch.empty(64, 32000)
    ticks = 0
    running = threading.Event()
    stop = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        running.set()
        while not stop.is_set():
            ticks += 1
            time.sleep(0)

    thread = threading.Thread(target=ticker)
    thread.start()
    running.wait()
    try:
        before = ticks
        for _ in range(5):                 # ~15 ms each: long enough for many switches
            cpu_ops.tiled_linear(out, x, w, None)
        during = ticks - before
    finally:
        stop.set()
        thread.join()
    # Holding the GIL, the ticker would advance only at the few switch points between calls.
    assert during > 50, during
