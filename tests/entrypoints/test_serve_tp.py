"""`sluice serve -tp 2`: one engine core driving two worker processes (the `mp` executor).

End to end with the official `openai` client (greedy text identical to the single-rank engine),
a regex-constrained answer equals the single-rank one; SIGTERM ends server, engine core and workers with exit 0; a worker killed mid-stream fails the
in-flight requests with 503s, /health answers 503, the server exits non-zero, and no process,
executor IPC directory or /dev/shm entry is left behind.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import tempfile
import threading
import time

import httpx
import psutil
import pytest

from _sluice_server_helpers import last_line

pytestmark = pytest.mark.timeout(300)

TP_FLAGS = ("-tp", "2", "--num-threads", "2")   # one torch thread per rank
PROMPT = "The quick brown fox"


def _leftovers() -> tuple[set[str], set[str]]:
    ipc = set(glob.glob(os.path.join(tempfile.gettempdir(), "sluice-exec-*")))
    ipc |= set(glob.glob("/tmp/sluice-exec-*"))
    return ipc, set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _tree(server) -> tuple[psutil.Process, list[psutil.Process]]:
    """The engine-core process of `server` and its workers (rank order)."""
    children = {c.pid: c for c in psutil.Process(server.pid).children(recursive=True)}
    workers = sorted((c for c in children.values() if c.name().startswith("sluice-rank-")),
                     key=lambda c: c.name())
    assert len(workers) == 2, [c.name() for c in children.values()]
    return psutil.Process(workers[0].ppid()), workers


def _assert_gone(pids: list[int], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes left behind: {alive}"
        time.sleep(0.1)


REGEX = "[a-z]{2,6}( [a-z]{2,6}){1,3}"


def _single_rank_texts(llama_dir, max_tokens: int) -> tuple[str, str]:
    """Greedy text of PROMPT on one rank: plain, and constrained by REGEX."""
    from sluice.config_sources import build_engine_config
    from sluice.frontend.llm import LLM
    from sluice.sampling_params import SamplingParams, StructuredOutputsParams
    config = build_engine_config(overrides={"model": str(llama_dir), "kv_cache_memory": "16MiB",
                                            "max_model_len": 256, "max_num_seqs": 4}, env={})
    with LLM(config=config) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        constrained = params.with_updates(max_tokens=40, structured_outputs=(
            StructuredOutputsParams(regex=REGEX)))
        outs = llm.generate([PROMPT, PROMPT], [params, constrained], use_tqdm=False)
        return outs[0].outputs[0].text, outs[1].outputs[0].text


def test_serve_tp2_with_openai_client_then_sigterm(start_server, llama_dir):
    import openai
    before = _leftovers()
    expected, expected_regex = _single_rank_texts(llama_dir, 12)
    server = start_server(llama_dir, *TP_FLAGS, "--served-model-name", "tiny-tp")
    engine, workers = _tree(server)
    pids = [engine.pid, *(w.pid for w in workers)]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                       timeout=60.0) as client:
        full = client.completions.create(model="tiny-tp", prompt=PROMPT, max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert full.choices[0].text == expected
        assert full.usage.completion_tokens == 12
        chunks = list(client.completions.create(model="tiny-tp", prompt=PROMPT, max_tokens=12,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        chat = client.chat.completions.create(
            model="tiny-tp", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            temperature=0, extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 5
        # structured output under TP: the driver applies the grammar mask
        constrained = client.completions.create(
            model="tiny-tp", prompt=PROMPT, max_tokens=40, temperature=0,
            extra_body={"ignore_eos": True, "structured_outputs": {"regex": REGEX}})
        assert re.fullmatch(REGEX, constrained.choices[0].text)
        assert constrained.choices[0].text == expected_regex
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60.0) == 0, server.log()[-3000:]
    assert "Traceback" not in server.log()
    _assert_gone(pids)
    assert _leftovers() == before


def test_killed_worker_gives_503_and_a_nonzero_exit(start_server, llama_dir):
    before = _leftovers()
    server = start_server(llama_dir, *TP_FLAGS, "--served-model-name", "doomed-tp")
    engine, workers = _tree(server)
    pids = [engine.pid, *(w.pid for w in workers)]
    started = threading.Event()
    lines: list[str] = []

    def stream() -> None:
        body = {"prompt": "Keep going", "max_tokens": 240, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body,
                              timeout=60.0) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
        finally:
            started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60.0)
    workers[1].kill()
    killed_at = time.monotonic()

    saw_503 = False
    while time.monotonic() - killed_at < 10.0 and not saw_503:
        try:
            saw_503 = httpx.get(server.url + "/health", timeout=6.0).status_code == 503
        except httpx.HTTPError:
            break   # already shut down
        time.sleep(0.05)
    assert saw_503, "/health never answered 503 after a worker died"
    thread.join(30.0)
    errors = [json.loads(line[5:]) for line in lines
              if line.startswith("data:") and '"error"' in line]
    assert errors and errors[0]["error"]["type"] == "ServiceUnavailableError", lines[-3:]
    assert lines[-1] == "data: [DONE]"

    returncode = server.proc.wait(timeout=30.0)
    assert returncode not in (0, None)
    log = server.log()
    assert last_line(log).startswith("error: the engine core died"), log[-2000:]
    assert "rank 1" in last_line(log) and "SIGKILL" in last_line(log)
    _assert_gone(pids)
    assert _leftovers() == before
