"""GGUF types sluice has no block kernels for (`DEQUANTIZED_TYPES`: IQ1_S .. IQ3_S, TQ1_0 /
TQ2_0, MXFP4, NVFP4, Q1_0): dequantized at load (gguf-py; sluice's own decoder for Q1_0, checked
here against the test's transcription of ggml's), and by default re-encoded exactly as blocks of
a kernel type, or requantized to Q8_0 blocks, where int8 activations run at every step
(`sluice.model.gguf_quant`).

On a tiny llama (hidden 256) whose 2-D weights but the embedding are random valid blocks of the
type:
* `--quantization gguf` (exact): the linear layers are float and the logits equal, bit for bit,
  those of a safetensors checkpoint holding gguf-py's decoding of the same blocks with
  llama.cpp's Q/K permutation undone by the test's own helper (tensor names, layout,
  permutation);
* default, where the packed int8 kernel runs (x86 with AVX2): every linear layer is a packed
  layer with int8 activations: for the types `gguf_transcode` re-encodes (where the file's block
  scales allow it: IQ3_XXS's random ones here do not), of the target type and holding exactly
  the decoded weights; for the others Q8_0 with exactly gguf-py's Q8_0 quantization of them.
  The load log names the re-encoding or the requantization, and the logits are within
  test_int8_quant's INT8_LOGITS_RTOL of the exact ones (int8 activations, plus Q8_0 weights:
  the error of `--quantization int8`); elsewhere the default is the exact float path;
* a layer whose tensors cannot all be re-encoded falls back to Q8_0, and under TP=2 every
  shard is re-encoded exactly where it holds whole target blocks (else requantized).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from _gguf_helpers import (gguf_name, llama_cpp_unpermute, load_hf_tensors,
                           random_dequantized_type_blocks, reference_dequantize, write_gguf)
from _sluice_model_helpers import load_ours
from sluice.model.gguf_transcode import TRANSCODE_TARGETS
from sluice.model.int8_quant import quantize_q8_0
from sluice.model.layers.gguf_linear import GgufBlockLinearMethod, dequantize_blocks
from sluice.model.layers.linear import LinearBase
from sluice.model_spec.gguf import DEQUANTIZED_TYPES, inspect_gguf, prepare_gguf
from sluice.testing.tiny_models import TinyModelSpec
from test_gguf_quantized import _logits
from test_int8_quant import assert_int8_steps_close


def _model_files(tiny_model_factory, tmp_path: Path, qtype: str,
                 edit: Callable[[str, np.ndarray], None] | None = None) -> tuple[Path, Path]:
    """(the prepared GGUF model dir, a safetensors checkpoint of gguf-py's decoding of the same
    blocks in HF layout); `edit(hf_name, blocks)` may change a tensor's random blocks first."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    src = tiny_model_factory("llama_h256_blocks", TinyModelSpec(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2))
    cfg = json.loads((src / "config.json").read_text())
    ggml_type = gguf.GGMLQuantizationType[qtype]
    elems, _ = GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(0)
    raw, tensors = {}, load_hf_tensors(src)
    for name, values in list(tensors.items()):
        if values.ndim != 2 or "embed" in name:
            continue
        rows, cols = values.shape
        blocks = random_dequantized_type_blocks(qtype, rows * cols // elems, rng)
        if edit is not None:
            edit(name, blocks)
        raw[gguf_name(name)] = (blocks.reshape(rows, -1), ggml_type)
        decoded = (reference_dequantize(qtype, blocks) if qtype == "Q1_0"   # gguf-py cannot
                   else np.asarray(dequantize(blocks, ggml_type), np.float32)).reshape(rows, cols)
        if ".q_proj." in name or ".k_proj." in name:   # the file holds llama.cpp's row order
            decoded = llama_cpp_unpermute(decoded, cfg["num_attention_heads"] if ".q_proj."
                                          in name else cfg["num_key_value_heads"])
        assert np.isfinite(decoded).all() and 0.005 < np.sqrt((decoded ** 2).mean()) < 0.1
        tensors[name] = np.ascontiguousarray(decoded)
    path = write_gguf(src, tmp_path / f"{qtype}.gguf", raw_tensors=raw)
    assert inspect_gguf(path).tensor_types[qtype] == len(raw) == 2 * 7 + 1   # + the LM head
    ref = tmp_path / "decoded"
    shutil.copytree(src, ref)
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    return prepare_gguf(path, tmp_path / "sidecars"), ref


@pytest.mark.parametrize("qtype", DEQUANTIZED_TYPES)
def test_dequantized_types_load_exactly_and_run_as_kernel_blocks(cpu_ops, tiny_model_factory, tmp_path,
                                                        caplog, qtype):
    model_dir, ref = _model_files(tiny_model_factory, tmp_path, qtype)
    exact = load_ours(model_dir, layer_ops="cpu", attn_backend="cpu_paged", quantization="gguf")
    assert not any(isinstance(m.linear_method, GgufBlockLinearMethod)
                   for m in exact.modules() if isinstance(m, LinearBase))
    floats = _logits(exact)
    expected = _logits(load_ours(ref, layer_ops="cpu", attn_backend="cpu_paged"))
    assert floats.keys() == expected.keys()
    assert all(torch.equal(floats[k], expected[k]) for k in expected)

    with caplog.at_level("INFO", logger="sluice.model"):
        default = load_ours(model_dir, layer_ops="cpu", attn_backend="cpu_paged")
    layers = {n: m for n, m in default.named_modules() if isinstance(m, LinearBase)}
    plain = dict(exact.named_modules())
    if not bool(cpu_ops.packed_int8_kernel()):   # no int8 kernel at every step: float
        assert not any(isinstance(m.linear_method, GgufBlockLinearMethod)
                       for m in layers.values())
        assert all(torch.equal(_logits(default)[k], floats[k]) for k in floats)
        return
    # the decoder's 2 x 7 projections; the LM head stays float (as int8's does)
    target = TRANSCODE_TARGETS.get(qtype) if qtype != "IQ3_XXS" else None
    if target is not None:
        assert f"re-encoded exactly as kernel blocks: {qtype} -> {target} (14 tensors)" \
            in caplog.text, caplog.text
    else:
        assert f"requantized to Q8_0 blocks: {qtype} (14 tensors)" in caplog.text, caplog.text
    for name, module in layers.items():
        method = module.linear_method
        assert isinstance(method, GgufBlockLinearMethod) and method.qtype == (target or "Q8_0")
        assert method.int8_activations and getattr(module, "vnni_packed", False)
        expected = plain[name].weight if target is not None else \
            dequantize_blocks(quantize_q8_0(plain[name].weight), "Q8_0")
        assert torch.equal(method.dequantized_weight(module), expected), name
    assert_int8_steps_close(_logits(default), floats)


def test_a_layer_with_a_scale_the_target_cannot_hold_is_requantized(cpu_ops, tiny_model_factory,
                                                                    tmp_path, caplog):
    """IQ1_S re-encodes as Q6_K with d / 8 in the fp16 field: one block of layer 0's k_proj
    with a subnormal d whose d / 8 is not an fp16 makes that tensor, and so the fused qkv layer
    (q, k, v), fall back to the Q8_0 requantization; every other layer is re-encoded exactly."""
    if not bool(cpu_ops.packed_int8_kernel()):
        pytest.skip("no packed int8 kernel on this CPU: these layers stay float")
    odd_subnormal = np.array([3], np.uint16).view(np.uint8)       # 3 * 2^-24

    def edit(name: str, blocks: np.ndarray) -> None:
        if name == "model.layers.0.self_attn.k_proj.weight":
            blocks[7, 0:2] = odd_subnormal

    model_dir, _ = _model_files(tiny_model_factory, tmp_path, "IQ1_S", edit)
    with caplog.at_level("INFO", logger="sluice.model"):
        default = load_ours(model_dir, layer_ops="cpu", attn_backend="cpu_paged")
    assert "re-encoded exactly as kernel blocks: IQ1_S -> Q6_K (11 tensors)" in caplog.text
    assert "requantized to Q8_0 blocks: IQ1_S (3 tensors)" in caplog.text, caplog.text
    qtypes = {n: m.linear_method.qtype for n, m in default.named_modules()
              if isinstance(m, LinearBase)}
    assert qtypes.pop("model.layers.0.self_attn.qkv_proj") == "Q8_0"
    assert set(qtypes.values()) == {"Q6_K"}


def _tp_linear_weights(model_dir: str, ref_dir: str) -> dict:
    """On a TP rank: {layer name: (its block type, its dequantized weight shard, the float
    checkpoint's shard of the same layer)} for the GGUF model's block layers, default mode."""
    default = load_ours(Path(model_dir), layer_ops="cpu", attn_backend="cpu_paged")
    exact = dict(load_ours(Path(ref_dir), layer_ops="cpu", attn_backend="cpu_paged")
                 .named_modules())
    return {name: (m.linear_method.qtype, m.linear_method.dequantized_weight(m),
                   exact[name].weight.detach().clone())
            for name, m in default.named_modules()
            if isinstance(m, LinearBase) and isinstance(m.linear_method, GgufBlockLinearMethod)}


def test_tp2_re_encodes_each_shard_exactly(cpu_ops, tiny_model_factory, tmp_path):
    """TP=2 on an IQ3_S model: the column shards (qkv, gate_up: whole rows) and down_proj's row
    shards (256 of 512 columns: one whole Q5_K block) hold exactly the float checkpoint's shard
    as Q5_K; o_proj's row shards (128 of 256 columns) would split a 256-value block, so they
    take the Q8_0 requantization of their shard."""
    from _sluice_model_helpers import run_on_tp_ranks

    if not bool(cpu_ops.packed_int8_kernel()):
        pytest.skip("no packed int8 kernel on this CPU: these layers stay float")
    model_dir, ref = _model_files(tiny_model_factory, tmp_path, "IQ3_S")
    ranks, _ = run_on_tp_ranks(_tp_linear_weights, (str(model_dir), str(ref)))
    want = {"qkv_proj": "Q5_K", "o_proj": "Q8_0", "gate_up_proj": "Q5_K", "down_proj": "Q5_K"}
    for layers in ranks:
        assert {n.rsplit(".", 1)[1] for n in layers} == set(want) and len(layers) == 2 * 4
        for name, (qtype, weight, shard) in layers.items():
            assert qtype == want[name.rsplit(".", 1)[1]], name
            expected = shard if qtype == "Q5_K" else \
                dequantize_blocks(quantize_q8_0(shard), "Q8_0")
            assert weight.shape == shard.shape and torch.equal(weight, expected), name
    down = [layers["model.layers.0.mlp.down_proj"][1] for layers in ranks]
    assert [d.shape for d in down] == [(256, 256)] * 2        # [hidden, intermediate / 2]
    assert not torch.equal(ranks[0]["model.layers.0.mlp.down_proj"][1],
                           ranks[1]["model.layers.0.mlp.down_proj"][1])
