"""Weight loading: single/sharded/bf16 checkpoints, dummy weights, and every error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _sluice_model_helpers import PagedRunner, hf_logits, load_hf, load_ours, prompts
from sluice.errors import ModelLoadError
from sluice.hf_config import load_model_spec
from sluice.model.loader import load_model, resolve_dtype
from sluice.model.models.registry import get_model_class, supported_architectures
from sluice.testing.tiny_models import TinyModelSpec


def logits_for(model, tokens):
    runner = PagedRunner(model)
    runner.add("a", tokens)
    return runner.step([("a", len(tokens))])["a"]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads(tiny_model_factory, tiny_model_dir):
    sharded = tiny_model_factory("sharded", TinyModelSpec(), max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    single = tiny_model_dir("LlamaForCausalLM")            # same seed and spec: same weights
    tokens = prompts(2048, [20])[0]
    torch.testing.assert_close(logits_for(load_ours(sharded), tokens),
                               logits_for(load_ours(single), tokens), atol=0, rtol=0)


def test_bf16_checkpoint_becomes_float32(tiny_model_factory, monkeypatch):
    """On a CPU without native bf16 products, `--dtype auto` loads a bf16 checkpoint in
    float32 (test_half_weights covers the CPUs that keep it in bf16)."""
    from sluice.model.layers import layer_ops
    monkeypatch.setattr(layer_ops, "native_bf16_products", lambda: False)
    d = tiny_model_factory("bf16", TinyModelSpec(), dtype="bfloat16")
    spec = load_model_spec(d)
    assert spec.torch_dtype == "bfloat16"
    dtype = resolve_dtype("auto", spec, torch.device("cpu"))
    assert dtype == torch.float32
    model = load_model(spec, dtype, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ckpt = load_file(str(d / "model.safetensors"))
    assert torch.equal(model.model.norm.weight, ckpt["model.norm.weight"].float())
    hf = load_hf(d)                                   # HF upcasts the same bf16 values
    tokens = prompts(2048, [12])[0]
    torch.testing.assert_close(logits_for(model, tokens), hf_logits(hf, tokens),
                               atol=5e-5, rtol=0)


def test_loaded_model_is_eval_without_grad(tiny_model_dir):
    model = load_ours(tiny_model_dir("LlamaForCausalLM"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_dummy_weights_are_seeded_and_skip_files(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("Qwen2ForCausalLM"), tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")   # never read
    spec = load_model_spec(d)
    a = load_model(spec, torch.float32, "cpu", load_format="dummy")
    b = load_model(spec, torch.float32, "cpu", load_format="dummy")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    tokens = prompts(2048, [9])[0]
    assert torch.isfinite(logits_for(a, tokens)).all()


def test_missing_shard_file(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory("sharded", TinyModelSpec(), max_shard_size="100KB"),
                   tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"missing shard.*{shard.name}"):
        load_ours(d)


def test_corrupt_safetensors(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("LlamaForCausalLM"), tmp_path / "m")
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*truncated or corrupt"):
        load_ours(d)


def _rewrite(d: Path, edit) -> None:
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unknown_tensor_name(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("LlamaForCausalLM"), tmp_path / "m")
    _rewrite(d, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra"):
        load_ours(d)


def test_missing_tensor(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("LlamaForCausalLM"), tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError,
                       match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj"):
        load_ours(d)


def test_shape_mismatch(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("LlamaForCausalLM"), tmp_path / "m")
    _rewrite(d, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight \(shape mismatch: "
                                             r"expected \(64,\), checkpoint has \(65,\)\)"):
        load_ours(d)


def test_untied_model_missing_lm_head(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("LlamaForCausalLM"), tmp_path / "m")
    _rewrite(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensors: lm_head\.weight"):
        load_ours(d)


def test_sliding_window_shorter_than_max_len_is_refused(tiny_model_factory):
    d = tiny_model_factory("mistral_sw", TinyModelSpec(architecture="MistralForCausalLM",
                                                       extra={"sliding_window": 64}))
    with pytest.raises(ModelLoadError, match="sliding_window=64.*max-model-len 64"):
        load_ours(d)
    model = load_ours(d, max_model_len=64)   # within the window: exact, so allowed
    hf = load_hf(d)
    tokens = prompts(2048, [40])[0]
    torch.testing.assert_close(logits_for(model, tokens), hf_logits(hf, tokens),
                               atol=5e-5, rtol=0)


def test_registry():
    assert set(supported_architectures()) >= {"LlamaForCausalLM", "Qwen3ForCausalLM"}
    with pytest.raises(ModelLoadError, match="not supported"):
        get_model_class("GPT2LMHeadModel")


def test_resolve_dtype(tiny_model_factory, monkeypatch):
    from sluice.model.layers import layer_ops
    spec = load_model_spec(tiny_model_factory("bf16", TinyModelSpec(), dtype="bfloat16"))
    for native, on_cpu in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(layer_ops, "native_bf16_products", lambda native=native: native)
        assert resolve_dtype("auto", spec, "cpu") == on_cpu
    assert resolve_dtype("auto", spec, "cuda") == torch.bfloat16
    assert resolve_dtype("float16", spec, "cpu") == torch.float16


def _python_calls_to_load(model_dir: Path) -> int:
    """Python function calls made by one load_ours(model_dir) (after a warm-up load)."""
    import sys
    load_ours(model_dir)
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"
    sys.setprofile(count)
    try:
        load_ours(model_dir)
    finally:
        sys.setprofile(None)
    return calls


def test_load_has_no_per_row_python_work(tiny_model_factory):
    """Loading costs a bounded number of Python calls per layer (~1,060 today for a layer's six
    weight tensors: construction, name mapping, one copy each), not per row or element: a
    4-layer and an 8-layer model of 512 x 1536 projections (~1,500 rows a layer) differ by at
    most 2,500 calls a layer. Counted, not timed: the count does not depend on the machine."""
    calls = {}
    for layers in (4, 8):
        spec = TinyModelSpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
        calls[layers] = _python_calls_to_load(tiny_model_factory(f"medium{layers}", spec))
    assert 0 < calls[8] - calls[4] <= 4 * 2500, calls
