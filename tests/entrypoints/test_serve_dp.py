"""`sluice serve -dp 2`: two engine cores behind one API server, and `--data-parallel-rank`
(vLLM's external load balancing: one engine of a group as its own server).

Checked with live servers: 32 concurrent requests are spread over both engines (>= 25 % each,
from the per-engine `vllm:request_success_total{engine=...}`), with greedy text identical to a
single engine's (the rank-1 server, which runs one engine and labels its metrics engine="1");
a client that disconnects mid-stream has its request aborted on the engine that holds it;
killing one engine core mid-stream fails the in-flight requests with 503-type errors, /health
answers 503, the server exits non-zero with one `error:` line and no process is left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from _sluice_server_helpers import last_line

pytestmark = pytest.mark.timeout(300)

PROMPTS = [f"Item {i}: the {word} of" for i, word in
           enumerate(["list", "function", "module", "value", "class", "loop", "file",
                      "string"] * 4)]
GREEDY = {"max_tokens": 8, "temperature": 0.0}


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def complete_all(server, prompts: list[str]) -> list[str]:
    def one(prompt: str) -> str:
        response = httpx.post(server.url + "/v1/completions", timeout=120.0,
                              json={"prompt": prompt, **GREEDY})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def dp_server(start_server, llama_dir):
    return start_server(llama_dir, "-dp", "2")


@pytest.fixture(scope="module")
def dp_texts(dp_server) -> list[str]:
    return complete_all(dp_server, PROMPTS)


def test_requests_spread_over_both_engines(dp_server, dp_texts):
    assert len(dp_server.engine_pids()) == 2
    text = httpx.get(dp_server.url + "/metrics").text
    served = [metric(text, "vllm:request_success_total", engine=str(i)) for i in (0, 1)]
    # least-loaded routing: the faster engine (on a busy machine) may take more, never all
    assert sum(served) == len(PROMPTS) and min(served) >= 0.25 * len(PROMPTS), served
    for i in (0, 1):   # every engine has its own series
        assert f'vllm:kv_cache_usage_perc{{engine="{i}"' in text
        assert metric(text, "vllm:generation_tokens_total", engine=str(i)) > 0


def test_rank_server_runs_one_engine_labelled_with_its_rank(start_server, llama_dir,
                                                            dp_texts):
    server = start_server(llama_dir, "--data-parallel-size", "2", "--data-parallel-rank", "1")
    assert len(server.engine_pids()) == 1
    assert complete_all(server, PROMPTS) == dp_texts   # one engine's greedy text == DP=2's
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "vllm:request_success_total", engine="1") == len(PROMPTS)
    assert 'engine="0"' not in text
    assert "Data-parallel rank 1 of 2" in server.log()


def test_disconnect_aborts_on_the_engine_holding_the_request(dp_server):
    body = {"prompt": "Tell me a long story", "max_tokens": 230, "ignore_eos": True,
            "stream": True}
    before = metric(httpx.get(dp_server.url + "/metrics").text, "vllm:request_success_total",
                    finished_reason="abort")
    with httpx.stream("POST", dp_server.url + "/v1/completions", json=body,
                      timeout=60.0) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data:")
            if received >= 3:
                break   # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20.0
    while True:
        text = httpx.get(dp_server.url + "/metrics").text
        if (metric(text, "vllm:request_success_total", finished_reason="abort") >= before + 1
                and metric(text, "vllm:num_requests_running") == 0
                and metric(text, "vllm:kv_cache_usage_perc") == 0.0):
            return
        assert time.monotonic() < deadline, "the request was not aborted in its engine"
        for prompt in ("x", "y"):   # make both engines step and report fresh stats
            httpx.post(dp_server.url + "/v1/completions", json={"prompt": prompt,
                                                                "max_tokens": 1})
        time.sleep(0.3)


def test_one_engine_dying_fails_requests_and_stops_the_server(dp_server):
    """Last: it ends the module's server."""
    streams: list[list[str]] = [[], []]
    started = [threading.Event(), threading.Event()]

    def stream(i: int) -> None:
        body = {"prompt": f"Keep going {i}", "max_tokens": 230, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", dp_server.url + "/v1/completions", json=body,
                              timeout=60.0) as response:
                for line in response.iter_lines():
                    if line:
                        streams[i].append(line)
                        started[i].set()
        except httpx.HTTPError:
            pass
        started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    assert all(e.wait(30.0) for e in started)
    pids = dp_server.engine_pids()
    workers = [p.pid for pid in pids for p in psutil.Process(pid).children(recursive=True)]
    os.kill(pids[-1], signal.SIGKILL)

    saw_503, deadline = False, time.monotonic() + 10.0
    while time.monotonic() < deadline and not saw_503:
        try:
            saw_503 = httpx.get(dp_server.url + "/health", timeout=6.0).status_code == 503
        except httpx.HTTPError:
            break
        time.sleep(0.05)
    assert saw_503, "/health never answered 503 after an engine died"
    for t in threads:
        t.join(30.0)
    for lines in streams:   # both streams, on either engine, end with a clear error
        errors = [json.loads(line[5:]) for line in lines
                  if line.startswith("data:") and '"error"' in line]
        assert errors and errors[0]["error"]["type"] == "ServiceUnavailableError", lines[-3:]
        assert lines[-1] == "data: [DONE]"
    assert dp_server.proc.wait(timeout=30.0) not in (0, None)
    line = last_line(dp_server.log())
    assert line.startswith("error: the engine core died") and "data-parallel engine" in line
    deadline = time.monotonic() + 15.0
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in pids + workers):
        assert time.monotonic() < deadline, "engine processes left behind"
        time.sleep(0.1)
