"""sluice's C++ CPU layer ops (tiled GEMM, oneDNN on packed weights, fused RMSNorm,
SiLU-and-mul, RoPE) against the torch code they replace. How a model is built with them:
tests/model/test_linear_method.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.model.layers import ReplicatedLinear, RMSNorm, RotaryEmbedding, SiluAndMul
from sluice.model.layers.layer_ops import (make_argmax, make_tiled_gemm, onednn_linear,
                                          packed_weight)
from sluice.model.layers.linear_method import CpuPackedLinearMethod


@pytest.fixture(scope="module")
def tiled(cpu_ops):
    return make_tiled_gemm(cpu_ops)


# (M, K, N): the row-streaming path for 1-4 rows (K with and without a ragged 16-lane tail),
# the first sgemm size (5), the row-tile edge (128/129), several row tiles with a ragged last
# one, narrow and wide N with ragged column tiles, odd K.
SHAPES = [(1, 512, 1024), (2, 40, 300), (3, 64, 5), (4, 33, 1000), (5, 64, 300),
          (64, 512, 32000), (128, 96, 2049), (129, 96, 300), (600, 33, 700), (0, 16, 8)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_tiled_gemm_matches_linear(tiled, m, k, n, with_bias):
    gen = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if with_bias else None
    with torch.inference_mode():
        got = tiled(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_tiled_gemm_takes_leading_dims_and_strided_rows(tiled):
    x = torch.randn(2, 3, 40)[:, :, :32]          # rows strided (row stride 40)
    w = torch.randn(48, 64)[:, ::2]               # columns strided: not a BLAS layout
    with torch.inference_mode():
        got = tiled(x, w, None)
    assert got.shape == (2, 3, 48)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_tiled_gemm_leaves_autograd_and_other_dtypes_to_torch(tiled):
    w = torch.randn(8, 4, requires_grad=True)
    out = tiled(torch.randn(2, 4), w, None)
    out.sum().backward()                          # F.linear path: gradients flow
    assert w.grad is not None
    xb, wb = torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    assert tiled(xb, wb, None).dtype == torch.bfloat16


def _packed_layer(ops, w: torch.Tensor, b: torch.Tensor | None) -> ReplicatedLinear:
    """A layer holding `w` (and `b`) with CpuPackedLinearMethod, its weight packed."""
    layer = ReplicatedLinear(w.shape[1], w.shape[0], bias=b is not None,
                             linear_method=CpuPackedLinearMethod(ops))
    layer.weight.data.copy_(w)
    if b is not None:
        layer.bias.data.copy_(b)
    layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("m", [1, 2, 5, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_gemm_matches_linear(cpu_ops, m, with_bias):
    """oneDNN on the pre-packed weight for 2+ rows, the streaming GEMV for one row."""
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(300, 96, generator=gen)
    if packed_weight(w) is None:
        pytest.skip("this torch has no oneDNN")
    x = torch.randn(m, 96, generator=gen)
    b = torch.randn(300, generator=gen) if with_bias else None
    layer = _packed_layer(cpu_ops, w, b)
    with torch.inference_mode():
        got = layer(x.view(1, m, 96))
    assert got.shape == (1, m, 300)
    torch.testing.assert_close(got[0], F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    packed = packed_weight(w)    # torch's unpadded op on the same packed layout
    with torch.inference_mode():
        torch.testing.assert_close(onednn_linear(x, packed, b), F.linear(x, w, b),
                                   rtol=1e-5, atol=1e-4)


def test_onednn_rows_is_a_small_set_with_little_padding(cpu_ops):
    """Row counts oneDNN runs: exactly M below 32, above that at least M and under 1/16
    extra, never decreasing in M, and at most 127 distinct values up to a 2048-token step."""
    rows = [cpu_ops.onednn_rows(m) for m in range(1, 8193)]
    for m, r in enumerate(rows, start=1):
        assert r == m if m < 32 else m <= r and (r - m) * 16 < m, (m, r)
    assert rows == sorted(rows)
    assert len(set(rows[1:2048])) <= 127
    assert [cpu_ops.onednn_rows(m) for m in (33, 65, 1000, 2048)] == [34, 68, 1024, 2048]


@pytest.mark.parametrize("m", [2, 33, 255, 257, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_padded_onednn_gemm_matches_linear(cpu_ops, m, with_bias):
    """The C++ `onednn_linear` (rows padded to onednn_rows(M), the first M returned) as
    CpuPackedLinearMethod runs it: same values as F.linear, an [M, N] contiguous result."""
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(200, 48, generator=gen)
    if packed_weight(w) is None:
        pytest.skip("this torch has no oneDNN")
    x = torch.randn(m, 48, generator=gen)
    b = torch.randn(200, generator=gen) if with_bias else None
    layer = _packed_layer(cpu_ops, w, b)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (m, 200) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def _malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out (mallinfo2), or None off glibc."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                                                   "hblkhd", "usmblks", "fsmblks", "uordblks",
                                                   "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


def test_padded_onednn_gemm_builds_few_primitives(cpu_ops):
    """torch's oneDNN linear caches a primitive per input shape (issue 12: ~0.5 GB in a
    server). 300 row counts (400..699) through the padded op take 13 shapes' worth of memory;
    the raw op keeps all 300. The weight's shape is used nowhere else in this process."""
    if _malloc_in_use() is None:
        pytest.skip("needs glibc's mallinfo2")
    packed = packed_weight(torch.randn(88, 72))
    if packed is None:
        pytest.skip("this torch has no oneDNN")
    x = torch.randn(700, 72)

    def growth(linear) -> int:
        before = _malloc_in_use()
        with torch.inference_mode():
            for m in range(400, 700):
                linear(x[:m], packed)
        return _malloc_in_use() - before

    padded = growth(cpu_ops.onednn_linear)
    raw = growth(onednn_linear)
    assert padded * 4 < raw, (padded, raw)


