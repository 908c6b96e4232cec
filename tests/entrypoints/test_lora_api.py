"""LoRA over the OpenAI API: `model=<adapter>` on completions and chat, /v1/models, runtime
load/unload (SLUICE_ALLOW_RUNTIME_LORA_UPDATING), the 404s and 400s, `vllm:lora_requests_info`.

One module-scoped `sluice serve` of the tiny llama with --enable-lora, one adapter from
--lora-modules and the runtime routes on; adapters are PEFT directories written here with
safetensors' numpy API (no `peft` needed): `zero` has B = 0 (output = the base model's),
`strong` large random A and B (output differs from the base model's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from safetensors.numpy import save_file

from _sluice_server_helpers import ServerProcess, run_cli

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
        "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PROMPT = "The quick brown fox"


def write_adapter(directory: Path, model_dir: Path, *, rank: int = 4, scale: float = 0.0,
                  targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
                  seed: int = 0) -> Path:
    """A PEFT adapter for the model in `model_dir` (shapes from its config.json); B is
    `scale` x random (0: a no-op adapter)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    shapes = {"q_proj": (q_out, hidden), "k_proj": (kv_out, hidden), "v_proj": (kv_out, hidden),
              "o_proj": (hidden, q_out), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for proj in targets:
            out, inp = shapes[proj]
            key = f"base_model.model.model.layers.{layer}.{PROJ[proj]}.{proj}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, inp)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (scale * rng.standard_normal((out, rank))
                                               ).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "bias": "none", "base_model_name_or_path": str(model_dir)}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"zero": write_adapter(root / "zero", llama_dir),
            "strong": write_adapter(root / "strong", llama_dir, scale=1.0, seed=1),
            "other": write_adapter(root / "other", llama_dir, scale=1.0, seed=2),
            "rank_too_high": write_adapter(root / "rank-too-high", llama_dir, rank=32)}


@pytest.fixture(scope="module")
def lora_server(llama_dir, adapters, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:   # only this server's environment (vLLM's name)
        mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
        server = _start_lora_server(llama_dir, adapters, tmp_path_factory)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _start_lora_server(llama_dir, adapters, tmp_path_factory) -> ServerProcess:
    return ServerProcess(
        llama_dir, ("--kv-cache-memory", "64MiB", "--max-model-len", "256", "--max-num-seqs",
                    "8", "--served-model-name", "base", "--enable-lora", "--max-loras", "2",
                    "--max-lora-rank", "8", "--lora-modules", f"strong={adapters['strong']}",
                    json.dumps({"name": "zero", "path": str(adapters["zero"]),
                                "base_model_name": "base-parent"})),
        tmp_path_factory.mktemp("lora-server") / "serve.log")


@pytest.fixture
def client(lora_server):
    with openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none", max_retries=0,
                       timeout=60.0) as c:
        yield c


def complete(client, model: str, **kw) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                     **kw)


def test_completions_and_chat_with_adapters(client):
    base = complete(client, "base")
    zero = complete(client, "zero")
    strong = complete(client, "strong")
    assert strong.model == "strong" and zero.model == "zero" and base.model == "base"
    assert zero.choices[0].text == base.choices[0].text          # B = 0: the base model
    assert strong.choices[0].text != base.choices[0].text         # a real adapter
    assert complete(client, "strong").choices[0].text == strong.choices[0].text   # cache hit
    stream = "".join(c.choices[0].text for c in complete(client, "strong", stream=True)
                     if c.choices)
    assert stream == strong.choices[0].text
    messages = [{"role": "user", "content": "hello"}]
    chats = {m: client.chat.completions.create(model=m, messages=messages, max_tokens=8,
                                               temperature=0) for m in ("base", "strong")}
    assert chats["strong"].model == "strong"
    assert chats["strong"].choices[0].message.content != chats["base"].choices[0].message.content


def test_models_lists_adapters(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "strong", "zero"}
    assert cards["strong"].parent == "base" and cards["strong"].root.endswith("strong")
    assert cards["zero"].parent == "base-parent"
    assert cards["base"].parent is None


def test_unknown_model_is_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "no-such-adapter")
    assert "no-such-adapter" in str(e.value)


def test_load_use_unload_at_runtime(client, lora_server, adapters):
    url = lora_server.url
    r = httpx.post(url + "/v1/load_lora_adapter",
                   json={"lora_name": "other", "lora_path": str(adapters["other"])})
    assert r.status_code == 200 and "other" in r.text
    assert "other" in {m.id for m in client.models.list().data}
    out = complete(client, "other")
    assert out.model == "other"
    assert out.choices[0].text != complete(client, "base").choices[0].text
    again = httpx.post(url + "/v1/load_lora_adapter",
                       json={"lora_name": "other", "lora_path": str(adapters["other"])})
    assert again.status_code == 400 and "already been loaded" in again.text
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "other"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "other")
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "other"})
    assert r.status_code == 404 and "other" in r.json()["error"]["message"]


def test_unload_while_a_request_runs(client, lora_server, adapters):
    """A request already running with an adapter finishes with it after the unload."""
    url = lora_server.url
    body = {"lora_name": "late", "lora_path": str(adapters["other"])}
    assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 200
    expected = client.completions.create(model="late", prompt=PROMPT, max_tokens=24,
                                         temperature=0).choices[0].text
    stream = client.completions.create(model="late", prompt=PROMPT, max_tokens=24,
                                       temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    assert httpx.post(url + "/v1/unload_lora_adapter",
                      json={"lora_name": "late"}).status_code == 200
    text = first.choices[0].text + "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")


def test_tokenize_accepts_adapter_names(lora_server):
    def tokens(model: str) -> list[int]:
        r = httpx.post(lora_server.url + "/tokenize", json={"model": model, "prompt": PROMPT})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]
    assert tokens("strong") == tokens("base")


def test_load_bad_adapters_is_400_saying_which(lora_server, adapters, tmp_path):
    url = lora_server.url + "/v1/load_lora_adapter"
    missing = tmp_path / "nowhere"
    r = httpx.post(url, json={"lora_name": "x", "lora_path": str(missing)})
    assert r.status_code == 400, r.text
    assert str(missing) in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora_path"
    r = httpx.post(url, json={"lora_name": "x", "lora_path": str(adapters["rank_too_high"])})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert str(adapters["rank_too_high"]) in message and "32" in message
    r = httpx.post(url, json={"lora_name": "base", "lora_path": str(adapters["zero"])})
    assert r.status_code == 400   # the base model's name is taken


def test_lora_metric(lora_server, client):
    complete(client, "strong")
    text = httpx.get(lora_server.url + "/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(lines) == 1 and 'max_lora="2"' in lines[0]
    assert 'running_lora_adapters=""' in lines[0] or "strong" in lines[0]


def test_server_without_lora(server):
    """The shared server (no --enable-lora, no env var): adapters are unknown models and the
    runtime routes do not exist — both 404, as in vLLM."""
    from _sluice_server_helpers import API_KEY
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server.url + "/v1/completions", headers=headers,
                   json={"model": "strong", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 404 and "strong" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_lora_adapter", headers=headers,
                   json={"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 404


def test_bad_lora_module_fails_startup_naming_it(llama_dir, adapters):
    result = run_cli(["serve", str(llama_dir), "--port", "0", "--enable-lora",
                      "--max-lora-rank", "8", "--lora-modules",
                      f"big={adapters['rank_too_high']}"], timeout=120)
    assert result.returncode != 0
    assert "big=" in result.stderr and "32" in result.stderr, result.stderr[-2000:]
    assert os.path.basename(str(adapters["rank_too_high"])) in result.stderr
