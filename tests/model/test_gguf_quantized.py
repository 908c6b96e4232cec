"""GGUF linear weights kept in their quantized blocks (`GgufBlockLinearMethod`, the C++
`gguf_linear`) against the dequantized float path.

Tolerances:
* Kernel vs reference: the reference is F.linear in float64 on gguf-py's dequantization of the
  same blocks (the dequantization itself must be bit-identical: the kernels' `gguf_dequantize`
  == gguf-py). The kernel sums fp32 products in another order, so each output may differ by a
  few float32 roundings of the sum of |x_i w_i|: |y - ref| <= KERNEL_RTOL * (|x| @ |W|.T),
  KERNEL_RTOL = 2e-6 (K = 512 terms; observed <= 1.4e-7, i.e. >10x headroom; a wrong scale, a
  swapped nibble or a wrong sub-block is off by ~1e-1 of that bound or more).
The model-level checks run the blocks with float activations (`--quantization gguf`; the
default's int8 activations on an x86 CPU with AVX2 or AVX512-VNNI are checked in test_int8_quant):
* Tiny model (Q4_K attention, Q8_0 gate/up, Q4_1 down): logits of the quantized and
  dequantized paths agree to LOGITS_ATOL = 1e-4 (only summation order differs; observed ~1e-6)
  and greedy tokens through the engine are identical: the smallest top-2 logit gap of the
  checked positions (measured, >= 4e-3) must exceed 100x the paths' largest difference.
* SmolLM2 Q4_1: greedy continuations (24 tokens, 4 prompts) through the engine, quantized vs
  `--quantization none`, identical (the float paths differ from the block path by summation
  order only, ~1e-5 on logits; a first difference is accepted only at a near-tie, < 1e-3, and
  none was observed); linear weights take the file's bytes exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _gguf_helpers import (QK_K, gguf_name, load_hf_tensors, quantize, random_kquant_blocks,
                           write_gguf)
from _sluice_model_helpers import PagedRunner, load_ours, prompts, run_on_tp_ranks
from sluice.model.cpu_ops import load_cpu_ops
from sluice.model.fused_decode import FUSED_DECODE_SUPPORT
from sluice.model.layers.greedy import GREEDY_SCREEN_SUPPORT
from sluice.model.layers.gguf_linear import (BLOCK_TYPES, GgufBlockLinearMethod,
                                             dequantize_blocks)
from sluice.model.layers.linear_method import linear_layers
from sluice.model_spec.gguf import prepare_gguf
from sluice.testing.tiny_models import TinyModelSpec

KERNEL_RTOL = 2e-6
LOGITS_ATOL = 1e-4
ROWS = (1, 2, 7, 8, 9, 64)
TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS")


@pytest.fixture(scope="module")
def ops():
    module = load_cpu_ops()
    if module is None:
        pytest.skip("sluice's C++ operators are not available")
    return module


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row bytes]: gguf-py's quantization of random weights, or random valid
    k-quant / IQ4_NL / IQ4_XS blocks (gguf-py cannot write those)."""
    if qtype.endswith("_K") or qtype.startswith("IQ4"):
        elems = BLOCK_TYPES[qtype].block_elems
        blocks = random_kquant_blocks(qtype, rows * cols // elems, rng, scale=1e-2)
        return blocks.reshape(rows, -1)
    data, _ = quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qtype)
    return data


def block_layer(method: GgufBlockLinearMethod, blocks: np.ndarray, cols: int,
                bias: torch.Tensor | None) -> nn.Module:
    layer = nn.Module()
    method.create_weights(layer, cols, blocks.shape[0], bias=bias is not None,
                          dtype=torch.float32, weight_loader=lambda *a: None)
    layer.weight.data.copy_(torch.from_numpy(blocks))
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_matches_dequantized_reference(ops, qtype):
    rng = np.random.default_rng(1)
    n, k = 96, 512
    blocks = random_blocks(qtype, n, k, rng)
    assert blocks.shape == (n, BLOCK_TYPES[qtype].row_bytes(k))
    weight = dequantize_blocks(torch.from_numpy(blocks), qtype)
    out = torch.empty(n, k)
    ops.gguf_dequantize(out, torch.from_numpy(blocks), BLOCK_TYPES[qtype].ggml_id)
    assert torch.equal(out, weight)                       # bit-identical to gguf-py
    assert weight.abs().max() > 1e-3
    bias = torch.randn(n)
    method, reference = GgufBlockLinearMethod(ops, qtype), GgufBlockLinearMethod(None, qtype)
    layer = block_layer(method, blocks, k, bias)
    for m in ROWS:
        x = torch.randn(m, k)
        y = method.apply(layer, x, bias)
        ref = F.linear(x.double(), weight.double(), bias.double())
        bound = x.abs().double() @ weight.abs().double().T
        excess = ((y.double() - ref).abs() / (bound + 1e-30)).max().item()
        assert excess <= KERNEL_RTOL, (qtype, m, excess)
        # the pure-torch reference path (no C++ operators) is F.linear on the dequantized weight
        torch.testing.assert_close(reference.apply(layer, x, bias),
                                   F.linear(x, weight, bias), rtol=0, atol=0)


