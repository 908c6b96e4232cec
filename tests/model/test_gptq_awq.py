"""GPTQ and AWQ checkpoints (`sluice.model.gptq_awq`).

The checkpoints are the tiny random Llama's, its seven linear weights per layer quantized and
packed as AutoGPTQ / AutoAWQ store them (`sluice.testing.gptq_awq_checkpoints`); `float` is
the same model saved as the float32 values W' the format's readers get back, the oracle.

* Symmetric 4-bit GPTQ: Q4_0 blocks that decode to W' bit for bit; 8-bit: Q8_0, likewise.
* With zero points (GPTQ asymmetric, either checkpoint_format; AWQ): Q4_1 blocks within their
  fp16 mins of W'.
* `--quantization gptq|awq` (float activations): the logits of the float model on the weights
  the blocks hold up to fp32 summation order; the default: int8 activations (the int8 rule
  of test_int8_quant against the float model on W').
* Act order, 8-bit zero points, `--quantization none`: float weights equal to W', logits
  bit-identical to loading `float`.
* What sluice does not read is a ModelLoadError naming the field; a format flag on another
  checkpoint is a ConfigError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sluice.errors import ConfigError, ModelLoadError
from sluice.hf_config import load_model_spec
from sluice.model.layers.linear import LinearBase
from sluice.testing.compressed_checkpoints import write_checkpoint
from sluice.testing.gptq_awq_checkpoints import (awq_config, gptq_config, quantize_awq,
                                                 quantize_gptq)

from _sluice_model_helpers import load_ours
from test_compressed_tensors import W4A16_ATOL, assert_tp2_matches_tp1
from test_gguf_quantized import _logits
from test_int8_quant import assert_int8_logits_close

#: name -> (writer keywords, config); 'awq' uses quantize_awq
CHECKPOINTS = {
    "gptq4-sym": dict(bits=4, group_size=32, sym=True),
    "gptq4-channel": dict(bits=4, group_size=-1, sym=True),
    "gptq4-zero-points": dict(bits=4, group_size=32, sym=False),
    "gptq4-zero-points-v2": dict(bits=4, group_size=64, sym=False, checkpoint_format="gptq_v2"),
    "gptq8-sym": dict(bits=8, group_size=32, sym=True),
    "awq": dict(group_size=32),
    # activation order: blocks over the inputs sorted by group (ActOrderBlockLinearMethod)
    "gptq4-act-order": dict(bits=4, group_size=32, sym=True, desc_act=True),
    "gptq4-act-order-zero-points": dict(bits=4, group_size=32, sym=False, desc_act=True),
}
#: checkpoints that dequantize to float at load (logits bit-identical to the float model)
FLOAT_CHECKPOINTS = {
    "gptq8-zero-points": dict(bits=8, group_size=32, sym=False),
    "gptq4-group-48": dict(bits=4, group_size=48, sym=False),
}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def write(llama_dir: Path, root: Path, kind: str, options: dict,
          **writer_only) -> tuple[Path, Path]:
    """(the quantized checkpoint dir, the float32 dir of its oracle W'); `writer_only`: more
    keywords of quantize_gptq (not config fields)."""
    tensors = _tensors(llama_dir)
    if kind == "awq":
        quantized, dequantized = quantize_awq(tensors, options["group_size"])
        config = awq_config(options["group_size"])
    else:
        quantized, dequantized = quantize_gptq(tensors, **options, **writer_only)
        config = gptq_config(**options)
    return (write_checkpoint(llama_dir, root / "quantized", config, quantized),
            write_checkpoint(llama_dir, root / "float", None, dequantized))


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def packed(request, llama_dir, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    return (request.param, *write(llama_dir, root, request.param, CHECKPOINTS[request.param]))


def _block_type(kind: str) -> str:
    if kind == "gptq8-sym":
        return "Q8_0"
    return "Q4_0" if kind in ("gptq4-sym", "gptq4-channel", "gptq4-act-order") else "Q4_1"


def _method_name(kind: str) -> str:
    return "ActOrderBlockLinearMethod" if "act-order" in kind else "GgufBlockLinearMethod"


def test_checkpoint_keeps_its_integers_as_blocks(cpu_ops, packed):
    kind, quant_dir, float_dir = packed
    spec = load_model_spec(quant_dir)
    assert spec.quantization.method == ("awq" if kind == "awq" else "gptq")
    flag = spec.quantization.method
    ours = load_ours(quant_dir, layer_ops="cpu", attn_backend="cpu_paged", quantization=flag)
    dense = load_ours(float_dir, layer_ops="cpu", attn_backend="cpu_paged")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LinearBase)}
    qtype = _block_type(kind)
    assert layers and all(repr(m.linear_method).startswith(f"{_method_name(kind)}({qtype}")
                          and not m.linear_method.int8_activations for m in layers.values())
    if "act-order" in kind:    # every layer's inputs reordered (q/k/v and gate/up share one)
        assert all(not torch.equal(m.input_order, torch.arange(m.in_features))
                   for m in layers.values())
        # the reference path (x needing a gradient) multiplies the same reordered blocks
        for module in layers.values():
            x = torch.randn(3, module.in_features)
            fast = module.linear_method.apply(module, x, None)
            slow = module.linear_method.apply(module, x.clone().requires_grad_(), None)
            assert slow.grad_fn is not None
            torch.testing.assert_close(slow.detach(), fast, rtol=1e-5, atol=1e-5)
    assert ours.model.fused_decode is not None    # decode steps run the C++ stack
    assert ours.lm_head.weight.dtype == torch.float32
    # the float model on the weights the blocks hold: W' itself where exact; with zero points
    # W' but for each block's min -(8 + z) * s rounded to fp16 (within 16 * s * 2^-11)
    held = load_ours(float_dir)                   # torch layer ops: they read .weight per call
    plain = dict(held.named_modules())
    exact = qtype != "Q4_1"
    for name, module in layers.items():
        got, want = module.linear_method.dequantized_weight(module), plain[name].weight
        if exact:
            assert torch.equal(got, want), name
        else:
            scale = want.abs().max() / 7
            torch.testing.assert_close(got, want, rtol=0, atol=16 * scale * 2.0 ** -11,
                                       msg=name)
            want.copy_(got)
    a, b = _logits(ours), _logits(held)
    for key in a:
        torch.testing.assert_close(a[key], b[key], **W4A16_ATOL, msg=key)
    # the default: the same blocks with int8 activations (llama.cpp's numerics); prefill rows
    # only (each model's decode step is fed its own prefill argmax, see test_compressed_tensors)
    default = load_ours(quant_dir, layer_ops="cpu", attn_backend="cpu_paged")
    assert all(m.linear_method.int8_activations for m in default.modules()
               if isinstance(m, LinearBase))
    assert_int8_logits_close({k: v for k, v in _logits(default).items() if k.startswith("p")},
                             _logits(dense))


def test_checkpoint_dequantized_with_quantization_none(packed):
    _, quant_dir, float_dir = packed
    ours = load_ours(quant_dir, quantization="none")
    assert all(m.weight.dtype == torch.float32 for m in ours.modules()
               if isinstance(m, LinearBase))
    a, b = _logits(ours), _logits(load_ours(float_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", list(FLOAT_CHECKPOINTS))
def test_what_blocks_cannot_hold_is_dequantized_exactly(cpu_ops, llama_dir, tmp_path, kind,
                                                        caplog):
    quant_dir, float_dir = write(llama_dir, tmp_path, kind, FLOAT_CHECKPOINTS[kind])
    with caplog.at_level("INFO", logger="sluice.model"):
        ours = load_ours(quant_dir, layer_ops="cpu", attn_backend="cpu_paged")
    reason = {"gptq8-zero-points": "8-bit values with zero points",
              "gptq4-group-48": "groups of 48 inputs"}[kind]
    assert "all 14 quantized weights dequantized" in caplog.text and reason in caplog.text
    assert all(m.weight.dtype == torch.float32 for m in ours.modules()
               if isinstance(m, LinearBase))
    dense = load_ours(float_dir, layer_ops="cpu", attn_backend="cpu_paged")
    a, b = _logits(ours), _logits(dense)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_zero_point_of_zero_reads_as_the_formats_sixteen(llama_dir, tmp_path):
    """checkpoint_format 'gptq' stores Z - 1: a zero point of 0 is stored as 15 and every
    reader of the format (AutoGPTQ's kernels, vLLM's, sluice) takes it as 16."""
    from sluice.model.gptq_awq import read
    tensors = _tensors(llama_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].abs() + 0.01    # all positive: the minimum clamps to 0
    quantized, _ = quantize_gptq(tensors, bits=4, group_size=32, sym=False)
    quant_dir = write_checkpoint(llama_dir, tmp_path / "q", gptq_config(group_size=32, sym=False),
                                 quantized)
    stored = read(sorted(quant_dir.glob("*.safetensors")), load_model_spec(quant_dir)
                  .quantization)
    assert bool((stored.zeros[name] == 16 - 8).all())


@pytest.mark.parametrize("config,field", [
    (gptq_config(bits=3), "bits = 3"),
    (gptq_config(checkpoint_format="marlin"), "checkpoint_format = 'marlin'"),
    (gptq_config(dynamic={"-:.*down_proj": {}}), "dynamic"),
    (gptq_config(group_size=0), "group_size = 0"),
    (awq_config(version="gemv"), "version = 'gemv'"),
    (awq_config(zero_point=False), "zero_point = False"),
    (awq_config(bits=8), "bits = 8"),
], ids=["gptq-3bit", "gptq-marlin", "gptq-dynamic", "gptq-group-0", "awq-gemv",
        "awq-no-zero-point", "awq-8bit"])
def test_unsupported_gptq_awq_configs_fail_naming_the_field(llama_dir, tmp_path, config,
                                                            field):
    model_dir = write_checkpoint(llama_dir, tmp_path / "m", config, _tensors(llama_dir))
    with pytest.raises(ModelLoadError, match="quantization_config") as info:
        load_model_spec(model_dir)
    assert field in str(info.value) and "GPTQ (bits 4 or 8" in str(info.value)


def test_sidecar_quantize_config_of_older_checkpoints(llama_dir, tmp_path):
    """AutoGPTQ / AutoAWQ checkpoints from before transformers carried quantization_config keep
    it in quantize_config.json / quant_config.json (AutoAWQ's own key names)."""
    gptq_dir = write_checkpoint(llama_dir, tmp_path / "gptq", None, _tensors(llama_dir))
    (gptq_dir / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 128, "desc_act": True, "sym": False}))
    scheme = load_model_spec(gptq_dir).quantization
    assert (scheme.method, scheme.act_order, scheme.symmetric, scheme.zero_point_offset) == (
        "gptq", True, False, 1)
    awq_dir = write_checkpoint(llama_dir, tmp_path / "awq", None, _tensors(llama_dir))
    (awq_dir / "quant_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}))
    scheme = load_model_spec(awq_dir).quantization
    assert (scheme.method, scheme.group_size, scheme.symmetric) == ("awq", 64, False)


def test_format_flag_needs_that_format(llama_dir, tmp_path):
    quant_dir, float_dir = write(llama_dir, tmp_path, "awq", CHECKPOINTS["awq"])
    with pytest.raises(ConfigError, match="--quantization gptq needs a gptq checkpoint.*is a "
                                          "awq checkpoint"):
        load_ours(quant_dir, quantization="gptq")
    with pytest.raises(ConfigError, match="--quantization awq needs a awq checkpoint.*is a "
                                          "float checkpoint"):
        load_ours(float_dir, quantization="awq")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["gptq4-zero-points", "awq", "gptq4-act-order"])
