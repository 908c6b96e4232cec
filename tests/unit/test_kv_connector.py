"""The KV-connector scheduler hooks (`core/sched/hooks.py`, `kv_transfer/zmq_pull.py`) with
hand-written worker reports, and `--kv-transfer-config` / `kv_transfer_params` validation. No
torch, no sockets: milliseconds."""

from __future__ import annotations

import pytest

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.request import Request, RequestStatus
from sluice.core.sched.scheduler import Scheduler
from sluice.errors import ConfigError, InvalidRequestError
from sluice.kv_transfer.config import parse_kv_transfer_config
from sluice.kv_transfer.connector import ConnectorSchedulerHooks
from sluice.kv_transfer.metadata import KVConnectorOutput
from sluice.kv_transfer.params import check_for_server, prompt_digest
from sluice.kv_transfer.zmq_pull import ZmqPullScheduler
from sluice.sampling_params import SamplingParams
from sluice.step import ModelRunnerOutput

BS = 4
LAYOUT = {"model": "m", "dtype": "auto", "kv_cache_dtype": "auto", "block_size": BS,
          "num_kv_heads": 2, "head_dim": 8, "num_layers": 2, "tp_size": 1}


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def make(role: str, num_blocks: int = 32, lease: float = 30.0, clock: Clock | None = None):
    config = parse_kv_transfer_config({"kv_connector": "ZmqPullConnector", "kv_role": role,
                                       "kv_port": 20000, "engine_id": "e0",
                                       "kv_connector_extra_config": {"lease_seconds": lease}})
    connector = ZmqPullScheduler(config, dict(LAYOUT), BS, clock=clock or Clock())
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
                      CacheConfig(block_size=BS), max_model_len=64, num_kv_blocks=num_blocks,
                      hooks=ConnectorSchedulerHooks(connector))
    return sched, connector


def request(rid: str, prompt: list[int], params: dict | None = None,
            max_tokens: int = 4) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), None,
                   0.0, kv_transfer_params=params)


def remote_params(prompt: list[int], **changes) -> dict:
    params = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 20000,
              "remote_block_ids": list(range(11, 11 + -(-len(prompt) // BS))),
              "remote_request_id": "p-1", "remote_num_tokens": len(prompt),
              "remote_prompt_digest": prompt_digest(prompt), "kv_layout": dict(LAYOUT)}
    params.update(changes)
    return params


def output(so, sampled: dict[str, list[int]] | None = None, **kv) -> ModelRunnerOutput:
    tokens = {rid: [] for rid in so.num_scheduled_tokens}
    tokens.update(sampled or {})
    return ModelRunnerOutput(sampled_token_ids=tokens,
                             kv_connector_output=KVConnectorOutput(**kv) if kv else None)


PROMPT = list(range(1, 11))   # 10 tokens: 3 blocks of 4


def test_waiting_for_remote_kv_keeps_blocks_and_is_not_scheduled_until_loaded():
    sched, _ = make("kv_consumer")
    idle = sched.kv_cache_manager.get_num_free_blocks()
    sched.add_request(request("d", PROMPT, remote_params(PROMPT)))
    so = sched.schedule()
    req = sched.waiting_for_remote_kv["d"][0]
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert so.num_scheduled_tokens == {}
    loads = so.kv_connector_metadata.loads
    assert [(ld.request_id, ld.remote_block_ids, ld.remote_request_id) for ld in loads] == [
        ("d", [11, 12, 13], "p-1")]
    assert loads[0].local_block_ids == sched.kv_cache_manager.get_block_ids("d")
    assert sched.kv_cache_manager.get_num_free_blocks() == idle - 3
    # steps without the worker's report: neither scheduled nor freed, and no prefix-cache hit
    # on blocks whose KV has not arrived
    sched.update_from_output(so, output(so))
    for _ in range(2):
        so = sched.schedule()
        assert so.num_scheduled_tokens == {} and so.kv_connector_metadata is None
        sched.update_from_output(so, output(so))
    assert sched.kv_cache_manager.get_num_free_blocks() == idle - 3
    assert sched.has_unfinished_requests()
    other = request("o", PROMPT)
    other.set_block_hasher(sched.block_hasher)
    assert sched.kv_cache_manager.get_computed_blocks(other) == ([], 0)
    # the load finishes: scheduled with all but the last prompt token computed
    so = sched.schedule()
    sched.update_from_output(so, output(so, finished_recving=["d"], bytes_received=999,
                                        transfer_seconds=[0.01]))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"d": 1}
    assert so.scheduled_new_reqs[0].num_computed_tokens == len(PROMPT) - 1
    outs = sched.update_from_output(so, output(so, {"d": [7]}))
    assert outs[0].new_token_ids == [7] and outs[0].num_cached_tokens == len(PROMPT) - 1
    stats = sched.make_stats()
    assert (stats.kv_transfer_bytes, stats.kv_transfer_seconds, stats.kv_transfer_failures) == (
        999, [0.01], 0)
    # now the loaded full blocks are in the prefix cache
    assert sched.kv_cache_manager.get_computed_blocks(other)[1] == 8


def test_failed_load_recomputes_the_whole_prompt_and_counts_a_failure():
    sched, _ = make("kv_consumer")
    idle = sched.kv_cache_manager.get_num_free_blocks()
    sched.add_request(request("d", PROMPT, remote_params(PROMPT), max_tokens=1))
    so = sched.schedule()
    sched.update_from_output(so, output(so, failed_recving=["d"]))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"d": len(PROMPT)}
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0
    assert so.kv_connector_metadata is None
    outs = sched.update_from_output(so, output(so, {"d": [5]}))
    assert outs[0].finished and outs[0].kv_transfer_params is None
    assert sched.make_stats().kv_transfer_failures == 1
    assert sched.kv_cache_manager.get_num_free_blocks() == idle
    assert not sched.has_unfinished_requests()


