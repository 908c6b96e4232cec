"""The linear-layer seam: a `LinearMethod` chosen when the model is built, and the fast paths'
declarations of what they support (`FastPathSupport`): a method they do not list makes them
step aside, and the model's outputs stay those of the plain run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sluice.hf_config import load_model_spec
from sluice.model.fused_decode import FUSED_DECODE_SUPPORT
from sluice.model.layers import ReplicatedLinear, RowParallelLinear
from sluice.model.layers.greedy import GREEDY_SCREEN_SUPPORT
from sluice.model.layers.greedy_bf16 import Bf16HeadArgmax
from sluice.model.layers.layer_ops import LayerOps, building_with, current_layer_ops
from sluice.model.layers.half_linear import HalfWeightLinearMethod
from sluice.model.layers.linear_method import (CpuPackedLinearMethod, DenseLinearMethod,
                                               LinearMethod, linear_layers)
from sluice.model.loader import load_model


class EchoLinearMethod(LinearMethod):
    """Test-only: plain F.linear under a method type no fast path lists (as LoRA or a
    quantized method would be)."""

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


def _load(model_dir, layer_ops, dtype=torch.float32):
    return load_model(load_model_spec(model_dir), dtype, "cpu", layer_ops=layer_ops,
                      attn_backend="cpu_paged")


def test_layers_take_the_method_chosen_at_construction(tiny_model_dir, cpu_ops):
    """'cpu' float32: every linear layer and the LM head hold one CpuPackedLinearMethod and
    their packed copies; 'torch': F.linear and no C++ operators; 'cpu' bfloat16: the C++ tiles
    without packing. No layer carries a patched `gemm` hook."""
    d = tiny_model_dir("LlamaForCausalLM")
    model = _load(d, "cpu")
    layers = linear_layers(model)
    assert len(layers) == 4 * model.spec.num_hidden_layers + 1 and layers[-1] is model.lm_head
    methods = {id(m.linear_method) for m in layers}
    assert len(methods) == 1
    if torch.backends.mkldnn.is_available():
        assert all(type(m.linear_method) is CpuPackedLinearMethod for m in layers)
        assert all(m.packed_weight is not None for m in layers)
    assert all(FUSED_DECODE_SUPPORT.unsupported(m) is None for m in layers[:-1])
    assert GREEDY_SCREEN_SUPPORT.unsupported(model.lm_head) is None
    assert not any(hasattr(m, "gemm") for m in model.modules())
    assert model.model.norm.cpu_ops is cpu_ops and model.model.layers[0].mlp.act_fn.cpu_ops \
        is cpu_ops and model.model.layers[0].self_attn.cpu_ops is cpu_ops

    torch_model = _load(d, "torch")
    assert all(type(m.linear_method) is DenseLinearMethod and m.linear_method.gemm is F.linear
               for m in linear_layers(torch_model))
    assert all(getattr(m, "cpu_ops", None) is None for m in torch_model.modules())
    assert torch_model.model.fused_decode is None and torch_model.lm_head.greedy is None

    # bf16 on the C++ ops: 16-bit weights over float32 activations (tests/model/
    # test_half_weights.py); the fused decode stack takes them, the greedy screen does not (the
    # head's greedy path is the bf16 argmax where oneDNN packed it, `greedy_bf16`)
    bf16 = _load(d, "cpu", torch.bfloat16)
    assert all(type(m.linear_method) is HalfWeightLinearMethod for m in linear_layers(bf16))
    assert "HalfWeightLinearMethod" in GREEDY_SCREEN_SUPPORT.unsupported(bf16.lm_head)
    assert bf16.model.fused_decode is not None
    assert isinstance(bf16.lm_head.greedy, Bf16HeadArgmax) == (
        bf16.lm_head.__dict__.get("packed_weight") is not None)
    # float16 on the torch reference: the weight as loaded, F.linear
    fp16 = _load(d, "torch", torch.float16)
    assert all(type(m.linear_method) is DenseLinearMethod and m.linear_method.gemm is F.linear
               and m.weight.dtype == torch.float16 for m in linear_layers(fp16))
    with pytest.raises(ValueError, match="unknown layer ops 'blas'"):
        _load(d, "blas")


def test_outside_a_build_layers_compute_with_torch():
    assert current_layer_ops().name == "torch"
    layer = ReplicatedLinear(4, 3, bias=True)
    assert type(layer.linear_method) is DenseLinearMethod
    with building_with(LayerOps("test", None, EchoLinearMethod())):
        assert type(RowParallelLinear(4, 3, bias=False).linear_method) is EchoLinearMethod
    assert current_layer_ops().name == "torch"


@pytest.mark.parametrize("m", [1, 2, 33, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_and_dense_methods_match_f_linear(cpu_ops, m, with_bias):
    """Each method through a layer: oneDNN on the packed copy (2+ rows; the row-padded C++
    op), the streaming GEMV (1 row), the tiles; leading dims kept."""
    from sluice.model.layers.layer_ops import make_tiled_gemm
    gen = torch.Generator().manual_seed(m)
    w, b = torch.randn(200, 48, generator=gen), torch.randn(200, generator=gen)
    x = torch.randn(1, m, 48, generator=gen)
    for method in (CpuPackedLinearMethod(cpu_ops), DenseLinearMethod(make_tiled_gemm(cpu_ops)),
                   DenseLinearMethod()):
        layer = ReplicatedLinear(48, 200, bias=with_bias, linear_method=method)
        layer.weight.data.copy_(w)
        if with_bias:
            layer.bias.data.copy_(b)
        layer.process_weights_after_loading()
        with torch.inference_mode():
            got = layer(x)
        assert got.shape == (1, m, 200)
        torch.testing.assert_close(got[0], F.linear(x[0], w, b if with_bias else None),
                                   rtol=1e-5, atol=1e-4)


def _greedy_run(model, prompts, steps):
    """Prefill all prompts in one batch, then `steps` decode steps; -> (tokens, logits)."""
    from _sluice_model_helpers import PagedRunner
    runner = PagedRunner(model)
    for i, p in enumerate(prompts):
        runner.add(str(i), p)
    logits_seen = []
    sched = [(str(i), len(p)) for i, p in enumerate(prompts)]
    for _ in range(steps):
        out = runner.step(sched)
        last = torch.stack([out[str(i)][-1] for i in range(len(prompts))])
        logits_seen.append(last)
        for i, t in enumerate(last.argmax(-1).tolist()):
            runner.extend(str(i), [t])
        sched = [(str(i), 1) for i in range(len(prompts))]
    return [runner.tokens[str(i)] for i in range(len(prompts))], torch.stack(logits_seen)


def test_an_unlisted_method_makes_the_fast_paths_step_aside(tiny_model_dir, cpu_ops):
    """A model built with a method no fast path lists runs without the fused decode stack and
    the greedy screen (each says why), and decodes the same tokens as the plain 'cpu' model
    (which uses the stack)."""
    from _sluice_model_helpers import prompts
    d = tiny_model_dir("LlamaForCausalLM")
    plain = _load(d, "cpu")
    echo = _load(d, LayerOps("cpu", cpu_ops, EchoLinearMethod()))
    assert plain.model.fused_decode is not None
    assert echo.model.fused_decode is None and echo.lm_head.greedy is None
    assert "EchoLinearMethod" in FUSED_DECODE_SUPPORT.unsupported(
        echo.model.layers[0].self_attn.qkv_proj)
    assert "EchoLinearMethod" in GREEDY_SCREEN_SUPPORT.unsupported(echo.lm_head)
    # a subclass of a listed method is a new feature too
    sub = type("PackedSubclass", (CpuPackedLinearMethod,), {})(cpu_ops)
    layer = ReplicatedLinear(8, 8, bias=False, linear_method=sub)
    assert "PackedSubclass" in FUSED_DECODE_SUPPORT.unsupported(layer)

    batch = prompts(plain.spec.vocab_size, [5, 17, 3], seed=1)
    want_tokens, want_logits = _greedy_run(plain, batch, 6)
    got_tokens, got_logits = _greedy_run(echo, batch, 6)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


def test_memory_accounting_counts_the_packed_copies(tiny_model_dir, cpu_ops, monkeypatch):
    """The model runner's `model_memory_bytes` (it walks module attributes) counts every
    packed copy once; when the memory-fit rule declines packing, none are made or counted,
    the screen is off too, and the layers still compute."""
    from sluice.model.layers.linear_method import process_weights_after_loading
    from sluice.worker.model_runner import ModelRunner
    import sluice.platform.host as host

    model = _load(tiny_model_dir("LlamaForCausalLM"), "cpu")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = [m.packed_weight for m in linear_layers(model)]
    if any(p is None for p in packed):
        pytest.skip("this torch has no oneDNN")
    packed_bytes = sum(p.numel() * p.element_size() for p in packed)
    screen = model.lm_head.greedy
    screen_bytes = 0 if screen is None else sum(
        t.numel() * t.element_size() for t in (screen.bf16, screen.packed_bf16, screen.norms))
    counted = ModelRunner.model_memory_bytes(SimpleNamespace(model=model))
    assert counted >= params + packed_bytes + screen_bytes
    assert counted - params - packed_bytes - screen_bytes < 1 << 20  # rotary caches etc.

    monkeypatch.setattr(host, "memory_bytes", lambda: (1 << 30, 1 << 10))  # 1 KiB free
    process_weights_after_loading(model)
    assert all(m.packed_weight is None for m in linear_layers(model))
    assert model.lm_head.greedy is None
    assert ModelRunner.model_memory_bytes(SimpleNamespace(model=model)) == counted \
        - packed_bytes - screen_bytes
    x = torch.randn(3, model.spec.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(model.compute_logits(x), F.linear(x, model.lm_head.weight),
                                   rtol=1e-5, atol=1e-4)


def test_the_screen_is_built_exactly_for_heads_it_supports(tiny_model_dir, cpu_ops,
                                                           monkeypatch):
    """The model side of the greedy screen's decision, also on CPUs without bf16 dot
    products (where `make_greedy_screen` itself declines): the LM head asks for a screen,
    with its C++ ops and float32 weight, only when its method, dtype and rank count are in
    GREEDY_SCREEN_SUPPORT and its packed copy was made."""
    import sluice.model.layers.greedy as greedy
    calls = []

    def fake_screen(ops, weight, rows_hint):
        calls.append((ops, weight))
        return "screen"

    monkeypatch.setattr(greedy, "make_greedy_screen", fake_screen)
    d = tiny_model_dir("LlamaForCausalLM")
    plain = _load(d, "cpu")
    if plain.lm_head.packed_weight is None:
        pytest.skip("this torch has no oneDNN")
    assert plain.lm_head.greedy == "screen"
    assert calls == [(cpu_ops, plain.lm_head.lm_weight)]
    calls.clear()
    assert _load(d, LayerOps("cpu", cpu_ops, EchoLinearMethod())).lm_head.greedy is None
    assert _load(d, "torch").lm_head.greedy is None
    assert not isinstance(_load(d, "cpu", torch.bfloat16).lm_head.greedy, str)  # no screen
    assert calls == []
    bf16_layer = ReplicatedLinear(8, 8, bias=False, dtype=torch.bfloat16,
                                  linear_method=CpuPackedLinearMethod(cpu_ops))
    assert "bfloat16" in FUSED_DECODE_SUPPORT.unsupported(bf16_layer)
