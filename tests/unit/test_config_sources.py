"""Config sources: precedence (overrides/CLI > --config file > SLUICE_* env > defaults), value
parsing from strings and files, and the generated argparse flags. No torch."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from sluice.config import SECTIONS, EngineConfig, field_specs
from sluice.config_sources import (add_engine_args, build_engine_config, default_model_path,
                                   engine_config_from_args, flat_config, parse_bool,
                                   parse_byte_size)
from sluice.errors import ConfigError


def write(tmp_path: Path, data: dict | str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    elif name.endswith(".json"):
        path.write_text(json.dumps(data))
    else:
        import yaml
        path.write_text(yaml.safe_dump(data))
    return str(path)


def get(cfg: EngineConfig, name: str):
    return getattr(getattr(cfg, field_specs()[name].section), name)


# One field per section (parallel sizes > 1 are unsupported, so parallel uses 1 via env only).
PRECEDENCE = [
    ("max_model_len", "100", 200, "300", 400),
    ("block_size", "8", 32, "64", 128),
    ("max_num_seqs", "3", 5, "7", 9),
    ("scheduling_policy", "priority", "fcfs", "priority", "fcfs"),
    ("num_threads", "1", 2, "3", 4),
    ("load_format", "dummy", "safetensors", "dummy", "auto"),
    ("port", "1000", 2000, "3000", 4000),
    ("log_level", "debug", "warning", "error", "info"),
    ("kv_cache_memory_fraction", "0.1", 0.2, "0.4", 0.5),
]


@pytest.mark.parametrize("name,env_v,file_v,cli_v,kw_v", PRECEDENCE)
def test_precedence(tmp_path, name, env_v, file_v, cli_v, kw_v):
    spec = field_specs()[name]
    env = {spec.env_var: env_v}
    path = write(tmp_path, {name: file_v})
    as_type = type(spec.default) if spec.default is not None else int

    assert get(build_engine_config(env={}), name) == spec.default
    assert get(build_engine_config(env=env), name) == as_type(env_v)
    assert get(build_engine_config(env=env, config_file=path), name) == file_v
    assert get(build_engine_config({name: cli_v}, path, env), name) == as_type(cli_v)
    cfg = build_engine_config({name: cli_v}, path, env, overrides={name: kw_v})
    assert get(cfg, name) == kw_v
    # "not given" (None) falls through to the next source.
    assert get(build_engine_config({name: None}, path, env), name) == file_v


def test_precedence_mixed_sources_nested_file(tmp_path):
    path = write(tmp_path, {"cache": {"block_size": 32}, "scheduler": {"max_num_seqs": 8},
                            "server": {"port": 9000}}, "cfg.json")
    env = {"SLUICE_MAX_NUM_SEQS": "4", "SLUICE_HOST": "0.0.0.0", "SLUICE_PORT": "1234"}
    cfg = build_engine_config({"port": "8080"}, path, env)
    assert (cfg.cache.block_size, cfg.scheduler.max_num_seqs) == (32, 8)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8080)


def test_file_keys_kebab_and_snake_and_flag_style(tmp_path):
    path = write(tmp_path, {"max-num-seqs": 6, "Block_Size": 64, "--seed": 7})
    cfg = build_engine_config(config_file=path, env={})
    assert (cfg.scheduler.max_num_seqs, cfg.cache.block_size, cfg.model.seed) == (6, 64, 7)


def test_config_file_from_env_var(tmp_path):
    path = write(tmp_path, {"max_num_seqs": 11})
    assert build_engine_config(env={"SLUICE_CONFIG": path}).scheduler.max_num_seqs == 11


def test_null_in_file_means_not_given(tmp_path):
    path = write(tmp_path, "max_num_seqs: null\n")
    cfg = build_engine_config(config_file=path, env={"SLUICE_MAX_NUM_SEQS": "5"})
    assert cfg.scheduler.max_num_seqs == 5


def test_empty_file_is_fine(tmp_path):
    assert build_engine_config(config_file=write(tmp_path, ""), env={}) == \
        build_engine_config(env={})


@pytest.mark.parametrize("name", ["cfg.yaml", "cfg.json"])
def test_false_in_file_takes_effect(tmp_path, name):
    path = write(tmp_path, {"cache": {"enable_prefix_caching": False},
                            "enable_chunked_prefill": False, "disable_log_requests": False}, name)
    env = {"SLUICE_ENABLE_PREFIX_CACHING": "true"}
    cfg = build_engine_config(config_file=path, env=env)
    assert cfg.cache.enable_prefix_caching is False
    assert cfg.scheduler.enable_chunked_prefill is False
    assert cfg.observability.disable_log_requests is False


@pytest.mark.parametrize("text", ["false", "0", "no", "off", "FALSE", " Off "])
def test_false_in_env_takes_effect(text):
    cfg = build_engine_config(env={"SLUICE_ENABLE_PREFIX_CACHING": text})
    assert cfg.cache.enable_prefix_caching is False


@pytest.mark.parametrize("text", ["true", "1", "yes", "on", "True"])
def test_true_in_env(text):
    cfg = build_engine_config(env={"SLUICE_DISABLE_LOG_STATS": text})
    assert cfg.observability.disable_log_stats is True


def test_cli_bool_beats_file_false(tmp_path):
    path = write(tmp_path, {"enable_prefix_caching": False})
    cfg = build_engine_config({"enable_prefix_caching": True}, path, {})
    assert cfg.cache.enable_prefix_caching is True


def test_parse_bool_rejects_garbage():
    with pytest.raises(ValueError):
        parse_bool("maybe")


@pytest.mark.parametrize("text,expected", [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1024", 1024),
    (2048, 2048), ("4G", 4 * 2**30), ("10kb", 10_000), ("1.5KiB", 1536), ("2 TiB", 2 * 2**40),
    ("100B", 100), ("3M", 3 * 2**20), ("1e3", 1000), (4096.0, 4096),
])
def test_parse_byte_size(text, expected):
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "-1GiB", "1.5", "4XB", "", "GiB", True, 1.5])
def test_parse_byte_size_rejects(text):
    with pytest.raises(ValueError):
        parse_byte_size(text)


def test_byte_sizes_through_sources(tmp_path):
    assert build_engine_config(env={"SLUICE_KV_CACHE_MEMORY": "4GiB"}).cache.kv_cache_memory \
        == 4 * 2**30
    path = write(tmp_path, {"cache": {"kv_cache_memory": "1.5GB"}})
    assert build_engine_config(config_file=path, env={}).cache.kv_cache_memory == 1_500_000_000
    assert build_engine_config({"kv_cache_memory": "512MiB"}, env={}).cache.kv_cache_memory \
        == 512 * 2**20
    assert build_engine_config(overrides={"kv_cache_memory": 1 << 20}, env={}) \
        .cache.kv_cache_memory == 1 << 20


def test_tuples_and_strings(tmp_path):
    cfg = build_engine_config(env={"SLUICE_ALLOWED_ORIGINS": "https://a.com, https://b.com,",
                                   "SLUICE_API_KEY": "sekrit"})
    assert cfg.server.allowed_origins == ("https://a.com", "https://b.com")
    assert cfg.server.api_key == "sekrit"
    assert build_engine_config({"allowed_origins": '["*"]'}, env={}).server.allowed_origins \
        == ("*",)
    path = write(tmp_path, {"allowed_origins": ["x", "y"]})
    assert build_engine_config(config_file=path, env={}).server.allowed_origins == ("x", "y")


def test_optional_none_and_empty_env():
    cfg = build_engine_config(env={"SLUICE_MAX_MODEL_LEN": "none", "SLUICE_MAX_NUM_SEQS": ""})
    assert cfg.model.max_model_len is None and cfg.scheduler.max_num_seqs == 256


def test_choices_are_case_insensitive():
    assert build_engine_config(env={"SLUICE_DTYPE": "BFloat16"}).model.dtype == "bfloat16"


def test_default_model_path():
    cfg = build_engine_config(env={})
    assert cfg.model.model == str(default_model_path())
    assert default_model_path().parts[-3:] == ("sluice", "assets", "demo_model")
    assert build_engine_config({"model": "/m"}, env={}).model.model == "/m"


def test_from_kwargs_and_flat_config(monkeypatch):
    monkeypatch.delenv("SLUICE_MAX_NUM_SEQS", raising=False)
    cfg = EngineConfig.from_kwargs(max_num_seqs=4, block_size=32, api_key="k")
    assert (cfg.scheduler.max_num_seqs, cfg.cache.block_size) == (4, 32)
    flat = flat_config(cfg)
    assert flat["api_key"] == "***" and flat["max_num_seqs"] == 4
    assert set(flat) == set(field_specs())


def test_logging_from_cli_keeps_caplog_working(caplog, capsys):
    from sluice.entrypoints.cli import configure_logging
    configure_logging("info")
    configure_logging("warning")
    with caplog.at_level(logging.WARNING, logger="sluice.config_sources"):
        build_engine_config(env={"SLUICE_NOPE": "1"})
    assert "SLUICE_NOPE" in caplog.text and "SLUICE_NOPE" in capsys.readouterr().err
    logger = logging.getLogger("sluice")
    assert len(logger.handlers) == 1 and logger.propagate


def test_unknown_env_var_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sluice.config_sources"):
        cfg = build_engine_config(env={"SLUICE_MAX_NUM_SEQ": "3", "SLUICE_BOGUS": "1",
                                       "SLUICE_CONFIG": ""})
    assert cfg.scheduler.max_num_seqs == 256
    text = caplog.text
    assert "SLUICE_MAX_NUM_SEQ" in text and "did you mean SLUICE_MAX_NUM_SEQS?" in text
    assert "SLUICE_BOGUS" in text and "SLUICE_CONFIG" not in text


# ---------------------------------------------------------------------------------------------
# argparse

VLLM_FLAGS = ["--model", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
              "--block-size", "--enable-prefix-caching", "--no-enable-prefix-caching", "--dtype",
              "--seed", "--kv-cache-memory", "--tensor-parallel-size", "-tp",
              "--scheduling-policy", "--host", "--port", "--api-key", "--allowed-origins",
              "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--tokenizer",
              "--served-model-name", "--pipeline-parallel-size", "-pp", "--data-parallel-size",
              "--distributed-executor-backend", "--master-addr", "--master-port",
              "--load-format", "--config"]


def make_parser(**kwargs) -> argparse.ArgumentParser:
    return add_engine_args(argparse.ArgumentParser(allow_abbrev=False), **kwargs)


def test_generated_flags_include_vllm_names():
    options = set(make_parser()._option_string_actions)
    missing = [f for f in VLLM_FLAGS if f not in options]
    assert not missing
    for spec in field_specs().values():
        assert spec.flag in options


def test_flags_default_to_not_given():
    ns = make_parser().parse_args([])
    assert all(getattr(ns, name) is None for name in field_specs())
    assert ns.config is None


def test_bool_flags_and_alias():
    ns = make_parser().parse_args(["--no-enable-prefix-caching", "-tp", "1",
                                   "--enable-chunked-prefill"])
    assert ns.enable_prefix_caching is False and ns.enable_chunked_prefill is True
    assert ns.tensor_parallel_size == "1"
    ns = make_parser().parse_args(["-tp", "2", "-pp", "1", "--distributed-executor-backend",
                                   "mp", "--master-port", "29500"])
    assert (ns.tensor_parallel_size, ns.pipeline_parallel_size) == ("2", "1")
    cfg = engine_config_from_args(ns)
    assert cfg.parallel.tensor_parallel_size == 2 and cfg.parallel.master_port == 29500
    assert cfg.parallel.executor_backend == "mp"


def test_help_uses_field_metadata():
    text = make_parser().format_help()
    assert "Tokens per KV-cache block." in text and "{8,16,32,64,128}" in text
    assert "SLUICE_MAX_NUM_SEQS" in text and "[default: 256]" in text


def test_sections_restrict_flags():
    options = make_parser(sections=["cache"])._option_string_actions
    assert "--block-size" in options and "--port" not in options and "--config" in options
    with pytest.raises(ValueError):
        make_parser(sections=["cahce"])


def test_engine_config_from_args(tmp_path, monkeypatch):
    for var in ("SLUICE_MAX_NUM_SEQS", "SLUICE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLUICE_BLOCK_SIZE", "8")
    monkeypatch.setenv("SLUICE_SEED", "5")
    path = write(tmp_path, {"block_size": 32, "max_num_seqs": 3})
    parser = make_parser(positional_model=True)
    ns = parser.parse_args(["/models/x", "--config", path, "--max-num-seqs", "12",
                            "--no-enable-prefix-caching", "--kv-cache-memory", "1GiB"])
    cfg = engine_config_from_args(ns)
    assert cfg.model.model == "/models/x" and cfg.model.seed == 5
    assert (cfg.cache.block_size, cfg.scheduler.max_num_seqs) == (32, 12)
    assert cfg.cache.enable_prefix_caching is False and cfg.cache.kv_cache_memory == 2**30


def test_positional_and_flag_model_must_agree(monkeypatch):
    monkeypatch.delenv("SLUICE_CONFIG", raising=False)
    parser = make_parser(positional_model=True)
    assert engine_config_from_args(parser.parse_args(["/a", "--model", "/a"])).model.model == "/a"
    with pytest.raises(ConfigError, match="disagree"):
        engine_config_from_args(parser.parse_args(["/a", "--model", "/b"]))


def test_every_section_has_flags():
    options = make_parser()._option_string_actions
    for section in SECTIONS:
        assert any(s.flag in options for s in field_specs().values() if s.section == section)


def test_no_model_means_the_builtin_demo_model_served_as_sluice_demo():
    from sluice.config_sources import build_engine_config, default_model_path
    cfg = build_engine_config(env={})
    assert cfg.model.model == str(default_model_path())
    assert cfg.model.served_model_name == ("sluice-demo",)
    named = build_engine_config(env={}, overrides={"model": "/some/dir"})
    assert named.model.served_model_name == ("/some/dir",)  # as vLLM: the model as given


def test_served_model_name_takes_several_names():
    """`--served-model-name a b` is two names (the first reported), not a model path `b`."""
    parser = make_parser(positional_model=True)
    cfg = engine_config_from_args(parser.parse_args(["/m", "--served-model-name", "a", "b"]))
    assert cfg.model.model == "/m" and cfg.model.served_model_name == ("a", "b")
    cfg = engine_config_from_args(parser.parse_args(["--served-model-name", "a,b",
                                                     "--max-num-seqs", "4", "--model", "/m"]))
    assert cfg.model.model == "/m" and cfg.model.served_model_name == ("a", "b")


def test_every_sluice_variable_the_code_reads_is_known(caplog):
    """Each `SLUICE_*` name in sluice's sources is a config field's variable or one of
    OTHER_ENV_VARS, so setting it never logs "not a sluice option" (SLUICE_CACHE_DIR and
    SLUICE_CPU_KERNELS did, while being honoured)."""
    import re

    import sluice
    from sluice.config_sources import OTHER_ENV_VARS

    root = Path(sluice.__file__).parent
    names = {m for f in root.rglob("*.py")
             for m in re.findall(r'"(SLUICE_[A-Z0-9_]*[A-Z0-9])"', f.read_text())}
    fields = {spec.env_var for spec in field_specs().values()}
    assert {"SLUICE_CACHE_DIR", "SLUICE_CPU_KERNELS"} <= names
    assert names - fields - OTHER_ENV_VARS == set()
    with caplog.at_level(logging.WARNING, logger="sluice.config_sources"):
        build_engine_config(env={name: "" for name in names})
    assert "not a sluice option" not in caplog.text