def test_gptq_awq_tp2_matches_tp1(cpu_ops, llama_dir, tmp_path, kind):
    """Two gloo ranks, each keeping its shard's blocks (as test_compressed_tensors' TP test);
    with activation order the row-parallel layers (o, down) dequantize (a shard's inputs do not
    follow the sorted order) and the column-parallel ones keep their reordered blocks, so the
    two runs compare with float activations (`--quantization gptq`: both exact products of W)."""
    assert_tp2_matches_tp1(str(write(llama_dir, tmp_path, kind, CHECKPOINTS[kind])[0]),
                           "gptq" if "act-order" in kind else None)

def test_act_order_parts_with_different_orders_dequantize(cpu_ops, llama_dir, tmp_path,
                                                          caplog):
    """A fused layer whose parts sort their inputs differently (q/k/v, gate/up quantized in
    orders of their own) cannot gather one input order: it is dequantized exactly and logged;
    the single layers (o, down) keep their reordered blocks. Logits equal the float model's
    on the same weights within the block kernels' tolerance."""
    quant_dir, float_dir = write(llama_dir, tmp_path, "gptq4-act-order",
                                 CHECKPOINTS["gptq4-act-order"], shared_input_order=False)
    with caplog.at_level("INFO", logger="sluice.model"):
        ours = load_ours(quant_dir, layer_ops="cpu", attn_backend="cpu_paged",
                         quantization="gptq")
    assert "layers with activation order dequantized: its fused parts order their inputs " \
           "differently" in caplog.text
    layers = {n.rsplit(".", 1)[-1]: m for n, m in ours.named_modules()
              if isinstance(m, LinearBase)}
    for name in ("qkv_proj", "gate_up_proj"):
        assert layers[name].weight.dtype == torch.float32, name
    for name in ("o_proj", "down_proj"):
        assert repr(layers[name].linear_method).startswith("ActOrderBlockLinearMethod"), name
    a, b = _logits(ours), _logits(load_ours(float_dir))
    for key in a:
        torch.testing.assert_close(a[key], b[key], **W4A16_ATOL, msg=key)


