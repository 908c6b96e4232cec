"""`sluice.lora.peft.check_adapter`: what a PEFT adapter directory must hold to be served, and the
400-class message for each problem. No torch: adapters are written with safetensors' numpy API
against a hand-written config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sluice.errors import InvalidRequestError
from sluice.hf_config import load_model_spec
from sluice.lora.peft import check_adapter

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
SHAPES = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
          "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD_DIM),
          "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
PARENT = {"o_proj": "self_attn", "q_proj": "self_attn", "k_proj": "self_attn",
          "v_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu"}))
    save_file({"unused": np.zeros(1, np.float32)}, str(d / "model.safetensors"))
    return load_model_spec(d)


def write_adapter(d: Path, r: int = 8, targets=("q_proj", "v_proj"), config=None,
                  tensors=None, shapes=None) -> str:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": list(targets),
           "bias": "none", "use_dora": False, "use_rslora": False, **(config or {})}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {}
        for layer in range(LAYERS):
            for t in targets:
                out, inp = (shapes or SHAPES)[t]
                key = f"base_model.model.model.layers.{layer}.{PARENT[t]}.{t}"
                tensors[f"{key}.lora_A.weight"] = np.zeros((r, inp), np.float32)
                tensors[f"{key}.lora_B.weight"] = np.zeros((out, r), np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return str(d)


def _error(path, spec, max_rank=16) -> str:
    with pytest.raises(InvalidRequestError) as e:
        check_adapter(path, spec, max_rank)
    assert e.value.param == "lora_path"
    return str(e.value)


def test_valid_adapter(tmp_path, spec):
    cfg = check_adapter(write_adapter(tmp_path / "ok", r=8, targets=list(SHAPES)), spec, 16)
    assert cfg.rank == 8 and cfg.target_modules == tuple(SHAPES)
    assert cfg.scalings[(0, "q_proj")] == 2.0
    rs = check_adapter(write_adapter(tmp_path / "rs", r=4, config={"use_rslora": True}),
                       spec, 16)
    assert rs.scalings[(1, "v_proj")] == 16 / 2   # alpha / sqrt(r)


def test_rank_too_high(tmp_path, spec):
    msg = _error(write_adapter(tmp_path / "a", r=32), spec, max_rank=16)
    assert "rank 32" in msg and "--max-lora-rank 16" in msg


def test_unknown_target_module(tmp_path, spec):
    msg = _error(write_adapter(tmp_path / "a", targets=("q_proj", "embed_tokens"),
                               tensors={"x": np.zeros(1, np.float32)}), spec)
    assert "embed_tokens" in msg and "not supported" in msg
    key = "base_model.model.model.layers.0.self_attn.qk_proj.lora_A.weight"
    msg = _error(write_adapter(tmp_path / "b", targets=(), tensors={
        key: np.zeros((8, HIDDEN), np.float32)}), spec)
    assert "qk_proj" in msg
    msg = _error(write_adapter(tmp_path / "c", targets=(), tensors={
        "base_model.model.lm_head.lora_A.weight": np.zeros((8, HIDDEN), np.float32)}), spec)
    assert "lm_head" in msg


def test_wrong_shapes(tmp_path, spec):
    shapes = dict(SHAPES, v_proj=(HIDDEN, HIDDEN))   # an adapter for another model
    msg = _error(write_adapter(tmp_path / "a", shapes=shapes), spec)
    assert "v_proj" in msg and "wrong shapes" in msg and "[32, 8]" in msg


def test_missing_files(tmp_path, spec):
    assert "no such directory" in _error(str(tmp_path / "nowhere"), spec)
    d = Path(write_adapter(tmp_path / "a"))
    (d / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in _error(str(d), spec)
    (d / "adapter_model.bin").write_bytes(b"")
    assert "adapter_model.bin is not supported" in _error(str(d), spec)
    (d / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in _error(str(d), spec)
    b = Path(write_adapter(tmp_path / "b"))
    (b / "adapter_model.safetensors").write_bytes(b"\x01")
    assert "not a readable safetensors" in _error(str(b), spec)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    msg = _error(write_adapter(tmp_path / "c", tensors={key: np.zeros((8, HIDDEN), np.float32)}),
                 spec)
    assert "lora_B weight is missing" in msg


@pytest.mark.parametrize("config, needle", [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "biases"), ({"peft_type": "IA3"}, "IA3")])
def test_unsupported_features(tmp_path, spec, config, needle):
    assert needle in _error(write_adapter(tmp_path / "a", config=config), spec)


def test_layer_out_of_range(tmp_path, spec):
    key = f"base_model.model.model.layers.{LAYERS}.self_attn.q_proj"
    msg = _error(write_adapter(tmp_path / "a", tensors={
        f"{key}.lora_A.weight": np.zeros((8, HIDDEN), np.float32),
        f"{key}.lora_B.weight": np.zeros((HIDDEN, 8), np.float32)}), spec)
    assert f"layer {LAYERS} does not exist" in msg
