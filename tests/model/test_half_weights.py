"""16-bit weights over float32 activations (`sluice.model.layers.half_linear`): what
`--dtype bfloat16` / `float16` mean on a CPU with layer ops 'cpu', and the `--dtype auto` rule.

Tolerances:
* Kernels (`gguf_linear` types BF16 = 30, F16 = 1) vs F.linear in float64 on the widened weight
  (widening is exact: `gguf_dequantize` must equal `weight.float()` bit for bit): the fp32
  summation-order bound KERNEL_RTOL of test_gguf_quantized, on K with a tail that is not a
  multiple of the kernels' 8 / 32-element steps.
* Tiny model: logits of the bf16-weight model (fused decode stack, C++ kernels) vs the float32
  torch-reference model whose weights were rounded to bf16 — the same arithmetic up to summation
  order — within LOGITS_ATOL = 1e-4 of test_gguf_quantized (observed ~1e-6), except on a CPU
  whose oneDNN bf16 GEMM runs prefill (there the activations are rounded to bf16 too, a
  relative change of ~2^-9 per product, and the decode steps read the prefill's keys and values:
  PREFILL_BF16_RTOL = 2% of the logits' norm, for every step).
* Perplexity within 1% of float32 (the issue's bound): the demo model (tests/engine/
  test_demo_model.py) and SmolLM2 (tests/model/test_int8_quant.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.model.fused_decode import FUSED_DECODE_SUPPORT
from sluice.model.layers.greedy import GREEDY_SCREEN_SUPPORT
from sluice.model.layers.half_linear import HALF_KERNEL_TYPES, HalfWeightLinearMethod
from sluice.model.layers.layer_ops import model_compute_dtype, native_bf16_products
from sluice.model.layers.linear_method import linear_layers

from _sluice_model_helpers import load_ours
from test_gguf_quantized import KERNEL_RTOL, LOGITS_ATOL, _logits


def _logits_with(runner, lengths: tuple[int, ...] = (5, 17, 33)) -> dict[str, torch.Tensor]:
    """Prefill of one prompt per length, then 3 decode steps of all of them (logits of every
    step)."""
    out = {}
    for i, n in enumerate(lengths):
        runner.add(str(i), [(7 * j + i) % 100 + 1 for j in range(n)])
    first = runner.step([(str(i), n) for i, n in enumerate(lengths)])
    out.update({f"p{k}": v for k, v in first.items()})
    last = {k: int(v[-1].argmax()) for k, v in first.items()}
    for step in range(3):
        for rid, tok in last.items():
            runner.extend(rid, [tok])
        got = runner.step([(rid, 1) for rid in last])
        out.update({f"d{step}{k}": v for k, v in got.items()})
        last = {k: int(v[-1].argmax()) for k, v in got.items()}
    return out

PREFILL_BF16_RTOL = 0.02
NEAR_TIE = 1e-3


def _layer(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight, layer.bias = torch.nn.Parameter(weight, requires_grad=False), bias
    return layer


@pytest.mark.parametrize("dtype", list(HALF_KERNEL_TYPES))
@pytest.mark.parametrize("k", [37, 64, 200])
def test_half_weight_kernels_match_reference(cpu_ops, dtype, k):
    g = torch.Generator().manual_seed(k)
    n = 70
    weight = (torch.randn(n, k, generator=g) * torch.logspace(-2, 1, k)).to(dtype)
    wide = weight.float()
    out = torch.empty(n, k)
    cpu_ops.gguf_dequantize(out, weight, HALF_KERNEL_TYPES[dtype])
    assert torch.equal(out, wide)                                   # widening is exact
    cpu_ops.gguf_dequantize(out, weight.view(torch.uint8), HALF_KERNEL_TYPES[dtype])
    assert torch.equal(out, wide)                                   # the same bytes as uint8
    bias = torch.randn(n, generator=g)
    method = HalfWeightLinearMethod(cpu_ops, dtype, native_gemm=False)
    layer = _layer(weight, bias)
    for m in (1, 2, 3, 4, 5, 8, 9, 33):
        x = torch.randn(m, k, generator=g)
        y = method.apply(layer, x, bias)
        ref = F.linear(x.double(), wide.double(), bias.double())
        bound = x.abs().double() @ wide.abs().double().T + bias.abs().double()
        excess = ((y.double() - ref).abs() / bound).max().item()
        assert excess <= KERNEL_RTOL, (dtype, k, m, excess)
    # strided rows (a column-parallel shard's view) and a mismatched K are refused or honoured
    wide_rows = torch.randn(n, k + 16, generator=g).to(dtype)[:, :k]
    x = torch.randn(3, k, generator=g)
    y = torch.empty(3, n)
    cpu_ops.gguf_linear(y, x, wide_rows, HALF_KERNEL_TYPES[dtype], None)
    torch.testing.assert_close(y, x @ wide_rows.float().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="bytes per row"):
        cpu_ops.gguf_linear(torch.empty(1, n), torch.randn(1, k + 1), weight,
                            HALF_KERNEL_TYPES[dtype], None)


@pytest.mark.skipif(not native_bf16_products(), reason="no native bf16 GEMM (AMX-BF16 or "
                    "AVX-512-BF16 with oneDNN) on this CPU")
def test_native_bf16_gemm_rounds_only_the_activations(cpu_ops):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=g).to(torch.bfloat16)
    bias = torch.randn(96, generator=g)
    method = HalfWeightLinearMethod(cpu_ops, torch.bfloat16)
    assert method.native_gemm
    layer = _layer(weight, bias)
    method.process_weights_after_loading(layer)
    assert layer.packed_weight is not None
    x = torch.randn(40, 256, generator=g)
    y = method.apply(layer, x, bias)
    ref = F.linear(x.to(torch.bfloat16).double(), weight.double(), bias.double())
    bound = x.abs().double() @ weight.abs().double().T
    # fp32 accumulation, the result rounded to bf16 by oneDNN before it is widened
    assert ((y.double() - ref).abs() / (bound + ref.abs())).max().item() <= 2 ** -7


@pytest.mark.skipif(not native_bf16_products(), reason="no native bf16 GEMM (AMX-BF16 or "
                    "AVX-512-BF16 with oneDNN) on this CPU")
def test_onednn_bf16_linear_rounds_like_torch(cpu_ops):
    """`onednn_bf16_linear` narrows float32 activations to bf16 bit for bit as torch's
    .to(torch.bfloat16) does (nearest-even, ties included; NaN stays NaN) and widens oneDNN's
    bf16 result exactly: through an identity weight, out == x.to(bf16).float()."""
    from sluice.model.layers.half_linear import packed_bf16_weight
    k = 72
    eye = packed_bf16_weight(torch.eye(k, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, k, generator=g) * torch.logspace(-30, 30, k)
    x[1, :4] = torch.tensor([1.00390625, 1.01171875, -1.00390625, 3.0e38])  # ties, near max
    got = cpu_ops.onednn_bf16_linear(x, eye)
    assert torch.equal(got, x.to(torch.bfloat16).float())
    bias = torch.randn(k, generator=g)
    torch.testing.assert_close(cpu_ops.onednn_bf16_linear(x[:9], eye, bias),
                               x[:9].to(torch.bfloat16).float() + bias, rtol=0, atol=0)
    x[3, 5] = float("nan")
    assert cpu_ops.onednn_bf16_linear(x, eye)[3].isnan().any()
    # a bf16 input is oneDNN's input as it is: contiguous, strided rows, a padded row count
    for x16 in (x.nan_to_num().to(torch.bfloat16),
                torch.randn(33, 2 * k, generator=g).bfloat16()[:, :k]):
        got = cpu_ops.onednn_bf16_linear(x16, eye)
        assert got.dtype == torch.float32 and torch.equal(got, x16.float())


@pytest.mark.skipif(not native_bf16_products(), reason="no native bf16 GEMM (AMX-BF16 or "
                    "AVX-512-BF16 with oneDNN) on this CPU")
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("k", [200, 120])   # 6 / 3 whole 32-element chunks, then a tail
def test_bf16_linear_streams_few_rows_with_onednns_numerics(cpu_ops, rows, k):
    """`bf16_linear` (the layers', the fused stack's and the bf16 head's product): up to
    `streamed_bf16_rows()` rows on a CPU without AMX a streaming pass over the plain weight
    (vdpbf16ps, or the widening GEMV), otherwise oneDNN's GEMM; either way x rounded to bf16, float32 sums, the result rounded to
    bf16 (then widened, + bias): within one bf16 rounding of the float64 product of the rounded
    inputs, and of `onednn_bf16_linear`'s result. The rounding of x is observable: through an
    identity weight the result is x.to(bf16) exactly, for float32 and bf16 x, strided rows."""
    from sluice.model.layers.half_linear import packed_bf16_weight
    g = torch.Generator().manual_seed(2)
    n = 96   # K with a tail past the kernels' 32-element steps
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    packed, bias = packed_bf16_weight(w), torch.randn(n, generator=g)
    x = torch.randn(rows, 2 * k, generator=g)[:, :k]          # strided rows
    got = cpu_ops.bf16_linear(x, w, packed, bias)
    ref = x.to(torch.bfloat16).double() @ w.double().T
    bound = x.abs().double().to(torch.bfloat16).double() @ w.abs().double().T
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert ((got.double() - bias.double() - ref).abs() <= 2 ** -8 * (ref.abs() + bound)).all()
    oracle = cpu_ops.onednn_bf16_linear(x, packed, bias)
    assert ((got - oracle).abs() <= 2 ** -7 * (oracle - bias).abs() + 1e-6).all()
    got16 = cpu_ops.bf16_linear(x.to(torch.bfloat16), w, packed, None, False)
    assert got16.dtype == torch.bfloat16
    assert ((got16.double() - ref).abs() <= 2 ** -8 * (ref.abs() + bound)).all()
    eye = torch.eye(k, dtype=torch.bfloat16)
    x[0, :3] = torch.tensor([1.00390625, 1.01171875, -1.00390625])   # ties to even
    assert torch.equal(cpu_ops.bf16_linear(x, eye, packed_bf16_weight(eye)),
                       x.to(torch.bfloat16).float())
    # AMX: oneDNN at every row count; AVX512-BF16 (the v4 build): the vdpbf16ps kernel up to
    # 8 rows; else the widening GEMV up to 2
    expected = (0 if cpu_ops.amx_bf16_available() else 8 if cpu_ops.bf16_gemv_available()
                else 2)
    assert cpu_ops.streamed_bf16_rows() == expected
    streams = rows <= expected
    # the streamed path reads the plain weight: a copy that differs from the packed one shows
    other = cpu_ops.bf16_linear(x, -w, packed)
    assert torch.equal(other, -cpu_ops.bf16_linear(x, w, packed)) == streams


@pytest.mark.skipif(not native_bf16_products(), reason="no native bf16 GEMM (AMX-BF16 or "
                    "AVX-512-BF16 with oneDNN) on this CPU")
def test_bf16_mlp_keeps_bf16_between_its_gemms_with_the_same_bits(cpu_ops, llama_dir,
                                                                  monkeypatch):
    """A prefill MLP whose gate_up and down both run oneDNN's bf16 GEMM hands gate_up's bf16
    result to silu_and_mul and its bf16 result to down: the bits of the float32 round trip."""
    import sluice.model.models.llama as llama
    from sluice.model.layers import half_linear

    ours = load_ours(llama_dir, torch.bfloat16, layer_ops="cpu", attn_backend="cpu_paged")
    mlp = ours.model.layers[0].mlp
    method = half_linear.bf16_mlp_layers(mlp.gate_up_proj, mlp.down_proj)
    assert method is mlp.gate_up_proj.linear_method
    products = []
    real = HalfWeightLinearMethod.bf16_product
    monkeypatch.setattr(HalfWeightLinearMethod, "bf16_product",
                        lambda self, *a: products.append(1) or real(self, *a))
    x = torch.randn(37, mlp.gate_up_proj.in_features)
    with torch.no_grad():
        fast = mlp(x)
        monkeypatch.setattr(llama, "bf16_mlp_layers", lambda *a: None)
        plain = mlp(x)
    assert products == [1] and fast.dtype == torch.float32
    assert torch.equal(fast, plain)


def test_argmax_rows_bf16_is_torch_argmax_of_the_widened_rows(cpu_ops):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2500, generator=g).to(torch.bfloat16)   # 39 groups of 64 and a tail
    x[1, 1500] = x[1, 40] = 9.0                  # a tie across groups: the first one wins
    x[2, :] = -float("inf")                      # all -inf: index 0
    x[3, 2000], x[3, 2100] = float("nan"), 50.0  # a NaN wins, as in torch.argmax
    x[4, 7] = float("inf")
    x[5, 2499] = 20.0                            # the maximum in the tail past the last group
    out = torch.empty(6, dtype=torch.long)
    cpu_ops.argmax_rows_bf16(out, x)
    assert out.tolist() == torch.argmax(x.float(), dim=1).tolist()
    assert out[1] == 40 and out[3] == 2000 and out[5] == 2499


@pytest.mark.skipif(not native_bf16_products(), reason="no native bf16 GEMM (AMX-BF16 or "
                    "AVX-512-BF16 with oneDNN) on this CPU")
def test_bf16_head_greedy_tokens_are_the_argmax_of_its_logits(cpu_ops, tiny_model_dir):
    """A bf16 LM head's greedy path (`greedy_bf16`): the argmax of oneDNN's bf16 logits, the
    exact tokens of argmax over the head's float32 logits, for one row or many."""
    from sluice.model.layers.greedy_bf16 import Bf16HeadArgmax
    ours = load_ours(tiny_model_dir("LlamaForCausalLM"), torch.bfloat16, layer_ops="cpu",
                     attn_backend="cpu_paged")
    head = ours.lm_head
    assert isinstance(head.greedy, Bf16HeadArgmax)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, head.weight.shape[1], generator=g)
    with torch.inference_mode():
        want = torch.argmax(head(hidden), dim=1)
        for rows in (40, 3, 1):
            assert torch.equal(head.greedy_tokens(hidden[:rows]), want[:rows])


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_bf16_model_equals_float32_on_rounded_weights(cpu_ops, tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    ours = load_ours(model_dir, torch.bfloat16, layer_ops="cpu", attn_backend="cpu_paged")
    layers = linear_layers(ours)
    assert layers and all(type(l.linear_method) is HalfWeightLinearMethod
                          and l.weight.dtype == torch.bfloat16 for l in layers)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    assert ours.lm_head.weight.dtype == torch.bfloat16
    # everything that is not a linear weight or the embedding computes in float32
    others = [p for n, p in ours.named_parameters() if p.dim() == 1]
    assert others and all(p.dtype == torch.float32 for p in others)
    assert ours.model.fused_decode is not None                      # the decode stack runs them
    assert FUSED_DECODE_SUPPORT.first_unsupported(layers[:-1]) is None
    assert "not HalfWeightLinearMethod" in GREEDY_SCREEN_SUPPORT.unsupported(ours.lm_head)
    half_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    reference = load_ours(model_dir)                                 # float32, torch layers
    float_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert half_bytes < 0.6 * float_bytes
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    a, b = _logits(ours), _logits(reference)
    native = ours.lm_head.linear_method.native_gemm
    for key in a:
        if native:   # oneDNN's bf16 GEMM rounds prefill activations, and decode reads their KV
            assert ((a[key] - b[key]).norm() / b[key].norm()).item() <= PREFILL_BF16_RTOL, key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=LOGITS_ATOL)