def test_kernel_takes_strided_rows_and_batched_inputs(ops):
    """A row shard (narrowed rows: a row stride larger than the row) and [..., in] inputs."""
    rng = np.random.default_rng(2)
    blocks = random_blocks("Q4_1", 64, 256, rng)
    wide = torch.from_numpy(np.concatenate([blocks, blocks[:, :40]], axis=1))
    layer = nn.Module()
    layer.weight = nn.Parameter(wide[:, :blocks.shape[1]], requires_grad=False)
    assert layer.weight.stride(0) != layer.weight.shape[1]
    weight = dequantize_blocks(torch.from_numpy(blocks), "Q4_1")
    x = torch.randn(3, 5, 256)
    y = GgufBlockLinearMethod(ops, "Q4_1").apply(layer, x, None)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", TYPES)
def test_decode_kernels_every_row_count_and_panel_remainder(ops, qtype):
    """The decode kernels run panels of 4 / 2 / 1 weight rows (by the x row count, 1..8) and
    prefetch rows ahead: N = 4 * 9 + 3 leaves a remainder for every panel size, and narrowed
    rows (a row stride larger than the row) keep the prefetch and the panels on the row stride.
    Float and (INT8_ACTIVATION_TYPES: the legacy types, Q4_K, Q5_K) int8 activations, against
    the float64 references."""
    from sluice.model.layers.gguf_linear import (INT8_ACTIVATION_TYPES, INT8_ACTIVATIONS_FLAG,
                                                 quantize_activations_q8)
    rng = np.random.default_rng(4)
    n, k = 39, 512
    blocks = random_blocks(qtype, n, k, rng)
    wide = torch.from_numpy(np.concatenate([blocks, blocks[:, :24]], axis=1))[:, :blocks.shape[1]]
    weight = dequantize_blocks(torch.from_numpy(blocks), qtype).double()
    bias = torch.randn(n)
    ggml_id = BLOCK_TYPES[qtype].ggml_id
    flags = (0, INT8_ACTIVATIONS_FLAG) if qtype in INT8_ACTIVATION_TYPES else (0,)
    for m in range(1, 9):
        x = torch.randn(m, k)
        for flag in flags:
            out = torch.empty(m, n)
            ops.gguf_linear(out, x, wide, ggml_id | flag, bias)
            xa = quantize_activations_q8(x) if flag else x
            ref = F.linear(xa.double(), weight, bias.double())
            bound = xa.abs().double() @ weight.abs().T + bias.abs().double()
            excess = ((out.double() - ref).abs() / bound).max().item()
            assert excess <= KERNEL_RTOL, (qtype, m, flag, excess)


def _check_bf16_products(ops, w: torch.Tensor, ggml_id: int, weight: torch.Tensor,
                         rows: tuple[int, ...]) -> None:
    """gguf_linear with BF16_PRODUCTS_FLAG against x @ W.T + bias computed in float64 from x and
    the dequantized `weight` rounded to bf16; the unrounded product must differ by far more
    (the check tells the two apart)."""
    from sluice.model.layers.gguf_linear import BF16_PRODUCTS_FLAG
    n, k = weight.shape
    bias = torch.randn(n)
    for m in rows:
        x = torch.randn(m, k)
        out = torch.empty(m, n)
        ops.gguf_linear(out, x, w, ggml_id | BF16_PRODUCTS_FLAG, bias)
        xr, wr = x.bfloat16().double(), weight.bfloat16().double()
        ref = F.linear(xr, wr, bias.double())
        bound = xr.abs() @ wr.abs().T + bias.abs().double()
        excess = ((out.double() - ref).abs() / bound).max().item()
        assert excess <= KERNEL_RTOL, (ggml_id, m, excess)
        exact = F.linear(x.double(), weight.double(), bias.double())
        assert ((exact - ref).abs() / bound).max().item() > 100 * KERNEL_RTOL


