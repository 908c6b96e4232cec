"""Builds sluice's C++ CPU kernels (sluice/model/csrc/) at install time; everything else about
the package is in pyproject.toml.

One extension module per CPU variant (sluice/platform/cpu_kernels.py: x86-64-v3 for AVX2,
x86-64-v4 for AVX-512), compiled against the torch of the build environment (pinned in
pyproject.toml's [build-system]) with torch's own include and library paths. bindings.cpp is
compiled once and linked into every variant; the kernels are one translation unit per variant;
the compiles run in parallel (MAX_JOBS, default: every CPU). `_cpu_ops_build.json` records the
torch version and a digest of the sources, so the runtime never loads a module into a torch it
was not built for.

A failed build (no compiler, say) does not fail the install: pip's log says why, and sluice
compiles the kernels on first use as before, or runs its pure-torch paths.
SLUICE_SKIP_KERNEL_BUILD=1 skips the build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_sluice_cpu_kernels",
                                               ROOT / "sluice" / "platform" / "cpu_kernels.py")
K = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(K)
CSRC = Path("sluice") / "model" / "csrc"


def _say(msg: str) -> None:
    print(f"sluice kernels: {msg}", file=sys.stderr, flush=True)


class BuildCpuKernels(build_ext):
    """Compiles every variant in one parallel batch, then links each into its module path."""

    def build_extensions(self) -> None:
        try:
            self._build_all()
        except Exception as e:  # noqa: BLE001 - any failure: install without prebuilt kernels
            _say(f"WARNING: not built ({type(e).__name__}: {e}); sluice will compile them on "
                 "first use, or run its pure-torch paths without a compiler.")
            self.extensions = []

    def _build_all(self) -> None:
        import warnings
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # not needed here
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths

        cxx = os.environ.get("CXX", "c++")
        tmp = Path(self.build_temp) / "sluice_cpu_ops"
        tmp.mkdir(parents=True, exist_ok=True)
        includes = [f for p in include_paths() for f in ("-isystem", p)]
        includes += ["-isystem", sysconfig.get_paths()["include"]]
        base = ["-std=c++20", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes,
                *K.COMMON_CFLAGS]
        if hasattr(torch._C, "_GLIBCXX_USE_CXX11_ABI"):
            base.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")

        jobs: list[tuple[str, list[str]]] = []  # (label, command), longest first
        bindings = tmp / "bindings.o"
        jobs.append(("bindings", [cxx, *base, *K.BINDINGS_CFLAGS,
                                  f"-DTORCH_EXTENSION_NAME={K.INIT_NAME}", "-c",
                                  str(CSRC / "bindings.cpp"), "-o", str(bindings)]))
        variants = {ext.name.rsplit(K.MODULE_PREFIX, 1)[1]: ext for ext in self.extensions}
        for v in variants:
            jobs.append((v, [cxx, *base, *K.VARIANTS[v]["cflags"], "-c",
                             str(CSRC / "kernels.cpp"), "-o", str(tmp / f"kernels_{v}.o")]))

        def run(job: tuple[str, list[str]]) -> tuple[str, float, str | None]:
            label, cmd = job
            start = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            err = None if r.returncode == 0 else r.stderr.strip()[-3000:] or f"exit {r.returncode}"
            return label, time.perf_counter() - start, err

        workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        _say(f"compiling {', '.join(variants)} against torch {torch.__version__} "
             f"({len(jobs)} compiles, {workers} at a time; about a minute on 2 cores)")
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(run, jobs))
        failed = {label: err for label, _, err in results if err}
        if "bindings" in failed:
            raise RuntimeError(f"bindings.cpp did not compile:\n{failed['bindings']}")
        ldflags = ["-shared", "-fopenmp", *(f"-L{p}" for p in library_paths()),
                   "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
        built: dict[str, str] = {}
        for v, ext in variants.items():
            if v in failed:
                _say(f"WARNING: variant {v} did not compile, skipped:\n{failed[v]}")
                continue
            out = Path(self.get_ext_fullpath(ext.name))
            out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([cxx, str(bindings), str(tmp / f"kernels_{v}.o"), *ldflags,
                            "-o", str(out)], check=True, capture_output=True, text=True)
            built[v] = out.name
            self._info_dir = out.parent
        if not built:
            raise RuntimeError("no variant compiled")
        self.extensions = [variants[v] for v in built]
        info = {"torch": torch.__version__, "sources_sha256": K.sources_digest(CSRC),
                "variants": built, "compiler": cxx,
                "cflags": {v: [*K.COMMON_CFLAGS, *K.VARIANTS[v]["cflags"]] for v in built}}
        (self._info_dir / K.BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
        times = ", ".join(f"{label} {s:.0f} s" for label, s, _ in results)
        _say(f"built {', '.join(built)} in {time.perf_counter() - start:.0f} s ({times})")

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        if self.extensions and getattr(self, "_info_dir", None):
            dest = ROOT / "sluice" / "model" / K.BUILD_INFO
            shutil.copyfile(self._info_dir / K.BUILD_INFO, dest)


def _extensions() -> list[Extension]:
    if os.environ.get("SLUICE_SKIP_KERNEL_BUILD") == "1":
        return []
    sources = [str(CSRC / "bindings.cpp"), str(CSRC / "kernels.cpp")]
    return [Extension(f"sluice.model.{K.MODULE_PREFIX}{v}", sources=sources, language="c++")
            for v in K.build_variants()]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildCpuKernels})
