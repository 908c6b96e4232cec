"""Disaggregated prefill/decode (issue 16, items 3-5): `sluice router --prefill --decode` over a
prefill worker (kv_producer) and a decode worker (kv_consumer) of the tiny llama, the KV moving
over ZeroMQ/TCP (ZmqPullConnector).

One deployment per module: prefill P, decode D, router R (disaggregated). The prefill worker,
asked directly without kv_transfer_params, is the aggregated reference: greedy outputs through
R must equal it token for token (short prompts, prompts long enough to be prefilled in chunks,
shared prefixes; completions and streamed chat). A transfer pointed at a dead port falls back to
recompute on D (same output, the failure counter moves) and P frees the blocks it held when the
lease ends; killing D mid-stream (the last test) gives the client an error event, and P's blocks
are freed. Every test leaves the engines' KV caches empty again (`vllm:kv_cache_usage_perc` 0).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from _sluice_server_helpers import free_port
from test_router import RouterProcess, wait_for

pytestmark = pytest.mark.timeout(300)
BS = 16
LEASE_S = 3.0
PREFIX = ("You are a careful assistant for a public library. Answer questions about opening "
          "hours, borrowing rules, renewals, fines and room bookings. Be brief and polite. ")
PROMPTS = ["Hi", PREFIX + "When does it close on Saturday?",  # short; chunked (32-token steps)
           PREFIX + "How many books may I borrow?", PREFIX * 3 + "Can I renew online?"]


def kv_config(role: str, **extra) -> str:
    return json.dumps({"kv_connector": "ZmqPullConnector", "kv_role": role,
                       "kv_ip": "127.0.0.1", "kv_port": free_port(),
                       "kv_connector_extra_config": {"lease_seconds": LEASE_S,
                                                     "transfer_timeout_seconds": 1.0, **extra}})


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$",
                                                      text, re.M))


def idle(url: str) -> bool:
    return metric(url, "vllm:kv_cache_usage_perc") == 0.0


@pytest.fixture(scope="module")
def deployment(start_server, llama_dir, tmp_path_factory):
    flags = ("--block-size", str(BS), "--max-num-batched-tokens", "32")
    prefill = start_server(llama_dir, *flags, "--kv-transfer-config", kv_config("kv_producer"),
                           wait=False)
    decode = start_server(llama_dir, *flags, "--kv-transfer-config", kv_config("kv_consumer"),
                          wait=False)
    for server in (prefill, decode):
        server.wait_ready()
    router = RouterProcess(tmp_path_factory.mktemp("disagg") / "router.log",
                           "--prefill", prefill.url, "--decode", decode.url).wait_ready()
    wait_for(lambda: all(w["healthy"] for w in router.workers().values()), "both workers")
    yield prefill, decode, router
    router.stop()


def complete(url: str, prompt: str, **extra) -> dict:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_outputs_equal_one_aggregated_engine(deployment):
    prefill, decode, router = deployment
    assert metric(router.url, "sluice_router_disagg_kv_transfers_total") == 0
    for prompt in PROMPTS:
        via = complete(router.url, prompt)
        ref = complete(prefill.url, prompt)
        assert via["choices"][0]["text"] == ref["choices"][0]["text"], prompt
        assert via["usage"] == ref["usage"]
        assert "kv_transfer_params" not in via
    # a streamed chat through both hops equals the reference
    body = {"messages": [{"role": "user", "content": PREFIX + "Fines?"}], "max_tokens": 10,
            "temperature": 0}
    text = ""
    with httpx.stream("POST", router.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    ref = httpx.post(prefill.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert text == ref["choices"][0]["message"]["content"]
    n = len(PROMPTS) + 1
    assert metric(router.url, "sluice_router_disagg_kv_transfers_total") == n
    assert metric(decode.url, "vllm:kv_transfer_latency_seconds_count") == n
    assert metric(decode.url, "vllm:kv_transfer_bytes_total") > 0
    assert metric(decode.url, "vllm:kv_transfer_failures_total") == 0
    assert metric(router.url, "sluice_router_worker_kv_transfer_bytes_total") > 0
    wait_for(lambda: idle(prefill.url) and idle(decode.url), "idle KV caches", LEASE_S + 10)


def test_failed_transfer_recomputes_and_the_lease_frees_the_blocks(deployment):
    prefill, decode, _ = deployment
    prompt = PREFIX + "Where is the reading room?"
    held = complete(prefill.url, prompt, max_tokens=1,
                    kv_transfer_params={"do_remote_decode": True})["kv_transfer_params"]
    assert held["do_remote_prefill"] and held["remote_block_ids"]
    assert held["kv_layout"]["block_size"] == BS
    assert not idle(prefill.url)                      # blocks held for a consumer
    failures = metric(decode.url, "vllm:kv_transfer_failures_total")
    dead = {**held, "remote_port": free_port()}       # nobody listens there
    out = complete(decode.url, prompt, kv_transfer_params=dead)
    assert out["choices"][0]["text"] == complete(prefill.url, prompt)["choices"][0]["text"]
    assert metric(decode.url, "vllm:kv_transfer_failures_total") == failures + 1
    # another layout is refused without a pull, and recomputed
    other = {**held, "kv_layout": {**held["kv_layout"], "head_dim": 7}}
    again = complete(decode.url, prompt, kv_transfer_params=other)
    assert again["choices"][0]["text"] == out["choices"][0]["text"]
    assert metric(decode.url, "vllm:kv_transfer_failures_total") == failures + 2
    # nobody pulled: the lease frees the prefill's blocks
    wait_for(lambda: idle(prefill.url) and idle(decode.url), "the lease to expire", LEASE_S + 10)


def test_malformed_params_are_400s(deployment):
    prefill, decode, router = deployment
    for url, params, param in (
            (decode.url, {"do_remote_prefill": True}, "kv_transfer_params.remote_host"),
            (decode.url, {"do_remote_decode": True}, "kv_transfer_params.do_remote_decode"),
            (prefill.url, {"bogus": 1}, "kv_transfer_params.bogus"),
            (router.url, {"do_remote_decode": True}, "kv_transfer_params")):
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2,
                                                      "kv_transfer_params": params}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert idle(prefill.url) and idle(decode.url)


def test_decode_worker_killed_mid_stream(deployment):
    """The module's last test: it kills the decode worker."""
    prefill, decode, router = deployment
    lines = []
    with httpx.stream("POST", router.url + "/v1/completions",
                      json={"prompt": PREFIX, "max_tokens": 120, "temperature": 0,
                            "ignore_eos": True, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if len(lines) == 2:
                decode.proc.kill()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == 502 and decode.url in error["message"]
    wait_for(lambda: idle(prefill.url), "the prefill's blocks to be freed", LEASE_S + 10)
    # with no decode worker left, the router answers 503 naming the role
    wait_for(lambda: not router.workers()[decode.url]["healthy"], "the canary")
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 503 and "decode worker" in r.json()["error"]["message"]
    wait_for(lambda: idle(prefill.url), "the prefill's blocks to be freed", LEASE_S + 10)
