"""Layering rules from docs/architecture.md, enforced.

* core/, messages, step, config*, sampling_params, outputs, frontend/, entrypoints/ and
  model_spec/ (which the API-server process runs to resolve the model) import no
  torch (checked by importing every module in a fresh interpreter);
* worker/, model/ and sample/ never import sluice.core (checked statically).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import sluice

PACKAGE_DIR = Path(sluice.__file__).parent
TORCH_FREE_PACKAGES = ["sluice.core", "sluice.frontend", "sluice.entrypoints", "sluice.model_spec"]
TORCH_FREE_MODULES = ["sluice", "sluice.messages", "sluice.step", "sluice.config",
                      "sluice.config_sources", "sluice.sampling_params", "sluice.outputs",
                      "sluice.hf_config", "sluice.errors", "sluice.engine.launch",
                      "sluice.engine.serial", "sluice.bench.datasets", "sluice.bench.serve"]


def _modules_of(package: str) -> list[str]:
    root = PACKAGE_DIR.parent
    path = PACKAGE_DIR.joinpath(*package.split(".")[1:])
    return [".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for p in sorted(path.rglob("*.py"))]


def test_torch_free_modules_do_not_import_torch():
    modules = list(TORCH_FREE_MODULES)
    for package in TORCH_FREE_PACKAGES:
        modules += _modules_of(package)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'torch' not in sys.modules, f'{m} imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_device_side_never_imports_the_scheduler():
    pattern = re.compile(r"^\s*(from|import)\s+sluice\.core\b", re.MULTILINE)
    offenders = [str(p.relative_to(PACKAGE_DIR))
                 for folder in ("worker", "model", "sample")
                 for p in (PACKAGE_DIR / folder).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_only_distributed_calls_torch_distributed():
    """Process groups and collectives live behind sluice.distributed (ARCHITECTURE.md:
    'parallelism is owned by distributed/ and passed in')."""
    pattern = re.compile(r"torch\.distributed|from torch import distributed")
    offenders = [str(p.relative_to(PACKAGE_DIR)) for p in PACKAGE_DIR.rglob("*.py")
                 if p.parent.name != "distributed" and pattern.search(p.read_text())]
    assert offenders == []