def test_weights_are_packed_only_when_the_copy_fits(tiny_model_dir, cpu_ops, monkeypatch):
    """A packed copy larger than PACK_MEMORY_FRACTION of the available memory is not made:
    the GEMMs stay on the tiled sgemm (a big model keeps its memory for the KV cache)."""
    from _sluice_model_helpers import load_ours

    import sluice.platform.host as host
    from sluice.model.layers.linear_method import linear_layers
    monkeypatch.setattr(host, "memory_bytes", lambda: (1 << 30, 1 << 10))  # 1 KiB free
    model = load_ours(tiny_model_dir("LlamaForCausalLM"), layer_ops="cpu")
    layers = linear_layers(model)
    assert layers and all(m.packed_weight is None for m in layers)
    assert model.lm_head.greedy is None  # the screen's bf16 copies follow the same rule
    x = torch.randn(5, model.spec.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(model.compute_logits(x), F.linear(x, model.lm_head.weight),
                                   rtol=1e-5, atol=1e-4)


# ---- fused elementwise operators vs the torch code they replace --------------------------

@pytest.fixture(scope="module")
def ops(cpu_ops):
    return cpu_ops


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rms_norm_and_fused_add_match_torch(ops, rows):
    norm = RMSNorm(96, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(rows, 96) * 3, torch.randn(rows, 96)
    expected = norm(x)
    expected_out, expected_sum = norm(x, residual)
    norm.cpu_ops = ops
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    out, total = norm(x, residual)
    torch.testing.assert_close(total, expected_sum, rtol=0, atol=0)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    strided = torch.randn(rows, 128)[:, :96]     # rows with a stride, as q/k views
    norm.cpu_ops = None
    expected = norm(strided)
    norm.cpu_ops = ops
    torch.testing.assert_close(norm(strided), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 400])
def test_silu_and_mul_matches_torch(ops, rows):
    act = SiluAndMul()
    x = torch.randn(rows, 2 * 88) * 4
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-3])  # saturated exp, zero, tiny
    expected = act(x)
    act.cpu_ops = ops
    torch.testing.assert_close(act(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,d", [(1, 5), (3, 64), (9, 100), (64, 1536)])
def test_silu_and_mul_bf16_is_the_float32_op_rounded(ops, rows, d):
    """bf16 in and out (the decode stack's bf16 MLP): bit for bit the float32 op on the widened
    rows, rounded to nearest-even — d not a multiple of the 64-element chunk or 16 lanes too."""
    x = (torch.randn(rows, 2 * d) * 4).bfloat16()
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    got = torch.empty(rows, d, dtype=torch.bfloat16)
    ops.silu_and_mul(got, x)
    wide = torch.empty(rows, d)
    ops.silu_and_mul(wide, x.float())
    assert torch.equal(got.view(torch.int16), wide.bfloat16().view(torch.int16))
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        ops.silu_and_mul(wide, x)


@pytest.mark.parametrize("rows,heads", [(1, 12), (33, 3), (300, 12)])
def test_rotary_matches_torch(ops, rows, heads):
    qkv = torch.randn(rows, (heads + 4) * 64)
    x = qkv[:, :heads * 64].view(rows, heads, 64)   # strided rows, as in the attention layer
    freqs = torch.rand(rows, 1, 32) * 50
    cos, sin = freqs.cos(), freqs.sin()
    expected = RotaryEmbedding.apply(x, cos, sin)
    got = RotaryEmbedding.apply(x, cos, sin, ops)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 63, 64, 65, 32000])
def test_argmax_matches_torch_with_ties_nan_and_inf(cpu_ops, vocab):
    """The greedy-sampling argmax: torch's first-maximum rule on random rows, ties (first
    index wins), a NaN (torch returns the first NaN), all -inf, and strided rows."""
    argmax = make_argmax(cpu_ops)
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(8, vocab + 3, generator=gen)[:, :vocab]       # strided rows
    x[1] = 0.0                                                    # all tied
    x[2, vocab // 2:] = x[2].max() + 1.0                          # tie on the later half
    x[3, -1] = float("nan")
    x[4] = float("-inf")
    x[5, vocab // 3] = float("nan")
    x[5, 0] = float("inf")
    got = argmax(x)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(dim=-1))
