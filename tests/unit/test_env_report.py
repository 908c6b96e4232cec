"""`sluice env`: the JSON report from a real subprocess, and its text rendering."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sluice.entrypoints.env_report import format_report

KEYS = {"sluice", "os", "python", "cpu", "memory", "torch", "cuda", "packages", "environment"}


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, SLUICE_API_KEY="topsecret", SLUICE_MAX_NUM_SEQS="3")
    result = subprocess.run([sys.executable, "-m", "sluice.entrypoints.cli", "env", "--json"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_env_json_has_the_keys(report):
    assert KEYS <= set(report)
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    cpu = report["cpu"]
    for key in ("model", "physical_cores", "logical_cores", "affinity_cpus", "isa"):
        assert key in cpu
    assert cpu["affinity_cpus"] >= 1
    if cpu["architecture"] == "x86_64":
        assert {"avx2", "fma", "avx512f", "amx_bf16"} <= set(cpu["isa"])
    assert report["memory"]["total_bytes"] >= report["memory"]["available_bytes"] > 0
    for key in ("version", "num_threads", "mkl", "onednn"):
        assert key in report["torch"]
    assert isinstance(report["cuda"]["available"], bool)
    for name in ("transformers", "tokenizers", "safetensors", "msgspec", "pyzmq", "fastapi",
                 "uvicorn"):
        assert name in report["packages"]


def test_env_redacts_secrets(report):
    assert report["environment"]["SLUICE_API_KEY"] == "***"
    assert report["environment"]["SLUICE_MAX_NUM_SEQS"] == "3"


def test_text_report(report):
    text = format_report(report)
    for label in ("OS", "Python", "CPU", "cores", "ISA", "RAM", "torch", "CUDA",
                  "transformers"):
        assert any(line.startswith(label) for line in text.splitlines()), label
    assert "topsecret" not in text


def test_text_report_survives_broken_torch(report):
    broken = dict(report, torch={"version": None, "error": "ImportError: boom"},
                  cuda={"available": False, "error": "ImportError: boom"})
    assert "import failed: ImportError: boom" in format_report(broken)
