"""The data-parallel router (`sluice.frontend.dp_client.DPRouter`): least outstanding work,
prefix affinity within an imbalance bound, and its bookkeeping. No processes, milliseconds."""

from __future__ import annotations

import itertools
import time

from sluice.frontend.dp_client import DPRouter
from sluice.messages import EngineCoreOutput, EngineCoreRequest, FinishReason
from sluice.sampling_params import SamplingParams

BLOCK = 4
_ids = itertools.count()


def request(tokens: list[int], max_tokens: int = 8, salt: str | None = None
            ) -> EngineCoreRequest:
    return EngineCoreRequest(f"r{next(_ids)}", tokens, SamplingParams(max_tokens=max_tokens),
                             None, time.monotonic(), cache_salt=salt)


def route(router: DPRouter, req: EngineCoreRequest) -> int:
    engine = router.choose(req)
    router.add(req, engine)
    return engine


def test_balances_outstanding_requests_and_releases_them():
    router = DPRouter(2, BLOCK, 256)
    reqs = [request([i, i + 1]) for i in range(32)]   # shorter than a block: no affinity
    engines = [route(router, r) for r in reqs]
    assert engines.count(0) == engines.count(1) == 16
    assert router.loads == [16, 16] and router.tokens_owed == [16 * 10, 16 * 10]
    for r in reqs[:16]:   # a step's worth of outputs, then the first half finishes
        router.on_output(EngineCoreOutput(r.request_id, [7, 7]))
        router.on_output(EngineCoreOutput(r.request_id, [7], finish_reason=FinishReason.STOP))
    assert sum(router.loads) == 16
    for r in reqs[16:]:
        assert router.release(r.request_id) is not None   # aborted
        assert router.release(r.request_id) is None       # once
    assert router.loads == [0, 0] and router.tokens_owed == [0, 0]


def test_ties_in_requests_go_to_fewer_tokens_owed():
    router = DPRouter(2, BLOCK, 256)
    big = request([1], max_tokens=200)
    small = request([2], max_tokens=2)
    assert {route(router, big), route(router, small)} == {0, 1}
    router.release(small.request_id)
    router.add(request([3], max_tokens=1), router.engine_of(big.request_id) ^ 1)
    # both engines hold one request; the one without `big` owes fewer tokens
    assert router.choose(request([4])) == router.engine_of(big.request_id) ^ 1


def test_shared_prefix_sticks_to_one_engine_while_load_allows():
    router = DPRouter(2, BLOCK, 256, max_imbalance=2)
    prefix = list(range(100, 112))   # three full blocks
    first = route(router, request(prefix + [1, 2]))
    assert all(route(router, request(prefix + [9, i])) == first for i in range(2))
    # `first` holds 3 requests, the other none: beyond the bound, affinity gives way
    assert router.loads[first] == 3
    assert route(router, request(prefix + [5, 5])) != first


def test_the_longest_remembered_prefix_wins():
    router = DPRouter(3, BLOCK, 256, max_imbalance=0)   # affinity only to a least-loaded one
    short = list(range(8))                    # blocks a, b
    longer = short + list(range(50, 58))      # blocks a, b, c, d
    assert route(router, request([1])) == 0   # load on engine 0
    assert route(router, request(longer + [99])) == 1      # a, b, c, d -> 1
    assert route(router, request(short + [99])) == 2       # 1 is busier: a, b -> 2
    # every engine holds one request: d (engine 1) is the longest match, not b (engine 2)
    assert router.choose(request(longer + [1, 2])) == 1


def test_cache_salt_separates_prefixes():
    router = DPRouter(2, BLOCK, 256, max_imbalance=10)
    prompt = list(range(20))
    first = route(router, request(prompt))
    assert route(router, request(prompt)) == first
    assert route(router, request(prompt, salt="tenant-b")) != first   # no shared KV: load


def test_prefix_table_is_bounded_and_reset(monkeypatch):
    import sluice.frontend.dp_client as dp
    monkeypatch.setattr(dp, "MAX_AFFINITY_BLOCKS", 8)
    router = DPRouter(2, BLOCK, 256)
    for i in range(10):
        route(router, request([i * 1000 + t for t in range(9)]))   # two blocks each
    assert len(router._last_engine) == 8
    router.forget_prefixes()
    assert not router._last_engine


def test_each_engine_gets_its_rank_threads_and_rendezvous_port():
    from sluice.config_sources import build_engine_config
    from sluice.engine.launch import dp_engine_configs
    one = build_engine_config({"tensor_parallel_size": "2"}, env={})
    assert dp_engine_configs(one) == [one]
    dp = build_engine_config({"data_parallel_size": "3", "tensor_parallel_size": "2",
                              "num_threads": "6"}, env={})
    configs = dp_engine_configs(dp)
    assert [c.parallel.data_parallel_rank for c in configs] == [0, 1, 2]
    assert {c.device.num_threads for c in configs} == {2}
    ports = [c.parallel.master_port for c in configs]
    assert None not in ports and len(set(ports)) == 3
    fixed = build_engine_config({"data_parallel_size": "2", "tensor_parallel_size": "2",
                                 "master_port": "29600"}, env={})
    assert [c.parallel.master_port for c in dp_engine_configs(fixed)] == [29600, 29601]
    uni = build_engine_config({"data_parallel_size": "2"}, env={})   # no rendezvous at all
    assert [c.parallel.master_port for c in dp_engine_configs(uni)] == [None, None]
    external = build_engine_config({"data_parallel_size": "2", "data_parallel_rank": "1"},
                                   env={})
    assert dp_engine_configs(external) == [external]
