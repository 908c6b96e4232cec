"""`sluice router` (aggregated mode, item 5 of issue 16) in front of two live workers.

Two `sluice serve` workers (tiny llama, 16-token blocks, KV events on ipc:// sockets) and
router processes over them: kv mode keeps requests that share a long prefix on one worker (and
/metrics shows the predicted hits), round-robin alternates, greedy and streamed outputs equal
the worker's own, errors pass through, and the canary removes a dead worker and re-adds it
when it recovers (a stub worker in this process, killed and restarted on the same port, so no
third engine has to start), with registration through POST/DELETE /workers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from _sluice_server_helpers import _LAUNCH, free_port, server_env

BS = 16
pytestmark = pytest.mark.timeout(300)
PREFIX = ("You are a careful assistant for a public library. Answer questions about opening "
          "hours, borrowing rules, renewals, fines, room bookings and the catalogue. Be brief "
          "and polite, cite the rule you apply, and say when you do not know the answer. "
          "The library opens at nine and closes at six on weekdays, and at four on Saturday. ")


class RouterProcess:
    def __init__(self, log_path: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, "router", "--port", str(self.port),
             "--health-check-interval", "0.3", "--health-failure-threshold", "1",
             "--log-level", "debug", *flags],
            stdout=self._log, stderr=subprocess.STDOUT, env=server_env())

    def wait_ready(self, deadline_s: float = 60) -> "RouterProcess":
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"router not healthy:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def workers(self) -> dict[str, dict]:
        return {w["url"]: w for w in httpx.get(self.url + "/workers", timeout=10).json()["workers"]}

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def wait_for(predicate, what: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def workers(start_server, llama_dir, tmp_path_factory):
    """Two workers with KV events; returns [(server, --worker spec)]."""
    d = tmp_path_factory.mktemp("router-kv")
    out = []
    for i in range(2):
        pub, replay = f"ipc://{d}/pub{i}", f"ipc://{d}/replay{i}"
        cfg = {"enable_kv_cache_events": True, "endpoint": pub, "replay_endpoint": replay}
        server = start_server(llama_dir, "--block-size", str(BS), "--kv-events-config",
                              json.dumps(cfg), wait=False)
        out.append((server, f"{server.url},{pub},{replay}"))
    for server, _ in out:
        server.wait_ready()
    return out


@pytest.fixture(scope="module")
def start_router(tmp_path_factory):
    started: list[RouterProcess] = []

    def start(*flags: str) -> RouterProcess:
        router = RouterProcess(tmp_path_factory.mktemp("router") / "router.log", *flags)
        started.append(router)
        return router.wait_ready()

    yield start
    for router in started:
        router.stop()


@pytest.fixture(scope="module")
def kv_router(workers, start_router):
    router = start_router("--router-mode", "kv", *[a for _, s in workers for a in ("--worker", s)])
    wait_for(lambda: all(w["healthy"] for w in router.workers().values()), "both workers")
    return router


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def test_kv_mode_keeps_a_shared_prefix_on_one_worker(kv_router):
    n = httpx.post(kv_router.url + "/tokenize", json={"prompt": PREFIX}, timeout=30).json()
    assert 64 <= n["count"] <= 200, n                      # several 16-token blocks
    first = post(kv_router.url, "/v1/completions",
                 {"prompt": PREFIX + "Question 0?", "max_tokens": 2, "temperature": 0})
    assert first.status_code == 200, first.text
    home = first.headers["x-sluice-worker"]
    wait_for(lambda: kv_router.workers()[home]["kv_blocks"] >= 4, "the worker's KV events")
    for i in range(1, 5):
        r = post(kv_router.url, "/v1/completions",
                 {"prompt": PREFIX + f"Question {i}?", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-sluice-worker"] == home, r.headers
    # A chat conversation with a long shared system prompt sticks too (tokenized by a worker
    # with its chat template).
    messages = [{"role": "system", "content": PREFIX}]
    chat = [post(kv_router.url, "/v1/chat/completions",
                 {"messages": messages + [{"role": "user", "content": f"Hi {i}"}],
                  "max_tokens": 2, "temperature": 0}) for i in range(3)]
    assert all(r.status_code == 200 for r in chat), chat[0].text
    assert len({r.headers["x-sluice-worker"] for r in chat[1:]}) == 1
    assert kv_router.metric("sluice_router_routed_requests_total", worker=home, mode="kv") >= 5
    assert kv_router.metric("sluice_router_kv_overlap_blocks_total") >= 4 * 4
    assert kv_router.metric("sluice_router_kv_hit_rate") > 0.5
    assert kv_router.metric("sluice_router_worker_kv_blocks", worker=home) >= 4
    assert kv_router.metric("sluice_router_worker_outstanding_requests") == 0


def test_round_robin_alternates(workers, start_router):
    router = start_router("--router-mode", "round-robin",
                          *[a for _, s in workers for a in ("--worker", s)])
    wait_for(lambda: all(w["healthy"] for w in router.workers().values()), "both workers")
    seen = [post(router.url, "/v1/completions", {"prompt": "Hello", "max_tokens": 1}
                 ).headers["x-sluice-worker"] for _ in range(4)]
    assert seen[0] != seen[1] and seen[:2] == seen[2:], seen
    assert router.metric("sluice_router_routed_requests_total", mode="round-robin") == 4


def test_outputs_streams_and_errors_equal_direct(kv_router, workers):
    direct = workers[0][0].url
    body = {"prompt": PREFIX + "When does it close?", "max_tokens": 12, "temperature": 0}
    a = post(kv_router.url, "/v1/completions", body).json()
    b = post(direct, "/v1/completions", body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"] == b["usage"]

    def streamed(url: str, path: str, req: dict) -> tuple[str, list[str]]:
        text, lines = "", []
        with httpx.stream("POST", url + path, json={**req, "stream": True}, timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        return text, lines

    via, via_lines = streamed(kv_router.url, "/v1/completions", body)
    own, own_lines = streamed(direct, "/v1/completions", body)
    assert via == own == b["choices"][0]["text"] and via_lines[-1] == "data: [DONE]"
    assert len(via_lines) == len(own_lines)
    chat = {"messages": [{"role": "user", "content": "Opening hours?"}], "max_tokens": 8,
            "temperature": 0}
    assert streamed(kv_router.url, "/v1/chat/completions", chat)[0] == \
        streamed(direct, "/v1/chat/completions", chat)[0]

    bad = {"prompt": "x", "max_tokens": -1}
    r1, r2 = post(kv_router.url, "/v1/completions", bad), post(direct, "/v1/completions", bad)
    assert r1.status_code == r2.status_code == 400 and r1.json() == r2.json()
    models = httpx.get(kv_router.url + "/v1/models", timeout=30)
    assert models.status_code == 200 and models.json()["data"]


def test_client_leaving_a_stream_frees_the_worker(kv_router, workers):
    """A client that closes a stream early: the router closes its upstream, so the worker
    aborts the request (nothing left running) and the router's load returns to 0."""
    body = {"prompt": "Tell me a long story.", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", kv_router.url + "/v1/completions", json=body, timeout=120) as r:
        worker = r.headers["x-sluice-worker"]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    wait_for(lambda: kv_router.metric("sluice_router_worker_outstanding_requests") == 0,
             "the router to release the request")

    def idle() -> bool:
        text = httpx.get(worker + "/metrics", timeout=10).text
        running = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:num_requests_running")]
        return bool(running) and sum(running) == 0
    wait_for(idle, "the worker to abort the abandoned request")


class _StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200 if self.path == "/health" else 404)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._send(200, {"id": "stub", "object": "text_completion", "created": 0,
                         "model": "stub", "choices": [{"index": 0, "text": "stub",
                                                       "finish_reason": "length"}]})


