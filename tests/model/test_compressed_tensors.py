"""Checkpoints stored quantized in compressed-tensors' format (`sluice.model.compressed_tensors`).

The checkpoints here are the tiny random Llama's, its seven linear weights per layer quantized
as llm-compressor writes them (`sluice.testing.compressed_checkpoints`): W8A8 (int8 `weight`,
bf16 `weight_scale` [out, 1]) and W4A16 (int4 packed in int32 `weight_packed`, a bf16 scale per
group of 32 inputs or per channel); `dequantized` is the same model saved as the float32
values W = q * scale, the oracle.

* The int8 layers hold exactly the checkpoint's integers and scales (their Q8_0 blocks decode
  to W bit for bit: a bf16 scale is exact in fp16).
* Logits against the float32 model on W: within INT8_LOGITS_RTOL (the activations alone are
  quantized, per 32 values), greedy tokens equal where the float top-2 gap is more than twice
  the largest difference (test_int8_quant's rule).
* `--quantization none`: the float model on W, logits bit-identical to loading `dequantized`.
* What sluice does not read is a ModelLoadError naming the field, before any weight loads.
* SmolLM2 written as W8A8: held-out perplexity within 2% of float32 (+0.47%); as W4A16, int8
  activations within 2% of float ones.
* W4A16: the Q4_0 blocks decode to W bit for bit (with zero points, Q4_1 blocks to W up to
  their fp16 mins); float activations (`--quantization compressed-tensors`) give the float
  model's logits on W up to fp32 summation order (W4A16_ATOL; with zero points
  ZERO_POINT_RTOL); the default and `--quantization int8` take int8 activations (the int8
  rule).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sluice.errors import ModelLoadError
from sluice.hf_config import load_model_spec
from sluice.model.layers.gguf_linear import GgufBlockLinearMethod
from sluice.model.layers.linear import LinearBase
from sluice.testing.compressed_checkpoints import (checkpoint_tensors, quantize_w4a16,
                                                   quantize_w8a8, w4a16_config, w8a8_config,
                                                   write_checkpoint)

from _sluice_model_helpers import load_ours, run_on_tp_ranks
from test_gguf_quantized import _logits
from test_int8_quant import assert_int8_logits_close


@pytest.fixture(scope="module")
def w8a8(llama_dir, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(int8 checkpoint dir, float32 dir of its dequantized values, {name: (q, scale)})."""
    tensors = checkpoint_tensors(llama_dir)
    quantized, dequantized, parts = quantize_w8a8(tensors)
    root = tmp_path_factory.mktemp("w8a8")
    return (write_checkpoint(llama_dir, root / "int8", w8a8_config(), quantized),
            write_checkpoint(llama_dir, root / "float", None, dequantized), parts)


def test_int8_checkpoint_runs_its_integers_and_matches_float(cpu_ops, w8a8):
    int8_dir, float_dir, parts = w8a8
    spec = load_model_spec(int8_dir)
    assert spec.quantization is not None and spec.quantization.scheme == "w8a8-int8"
    ours = load_ours(int8_dir, layer_ops="cpu", attn_backend="cpu_paged")
    dense = load_ours(float_dir, layer_ops="cpu", attn_backend="cpu_paged")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LinearBase)}
    assert layers and all(isinstance(m.linear_method, GgufBlockLinearMethod)
                          and m.linear_method.int8_activations for m in layers.values())
    assert ours.lm_head.weight.dtype == torch.float32               # ignored: float
    # every layer's blocks decode to the checkpoint's q * scale exactly (fused parts stacked)
    layer0 = "model.layers.0"
    expect = torch.cat([parts[f"{layer0}.self_attn.{p}.weight"][0].float()
                        * parts[f"{layer0}.self_attn.{p}.weight"][1]
                        for p in ("q_proj", "k_proj", "v_proj")])
    qkv = layers[f"{layer0}.self_attn.qkv_proj"]
    assert torch.equal(qkv.linear_method.dequantized_weight(qkv), expect)
    down = layers[f"{layer0}.mlp.down_proj"]
    q, scale = parts[f"{layer0}.mlp.down_proj.weight"]
    assert torch.equal(down.linear_method.dequantized_weight(down), q.float() * scale)
    assert_int8_logits_close(_logits(ours), _logits(dense))


