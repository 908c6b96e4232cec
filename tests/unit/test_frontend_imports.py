"""The API-server side never imports torch (nor engine/worker/model internals)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FORBIDDEN = ("torch", "sluice.model", "sluice.worker", "sluice.engine", "sluice.executor",
             "sluice.sample", "sluice.core")


def test_frontend_modules_import_no_torch(tiny_tokenizer_dir):
    code = textwrap.dedent(f"""
        import sys
        import sluice.frontend.tokenizer, sluice.frontend.detokenizer
        import sluice.frontend.input_processor, sluice.frontend.output_processor
        from sluice.frontend.tokenizer import load_tokenizer
        from sluice.frontend.input_processor import InputProcessor
        from sluice.frontend.output_processor import OutputProcessor
        from sluice.messages import EngineCoreOutput, FinishReason
        from sluice.sampling_params import SamplingParams

        tok = load_tokenizer({str(tiny_tokenizer_dir)!r})
        prompt = tok.apply_chat_template([{{"role": "user", "content": "hé 漢"}}])
        req = InputProcessor(tok, 128, tok.vocab_size, 5, tok.eos_token_id).process(
            "r", prompt, SamplingParams(n=2, stop=["x"], logprobs=1))
        op = OutputProcessor(tok, log_stats=True)
        op.add_request(req, prompt)
        op.process_outputs([EngineCoreOutput("0_r", tok.encode("ab"),
                                             finish_reason=FinishReason.LENGTH)])
        bad = sorted(m for m in sys.modules
                     if any(m == f or m.startswith(f + ".") for f in {FORBIDDEN!r}))
        print("BAD", bad)
        assert not bad, bad
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