@pytest.mark.parametrize("qtype", TYPES)
def test_bf16_products_round_inputs_to_bf16(ops, qtype):
    """BF16_PRODUCTS_FLAG with more than 8 rows: x and the weight rounded to bf16, float32 sums
    — on AMX tiles where the CPU has AMX-BF16 (amx_gemm.cpp), through the sgemm elsewhere.
    Row counts and N = 2 * 32 + 6 leave remainders of AMX's 16-row x tiles and 32-row weight
    panels; the weight rows are narrowed (a row stride above the row)."""
    from sluice.model.cpu_ops import kernels_info
    from sluice.platform.cpu_kernels import cpu_flags
    if {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu_flags() \
            and kernels_info()["variant"] == "x86_64_v4":
        assert ops.amx_bf16_available()   # an AMX CPU with the AVX-512 build runs the tiles
    rng = np.random.default_rng(5)
    n, k = 70, 512
    blocks = random_blocks(qtype, n, k, rng)
    wide = torch.from_numpy(np.concatenate([blocks, blocks[:, :24]], axis=1))[:, :blocks.shape[1]]
    weight = dequantize_blocks(torch.from_numpy(blocks), qtype)
    _check_bf16_products(ops, wide, BLOCK_TYPES[qtype].ggml_id, weight, (9, 16, 17, 33, 64))
    # a K that AMX's 32-value chunks do not divide takes the sgemm with the same roundings
    half = (torch.randn(n, 48) * 0.05).half()
    _check_bf16_products(ops, half, 1, half.float(), (9, 20))
    # the pure-torch reference rounds alike
    method = GgufBlockLinearMethod(None, qtype, bf16_products=True)
    layer = block_layer(method, blocks, k, None)
    x = torch.randn(12, k)
    torch.testing.assert_close(method.apply(layer, x, None),
                               F.linear(x.bfloat16().float(), weight.bfloat16().float()))


# ---- a tiny GGUF model: mixed Q4_K / Q5_K / Q8_0 / Q4_1 linear weights --------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_factory, tmp_path_factory) -> Path:
    """Rows of 256 (the k-quant block): hidden 256, intermediate 512, 4 heads of 64; attention
    q/k/v as random Q4_K blocks, o Q5_K, gate/up Q8_0 and down Q4_1 (gguf-py's quantization of
    the checkpoint), embedding Q8_0, norms F32. Returns the sidecar directory."""
    import gguf

    src = tiny_model_factory("llama_h256_q", TinyModelSpec(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2))
    rng = np.random.default_rng(0)
    raw = {}
    for hf_name, values in load_hf_tensors(src).items():
        if values.ndim != 2:
            continue
        name = gguf_name(hf_name)
        if ".attn_" in name:
            kq = "Q5_K" if ".attn_output." in name else "Q4_K"
            blocks = random_kquant_blocks(kq, values.size // QK_K, rng, scale=4e-4)
            raw[name] = (blocks.reshape(values.shape[0], -1), gguf.GGMLQuantizationType[kq])
        else:
            qtype = "Q4_1" if ".ffn_down." in name else "Q8_0"
            raw[name] = quantize(values, qtype)
    root = tmp_path_factory.mktemp("gguf-quant")
    path = write_gguf(src, root / "tiny-mixed.gguf", raw_tensors=raw)
    return prepare_gguf(path, root / "sidecars")


def _logits(model) -> dict[str, torch.Tensor]:
    runner = PagedRunner(model)
    ps = prompts(model.spec.vocab_size, [5, 17, 1, 33])
    for i, p in enumerate(ps):
        runner.add(str(i), p)
    first = runner.step([(str(i), len(p)) for i, p in enumerate(ps)])
    for i in range(len(ps)):                       # one decode step of every request
        runner.extend(str(i), [int(first[str(i)][-1].argmax())])
    second = runner.step([(str(i), 1) for i in range(len(ps))])
    return {**{f"p{k}": v for k, v in first.items()}, **{f"d{k}": v for k, v in second.items()}}


def test_tiny_model_quantized_logits_equal_dequantized(ops, tiny_gguf, caplog):
    with caplog.at_level(logging.INFO, logger="sluice.model"):
        quant = load_ours(tiny_gguf, layer_ops="cpu", attn_backend="cpu_paged",
                          quantization="gguf")
    # float activations (the default's int8 ones on AVX2 / AVX512-VNNI: test_int8_quant);
    # gate/up + embedding + LM head Q8_0; only the norms (F32) are dequantized
    assert ("kept quantized: Q4_1 (2 tensors), Q4_K (6 tensors), Q5_K (2 tensors), "
            "Q8_0 (6 tensors); "
            "dequantized to torch.float32: F32 (5 tensors)") in caplog.text
    assert quant.model.embed_tokens.weight.dtype == torch.uint8
    assert repr(quant.lm_head.linear_method) == "GgufBlockLinearMethod(Q8_0)"
    methods = {repr(layer.linear_method) for layer in linear_layers(quant.model)}
    assert methods == {"GgufBlockLinearMethod(Q4_K)", "GgufBlockLinearMethod(Q5_K)",
                       "GgufBlockLinearMethod(Q8_0)", "GgufBlockLinearMethod(Q4_1)"}
    assert all(layer.weight.dtype == torch.uint8 for layer in linear_layers(quant.model))
    dense = load_ours(tiny_gguf, layer_ops="cpu", attn_backend="cpu_paged", quantization="none")
    assert all(layer.weight.dtype == torch.float32 for layer in linear_layers(dense.model))
    # fast paths: the fused decode stack takes block layers (declared in its FastPathSupport);
    # the greedy screen (a float LM head only) steps aside for a head over blocks
    assert quant.model.fused_decode is not None and dense.model.fused_decode is not None
    assert FUSED_DECODE_SUPPORT.unsupported(quant.model.layers[0].mlp.down_proj) is None
    assert "not GgufBlockLinearMethod(Q8_0)" in GREEDY_SCREEN_SUPPORT.unsupported(quant.lm_head)
    assert quant.lm_head.greedy is None
    a, b = _logits(quant), _logits(dense)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=LOGITS_ATOL)
    stack, quant.model.fused_decode = quant.model.fused_decode, None   # the Python layers
    python_layers = _logits(quant)
    quant.model.fused_decode = stack
    for key in a:
        torch.testing.assert_close(a[key], python_layers[key], rtol=0, atol=LOGITS_ATOL)
    # greedy choices agree at every position, and no top-2 gap is within reach of the
    # paths' difference (measured: gaps >= 4e-3, differences ~1e-6)
    diff = max((a[key] - b[key]).abs().max().item() for key in a)
    top2 = torch.cat(list(b.values())).topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 100 * diff
    assert all(torch.equal(a[key].argmax(-1), b[key].argmax(-1)) for key in a)


def test_torch_layer_ops_dequantize_unless_asked(tiny_gguf):
    """Default with layer ops 'torch': dequantized; `quantization='gguf'`: blocks, through the
    pure-torch reference, giving the same logits as the float path."""
    plain = load_ours(tiny_gguf)
    assert all(layer.weight.dtype == torch.float32 for layer in linear_layers(plain.model))
    blocks = load_ours(tiny_gguf, quantization="gguf")
    assert all(layer.weight.dtype == torch.uint8 for layer in linear_layers(blocks.model))
    a, b = _logits(blocks), _logits(plain)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=LOGITS_ATOL)