def test_act_order_checkpoint_with_quantization_int8(cpu_ops, llama_dir, tmp_path):
    """An act-order checkpoint under `--quantization int8` keeps its reordered int4 blocks, as
    any GPTQ checkpoint keeps its integers, with int8 activations."""
    quant_dir, float_dir = write(llama_dir, tmp_path, "gptq4-act-order",
                                 CHECKPOINTS["gptq4-act-order"])
    ours = load_ours(quant_dir, layer_ops="cpu", attn_backend="cpu_paged", quantization="int8")
    layers = [m for m in ours.modules() if isinstance(m, LinearBase)]
    assert layers and all(repr(m.linear_method).startswith("ActOrderBlockLinearMethod(Q4_0")
                          and m.linear_method.int8_activations for m in layers)
    dense = load_ours(float_dir, layer_ops="cpu", attn_backend="cpu_paged")
    assert_int8_logits_close({k: v for k, v in _logits(ours).items() if k.startswith("p")},
                             _logits(dense))


@pytest.mark.parametrize("kind", ["gptq4-sym", "awq"])
def test_qwen2_checkpoint_with_qkv_bias(cpu_ops, tiny_model_dir, tmp_path, kind):
    """Qwen2 (q/k/v biases stored in float beside the packed weights, as Qwen2.5's official
    GPTQ-Int4 / AWQ checkpoints hold them): the biases load with the blocks, and the logits
    equal the float model's on the weights the blocks hold."""
    qwen_dir = tiny_model_dir("Qwen2ForCausalLM")
    quant_dir, float_dir = write(qwen_dir, tmp_path, kind, CHECKPOINTS[kind])
    assert any(name.endswith("q_proj.bias") for name in _tensors(quant_dir))
    flag = "awq" if kind == "awq" else "gptq"
    ours = load_ours(quant_dir, layer_ops="cpu", attn_backend="cpu_paged", quantization=flag)
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert repr(qkv.linear_method).startswith("GgufBlockLinearMethod(Q4_")
    held = load_ours(float_dir)
    for name, module in ours.named_modules():
        if isinstance(module, LinearBase):
            dict(held.named_modules())[name].weight.copy_(
                module.linear_method.dequantized_weight(module))
    a, b = _logits(ours), _logits(held)
    for key in a:
        torch.testing.assert_close(a[key], b[key], **W4A16_ATOL, msg=key)
