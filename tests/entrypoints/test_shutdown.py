"""SIGTERM on a live server: new requests get 503 in OpenAI's shape, in-flight requests run on
for --shutdown-timeout, the rest end with an error (JSON 503, or an error event and [DONE] on a
stream), and the process exits 0 with no traceback and no engine process left behind."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil

from test_http_errors import assert_error

EXIT_BOUND_S = 60.0
LONG = {"prompt": "Tell me a very long story", "max_tokens": 1000, "ignore_eos": True}


def _wait_draining(url: str) -> None:
    """Until /health answers 503 (the signal has been handled and the drain begun)."""
    deadline = time.monotonic() + 20.0
    while httpx.get(url + "/health", timeout=10.0).status_code != 503:
        assert time.monotonic() < deadline, "the server did not start draining"
        time.sleep(0.05)


def _assert_clean_exit(server, engine_pids: list[int]) -> None:
    assert server.proc.wait(timeout=EXIT_BOUND_S) == 0, server.log()[-3000:]
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert "Shut down on SIGTERM" in log
    for pid in engine_pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid


def _data_events(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_sigterm_ends_long_requests_with_errors_and_exits_0(start_server, llama_dir):
    server = start_server(llama_dir, "--max-model-len", "1024", "--shutdown-timeout", "0.2")
    engine_pids = server.engine_pids()
    streams: list[list[str]] = [[] for _ in range(3)]
    started = [threading.Event() for _ in range(3)]
    plain: list[httpx.Response | None] = [None] * 3

    def stream(i: int) -> None:
        with httpx.stream("POST", server.url + "/v1/completions",
                          json={**LONG, "stream": True}, timeout=120.0) as response:
            for line in response.iter_lines():
                streams[i].append(line)
                started[i].set()

    def post(i: int) -> None:
        plain[i] = httpx.post(server.url + "/v1/chat/completions", timeout=120.0, json={
            "messages": [{"role": "user", "content": LONG["prompt"]}],
            "max_tokens": LONG["max_tokens"], "ignore_eos": True})

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=post, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(60.0)
    time.sleep(0.3)  # the non-streaming ones are admitted too
    server.proc.send_signal(signal.SIGTERM)
    # The 503 for new requests is checked in the next test: with a 0.2 s grace period the
    # drain here may be over before a new request arrives on a busy machine.
    for thread in threads:
        thread.join(timeout=EXIT_BOUND_S)
        assert not thread.is_alive()
    for response in plain:
        assert response is not None
        assert_error(response, 503, "ServiceUnavailableError")
    for lines in streams:
        events = _data_events(lines)
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["type"] == "ServiceUnavailableError" and "shutting down" in error["message"]
        assert len(events) >= 3  # some tokens were streamed before the error
    _assert_clean_exit(server, engine_pids)


def test_sigterm_lets_in_flight_requests_finish(start_server, llama_dir):
    server = start_server(llama_dir, "--max-model-len", "1024", "--shutdown-timeout", "60")
    engine_pids = server.engine_pids()
    # Long enough (about a thousand engine steps) that the drain is still waiting for it while
    # the test checks /health and a new request; a busier machine only widens that window.
    body = {"prompt": "Count slowly", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      timeout=120.0) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        server.proc.send_signal(signal.SIGTERM)
        _wait_draining(server.url)
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
        assert "shutting down" in assert_error(refused, 503,
                                               "ServiceUnavailableError")["message"]
        events = _data_events([first, *lines])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"]) >= 2
    start = time.monotonic()
    _assert_clean_exit(server, engine_pids)
    assert time.monotonic() - start < 30.0  # it did not sit out the 60 s grace period


def test_a_signal_before_the_server_runs_drains_it_once_it_starts(llama_dir, caplog):
    """A SIGTERM that arrives after the engine is up but before uvicorn serves (while the app
    is built and the server starts) was recorded and then ignored: the server came up and
    served on. Now it is handed to the server as soon as it runs, which drains and returns."""
    import asyncio
    import logging
    import os

    from sluice import event_loop
    from sluice.config_sources import build_engine_config
    from sluice.entrypoints.serve_cmd import _Signals, bind_socket, serve_engine, start_engine

    config = build_engine_config(overrides={"model": str(llama_dir), "max_model_len": 256,
                                            "kv_cache_memory": "16MiB"}, env={})
    engine = start_engine(config)
    sock = bind_socket("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.INFO, logger="sluice"), _Signals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)    # handled by _Signals: recorded
            deadline = time.monotonic() + 10
            while not signals.received and time.monotonic() < deadline:
                time.sleep(0.01)
            assert signals.received == [signal.SIGTERM]
            serving = serve_engine(engine, config, sock, None, signals)
            # without the hand-over the server would serve on: bounded, so that fails here
            assert event_loop.run(asyncio.wait_for(serving, EXIT_BOUND_S)) == 0
    finally:
        engine.shutdown()
        sock.close()
    assert "Shut down on SIGTERM" in caplog.text


def test_a_second_sigterm_ends_the_grace_period_cleanly(start_server, llama_dir):
    """The second signal during a drain ends its grace period (here 600 s, far beyond the exit
    bound): the in-flight stream gets its error event and [DONE] at once, and the server exits
    0 with no traceback (before, uvicorn's force exit cancelled the stream's task and the app's
    lifespan at loop close, each logged as a CancelledError traceback)."""
    server = start_server(llama_dir, "--max-model-len", "1024", "--shutdown-timeout", "600")
    engine_pids = server.engine_pids()
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True},
                          timeout=120.0) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    _wait_draining(server.url)      # draining: the stream would run on for 600 s
    server.proc.send_signal(signal.SIGTERM)
    _assert_clean_exit(server, engine_pids)
    thread.join(timeout=30)
    events = _data_events(lines)
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
    assert "Second signal: ending the 1 in-flight sequence(s) now" in server.log()