def test_engine_greedy_tokens_quantized_equal_dequantized(tiny_gguf):
    from sluice.frontend.llm import LLM
    from sluice.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    texts = ["The quick brown fox", "def main():", "Numbers: 1, 2, 3,"]
    runs = []
    for quantization in ("gguf", "none"):
        with LLM(str(tiny_gguf), kv_cache_memory="16MiB", max_model_len=256,
                 quantization=quantization) as llm:
            runs.append([o.outputs[0].token_ids for o in
                         llm.generate(texts, params, use_tqdm=False)])
    assert runs[0] == runs[1]


def _tp_run(model_dir: str) -> dict:
    """A TP rank's (or TP=1's) greedy run (test_tensor_parallel.run_greedy) and the methods of
    layer 0's projections; float activations (`--quantization gguf`): int8 ones would turn a
    summation-order difference into a different rounding of some activation (a jump of one
    quantization step, observed 4e-3 in a logit)."""
    from test_tensor_parallel import run_greedy

    out = run_greedy(model_dir, "cpu", "cpu_paged", quantization="gguf")
    model = load_ours(Path(model_dir), layer_ops="cpu", attn_backend="cpu_paged",
                      quantization="gguf")
    out["methods"] = {name.rsplit(".", 1)[1]: repr(m.linear_method)
                      for name, m in model.model.layers[0].named_modules()
                      if name.endswith("_proj")}
    return out