def test_dtype_auto_and_compute_dtype_rules(monkeypatch):
    from sluice.model.layers import layer_ops
    from sluice.platform.cpu import CpuPlatform

    plat = CpuPlatform()
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(layer_ops, "native_bf16_products", lambda native=native: native)
        assert plat.resolve_dtype("auto", "bfloat16") == want
        assert plat.resolve_dtype("auto", "float16") == torch.float32
        assert plat.resolve_dtype("auto", "float32") == torch.float32
        assert plat.resolve_dtype("auto", None) == torch.float32
        assert plat.resolve_dtype("bfloat16", "float32") == torch.bfloat16   # explicit wins
    # 16-bit weights compute in float32 on the C++ layer ops; the torch reference keeps bf16
    assert model_compute_dtype("cpu", torch.bfloat16, "cpu") == torch.float32
    assert model_compute_dtype("cpu", torch.float16, "cpu") == torch.float32
    assert model_compute_dtype("torch", torch.bfloat16, "cpu") == torch.bfloat16
    assert model_compute_dtype("cpu", torch.float32, "cpu") == torch.float32


def test_16_bit_worker_dtypes(llama_dir):
    """`--dtype bfloat16` on a CPU: bf16 weights, float32 activations, a bf16 KV cache ('auto':
    the C++ attention and the fused decode stack read it); float16 weights a float16 cache
    (read by them as well); an explicit `--kv-cache-dtype` is honoured."""
    from sluice.config import EngineConfig
    from sluice.hf_config import load_model_spec
    from sluice.worker.worker import Worker

    spec = load_model_spec(llama_dir)

    def worker(**options) -> Worker:
        return Worker(EngineConfig.from_kwargs(model=str(llama_dir), **options), spec, 256)

    bf16 = worker(dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.model_runner.compute_dtype == torch.float32
    assert bf16.kv_cache_dtype == torch.bfloat16
    assert worker(dtype="float16").kv_cache_dtype == torch.float16
    assert worker(dtype="bfloat16", kv_cache_dtype="float32").kv_cache_dtype == torch.float32
    assert worker(dtype="float32").kv_cache_dtype == torch.float32
    assert worker(dtype="bfloat16", kernels="torch").kv_cache_dtype == torch.bfloat16


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lengths", [(5, 17, 33), tuple(range(3, 39, 3))])
def test_fused_decode_over_a_16_bit_cache_equals_the_python_layers(cpu_ops, llama_dir,
                                                                   monkeypatch, lengths,
                                                                   cache_dtype):
    """The fused decode stack writes k/v into a bf16 / fp16 cache rounded as torch rounds them
    (the same cache bits), and reads it as the Python layers' attention kernels do, and takes
    the same product per row count (oneDNN's bf16 GEMM where the CPU has native bf16 products,
    else the streaming GEMV for 3 rows and the panels for 12): the same logits."""
    from _sluice_model_helpers import PagedRunner
    from sluice.model.fused_decode import FusedDecode

    calls = []
    real_call = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__",
                        lambda self, *a: calls.append(a[0].shape[0]) or real_call(self, *a))
    ours = load_ours(llama_dir, torch.bfloat16, layer_ops="cpu", attn_backend="cpu_paged")
    assert ours.model.fused_decode is not None
    results = []
    for fused in (True, False):
        if not fused:
            ours.model.fused_decode = None
        torch.manual_seed(0)   # the caches' unused slots hold the same random fill
        runner = PagedRunner(ours)
        runner.kv_caches = [c.to(cache_dtype) for c in runner.kv_caches]
        results.append(_logits_with(runner, lengths))
        assert all(c.dtype == cache_dtype for c in runner.kv_caches)
        results[-1]["caches"] = torch.stack(runner.kv_caches)
        # the stack ran the 3 decode steps (a row per request) of the first run, none of the
        # second
        assert calls == [len(lengths)] * 3
    assert torch.equal(results[0].pop("caches").view(torch.int16),
                       results[1].pop("caches").view(torch.int16))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_model_factory):
    """A tiny Llama saved in bfloat16: its weights are exact in both dtypes."""
    from sluice.testing.tiny_models import TinyModelSpec
    return tiny_model_factory("llama-bf16", TinyModelSpec(architecture="LlamaForCausalLM"),
                              dtype="bfloat16")


