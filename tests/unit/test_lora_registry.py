"""The frontend's adapter table (`sluice.lora.registry`), --lora-modules parsing and the
checks of caller-built LoRARequests. No torch; adapters are checked by a stand-in `check`."""

from __future__ import annotations

import pytest

from sluice.config_sources import build_engine_config
from sluice.entrypoints.openai.lora import runtime_updating_allowed
from sluice.errors import ConfigError, InvalidRequestError, NotFoundError
from sluice.lora.registry import (AdapterValidator, LoRARegistry, check_lora_request,
                                  parse_lora_module, registry_from_config)
from sluice.lora.request import LoRARequest


def check(path: str) -> None:
    if "bad" in path:
        raise InvalidRequestError(f"LoRA adapter {path}: rank 32 exceeds --max-lora-rank 16",
                                  param="lora_path")


def test_parse_lora_modules():
    assert parse_lora_module("sql=/adapters/sql").path == "/adapters/sql"
    m = parse_lora_module('{"name": "sql", "path": "/a", "base_model_name": "base"}')
    assert (m.name, m.path, m.base_model_name) == ("sql", "/a", "base")
    for bad in ("nopath", "=/a", '{"name": "x"}', '{"name": "x", "path": "/a", "r": 1}', "{x"):
        with pytest.raises(ConfigError, match="--lora-modules"):
            parse_lora_module(bad)


def test_cli_keeps_json_lora_modules_whole():
    config = build_engine_config(overrides={
        "enable_lora": True,
        "lora_modules": ["a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}']})
    assert config.lora.lora_modules == ("a=/x",
                                        '{"name": "b", "path": "/y", "base_model_name": "m"}')


def test_registry_ids_names_and_errors():
    registry = LoRARegistry(check, reserved=("base",))
    a = registry.add("a", "/adapters/a")
    b = registry.add("b", "/adapters/b", "base")
    assert (a.lora_int_id, b.lora_int_id) == (1, 2) and b.base_model_name == "base"
    assert [r.lora_name for r in registry] == ["a", "b"] and registry.get("a") == a
    with pytest.raises(InvalidRequestError, match="already been loaded"):
        registry.add("a", "/adapters/a2")
    with pytest.raises(InvalidRequestError, match="base model"):
        registry.add("base", "/adapters/x")
    with pytest.raises(InvalidRequestError, match="/adapters/bad") as e:
        registry.add("c", "/adapters/bad")
    assert e.value.param == "lora_path" and "c" not in registry
    registry.remove("a")
    with pytest.raises(NotFoundError, match="'a' cannot be found"):
        registry.remove("a")
    assert registry.add("a", "/adapters/a-v2").lora_int_id == 3   # ids are never reused


def test_bad_lora_module_fails_naming_it():
    registry = LoRARegistry(check)
    with pytest.raises(ConfigError, match="--lora-modules x=/adapters/bad: .*rank 32"):
        registry.load_modules(["ok=/adapters/ok", "x=/adapters/bad"])


def test_lora_modules_need_enable_lora():
    config = build_engine_config(overrides={"lora_modules": ["a=/x"]})
    with pytest.raises(ConfigError, match="needs --enable-lora"):
        registry_from_config(config)
    assert registry_from_config(build_engine_config(overrides={})) is None


def test_caller_built_lora_requests():
    with pytest.raises(ValueError, match="--enable-lora"):
        check_lora_request(None, LoRARequest("a", 1, "/adapters/a"))
    check_lora_request(None, None)
    validator = AdapterValidator(check)
    validator.validate(LoRARequest("a", 1, "/adapters/a"))
    with pytest.raises(ValueError, match="already names the adapter at '/adapters/a'"):
        validator.validate(LoRARequest("b", 1, "/adapters/b"))
    with pytest.raises(ValueError, match="bad"):
        validator.validate(LoRARequest("c", 2, "/adapters/bad"))
    with pytest.raises(ValueError, match="LoRARequest"):
        check_lora_request(validator, "a")


def test_runtime_updating_env():
    assert runtime_updating_allowed({"SLUICE_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    assert runtime_updating_allowed({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    assert not runtime_updating_allowed({"SLUICE_ALLOW_RUNTIME_LORA_UPDATING": "0"})
    assert not runtime_updating_allowed({})