@pytest.mark.parametrize("change", [{"kv_layout": {**LAYOUT, "head_dim": 16}},
                                    {"remote_num_tokens": 9},
                                    {"remote_prompt_digest": "00"}])
def test_mismatched_params_fall_back_to_local_compute(change):
    sched, _ = make("kv_consumer")
    sched.add_request(request("d", PROMPT, remote_params(PROMPT, **change)))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"d": len(PROMPT)} and so.kv_connector_metadata is None
    assert sched.make_stats().kv_transfer_failures == 1


def test_local_prefix_hit_loads_only_the_rest():
    sched, _ = make("kv_consumer")
    sched.add_request(request("a", PROMPT, max_tokens=1))
    so = sched.schedule()
    sched.update_from_output(so, output(so, {"a": [5]}))
    sched.add_request(request("d", PROMPT, remote_params(PROMPT)))
    so = sched.schedule()
    (load,) = so.kv_connector_metadata.loads
    assert load.remote_block_ids == [13]            # blocks 0-1 hit locally (8 tokens)
    assert sched.waiting_for_remote_kv["d"][1] == len(PROMPT) - 1


def test_producer_holds_blocks_until_pulled_and_returns_params():
    sched, connector = make("kv_producer")
    idle = sched.kv_cache_manager.get_num_free_blocks()
    sched.add_request(request("p", PROMPT, {"do_remote_decode": True}, max_tokens=1))
    so = sched.schedule()
    (out,) = sched.update_from_output(so, output(so, {"p": [5]}))
    params = out.kv_transfer_params
    assert out.finished and params["do_remote_prefill"] is True
    assert params["remote_request_id"] == "p" and params["remote_port"] == 20000
    assert "p" in sched.held
    assert len(params["remote_block_ids"]) == 3 and params["kv_layout"] == LAYOUT
    assert params["remote_prompt_digest"] == prompt_digest(PROMPT)
    assert sched.kv_cache_manager.get_num_free_blocks() < idle
    assert sched.has_unfinished_requests() and sched.get_num_unfinished_requests() == 0
    so = sched.schedule()
    assert so.kv_connector_metadata.sends == {"p": params["remote_block_ids"]}
    sched.update_from_output(so, output(so, finished_sending=["p"]))
    assert sched.kv_cache_manager.get_num_free_blocks() == idle
    assert not sched.has_unfinished_requests()


def test_producer_lease_expires():
    clock = Clock()
    sched, _ = make("kv_producer", lease=5.0, clock=clock)
    idle = sched.kv_cache_manager.get_num_free_blocks()
    sched.add_request(request("p", PROMPT, {"do_remote_decode": True}, max_tokens=1))
    so = sched.schedule()
    sched.update_from_output(so, output(so, {"p": [5]}))
    clock.now += 4.9
    so = sched.schedule()
    assert so.kv_connector_metadata.expired == []
    assert sched.kv_cache_manager.get_num_free_blocks() < idle
    clock.now += 0.2
    so = sched.schedule()
    assert so.kv_connector_metadata.expired == ["p"]
    assert sched.kv_cache_manager.get_num_free_blocks() == idle
    assert not sched.has_unfinished_requests()


def test_aborted_producer_request_is_not_held():
    sched, _ = make("kv_both")
    idle = sched.kv_cache_manager.get_num_free_blocks()
    sched.add_request(request("p", PROMPT, {"do_remote_decode": True}, max_tokens=3))
    so = sched.schedule()
    sched.update_from_output(so, output(so, {"p": [5]}))
    sched.finish_requests("p", RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache_manager.get_num_free_blocks() == idle and not sched.held


def test_without_hooks_nothing_changes():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), CacheConfig(block_size=BS),
                      max_model_len=64, num_kv_blocks=32)
    sched.add_request(request("a", PROMPT, remote_params(PROMPT)))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": len(PROMPT)} and so.kv_connector_metadata is None