def test_bf16_engine_greedy_equals_float32_on_a_bf16_checkpoint(bf16_checkpoint):
    """Through the engine (prefill, decode on the fused stack): greedy tokens of `--dtype
    bfloat16` equal float32's on a bf16 checkpoint; a first difference is accepted only at a
    near-tie of float32's top-2 logprobs (< NEAR_TIE, or twice the largest logprob change
    measured on the tokens both runs report up to there)."""
    from sluice.frontend.llm import LLM
    from sluice.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    prompts = ["The quick brown fox", "one two three four five", "a b a b a b"]
    outs = {}
    for dtype in ("float32", "bfloat16"):
        with LLM(str(bf16_checkpoint), dtype=dtype, kv_cache_memory="16MiB") as llm:
            outs[dtype] = [o.outputs[0] for o in llm.generate(prompts, params)]
    for ref, got in zip(outs["float32"], outs["bfloat16"]):
        assert len(got.token_ids) == 16
        drift = 0.0   # the largest |logprob change| of a shared token so far
        for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
            shared = ref.logprobs[i].keys() & got.logprobs[i].keys()
            drift = max([drift, *(abs(ref.logprobs[i][t].logprob - got.logprobs[i][t].logprob)
                                  for t in shared)])
            assert drift < 0.05, (i, drift)   # bf16 moves logprobs a little, never far
            if a != b:
                # a tie within what the 16-bit arithmetic moves a logprob (oneDNN's bf16 GEMM
                # also rounds activations): twice the drift seen, at least NEAR_TIE
                top2 = sorted((lp.logprob for lp in ref.logprobs[i].values()), reverse=True)
                assert top2[0] - top2[1] < max(NEAR_TIE, 2 * drift), (i, a, b, top2, drift)
                break
