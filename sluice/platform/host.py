"""Facts about the host machine read from the OS (no torch): CPU model and ISA flags, cores,
affinity, and memory as limited by the process's cgroup (a container sees the host's RAM in
/proc/meminfo but is killed at its cgroup limit, so every memory figure here is min(host,
cgroup)). Used by `platform.cpu` and by `sluice env`.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import platform as _pyplatform
import signal
import socket
import threading
from pathlib import Path

X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm")
"""CPU features that decide which kernels are fast (x86 'flags', aarch64 'Features')."""

_UNLIMITED = 1 << 60


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as a dict (empty where unavailable)."""
    text = _read("/proc/cpuinfo") or ""
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's marketing name, e.g. 'AMD EPYC 9654 96-Core Processor'."""
    info = cpuinfo()
    return (info.get("model name") or info.get("Model") or info.get("Hardware")
            or _pyplatform.processor() or _pyplatform.machine() or "unknown")


def isa_flags() -> dict[str, bool]:
    """Whether the CPU reports each of X86_FLAGS (or ARM_FLAGS on aarch64)."""
    info = cpuinfo()
    present = set((info.get("flags") or info.get("Features") or "").split())
    arm = _pyplatform.machine().lower() in ("aarch64", "arm64")
    return {f: f in present for f in (ARM_FLAGS if arm else X86_FLAGS)}


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    """Physical cores of the machine (not limited by affinity), if known."""
    try:
        import psutil
        return psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unsupported platform
        return None


def cgroup_cpu_limit() -> float | None:
    """The cgroup CPU quota in CPUs (e.g. 2.0), or None when unlimited/unknown."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), \
        _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def _cgroup_dir(controller: str) -> list[Path]:
    """Candidate directories of this process's cgroup for `controller` (v2 first)."""
    dirs: list[Path] = []
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":
            dirs.append(Path("/sys/fs/cgroup") / rel)
        elif controller in controllers.split(","):
            dirs.append(Path("/sys/fs/cgroup") / controller / rel)
    dirs += [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup") / controller]
    return dirs


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage excluding reclaimable page cache) in bytes of this process's memory
    cgroup, or None when no limit applies."""
    for d in _cgroup_dir("memory"):
        for limit_f, usage_f in (("memory.max", "memory.current"),
                                 ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit, usage = _read(d / limit_f), _read(d / usage_f)
            if limit is None or usage is None:
                continue
            if limit == "max" or int(limit) >= _UNLIMITED:
                return None
            inactive = 0
            for line in (_read(d / "memory.stat") or "").splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file"):
                    inactive = max(inactive, int(value))
            return int(limit), max(0, int(usage) - inactive)
    return None


def memory_bytes() -> tuple[int, int]:
    """(total, available) RAM in bytes for this process: min of the host and its cgroup."""
    import psutil
    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    cg = cgroup_memory()
    if cg is not None:
        limit, used = cg
        total, available = min(total, limit), min(available, max(0, limit - used))
    return total, available


def free_ports(host: str, count: int = 1) -> list[int]:
    """`count` distinct TCP ports free on `host` right now (the OS picks them; all sockets are
    held open together, so the ports differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def describe_exit(exitcode: int | None) -> str:
    """A process exit status in words: "exit code 1", "signal SIGKILL", or "an unknown
    status" (`multiprocessing`'s convention: negative = killed by that signal)."""
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def wait_for_parent_exit(parent_pid: int) -> None:
    """Block until this process's parent is gone: the `multiprocessing` parent's sentinel
    pipe closes (it died, even by SIGKILL), or we were re-parented away from `parent_pid`.
    Checks once a second; meant for a daemon watcher thread."""
    parent = multiprocessing.parent_process()
    while True:
        if parent is not None:
            if multiprocessing.connection.wait([parent.sentinel], timeout=1.0):
                return
        else:
            threading.Event().wait(1.0)
        if os.getppid() != parent_pid:
            return
