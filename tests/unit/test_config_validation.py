"""Config validation: every problem is reported at once, each line naming the flag, the value,
where it came from, what is allowed and how to fix it. No torch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sluice.config import EngineConfig, field_specs
from sluice.config_sources import build_engine_config
from sluice.errors import ConfigError


def problems(**kwargs) -> list[str]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        build_engine_config(**kwargs)
    return info.value.problems


def one_problem(**kwargs) -> str:
    found = problems(**kwargs)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("name,value,allowed", [
    ("max_num_seqs", "abc", "an integer >= 1"),
    ("max_num_seqs", "0", "an integer >= 1"),
    ("max_num_seqs", "2.5", "an integer >= 1"),
    ("max_num_batched_tokens", "-3", "an integer >= 1"),
    ("max_model_len", "0", "an integer >= 1"),
    ("seed", "-1", "an integer >= 0"),
    ("num_threads", "0", "an integer >= 1"),
    ("kv_cache_memory_fraction", "0", "a number in (0, 1]"),
    ("kv_cache_memory_fraction", "1.5", "a number in (0, 1]"),
    ("kv_cache_memory_fraction", "nan", "a number in (0, 1]"),
    ("kv_cache_memory_fraction", "lots", "a number in (0, 1]"),
    ("port", "70000", "an integer in [0, 65535]"),
    ("port", "-1", "an integer in [0, 65535]"),
    ("kv_cache_memory", "0", "a positive byte size"),
    ("kv_cache_memory", "4XB", "a positive byte size"),
    ("enable_prefix_caching", "maybe", "true or false"),
    ("dtype", "fp8", "one of auto, float32, bfloat16, float16"),
    ("block_size", "33", "one of 8, 16, 32, 64, 128"),
    ("scheduling_policy", "lifo", "one of fcfs, priority"),
    ("device", "tpu", "one of auto, cpu, cuda"),
    ("log_level", "loud", "one of debug, info, warning, error"),
])
def test_bad_value_from_env_names_flag_value_allowed_and_fix(name, value, allowed):
    spec = field_specs()[name]
    msg = one_problem(env={spec.env_var: value})
    assert msg.startswith(spec.flag + ":")
    assert repr(value) in msg and allowed in msg
    assert spec.env_var in msg and "Fix:" in msg and "unset it" in msg


def test_bad_value_from_cli_file_and_kwargs(tmp_path):
    msg = one_problem(cli_args={"max_num_seqs": "0"})
    assert "--max-num-seqs: '0' on the command line" in msg and "pass --max-num-seqs" in msg
    path = tmp_path / "c.yaml"
    path.write_text("scheduler:\n  max_num_seqs: 0\n")
    msg = one_problem(config_file=str(path))
    assert "--max-num-seqs: 0 from key 'scheduler.max_num_seqs' in" in msg
    assert str(path) in msg and "an integer >= 1" in msg
    msg = one_problem(overrides={"max_num_seqs": 0})
    assert "keyword argument max_num_seqs=" in msg and "an integer >= 1" in msg


def test_wrong_types_in_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"max_num_seqs": true, "enable_prefix_caching": "perhaps",'
                    ' "allowed_origins": [1, 2], "port": [80]}')
    found = problems(config_file=str(path))
    assert len(found) == 4
    text = "\n".join(found)
    for flag in ("--max-num-seqs", "--enable-prefix-caching", "--allowed-origins", "--port"):
        assert flag in text


def test_unknown_file_key_did_you_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_num_seq: 8\n")
    msg = one_problem(config_file=str(path))
    assert "unknown key 'max_num_seq'" in msg and "did you mean --max-num-seqs?" in msg
    assert str(path) in msg


def test_unknown_nested_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cahce:\n  block_size: 32\ncache:\n  blok_size: 32\n  max_num_seqs: 4\n"
                    "totally_unrelated_thing: 1\n")
    found = problems(config_file=str(path))
    assert len(found) == 4
    text = "\n".join(found)
    assert "did you mean section 'cache'?" in text
    assert "'cache.blok_size'" in text and "did you mean --block-size?" in text
    assert "belongs to section 'scheduler'" in text
    assert "'totally_unrelated_thing'" in text and "no such option" in text


def test_duplicate_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_num_seqs: 4\nscheduler:\n  max-num-seqs: 5\n")
    assert "both set --max-num-seqs" in one_problem(config_file=str(path))


@pytest.mark.parametrize("content,name,expect", [
    (None, "missing.yaml", "does not exist"),
    ("a: [1,\n", "bad.yaml", "not valid YAML"),
    ("{nope", "bad.json", "not valid JSON"),
    ("- 1\n- 2\n", "list.yaml", "must hold a mapping"),
])
def test_bad_config_files(tmp_path: Path, content, name, expect):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    msg = one_problem(config_file=str(path))
    assert msg.startswith("--config") and expect in msg and "Fix:" in msg


def test_unknown_override_and_cli_key():
    msg = one_problem(overrides={"max_num_seq": 4})
    assert "unknown engine argument 'max_num_seq'" in msg
    assert "did you mean --max-num-seqs?" in msg
    assert "unknown option 'blocksize'" in one_problem(cli_args={"blocksize": 4})


def test_data_parallel_size_and_rank():
    par = build_engine_config({"data_parallel_size": "2"}, env={}).parallel
    assert (par.data_parallel_size, par.data_parallel_rank, par.engine_indexes) == (2, None,
                                                                                    (0, 1))
    par = build_engine_config({"data_parallel_size": "4", "data_parallel_rank": "3"},
                              env={}).parallel
    assert par.engine_indexes == (3,)
    msg = one_problem(cli_args={"data_parallel_size": "2", "data_parallel_rank": "2"})
    assert msg.startswith("--data-parallel-rank: 2 is not an engine of --data-parallel-size 2")
    assert "Fix:" in msg
    msg = one_problem(cli_args={"data_parallel_size": "2", "tensor_parallel_size": "2",
                                "nnodes": "2"})
    assert msg.startswith("--data-parallel-size: 2 engines in one server with --nnodes 2")


def test_pipeline_parallelism_and_its_layer_partition():
    par = build_engine_config({"pipeline_parallel_size": "2", "tensor_parallel_size": "2"},
                              env={}).parallel
    assert (par.world_size, par.executor_backend, par.output_rank) == (4, "mp", 2)
    par = build_engine_config({"pipeline_parallel_size": "2"},
                              env={"SLUICE_PP_LAYER_PARTITION": "3,5"}).parallel
    assert par.pp_layer_partition == "3,5"
    msg = one_problem(cli_args={"pipeline_parallel_size": "2", "pp_layer_partition": "3"})
    assert msg.startswith("--pp-layer-partition: '3' must be 2 comma-separated")
    assert "Fix:" in msg
    assert "at least 1" in one_problem(cli_args={"pipeline_parallel_size": "2",
                                                 "pp_layer_partition": "3,0"})


def test_executor_backend_defaults_from_the_number_of_ranks():
    one = build_engine_config(env={}).parallel
    assert one.distributed_executor_backend is None and one.executor_backend == "uni"
    assert (one.master_addr, one.master_port) == ("127.0.0.1", None)
    two = build_engine_config({"tensor_parallel_size": "2"}, env={}).parallel
    assert two.world_size == 2 and two.executor_backend == "mp"
    mp_one = build_engine_config({"distributed_executor_backend": "mp"}, env={}).parallel
    assert mp_one.executor_backend == "mp"


def test_executor_backend_refusals():
    par = build_engine_config({"distributed_executor_backend": "ray",
                               "tensor_parallel_size": "2"}, env={}).parallel
    assert par.executor_backend == "ray"
    msg = one_problem(cli_args={"distributed_executor_backend": "ray", "nnodes": "2",
                                "tensor_parallel_size": "2"})
    assert msg.startswith("--nnodes") and "'ray'" in msg and "Fix:" in msg
    msg = one_problem(cli_args={"distributed_executor_backend": "uni",
                                "tensor_parallel_size": "2"})
    assert "'uni'" in msg and "2 ranks" in msg and "Fix: use 'mp'" in msg
    msg = one_problem(cli_args={"distributed_executor_backend": "threads"})
    assert "one of uni, mp, ray" in msg
    assert "--master-port" in one_problem(cli_args={"master_port": "70000"})


def test_batched_tokens_below_num_seqs():
    msg = one_problem(cli_args={"max_num_batched_tokens": "4", "max_num_seqs": "8"})
    assert "--max-num-batched-tokens" in msg and "--max-num-seqs" in msg
    assert "4" in msg and "8" in msg and "Fix:" in msg
    build_engine_config({"max_num_batched_tokens": "8", "max_num_seqs": "8"}, env={})


def test_no_chunked_prefill_needs_budget_for_max_model_len():
    args = {"max_num_batched_tokens": "1024", "max_model_len": "2048",
            "enable_chunked_prefill": False}
    msg = one_problem(cli_args=args)
    assert "--max-num-batched-tokens" in msg and "--max-model-len" in msg
    assert "1024" in msg and "2048" in msg and "chunked prefill" in msg
    build_engine_config({**args, "enable_chunked_prefill": True}, env={})
    build_engine_config({"max_model_len": "4096", "enable_chunked_prefill": False}, env={})


def test_cross_field_skipped_for_fields_that_failed():
    found = problems(cli_args={"max_num_seqs": "lots", "max_num_batched_tokens": "4"})
    assert len(found) == 1 and "'lots'" in found[0]


def test_many_problems_reported_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_num_seq: 8\nblock_size: 7\n")
    with pytest.raises(ConfigError) as info:
        build_engine_config(cli_args={"port": "99999", "dtype": "fp8", "pp_layer_partition": "x"},
                            config_file=str(path), env={"SLUICE_SEED": "x"})
    err = info.value
    assert len(err.problems) == 6
    text = str(err)
    assert text.startswith("6 configuration problems:")
    for needle in ("did you mean --max-num-seqs?", "--block-size", "--port", "--dtype",
                   "--pp-layer-partition", "--seed"):
        assert needle in text


def test_engine_config_validate_after_replace():
    cfg = build_engine_config(env={})
    cfg.validate()
    bad = dataclasses.replace(cfg, scheduler=dataclasses.replace(
        cfg.scheduler, max_num_seqs=0), server=dataclasses.replace(cfg.server, port=-5))
    with pytest.raises(ConfigError) as info:
        bad.validate()
    assert len(info.value.problems) == 2
    assert "--max-num-seqs: 0" in str(info.value) and "--port: -5" in str(info.value)
    wrong_type = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, block_size="16"))
    with pytest.raises(ConfigError, match="--block-size"):
        wrong_type.validate()


def test_defaults_are_valid():
    EngineConfig().validate()
    for spec in field_specs().values():
        assert spec.check(spec.default) is None, spec.name
