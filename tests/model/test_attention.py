"""The pure-torch paged backend against a dense per-request reference, plus the forward context.

Tolerance: both sides compute the same fp32 softmax(q·kᵀ·scale)·v over at most a few hundred
keys; only summation order differs (SDPA kernel vs explicit matmuls), giving ~1e-7 absolute
error on outputs of magnitude ~1, so atol=rtol=1e-5 has ample headroom while any masking or
indexing error (a wrong key, a missing key) changes outputs by ~1e-1.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sluice.model.attention import (Attention, allocate_kv_caches, build_attention_metadata,
                                    get_forward_context, kv_cache_shape, set_forward_context)
from sluice.model.attention.backends import get_attn_backend

H, HKV, D, BS = 8, 4, 16, 4
TOL = dict(atol=1e-5, rtol=1e-5)


def reference(q, k_full, v_full, ctx, scale):
    """Dense causal attention for one request: q [n, H, D] at positions ctx.., k/v [s, Hkv, D]."""
    n, s = q.shape[0], k_full.shape[0]
    k = k_full.repeat_interleave(H // HKV, dim=1)
    v = v_full.repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    allowed = torch.arange(s)[None, :] <= (ctx + torch.arange(n))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_step(shapes, num_blocks=200, seed=0, shuffle=True, pad_blocks=2):
    """shapes: list of (ctx, query_len). Builds a cache holding each request's context,
    the step's q/k/v in a shuffled token order, metadata, and reference outputs."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.zeros(kv_cache_shape(num_blocks, BS, HKV, D))
    cache[:, 1:].uniform_(-50, 50, generator=g)          # stale garbage must be masked out
    free = list(range(1, num_blocks))
    if shuffle:
        random.Random(seed + 1).shuffle(free)
    order = list(range(len(shapes)))
    random.Random(seed).shuffle(order)                  # requests in arbitrary batch order
    qsl, seq_lens, tables, slots, qs, ks, vs, refs = [0], [], [], [], [], [], [], []
    scale = D ** -0.5
    for r in order:
        ctx, n = shapes[r]
        s = ctx + n
        table = [free.pop() for _ in range(-(-s // BS))]
        k_full = torch.randn(s, HKV, D, generator=g)
        v_full = torch.randn(s, HKV, D, generator=g)
        q = torch.randn(n, H, D, generator=g)
        for p in range(ctx):                              # context already cached
            cache[0, table[p // BS], p % BS] = k_full[p]
            cache[1, table[p // BS], p % BS] = v_full[p]
        slots += [table[p // BS] * BS + p % BS for p in range(ctx, s)]
        qs.append(q); ks.append(k_full[ctx:]); vs.append(v_full[ctx:])
        refs.append(reference(q, k_full, v_full, ctx, scale) if n else q)
        qsl.append(qsl[-1] + n); seq_lens.append(s); tables.append(table)
    bt = np.zeros((len(order), max(map(len, tables)) + pad_blocks), dtype=np.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    meta = build_attention_metadata(np.array(qsl, dtype=np.int32), np.array(seq_lens),
                                    bt, np.array(slots, dtype=np.int64), BS,
                                    torch.device("cpu"))
    return cache, meta, torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(refs), scale


def run_layer(cache, meta, q, k, v, scale):
    layer = Attention(H, D, HKV, scale, layer_idx=0)
    with set_forward_context(meta, [cache]):
        return layer(q.reshape(len(q), -1), k.reshape(len(k), -1), v.reshape(len(v), -1))


MIXES = {
    "decodes": [(5, 1), (17, 1), (0, 1), (33, 1)],
    "fresh_prefills": [(0, 7), (0, 13), (0, 2)],
    "single_prefill": [(0, 21)],
    "mid_prompt_chunks": [(8, 9), (3, 16), (12, 4)],
    "single_chunk_with_ctx": [(9, 10)],
    "mixed": [(5, 1), (0, 11), (20, 1), (7, 6), (0, 1), (16, 16), (31, 1)],
    "with_empty_request": [(4, 1), (6, 0), (0, 5)],
    # shapes spread widely enough that both kinds are split into several buckets
    "bucketed": [(c, 1) for c in (3, 290, 40, 150, 7, 220, 90, 300, 12, 60)]
                + [(0, 9), (50, 5), (0, 120), (200, 3), (30, 40), (0, 2)],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_backend_matches_dense_reference(mix):
    cache, meta, q, k, v, ref, scale = make_step(MIXES[mix], num_blocks=1000)
    if mix == "bucketed":
        assert len(meta.decode) > 1 and len(meta.prefill) > 1
        assert any(g.fresh for g in meta.prefill)
    out = run_layer(cache, meta, q, k, v, scale)
    torch.testing.assert_close(out, ref.reshape(len(ref), -1), **TOL)


def test_new_kv_written_at_slots():
    cache, meta, q, k, v, _, scale = make_step(MIXES["mixed"])
    run_layer(cache, meta, q, k, v, scale)
    flat = cache.view(2, -1, HKV, D)
    assert torch.equal(flat[0, meta.slot_mapping], k)
    assert torch.equal(flat[1, meta.slot_mapping], v)


def test_block_order_does_not_change_output():
    """Oracle property: the same step through contiguous or randomly ordered blocks (and a
    different amount of block-table padding) gives bit-identical attention output."""
    shapes = MIXES["mixed"]
    a = make_step(shapes, shuffle=False, pad_blocks=0)
    b = make_step(shapes, shuffle=True, pad_blocks=3)
    out_a = run_layer(*a[:5], a[6])
    out_b = run_layer(*b[:5], b[6])
    assert not torch.equal(a[1].block_table[:, :2], b[1].block_table[:, :2])
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)


def test_metadata_groups_and_fast_paths():
    _, meta, *_ = make_step(MIXES["decodes"])
    assert meta.covered_by == "decode" and meta.prefill == ()
    assert len(meta.decode) == 1 and meta.decode[0].token_sel == slice(0, 4)
    _, meta, *_ = make_step(MIXES["single_prefill"])
    assert meta.covered_by == "prefill" and meta.prefill[0].q_sel == slice(0, 21)
    assert meta.prefill[0].fresh and meta.prefill[0].mask is None
    _, meta, *_ = make_step(MIXES["fresh_prefills"])
    assert len(meta.prefill) == 1 and meta.prefill[0].num_reqs == 3
    assert meta.prefill[0].fresh and meta.prefill[0].mask is None
    _, meta, *_ = make_step(MIXES["mixed"])
    assert meta.covered_by is None
    assert sum(g.num_reqs for g in meta.decode) == 4
    assert sum(g.num_reqs for g in meta.prefill) == 3
    assert meta.num_actual_tokens == 4 + 11 + 6 + 16


def test_split_buckets():
    from sluice.model.attention.metadata import split_buckets
    ones = np.ones(4, dtype=np.int64)
    same = split_buckets(ones, np.array([100, 101, 99, 100]))
    assert len(same) == 1 and same[0].tolist() == [0, 1, 2, 3]      # original order kept
    lens = np.array([400, 20, 30, 410, 25, 390, 15, 405])
    buckets = split_buckets(np.ones(8, dtype=np.int64), lens, min_gain=64)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(8))
    assert sorted(lens[buckets[0]].tolist()) == [15, 20, 25, 30]
    assert len(split_buckets(np.ones(8, dtype=np.int64), lens, max_buckets=1)) == 1
    # one long prefill chunk is not padded together with short ones
    q = np.array([2000, 20, 30, 25])
    buckets = split_buckets(q, q.copy())
    assert [0] in [b.tolist() for b in buckets]


def test_bf16_cache_runs():
    cache, meta, q, k, v, ref, scale = make_step(MIXES["mixed"])
    out = run_layer(cache.bfloat16(), meta, q.bfloat16(), k.bfloat16(), v.bfloat16(), scale)
    torch.testing.assert_close(out.float(), ref.reshape(len(ref), -1), atol=5e-2, rtol=5e-2)


def test_forward_context_guards():
    cache, meta, q, k, v, _, scale = make_step(MIXES["decodes"])
    layer = Attention(H, D, HKV, scale, layer_idx=0)
    with pytest.raises(RuntimeError, match="No forward context"):
        layer(q.reshape(len(q), -1), k.reshape(len(k), -1), v.reshape(len(v), -1))
    with pytest.raises(RuntimeError, match="No forward context"):
        get_forward_context()
    with set_forward_context(meta, [cache]) as ctx:
        assert get_forward_context() is ctx
        with pytest.raises(RuntimeError, match="nested"):
            with set_forward_context(meta, [cache]):
                pass
        assert get_forward_context() is ctx          # the failed nesting left it intact
    with pytest.raises(RuntimeError):
        get_forward_context()
    with pytest.raises(ValueError):                    # context is released on exceptions too
        with set_forward_context(meta, [cache]):
            raise ValueError
    with set_forward_context(None, []):                # dummy/profiling run: zeros, no cache
        out = layer(q.reshape(len(q), -1), k.reshape(len(k), -1), v.reshape(len(v), -1))
    assert out.shape == (len(q), H * D) and not out.any()


def test_allocate_kv_caches(tiny_model_dir):
    from sluice.hf_config import load_model_spec
    spec = load_model_spec(tiny_model_dir("LlamaForCausalLM"))
    caches = allocate_kv_caches(spec, 10, 16, torch.float32, "cpu")
    assert len(caches) == spec.num_hidden_layers
    assert caches[0].shape == (2, 10, 16, spec.num_key_value_heads, spec.head_dim)
    assert all(not c[:, 0].any() for c in caches)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attn_backend("nope")