class StubWorker:
    """A stand-in worker on a fixed port that can be killed and brought back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _StubHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None


def test_canary_removes_a_dead_worker_and_readds_it(workers, start_router):
    real = workers[0][0].url
    router = start_router("--router-mode", "round-robin", "--worker", real)
    stub = StubWorker()
    stub.start()
    try:
        r = httpx.post(router.url + "/workers", json={"url": stub.url + "/"}, timeout=10)
        assert r.status_code == 201 and r.json()["healthy"], r.text
        hit = {post(router.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}
                    ).headers["x-sluice-worker"] for _ in range(2)}
        assert hit == {real, stub.url}

        stub.kill()
        wait_for(lambda: not router.workers()[stub.url]["healthy"], "the canary to notice")
        for _ in range(4):   # every request still succeeds, on the live worker
            r = post(router.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
            assert r.status_code == 200 and r.headers["x-sluice-worker"] == real
        assert router.metric("sluice_router_worker_healthy", worker=stub.url) == 0

        stub.start()
        wait_for(lambda: router.workers()[stub.url]["healthy"], "the canary to re-add it")
        hit = {post(router.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}
                    ).headers["x-sluice-worker"] for _ in range(2)}
        assert hit == {real, stub.url}

        assert httpx.request("DELETE", router.url + "/workers", json={"url": stub.url},
                             timeout=10).status_code == 200
        assert list(router.workers()) == [real]
        assert httpx.delete(router.url + "/workers", params={"url": stub.url},
                            timeout=10).status_code == 404
    finally:
        if stub.server is not None:
            stub.kill()


def test_a_refused_connection_fails_over_before_the_canary(workers, start_router):
    """A worker that dies between canary rounds costs no request: the connection is refused,
    the router marks it down and sends the request to the other worker."""
    real = workers[0][0].url
    stub = StubWorker()
    stub.start()
    router = start_router("--router-mode", "round-robin", "--health-check-interval", "30",
                          "--worker", stub.url, "--worker", real)
    stub.kill()
    for _ in range(3):
        r = post(router.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-sluice-worker"] == real
    assert router.metric("sluice_router_worker_errors_total", worker=stub.url,
                         kind="connect") == 1


def test_api_key(workers, start_router):
    router = start_router("--api-key", "router-key", "--router-mode", "least-load",
                          "--worker", workers[0][1])
    wait_for(lambda: httpx.get(router.url + "/health", timeout=10).status_code == 200, "health")
    body = {"prompt": "Hello", "max_tokens": 1}
    r = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert httpx.get(router.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(router.url + "/workers", timeout=10).status_code == 401
    r = httpx.post(router.url + "/v1/completions", json=body, timeout=60,
                   headers={"Authorization": "Bearer router-key"})
    assert r.status_code == 200, r.text