def test_tp2_keeps_row_shards_on_block_boundaries(ops, tiny_gguf):
    """TP=2: column shards split rows; down_proj's row shards (256 of 512 columns) hold whole
    Q4_1 blocks and stay quantized, o_proj's (128 of 256 columns) would split Q5_K blocks and is
    dequantized; logits and greedy tokens match TP=1 (summation order only)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got, want = run_on_tp_ranks(_tp_run, (str(tiny_gguf),),
                                    local=lambda: _tp_run(str(tiny_gguf)))
    finally:
        torch.set_num_threads(threads)
    assert want["methods"]["o_proj"] == "GgufBlockLinearMethod(Q5_K)"
    for rank in got:   # o_proj keeps the model's float method
        assert rank["methods"] == {**want["methods"], "o_proj": "CpuPackedLinearMethod"}, rank
    for a, b in zip(got[0]["logits"], want["logits"]):
        torch.testing.assert_close(a, b, rtol=0, atol=LOGITS_ATOL)
    assert got[0]["tokens"] == want["tokens"] == got[1]["tokens"]


def test_quantization_flag_rules(tiny_gguf, llama_dir):
    from sluice.config import EngineConfig
    from sluice.errors import ConfigError

    with pytest.raises(ConfigError, match="--quantization"):
        EngineConfig.from_kwargs(quantization="bitsandbytes")
    with pytest.raises(ConfigError, match="--quantization gguf"):
        EngineConfig.from_kwargs(quantization="gguf", load_format="dummy")
    with pytest.raises(ConfigError, match="needs a GGUF model"):
        load_ours(llama_dir, quantization="gguf")


# ---- SmolLM2-135M-Instruct Q4_1 -----------------------------------------------------------------

SMOL_PROMPTS = ["The history of the Roman Empire begins", "def fibonacci(n):\n    ",
                "Q: What is 17 times 23?\nA:", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def smol_sidecar(smollm2_gguf, tmp_path_factory):
    return prepare_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2-q-sidecar"))


def test_smollm2_linear_weights_take_the_files_bytes(ops, smol_sidecar, smollm2_gguf):
    from sluice.model_spec.gguf import open_gguf
    from sluice.worker.model_runner import ModelRunner

    model = load_ours(smol_sidecar, layer_ops="cpu")
    layers = linear_layers(model.model)
    assert {layer.linear_method.qtype for layer in layers} == {"Q4_1"}
    linear_bytes = sum(layer.weight.numel() for layer in layers)
    file_bytes = sum(int(t.n_bytes) for t in open_gguf(smollm2_gguf).tensors
                     if t.name.startswith("blk.") and t.tensor_type.name == "Q4_1")
    assert linear_bytes == file_bytes                 # ~65 MB, not 4-8x
    float_linear = sum(layer.in_features * layer.out_features * 4 for layer in layers)
    assert float_linear > 6 * linear_bytes
    # the tied embedding / LM head stays in its Q8_0 blocks too
    embd = next(t for t in open_gguf(smollm2_gguf).tensors if t.name == "token_embd.weight")
    assert model.model.embed_tokens.weight.numel() == int(embd.n_bytes)
    # the model runner's accounting (KV sizing) counts the blocks, not a float size
    counted = ModelRunner.model_memory_bytes(SimpleNamespace(model=model))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params <= counted < params + float_linear // 2


def test_smollm2_greedy_quantized_equals_dequantized(ops, smol_sidecar):
    from sluice.frontend.llm import LLM
    from sluice.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = []
    for quantization in ("gguf", "none"):
        with LLM(str(smol_sidecar), kv_cache_memory="64MiB", max_model_len=256,
                 quantization=quantization) as llm:
            runs.append([list(o.outputs[0].token_ids) for o in
                         llm.generate(SMOL_PROMPTS, params, use_tqdm=False)])
    assert runs[0] == runs[1], json.dumps(runs)