def test_int8_checkpoint_dequantized_with_quantization_none(w8a8):
    int8_dir, float_dir, _ = w8a8
    ours = load_ours(int8_dir, quantization="none")
    dense = load_ours(float_dir)
    assert all(m.weight.dtype == torch.float32 for m in ours.modules()
               if isinstance(m, LinearBase))
    a, b = _logits(ours), _logits(dense)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _w4a16_weights(**changes) -> dict:
    return {**w4a16_config()["config_groups"]["group_0"]["weights"], **changes}


W8A8_GROUP = w8a8_config()["config_groups"]["group_0"]


@pytest.mark.parametrize("config,field", [
    (w8a8_config(quant_method="bitsandbytes"), "quant_method 'bitsandbytes'"),
    (w8a8_config(format="float-quantized"), "weights.type = 'int'"),
    (w8a8_config(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme.type = None"),
    (w8a8_config(config_groups={"g": {**W8A8_GROUP, "input_activations": None}}),
     "input_activations"),
    (w8a8_config(config_groups={"g": {**W8A8_GROUP, "input_activations": {
        "num_bits": 8, "type": "int", "symmetric": True, "dynamic": False,
        "strategy": "tensor"}}}), "input_activations.dynamic"),
    (w8a8_config(config_groups={"g": {**W8A8_GROUP, "weights": _w4a16_weights()}}),
     "weights.num_bits = 4"),
    (w8a8_config(config_groups={"g": {**W8A8_GROUP, "weights": {
        **W8A8_GROUP["weights"], "symmetric": False}}}), "weights.symmetric = False"),
    (w4a16_config(config_groups={"g": {**W8A8_GROUP, "input_activations": None,
                                       "weights": _w4a16_weights(actorder="group",
                                                                 strategy="channel",
                                                                 group_size=None)}}),
     "weights.actorder = 'group'"),
    (w4a16_config(config_groups={"g": {**W8A8_GROUP, "input_activations": None,
                                       "weights": _w4a16_weights(group_size=48)}}),
     "group_size = 48"),
    (w4a16_config(config_groups={"g": {**W8A8_GROUP, "weights": _w4a16_weights()}}),
     "input_activations of a pack-quantized"),
], ids=["bitsandbytes", "fp8-format", "kv-cache", "w8a16", "static-activations", "int4-as-int8",
        "asymmetric-int8", "actorder", "group-48", "w4a8"])
def test_unsupported_quantization_configs_fail_naming_the_field(llama_dir, tmp_path, config,
                                                                field):
    tensors = checkpoint_tensors(llama_dir)
    model_dir = write_checkpoint(llama_dir, tmp_path / "m", config, tensors)
    with pytest.raises(ModelLoadError, match="quantization_config") as info:
        load_model_spec(model_dir)
    assert field in str(info.value) and "compressed-tensors W8A8 int8" in str(info.value)


def test_a_fused_layer_stored_half_int8_fails(w8a8, tmp_path):
    int8_dir, _, _ = w8a8
    tensors = load_file(str(int8_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name].float() * tensors.pop(name + "_scale").float()
    model_dir = write_checkpoint(int8_dir, tmp_path / "half", None, tensors)
    with pytest.raises(ModelLoadError, match="parts of a fused layer must be stored alike"):
        load_ours(model_dir, layer_ops="cpu")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", ["w8a8", "w4a16", "w4a16-zero-points"])
def test_checkpoint_tp2_matches_tp1(cpu_ops, llama_dir, tmp_path, scheme):
    """Two gloo ranks: each reads the whole quantized tensors and keeps its shard's blocks
    (column shards split rows; row shards split whole 32-value blocks, so every activation
    block is quantized as at TP=1 and only the summation order changes)."""
    tensors = load_file(str(llama_dir / "model.safetensors"))
    symmetric = scheme != "w4a16-zero-points"
    quantized, config = ((quantize_w8a8(tensors)[0], w8a8_config()) if scheme == "w8a8" else
                         (quantize_w4a16(tensors, 32, symmetric)[0],
                          w4a16_config(32, symmetric)))
    assert_tp2_matches_tp1(str(write_checkpoint(llama_dir, tmp_path / scheme, config,
                                                quantized)))


def assert_tp2_matches_tp1(model_dir: str, quantization: str | None = None,
                           cache_dtype: torch.dtype = torch.float32, atol: float = 1e-4) -> None:
    """Greedy decoding of `model_dir` (loaded with `quantization`, a `cache_dtype` KV cache)
    on two gloo ranks gives TP=1's tokens, logits within `atol` (the row-parallel sums'
    order)."""
    from test_tensor_parallel import run_greedy

    torch.set_num_threads(1)
    args = (model_dir, "cpu", "cpu_paged", quantization, cache_dtype)
    got, want = run_on_tp_ranks(run_greedy, args, tp_size=2, local=lambda: run_greedy(*args))
    for step, (a, b) in enumerate(zip(got[0]["logits"], want["logits"])):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"step {step}: {m}")
    assert got[0]["tokens"] == want["tokens"] == got[1]["tokens"]


def test_smollm2_compressed_checkpoints_perplexity(cpu_ops, smollm2_gguf, tmp_path):
    """SmolLM2 (its Q4_1 file dequantized) written as W8A8 and as W4A16 (groups of 32), held-out
    perplexity with at most 8 tokens per step (the decode-sized paths at every forward): W8A8
    within the int8 bound (2%) of float32 (observed 20.951 -> 21.050, +0.47%); W4A16's int8
    activations (the default) within 2% of its float ones (`--quantization compressed-tensors`;
    observed 29.354 -> 29.480, +0.43%; round-to-nearest int4 itself costs this small model 40%)."""
    from sluice.frontend.llm import LLM
    from sluice.model.gguf_weights import iterate_gguf
    from sluice.model_spec.gguf import prepare_gguf
    from sluice.testing.perplexity import engine_perplexity, heldout_prompts

    from test_int8_quant import MAX_PPL_INCREASE

    tensors = dict(iterate_gguf(smollm2_gguf, torch.float32))
    meta = prepare_gguf(smollm2_gguf)
    w8a8_dir = write_checkpoint(meta, tmp_path / "w8a8", w8a8_config(),
                                quantize_w8a8(tensors)[0])
    w4a16_dir = write_checkpoint(meta, tmp_path / "w4a16", w4a16_config(32),
                                 quantize_w4a16(tensors, 32)[0])
    prompts = heldout_prompts(8)
    ppl = {}
    for name, model, mode in (("float32", smollm2_gguf, "none"), ("w8a8", w8a8_dir, None),
                              ("w4a16", w4a16_dir, None),
                              ("w4a16-float", w4a16_dir, "compressed-tensors")):
        with LLM(str(model), kv_cache_memory="64MiB", max_model_len=512,
                 max_num_batched_tokens=8, max_num_seqs=1, dtype="float32",
                 quantization=mode) as llm:
            ppl[name] = engine_perplexity(llm, prompts)[0]
    assert ppl["w8a8"] != ppl["float32"]           # the int8 weights were used
    assert ppl["w8a8"] <= ppl["float32"] * (1 + MAX_PPL_INCREASE), ppl
    assert ppl["w4a16"] != ppl["w4a16-float"]      # int8 activations were used
    assert abs(ppl["w4a16"] / ppl["w4a16-float"] - 1) <= MAX_PPL_INCREASE, ppl


def test_vllms_quantization_name_is_accepted_for_such_a_checkpoint_only(cpu_ops, w8a8):
    from sluice.errors import ConfigError

    int8_dir, float_dir, _ = w8a8
    ours = load_ours(int8_dir, layer_ops="cpu", quantization="compressed-tensors")
    assert all(m.weight.dtype == torch.uint8 for m in ours.modules()
               if isinstance(m, LinearBase))
    with pytest.raises(ConfigError, match="--quantization compressed-tensors needs a "
                                          "compressed-tensors checkpoint"):
        load_ours(float_dir, quantization="compressed-tensors")


W4A16_ATOL = dict(atol=1e-4, rtol=1e-4)   # float activations: fp32 summation order only
ZERO_POINT_RTOL = 2e-3                     # and with zero points, the fp16 mins of Q4_1


@pytest.fixture(scope="module", params=[(32, True), (None, True), (32, False)],
                ids=["group32", "channel", "group32-zero-points"])
def w4a16(request, llama_dir, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(int4 checkpoint dir, float32 dir of its dequantized values, {name: (q, scale, zero)})."""
    tensors = checkpoint_tensors(llama_dir)
    group, symmetric = request.param
    quantized, dequantized, parts = quantize_w4a16(tensors, group, symmetric)
    root = tmp_path_factory.mktemp("w4a16")
    return (write_checkpoint(llama_dir, root / "int4", w4a16_config(group, symmetric),
                             quantized),
            write_checkpoint(llama_dir, root / "float", None, dequantized), parts)


def test_int4_checkpoint_runs_q4_0_blocks_float_or_int8_activations(cpu_ops, w4a16):
    int4_dir, float_dir, parts = w4a16
    assert load_model_spec(int4_dir).quantization.scheme == "w4a16-int4"
    ours = load_ours(int4_dir, layer_ops="cpu", attn_backend="cpu_paged",
                     quantization="compressed-tensors")        # as stored: float activations
    dense = load_ours(float_dir, layer_ops="cpu", attn_backend="cpu_paged")
    symmetric = load_model_spec(int4_dir).quantization.symmetric
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LinearBase)}
    qtype = "Q4_0" if symmetric else "Q4_1"
    assert layers and all(repr(m.linear_method).startswith(f"GgufBlockLinearMethod({qtype}")
                          and not m.linear_method.int8_activations for m in layers.values())
    plain = dict(load_ours(float_dir).named_modules())   # W, fused as our layers hold it
    # symmetric: every layer decodes to the checkpoint's W exactly; with zero points, a block's
    # min -(8 + z) * scale is rounded to fp16 (11 significant bits): within 16 * scale * 2^-11
    top = max(p[1].max().item() for p in parts.values())
    for name, module in layers.items():
        got = module.linear_method.dequantized_weight(module)
        if symmetric:
            assert torch.equal(got, plain[name].weight), name
        else:
            torch.testing.assert_close(got, plain[name].weight, rtol=0,
                                       atol=16 * top * 2.0 ** -11, msg=name)
    a, b = _logits(ours), _logits(dense)
    for key in a:
        if symmetric:
            torch.testing.assert_close(a[key], b[key], **W4A16_ATOL, msg=key)
        else:   # the fp16 mins above: observed 5e-4 of the largest logit
            assert (a[key] - b[key]).abs().max() <= ZERO_POINT_RTOL * b[key].abs().max(), key
    # the default and --quantization int8: the same blocks with int8 activations (llama.cpp's
    # Q4_0 numerics). Prefill rows only: each model's decode step is fed its own prefill
    # argmax, and request 0's float top-2 are a near-tie that int8 activations flip (for
    # --quantization int8 of the float checkpoint as well)
    for mode in (None, "int8"):
        int8 = load_ours(int4_dir, layer_ops="cpu", attn_backend="cpu_paged", quantization=mode)
        assert all(m.linear_method.int8_activations for m in int8.modules()
                   if isinstance(m, LinearBase))
        got = _logits(int8)
        assert_int8_logits_close({k: v for k, v in got.items() if k.startswith("p")}, b)


def test_int4_checkpoint_dequantized_with_quantization_none(w4a16):
    int4_dir, float_dir, _ = w4a16
    a, b = _logits(load_ours(int4_dir, quantization="none")), _logits(load_ours(float_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_points_of_a_symmetric_checkpoint_are_checked_and_dropped(w8a8, tmp_path):
    """Some writers save all-zero `weight_zero_point` tensors for symmetric schemes."""
    int8_dir, float_dir, _ = w8a8
    tensors = load_file(str(int8_dir / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight_zero_point"
    tensors[name] = torch.zeros(tensors[name.replace("zero_point", "scale")].shape,
                                dtype=torch.int8)
    ok_dir = write_checkpoint(int8_dir, tmp_path / "zeros", None, tensors)
    a, b = _logits(load_ours(ok_dir, quantization="none")), _logits(load_ours(float_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    tensors[name][3] = 1
    bad_dir = write_checkpoint(int8_dir, tmp_path / "nonzero", None, tensors)
    with pytest.raises(ModelLoadError, match="nonzero zero point"):
        load_ours(bad_dir, quantization="none")


@pytest.mark.parametrize("actorder", ["weight", "static", "group", True])
def test_activation_ordered_int4_checkpoints(cpu_ops, llama_dir, tmp_path, actorder):
    """actorder 'weight' / 'static' changed only how the checkpoint was calibrated: its layers
    keep their Q4_0 blocks. 'group' (or True) stores `weight_g_idx`, each input's group: here a
    seeded shuffle of the groups of 32 per weight, so W[n, k] = q[n, k] * scale[n, g_idx[k]]:
    o / down keep their blocks over the inputs sorted by group (ActOrderBlockLinearMethod), the
    fused q/k/v and gate/up, whose parts differ in order, are dequantized exactly; the logits
    equal that float model's within the block kernels' tolerance."""
    from sluice.model.layers.gguf_linear import GgufBlockLinearMethod

    tensors = load_file(str(llama_dir / "model.safetensors"))
    quantized, dequantized, parts = quantize_w4a16(tensors, 32)
    config = w4a16_config(32)
    config["config_groups"]["group_0"]["weights"]["actorder"] = actorder
    grouped = actorder in ("group", True)
    if grouped:
        gen = torch.Generator().manual_seed(0)
        for name, (q, scale, _) in parts.items():
            k = q.shape[1]
            g_idx = (torch.arange(k) // 32)[torch.randperm(k, generator=gen)]
            quantized[name + "_g_idx"] = g_idx.to(torch.int32)
            dequantized[name] = q.float() * scale[:, g_idx]
    quant_dir = write_checkpoint(llama_dir, tmp_path / "q", config, quantized)
    float_dir = write_checkpoint(llama_dir, tmp_path / "f", None, dequantized)
    assert load_model_spec(quant_dir).quantization.act_order == grouped
    ours = load_ours(quant_dir, layer_ops="cpu", attn_backend="cpu_paged",
                     quantization="compressed-tensors")
    layers = [m for m in ours.modules() if isinstance(m, LinearBase)]
    if grouped:
        from sluice.model.layers.act_order_linear import ActOrderBlockLinearMethod
        fused = [m for m in layers if type(m).__name__ in ("QKVLinear", "MergedColumnLinear")]
        single = [m for m in layers if m not in fused]
        assert fused and all(m.weight.dtype == torch.float32 for m in fused)
        assert single and all(isinstance(m.linear_method, ActOrderBlockLinearMethod)
                              for m in single)
        dense = load_ours(float_dir, layer_ops="cpu", attn_backend="cpu_paged")
        a, b = _logits(ours), _logits(dense)
        for key in a:
            torch.testing.assert_close(a[key], b[key], **W4A16_ATOL, msg=key)
    else:
        assert all(isinstance(m.linear_method, GgufBlockLinearMethod) for m in layers)
