"""The HTTP server side (app, endpoints, metrics, serve command, bench serve) never imports
torch nor engine/worker/model internals."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FORBIDDEN = ("torch", "sluice.model", "sluice.worker", "sluice.executor", "sluice.sample",
             "sluice.core")


def test_server_modules_import_no_torch(tiny_tokenizer_dir):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        import sluice.entrypoints.serve_cmd, sluice.bench.serve, sluice.bench.cli
        import sluice.metrics.prometheus, sluice.metrics.loggers
        from sluice.entrypoints.openai.app import build_app
        from sluice.config_sources import build_engine_config
        from sluice.frontend.tokenizer import load_tokenizer
        from _sluice_fake_engine import FakeAsyncLLM

        engine = FakeAsyncLLM(load_tokenizer({str(tiny_tokenizer_dir)!r}))
        build_app(engine, build_engine_config(overrides={{"model": "/x"}}, env={{}}))
        bad = sorted(m for m in sys.modules
                     if any(m == f or m.startswith(f + ".") for f in {FORBIDDEN!r}))
        assert not bad, bad
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
