"""The tiled C++ GEMM ('cpu_tiled') against F.linear, and how the loader installs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.model.cpu_ops import load_cpu_ops
from sluice.model.layers import LMHead, RowParallelLinear
from sluice.model.layers.gemm import get_gemm, make_tiled_gemm, use_gemm


@pytest.fixture(scope="module")
def tiled():
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("no C++ compiler: the CPU operators cannot be built here")
    return make_tiled_gemm(ops)


# (M, K, N): single rows, the row-tile edge (128/129), several row tiles with a ragged last one,
# narrow and wide N with ragged column tiles, odd K.
SHAPES = [(1, 512, 1024), (3, 64, 5), (64, 512, 32000), (128, 96, 2049), (129, 96, 300),
          (600, 33, 700), (0, 16, 8)]


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


def test_use_gemm_installs_on_every_linear_and_the_lm_head(tiled):
    model = torch.nn.Sequential(RowParallelLinear(16, 8, True, torch.float32),
                                LMHead(32, 8, torch.float32))
    for p in model.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 16)
    with torch.inference_mode():
        expected = model(x)
        use_gemm(model, tiled)
        assert all(m.gemm is tiled for m in model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-4)


def test_get_gemm_names():
    assert get_gemm("torch") is F.linear
    with pytest.raises(ValueError, match="unknown GEMM backend 'blas'"):
        get_gemm("blas")
