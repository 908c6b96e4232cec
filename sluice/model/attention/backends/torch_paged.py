"""The pure-torch paged attention backend: CPU default and the test oracle for faster ones.

Per layer and step:
  1. write:  cache[0].view(-1, Hkv, D)[slot_mapping] = k  (and cache[1] for v), via index_copy_
  2. gather: for each group (decode and prefill buckets), the whole blocks of its requests'
             block-table rows in ONE index_select into a reusable workspace
             -> [2, N, nb*block_size, Hkv, D]
  3. attend: one SDPA per group with the group's precomputed mask (as an additive float
             mask, converted once per step)
       decode:  q viewed as [Nd, Hkv, G, D] (G = H/Hkv query heads share a kv head, as HF's
                repeat_kv: head h uses kv head h // G) vs k/v [Nd, Hkv, L, D]
       prefill: q padded to [Np, H, max_q, D] vs k/v [Np, Hkv, L, D] with enable_gqa
                (requests with no earlier context: this step's k/v, is_causal, no gather)
  4. place:  outputs go back to flat token order (no copy when one group covers the batch in
             order).
No Python loop over requests. The workspace grows to the largest gather seen and is reused by
every layer sharing this backend instance (layers run one after another).

The cache may be stored in another dtype than q/k/v (`--kv-cache-dtype`): k/v are converted to
the cache's dtype when written and the gathered blocks back to q's dtype before SDPA, and the
no-gather prefill path rounds this step's k/v through the cache's dtype, so every step attends
over exactly the values the cache holds (an fp8 cache saturates them first: `to_cache_dtype`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sluice.model.attention.kv_cache import cache_bytes, to_cache_dtype
from sluice.model.attention.metadata import AttentionMetadata, DecodeGroup, TokenSel


def take_tokens(x: torch.Tensor, sel: TokenSel) -> torch.Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def place_rows(out: torch.Tensor, sel: TokenSel, rows: torch.Tensor) -> None:
    """out[sel] = rows (sel: a slice or an index tensor of flat tokens)."""
    if isinstance(sel, slice):
        out[sel] = rows
    else:
        out.index_copy_(0, sel, rows)


def write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """cache[0] slot s = k row, cache[1] slot s = v row, for s in slot_mapping (k/v [T, Hkv, D])."""
    flat = cache_bytes(kv_cache).view(2, -1, k.shape[1], k.shape[2])
    flat[0].index_copy_(0, slot_mapping, cache_bytes(to_cache_dtype(k, kv_cache.dtype)))
    flat[1].index_copy_(0, slot_mapping, cache_bytes(to_cache_dtype(v, kv_cache.dtype)))


def _as_cached(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """`x` with the rounding of a cache stored in `cache_dtype` (unchanged when x has it)."""
    return x if x.dtype == cache_dtype else to_cache_dtype(x, cache_dtype).to(x.dtype)


class TorchPagedBackend:
    name = "torch_paged"

    def __init__(self) -> None:
        self._workspace: torch.Tensor | None = None

    def _scratch(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        ws = self._workspace
        if (ws is None or ws.numel() < numel or ws.dtype != like.dtype
                or ws.device != like.device
                or ws.is_inference() != torch.is_inference_mode_enabled()):
            self._workspace = ws = torch.empty(numel, dtype=like.dtype, device=like.device)
        return ws[:numel]

    def _gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_reqs: int,
                num_blocks: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of the listed blocks as [N, Hkv, nb*block_size, D] (strided views) in
        `dtype` (the query's; converted when the cache is stored in another)."""
        _, total_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        per_block = block_size * num_kv_heads * head_dim
        stored = cache_bytes(kv_cache)
        out = self._scratch(2 * block_ids.numel() * per_block, stored).view(2, -1, per_block)
        torch.index_select(stored.view(2, total_blocks, per_block), 1, block_ids, out=out)
        out = out.view(kv_cache.dtype).to(dtype)
        kv = out.view(2, num_reqs, num_blocks * block_size, num_kv_heads, head_dim)
        return kv[0].transpose(1, 2), kv[1].transpose(1, 2)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, dec: DecodeGroup,
                scale: float) -> torch.Tensor:
        """[Nd, H, D] attention output of one decode group (gather + SDPA)."""
        _, num_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[3]
        qd = take_tokens(q, dec.token_sel).reshape(dec.num_reqs, num_kv_heads, -1, head_dim)
        kd, vd = self._gather(kv_cache, dec.block_ids, dec.num_reqs, dec.num_blocks, q.dtype)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dec.float_mask(q.dtype),
                                            scale=scale)
        return od.reshape(dec.num_reqs, num_heads, head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]; writes k/v into `kv_cache` first."""
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        write_kv(kv_cache, metadata.slot_mapping, k, v)

        out: torch.Tensor | None = None
        for dec in metadata.decode:
            od = self._decode(q, kv_cache, dec, scale)
            if metadata.covered_by == "decode":
                return od
            if out is None:
                out = q.new_empty(num_tokens, num_heads, head_dim)
            place_rows(out, dec.token_sel, od)

        for pre in metadata.prefill:
            qp = take_tokens(q, pre.q_sel).view(pre.num_reqs, pre.max_query_len, num_heads,
                                                head_dim)
            if pre.fresh:   # keys = the group's own k/v of this step: no gather, plain causal
                kp, vp = (_as_cached(take_tokens(x, pre.q_sel), kv_cache.dtype).view(
                    pre.num_reqs, pre.max_query_len, num_kv_heads, head_dim).transpose(1, 2)
                    for x in (k, v))
                op = F.scaled_dot_product_attention(qp.transpose(1, 2), kp, vp, is_causal=True,
                                                    scale=scale, enable_gqa=True)
            else:
                kp, vp = self._gather(kv_cache, pre.block_ids, pre.num_reqs, pre.num_blocks,
                                      q.dtype)
                op = F.scaled_dot_product_attention(qp.transpose(1, 2), kp, vp,
                                                    attn_mask=pre.float_mask(q.dtype),
                                                    scale=scale, enable_gqa=True)
            op = op.transpose(1, 2)                                    # [Np, max_q, H, D]
            if metadata.covered_by == "prefill":
                return op[0]
            if out is None:
                out = q.new_empty(num_tokens, num_heads, head_dim)
            if pre.out_src is None:
                out[pre.q_sel] = op[0]
            else:
                rows = op.reshape(-1, num_heads, head_dim).index_select(0, pre.out_src)
                out.index_copy_(0, pre.out_dst, rows)
        assert out is not None, "attention metadata with no requests"
        return out