@pytest.mark.parametrize("config, needle", [
    ("{", "not valid JSON"),
    ({"kv_connector": "ZmqPullConnector"}, "kv_role is required"),
    ({"kv_connector": "Nope", "kv_role": "kv_producer"}, "unknown kv_connector"),
    ({"kv_connector": "ZmqPullConnector", "kv_role": "kv_sender"}, "kv_role 'kv_sender'"),
    ({"kv_connector": "ZmqPullConnector", "kv_role": "kv_both", "kv_rank": 0}, "'kv_rank'"),
    ({"kv_connector": "ZmqPullConnector", "kv_role": "kv_both", "kv_port": "1"}, "kv_port"),
    ({"kv_connector": "ZmqPullConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"lease": 1}}, "'lease'"),
    ({"kv_connector": "ZmqPullConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"lease_seconds": 0}}, "must be > 0"),
])
def test_config_errors_name_the_key(config, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_kv_transfer_config(config)


def test_alias_and_defaults():
    config = parse_kv_transfer_config('{"kv_connector": "ZmqConnectorV1", "kv_role": "kv_both"}')
    assert config.is_producer and config.is_consumer and config.lease_seconds == 30.0
    assert config.port_for(1, 2, dp_rank=1) == config.kv_port + 3


PRODUCER = '{"kv_connector": "ZmqPullConnector", "kv_role": "kv_producer"}'


@pytest.mark.parametrize("params, config, param", [
    ({"do_remote_decode": True}, None, "kv_transfer_params"),
    ({"do_remote_decode": True, "x": 1}, PRODUCER, "kv_transfer_params.x"),
    ({"do_remote_decode": 1}, PRODUCER, "kv_transfer_params.do_remote_decode"),
    ({"do_remote_prefill": True}, PRODUCER, "kv_transfer_params.do_remote_prefill"),
    ({"do_remote_prefill": True}, PRODUCER.replace("producer", "consumer"),
     "kv_transfer_params.remote_host"),
    ("yes", PRODUCER, "kv_transfer_params"),
])
def test_malformed_request_params_are_400s(params, config, param):
    with pytest.raises(InvalidRequestError) as e:
        check_for_server(params, config)
    assert e.value.param == param


def test_request_params_n_must_be_1():
    with pytest.raises(InvalidRequestError) as e:
        check_for_server({"do_remote_decode": True}, PRODUCER, n=2)
    assert e.value.param == "n"
    assert check_for_server({"do_remote_decode": True}, PRODUCER) == {"do_remote_decode": True}


def test_layout_names_the_cache_auto_resolves_to_where_the_checkpoint_decides(tmp_path):
    """A compressed-tensors kv_cache_scheme makes `--kv-cache-dtype auto` the fp8_e4m3 cache,
    and a GGUF file with int8 activations (its default mode or --quantization int8, float32)
    the float16 one: the layout says so, so a
    prefill engine given 'auto' and a decode engine given 'fp8' / 'float16' match; other
    checkpoints and modes keep the flag's value."""
    from sluice.config_sources import build_engine_config
    from sluice.hf_config import ModelSpec
    from sluice.kv_transfer.factory import kv_layout

    class Spec:
        path, num_key_value_heads, head_dim, num_hidden_layers = "/m/model", 2, 8, 2
        fp8_kv_cache, gguf = True, False
        auto_kv_cache_dtype = ModelSpec.auto_kv_cache_dtype

    def layout(kv_cache_dtype: str, spec=Spec, **options) -> str:
        config = build_engine_config(overrides={"kv_cache_dtype": kv_cache_dtype, **options})
        return kv_layout(config, spec())["kv_cache_dtype"]

    assert layout("auto") == layout("fp8") == layout("fp8_e4m3") == "fp8_e4m3"
    assert layout("auto", dtype="bfloat16") == "fp8_e4m3"
    plain = type("PlainSpec", (Spec,), {"fp8_kv_cache": False})
    assert layout("auto", plain) == "auto" and layout("bfloat16") == "bfloat16"
    gguf = type("GgufSpec", (plain,), {"gguf": True})
    assert layout("auto", gguf) == layout("float16", gguf) == "float16"
    assert layout("auto", gguf, dtype="float32") == "float16"
    assert layout("auto", gguf, quantization="int8") == "float16"
    assert layout("auto", gguf, quantization="gguf") == "auto"
    assert layout("auto", gguf, dtype="bfloat16") == "auto"
