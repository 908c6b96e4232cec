"""`sluice env`: the hardware and software facts that matter for a bug report or a benchmark.

    sluice env          human-readable report
    sluice env --json   the same as one JSON object (keys: sluice, os, python, cpu, memory,
                        torch, cuda, packages, environment)

torch is imported only inside `collect_report()`; a broken torch install is reported, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from sluice.platform import host

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "msgspec", "pyzmq", "fastapi",
            "uvicorn", "pydantic", "numpy", "pyyaml", "psutil", "prometheus_client")
"""Distributions whose versions the report lists (None when not installed)."""

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "CUDA_VISIBLE_DEVICES",
            "HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
_SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _os_info() -> dict[str, Any]:
    info: dict[str, Any] = {"system": platform.system(), "release": platform.release(),
                            "platform": platform.platform(), "machine": platform.machine()}
    try:
        info["distribution"] = platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        info["distribution"] = None
    libc = platform.libc_ver()
    info["libc"] = " ".join(libc) if libc[0] else None
    return info


def _cpu_info() -> dict[str, Any]:
    return {"model": host.cpu_model(), "architecture": platform.machine(),
            "physical_cores": host.physical_cores(), "logical_cores": os.cpu_count(),
            "affinity_cpus": host.affinity_cpus(), "cgroup_cpu_limit": host.cgroup_cpu_limit(),
            "isa": host.isa_flags()}


def _memory_info() -> dict[str, Any]:
    import psutil
    total, available = host.memory_bytes()
    cg = host.cgroup_memory()
    return {"total_bytes": total, "available_bytes": available,
            "host_total_bytes": psutil.virtual_memory().total,
            "cgroup_limit_bytes": cg[0] if cg else None}


def _torch_info() -> tuple[dict[str, Any], dict[str, Any]]:
    """(torch facts, cuda facts); an import failure becomes {'error': ...}."""
    try:
        import torch
    except Exception as e:  # report a broken install instead of crashing the report
        err = f"{type(e).__name__}: {e}"
        return {"version": None, "error": err}, {"available": False, "error": err}
    info: dict[str, Any] = {
        "version": torch.__version__, "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(), "onednn": torch.backends.mkldnn.is_available(),
        "openmp": torch.backends.openmp.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_build": torch.version.cuda, "debug": torch.version.debug,
        "cpu_kernels": _cpu_kernels(torch.__version__),
    }
    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "devices": []}
    if cuda["available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda["devices"].append({"name": props.name, "total_memory_bytes": props.total_memory,
                                    "capability": f"{props.major}.{props.minor}"})
    return info, cuda


def _cpu_kernels(torch_version: str) -> dict[str, Any]:
    """Which prebuilt variant of sluice's C++ CPU kernels this CPU takes, and whether it is
    usable with this torch (read from files; the kernels are not loaded)."""
    try:
        from sluice.platform import cpu_kernels
        return cpu_kernels.describe(torch_version)
    except Exception as e:  # a report, not a crash
        return {"variant": None, "usable": False, "problem": f"{type(e).__name__}: {e}"}


def _format_kernels(k: dict[str, Any] | None) -> str:
    if not k:
        return "n/a"
    if k.get("usable"):
        return (f"prebuilt {k['variant']} ({k.get('reason')}; "
                f"built with torch {k.get('built_with_torch')})")
    variant = f"{k['variant']}: " if k.get("variant") else ""
    return f"{variant}{k.get('problem')} -> compiled for this machine on first use (-march=native)"


def _environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for name in sorted(os.environ):
        if name.startswith("SLUICE_") or name in ENV_VARS:
            secret = any(hint in name for hint in _SECRET_HINTS)
            env[name] = "***" if secret else os.environ[name]
    return env


def collect_report() -> dict[str, Any]:
    """Every fact of the report as a JSON-serializable dict."""
    import sluice
    torch_info, cuda_info = _torch_info()
    return {
        "sluice": {"version": sluice.__version__, "path": os.path.dirname(sluice.__file__)},
        "os": _os_info(),
        "python": {"version": platform.python_version(),
                   "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "cpu": _cpu_info(),
        "memory": _memory_info(),
        "torch": torch_info,
        "cuda": cuda_info,
        "packages": {name: _version(name) for name in PACKAGES},
        "environment": _environment(),
    }


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned `key: value` lines grouped by section."""
    cpu, mem, tch, cuda = report["cpu"], report["memory"], report["torch"], report["cuda"]
    isa = " ".join(k for k, v in cpu["isa"].items() if v) or "none of interest"
    rows: list[tuple[str, Any]] = [
        ("sluice", f"{report['sluice']['version']} ({report['sluice']['path']})"),
        ("OS", report["os"]["distribution"] or report["os"]["platform"]),
        ("kernel", f"{report['os']['system']} {report['os']['release']}"),
        ("Python", f"{report['python']['version']} ({report['python']['executable']})"),
        ("CPU", f"{cpu['model']} ({cpu['architecture']})"),
        ("cores", f"{cpu['physical_cores']} physical, {cpu['logical_cores']} logical, "
                  f"{cpu['affinity_cpus']} in affinity mask"
                  + (f", cgroup quota {cpu['cgroup_cpu_limit']:g}" if cpu["cgroup_cpu_limit"]
                     else "")),
        ("ISA", isa),
        ("RAM", f"{_gib(mem['total_bytes'])} total, {_gib(mem['available_bytes'])} available"
                + (f" (cgroup limit {_gib(mem['cgroup_limit_bytes'])})"
                   if mem["cgroup_limit_bytes"] else "")),
    ]
    if tch.get("error"):
        rows.append(("torch", f"import failed: {tch['error']}"))
    else:
        rows += [("torch", f"{tch['version']} (CUDA build: {tch['cuda_build']})"),
                 ("torch threads", f"{tch['num_threads']} intra-op, "
                                   f"{tch['num_interop_threads']} inter-op"),
                 ("torch CPU", f"capability {tch['cpu_capability']}, MKL {tch['mkl']}, "
                               f"oneDNN {tch['onednn']}, OpenMP {tch['openmp']}"),
                 ("CPU kernels", _format_kernels(tch.get("cpu_kernels")))]
    rows.append(("CUDA", "available" if cuda["available"] else "not available"))
    for i, dev in enumerate(cuda.get("devices", [])):
        rows.append((f"GPU {i}", f"{dev['name']}, {_gib(dev['total_memory_bytes'])}, "
                                 f"sm {dev['capability']}"))
    rows += [(name, version or "not installed") for name, version in report["packages"].items()
             if name != "torch"]
    rows += [(name, value) for name, value in report["environment"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "env", help="Print the hardware and software environment.",
        description="Print the hardware and software facts that matter for bug reports and "
                    "benchmarks: OS, Python, CPU and ISA flags, RAM, torch, CUDA, packages.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    return parser


def run(args: argparse.Namespace) -> int:
    report = collect_report()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(format_report(report))
    return 0
