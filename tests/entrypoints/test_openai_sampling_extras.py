"""vLLM's sampling extras over HTTP, in process with `FakeAsyncLLM`: generation_config.json
defaults fill the fields a request leaves unset (`--generation-config`), and
allowed_token_ids / bad_words / truncate_prompt_tokens / best_of reach the engine, bounded by
`RequestLimits`. (Their effect on tokens is tested on a real engine in
tests/engine/test_offline_api_e2e.py.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from _sluice_fake_engine import FakeAsyncLLM
from sluice.config_sources import build_engine_config
from sluice.entrypoints.openai.app import build_app
from sluice.errors import ConfigError
from sluice.frontend.tokenizer import load_tokenizer

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_cfg_model")
    (path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.5, "top_k": 7, "repetition_penalty": 1.1, "max_new_tokens": 5}))
    return path


class RecordingEngine(FakeAsyncLLM):
    """Keeps the SamplingParams of every request the server sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = []

    def generate(self, prompt, sampling_params, request_id, **kwargs):
        self.params.append(sampling_params)
        return super().generate(prompt, sampling_params, request_id, **kwargs)


def _post(tokenizer, model_dir, path: str, body: dict, **config):
    cfg = build_engine_config(overrides={"model": str(model_dir), **config}, env={})
    engine = RecordingEngine(tokenizer, config=cfg)
    app = build_app(engine, cfg)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body)
    return asyncio.run(go()), engine.params


def test_model_defaults_fill_unset_fields(tokenizer, model_dir):
    response, [params] = _post(tokenizer, model_dir, "/v1/completions", {"prompt": "x"})
    assert response.json()["usage"]["completion_tokens"] == 5  # min(16, max_new_tokens)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.5, 7, 1.1)
    response, [params] = _post(tokenizer, model_dir, "/v1/chat/completions",
                               {"messages": USER})
    assert response.json()["usage"]["completion_tokens"] == 5
    assert params.temperature == 0.5


def test_fields_the_client_sets_win(tokenizer, model_dir):
    response, [params] = _post(tokenizer, model_dir, "/v1/completions", {
        "prompt": "x", "max_tokens": 7, "temperature": 0.9, "top_k": 3})
    assert response.json()["usage"]["completion_tokens"] == 7
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.9, 3, 1.1)
    response, _ = _post(tokenizer, model_dir, "/v1/chat/completions",
                        {"messages": USER, "max_completion_tokens": 9})
    assert response.json()["usage"]["completion_tokens"] == 9


def test_generation_config_vllm_turns_model_defaults_off(tokenizer, model_dir):
    response, [params] = _post(tokenizer, model_dir, "/v1/completions", {"prompt": "x"},
                               generation_config="vllm")
    assert response.json()["usage"]["completion_tokens"] == 16
    assert (params.temperature, params.top_k, params.repetition_penalty) == (1.0, 0, 1.0)


def test_generation_config_directory_without_the_file_fails_at_startup(tokenizer, tmp_path):
    cfg = build_engine_config(overrides={"model": str(tmp_path),
                                         "generation_config": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match="--generation-config"):
        build_app(FakeAsyncLLM(tokenizer, config=cfg), cfg)


def test_vllm_sampling_extras_reach_the_engine(tokenizer, model_dir):
    response, [params] = _post(tokenizer, model_dir, "/v1/completions", {
        "prompt": "x", "allowed_token_ids": [5, 6], "bad_words": ["the"],
        "truncate_prompt_tokens": 3, "best_of": 3, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1  # n=1 of best_of=3
    assert (params.allowed_token_ids, params.bad_words, params.truncate_prompt_tokens,
            params.best_of) == ([5, 6], ["the"], 3, 3)
    response, [params] = _post(tokenizer, model_dir, "/v1/chat/completions", {
        "messages": USER, "allowed_token_ids": [5], "best_of": 2, "n": 2, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2 and params.allowed_token_ids == [5]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/chat/completions", {"messages": USER, "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, "best_of"),
    ("/v1/completions", {"prompt": ["x"] * 10, "best_of": 128}, "prompt"),
    ("/v1/completions", {"prompt": "x", "bad_words": ["w"] * 129}, "bad_words"),
    ("/v1/completions", {"prompt": "x", "bad_words": ["w" * 257]}, "bad_words"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10 ** 6]},
     "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0},
     "truncate_prompt_tokens"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 10 ** 6},
     "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": USER, "continue_final_message": True},
     "continue_final_message"),
])
def test_bad_extras_are_400_naming_the_field(tokenizer, model_dir, path, body, param):
    response, _ = _post(tokenizer, model_dir, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
