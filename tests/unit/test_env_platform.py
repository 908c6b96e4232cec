"""The platform seam on this machine (CPU): host facts, memory, dtype, threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sluice.config import DeviceConfig
from sluice.errors import ConfigError
from sluice.platform import current_platform, dtype_name, host


def test_host_facts():
    assert host.affinity_cpus() >= 1
    assert isinstance(host.cpu_model(), str) and host.cpu_model()
    flags = host.isa_flags()
    assert flags and all(isinstance(v, bool) for v in flags.values())
    total, available = host.memory_bytes()
    assert total >= available > 0


def test_cpu_platform_basics():
    plat = current_platform("cpu")
    assert plat is current_platform(DeviceConfig(device="cpu"))
    assert plat.device_type == "cpu" and plat.dist_backend == "gloo"
    assert plat.attention_backend_name() == "cpu_paged"
    assert plat.total_memory_bytes() >= plat.free_memory_bytes() > 0
    plat.synchronize()


def test_cpu_dtypes_and_threads(monkeypatch):
    torch = pytest.importorskip("torch")
    from sluice.model.layers import layer_ops
    plat = current_platform("cpu")
    assert plat.torch_device() == torch.device("cpu")
    for native, want in ((False, torch.float32), (True, torch.bfloat16)):  # bf16 kept if native
        monkeypatch.setattr(layer_ops, "native_bf16_products", lambda native=native: native)
        assert plat.default_dtype("bfloat16") == want
    assert plat.resolve_dtype("auto", torch.float16) == torch.float32
    assert plat.resolve_dtype("bfloat16", None) == torch.bfloat16
    before = torch.get_num_threads()
    try:
        assert plat.set_num_threads(1) == 1
        assert plat.set_num_threads(None) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_auto_and_unknown_devices():
    torch = pytest.importorskip("torch")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert current_platform(DeviceConfig()).device_type == expected
    assert current_platform().device_type == expected
    with pytest.raises(ConfigError, match="--device"):
        current_platform("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            current_platform("cuda")


@pytest.mark.parametrize("given,name", [("bfloat16", "bfloat16"), ("torch.float16", "float16"),
                                        ("half", "float16"), ("float32", "float32"),
                                        (None, None), ("int8", None)])
def test_dtype_name(given, name):
    assert dtype_name(given) == name


HEAP_CHECK = """
import sys
from pathlib import Path

import torch

from sluice.config import DeviceConfig
from sluice.platform import current_platform
from sluice.platform.cpu import _mallopt


def heap_range():
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            start, end = line.split()[0].split("-")
            return int(start, 16), int(end, 16)
    return 0, 0


if _mallopt() is None:
    print("no mallopt")
    sys.exit(0)
current_platform(DeviceConfig(device="cpu")).prepare_worker_process()
buffer = torch.empty(16 << 20)  # 64 MiB of float32
start, end = heap_range()
assert start <= buffer.data_ptr() < end, (hex(start), hex(buffer.data_ptr()), hex(end))
print("in heap")
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cpu_worker_process_keeps_freed_activations_in_the_heap():
    """After CpuPlatform.prepare_worker_process a 64 MiB activation-sized buffer comes from
    malloc's heap, where freed memory is reused (by default glibc maps anything over 32 MiB
    afresh, and the kernel page-faults and zero-fills it on every use).

    Checked in a fresh interpreter, as a worker process starts: in the test process, earlier
    tests' large allocations and memory maps can sit just above the brk heap, so that it
    cannot grow and glibc maps the buffer whatever the threshold."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    if proc.stdout.strip() == "no mallopt":
        pytest.skip("the C library has no mallopt")
    assert proc.stdout.strip() == "in heap"
