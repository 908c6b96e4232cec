"""Data parallelism (--data-parallel-size 2) behind one frontend: two real engine-core
processes under one `DPAsyncMPClient` (through `LLM` / `SyncMPClient`).

Checked: 32 concurrent requests are spread over both engines (>= 40 % each, from the
`engine_index` the outputs carry) and their greedy tokens equal one engine's; requests sharing
a prefix, sent while the engines are idle, all go to one engine, hit its prefix cache, and that
engine's KV events (on its own, rank-shifted endpoint) carry its rank; utility calls reach both
engines; a failing start names the engine; killing one engine core fails the in-flight
requests with an error naming it and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import zmq

from sluice.core.kv_cache.events import BlockStored, batch_decoder
from sluice.core.kv_cache.hashing import hash_token_blocks
from sluice.errors import EngineDeadError, EngineStartupError
from sluice.frontend.llm import LLM
from sluice.frontend.sync_client import SyncMPClient
from sluice.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import engine_children, make_config

pytestmark = pytest.mark.timeout(240)

BS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def events_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dp-kv-events")


@pytest.fixture(scope="module")
def dp_llm(llama_dir, events_dir):
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
              "endpoint": f"ipc://{events_dir}/pub"}
    llm = LLM(config=make_config(llama_dir, data_parallel_size=2, block_size=BS,
                                 enable_sleep_mode=True, kv_events_config=json.dumps(events)))
    yield llm
    llm.shutdown()


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + j) % 500 + 3 for j in range(3 + i % 9)] for i in range(n)]


def run(client, token_lists: list[list[int]], params=GREEDY, tag: str = "r"
        ) -> tuple[dict[str, list[int]], dict[str, int], dict[str, int]]:
    """Send all at once; return tokens, engine index and cached prompt tokens per request."""
    for i, ids in enumerate(token_lists):
        client.add_request(EngineCoreRequest(f"{tag}{i}", ids, params, None, time.monotonic()))
    tokens: dict[str, list[int]] = {}
    engine: dict[str, int] = {}
    cached: dict[str, int] = {}
    done: set[str] = set()
    while len(done) < len(token_lists):
        outputs = client.get_output(timeout_s=60)
        if outputs.scheduler_stats is not None:
            assert outputs.scheduler_stats.engine_index == outputs.engine_index
        for out in outputs.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert engine.setdefault(out.request_id, outputs.engine_index) == \
                outputs.engine_index
            cached[out.request_id] = max(cached.get(out.request_id, 0), out.num_cached_tokens)
            if out.finished:
                done.add(out.request_id)
    return tokens, engine, cached


def test_requests_spread_over_both_engines_with_dp1_outputs(dp_llm, llama_dir):
    client = dp_llm.client
    assert client.client.engine_indexes == (0, 1) and len(client.processes) == 2
    token_lists = prompts(32)
    tokens, engine, _ = run(client, token_lists)
    per_engine = Counter(engine.values())
    assert min(per_engine[0], per_engine[1]) >= 0.4 * 32, per_engine

    with LLM(config=make_config(llama_dir, block_size=BS)) as one:
        reference = one.generate([{"prompt_token_ids": ids} for ids in token_lists], GREEDY,
                                 use_tqdm=False)
        assert [tokens[f"r{i}"] for i in range(32)] == [o.outputs[0].token_ids
                                                        for o in reference]
        texts = ["The function returns", "A list is", "x", "Raises an exception when"]
        params = SamplingParams(temperature=0.0, max_tokens=8)
        assert [o.outputs[0].text for o in dp_llm.generate(texts, params, use_tqdm=False)] == \
            [o.outputs[0].text for o in one.generate(texts, params, use_tqdm=False)]


def subscribe(endpoint: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(endpoint)
    return ctx, sub


def stored_events(sub: zmq.Socket) -> list[tuple[int | None, BlockStored]]:
    decoder, found = batch_decoder(), []
    while sub.poll(500):
        _, _, payload = sub.recv_multipart()
        batch = decoder.decode(payload)
        found += [(batch.data_parallel_rank, e) for e in batch.events
                  if isinstance(e, BlockStored)]
    return found


def test_shared_prefix_sticks_to_one_engine_and_hits_its_cache(dp_llm, events_dir):
    client = dp_llm.client
    assert client.reset_prefix_cache()
    subs = [subscribe(f"ipc://{events_dir}/pub"), subscribe(f"ipc://{events_dir}/pub_dp1")]
    time.sleep(0.3)   # let the subscriptions reach the publishers
    prefix = [(11 * j) % 400 + 5 for j in range(3 * BS)]
    engines, cached = [], []
    for i in range(5):   # one at a time: the engines are idle, so the load is balanced
        _, engine, hits = run(client, [prefix + [i + 1, i + 2]], tag=f"p{i}-")
        engines.append(engine[f"p{i}-0"])
        cached.append(hits[f"p{i}-0"])
    assert len(set(engines)) == 1, engines
    assert cached[0] == 0 and all(c == 3 * BS for c in cached[1:]), cached
    chosen = engines[0]
    first_block = hash_token_blocks(prefix, BS)[0]
    try:
        events = [stored_events(sub) for _, sub in subs]
    finally:
        for ctx, _ in subs:
            ctx.destroy(linger=0)
    assert any(first_block in e.block_hashes for _, e in events[chosen])
    assert {rank for rank, _ in events[chosen]} == {chosen}
    assert not any(first_block in e.block_hashes for _, e in events[1 - chosen])


def test_utility_calls_reach_every_engine(dp_llm):
    client = dp_llm.client
    assert client.ping() < 10.0
    client.check_health()
    client.sleep(1)
    assert client.sleep_level() == 1
    client.wake_up()
    assert client.sleep_level() == 0
    tokens, engine, _ = run(client, prompts(4), tag="after-wake-")
    assert len(tokens) == 4


def test_a_failing_engine_start_names_it_and_stops_all(tmp_path):
    before = {c.pid for c in engine_children()}   # the module's engines, if started
    with pytest.raises(EngineStartupError,
                       match=r"^data-parallel engine \d: Model path .* does not exist"):
        SyncMPClient(make_config(tmp_path / "missing", data_parallel_size=2))
    assert {c.pid for c in engine_children()} <= before


def test_each_engine_may_be_tensor_parallel(llama_dir):
    """-dp 2 -tp 2: two engines with two worker processes each (their own rendezvous ports),
    greedy outputs as one engine's; shutdown leaves no process."""
    texts = ["The function returns", "A list is", "x", "Raises an exception when"]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    with LLM(config=make_config(llama_dir, data_parallel_size=2, tensor_parallel_size=2)) as llm:
        configs = [p.config.parallel for p in llm.client.processes]
        assert len({c.master_port for c in configs}) == 2
        got = [o.outputs[0].token_ids for o in llm.generate(texts, params, use_tqdm=False)]
    with LLM(config=make_config(llama_dir)) as one:
        assert got == [o.outputs[0].token_ids
                       for o in one.generate(texts, params, use_tqdm=False)]


def test_killing_one_engine_fails_requests_and_leaves_nothing(dp_llm):
    """Last: it kills the module's engines."""
    client = dp_llm.client
    pids = [p.pid for p in client.processes]
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for i, ids in enumerate(prompts(4)):
        client.add_request(EngineCoreRequest(f"k{i}", ids, long, None, time.monotonic()))
    assert client.get_output(timeout_s=60).outputs
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(EngineDeadError, match=r"data-parallel engine 1 \(of 2\).*SIGKILL"):
        while True:
            client.get_output(timeout_s=30)
    assert client.is_dead
    with pytest.raises(EngineDeadError, match="data-parallel engine 1"):
        client.check_health()
    dp_llm.shutdown()
    assert engine_children() == []
