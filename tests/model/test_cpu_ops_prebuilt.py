"""The CPU kernels come prebuilt from `pip install` (setup.py): loading them compiles nothing,
and a prebuilt module that cannot be used falls back, with one warning, to the per-machine
build (here a stub: nothing compiles inside a test)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from sluice.model import cpu_ops
from sluice.platform import cpu_kernels as K

VARIANT, _ = K.selected_variant()
needs_prebuilt = pytest.mark.skipif(
    VARIANT is None or os.environ.get("SLUICE_SKIP_KERNEL_BUILD") == "1",
    reason="no prebuilt variant for this CPU (or the install skipped the build)")

LOAD = ("import json, sys; from sluice.model import cpu_ops; m = cpu_ops.load_cpu_ops(); "
        "print(json.dumps(dict(cpu_ops.kernels_info(), file=getattr(m, '__file__', None))))")


def _load_in_subprocess(tmp_path, **env):
    ext_dir = tmp_path / "torch_extensions"
    result = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir),
                                                  **env))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), ext_dir, result.stderr


@needs_prebuilt
def test_the_installed_tree_loads_the_prebuilt_module_without_compiling(tmp_path):
    info, ext_dir, stderr = _load_in_subprocess(tmp_path)
    assert info["source"] == "prebuilt", (info, stderr)
    assert info["variant"] == VARIANT
    assert info["file"] == info["path"] == str(K.module_path(VARIANT))
    assert not ext_dir.exists()  # torch's extension tooling never ran
    assert "not usable" not in stderr and "ompil" not in stderr


@needs_prebuilt
@pytest.mark.parametrize("variant", list(K.VARIANTS))
def test_each_variant_the_cpu_runs_computes_what_torch_does(tmp_path, variant):
    if not K.VARIANTS[variant]["requires"] <= K.cpu_flags():
        pytest.skip(f"this CPU cannot run {variant}")
    code = ("import torch; from sluice.model import cpu_ops; m = cpu_ops.load_cpu_ops(); "
            "assert cpu_ops.kernels_info()['variant'] == %r, cpu_ops.kernels_info(); "
            "x, w = torch.randn(5, 300), torch.randn(70, 300); out = torch.empty(5, 70); "
            "m.tiled_linear(out, x, w, None); "
            "torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4); "
            "n = torch.empty(5, 300); g = torch.randn(300); m.rms_norm(n, x, g, 1e-6); "
            "ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g; "
            "torch.testing.assert_close(n, ref, rtol=1e-4, atol=1e-5)" % variant)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, SLUICE_CPU_KERNELS=variant,
                                                  TORCH_EXTENSIONS_DIR=str(tmp_path / "te")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "te").exists()


def _stub_jit():
    calls = []

    def jit():
        calls.append(1)
        return types.ModuleType("stub_cpu_ops")
    return jit, calls


def _copy_build(tmp_path, **changes):
    """The installed modules and build record, copied to tmp_path with the record edited."""
    info = K.read_build_info()
    if info is None:
        pytest.skip("no prebuilt kernels installed")
    for name in info["variants"].values():
        shutil.copy(K.MODULE_DIR / name, tmp_path / name)
    (tmp_path / K.BUILD_INFO).write_text(json.dumps({**info, **changes}))


@needs_prebuilt
def test_a_module_built_for_another_torch_falls_back_with_one_warning(tmp_path, caplog):
    _copy_build(tmp_path, torch="2.12.0+cpu")
    jit, calls = _stub_jit()
    with caplog.at_level(logging.INFO, logger="sluice.model.cpu_ops"):
        module, info = cpu_ops._load(tmp_path, jit=jit)
    assert calls == [1] and module.__name__ == "stub_cpu_ops"
    assert info["source"] == "jit" and "2.12.0+cpu" in info["reason"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"running torch {torch.__version__}" in warnings[0].message


@needs_prebuilt
def test_a_module_that_does_not_import_falls_back(tmp_path, caplog):
    _copy_build(tmp_path)
    (tmp_path / K.module_path(VARIANT).name).write_bytes(b"\x7fELF truncated")
    jit, calls = _stub_jit()
    module, info = cpu_ops._load(tmp_path, jit=jit)
    assert calls == [1] and info["source"] == "jit"
    assert "does not import" in caplog.text


def test_a_missing_module_falls_back_and_a_failed_build_runs_pure_torch(tmp_path, caplog):
    def broken():
        raise RuntimeError("Error building extension: c++ not found")

    module, info = cpu_ops._load(tmp_path, jit=broken)  # tmp_path holds no prebuilt module
    assert module is None and info["source"] == "none"
    assert "kernels unavailable" in caplog.text


def test_forcing_the_per_machine_build(tmp_path, monkeypatch):
    monkeypatch.setenv(K.FORCE_ENV, "jit")
    jit, calls = _stub_jit()
    _, info = cpu_ops._load(jit=jit)
    assert calls == [1] and info == {"source": "jit", "variant": "native", "path": None,
                                     "reason": f"{K.FORCE_ENV}=jit"}
