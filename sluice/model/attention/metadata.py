"""Per-step attention metadata, built once by the model runner and read by every layer.

Inputs describe one flattened step of R requests and T tokens (any order, any mix):

    query_start_loc [R+1]  request r owns tokens [qsl[r], qsl[r+1]) of the flat batch
    seq_lens        [R]    context length AFTER this step: num_computed + num_scheduled
    block_table     [R, MB] int32, physical block ids, padded with 0 (the zero-filled null block)
    slot_mapping    [T]    int64, slot of token t = block_id * block_size + offset

For request r with q = query_len and s = seq_len, the ctx = s - q tokens before this step are
already in the cache; query token i (0 <= i < q) sits at absolute position ctx + i and may
attend to keys 0..ctx+i (causal):

    keys:    | 0 ........ ctx-1 | ctx ...... s-1 |
              computed earlier    written this step (by slot_mapping), then read back

Requests are split into groups so that each layer runs a handful of batched SDPA calls:
  * decode:  q == 1 (decodes, and 1-token chunks): queries [Nd, H, 1, D] vs keys [Nd, L_d]
  * prefill: q > 1 (prompt chunks, from position 0 or mid-prompt): queries padded to
             [Np, max_q] vs keys [Np, L_p] with a causal-offset mask.
Each kind is cut into at most MAX_BUCKETS buckets of similar shape when that saves enough
padded work (`split_buckets`): padding costs as much as real keys, so 64 decodes of lengths
50..400 gather ~1/3 fewer key slots in 4 buckets than padded to 400 in one.
Keys are gathered per whole block: block row r truncated to nb = ceil(max s / block_size)
blocks gives L = nb * block_size key slots; slots >= s are masked (they read the null block or
stale data, which stays finite).
Everything here is index arithmetic done once per step; layers only run tensor ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

TokenSel = slice | torch.Tensor  # a contiguous range (no copy) or a gather index


@dataclass(frozen=True)
class _Masked:
    """Mixin: the boolean `mask` as an additive float mask (0 / -inf), converted once per step
    and dtype instead of inside every layer's SDPA call."""
    _float_masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def float_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        mask: torch.Tensor | None = getattr(self, "mask")
        if mask is None:
            return None
        if dtype not in self._float_masks:
            self._float_masks[dtype] = torch.zeros(mask.shape, dtype=dtype,
                                                   device=mask.device).masked_fill_(
                                                       ~mask, float("-inf"))
        return self._float_masks[dtype]

MAX_BUCKETS = 4
#: A further bucket must save at least this many padded query-key pairs: one more bucket
#: costs a few tensor ops per layer (~50-100 us); a decode pair reads one key and value
#: (~2 KB at 4 kv heads x 64 dims), a prefill pair is ~H*D*4 flops, both ~0.1 us.
MIN_BUCKET_GAIN = 1024


@dataclass(frozen=True)
class DecodeGroup(_Masked):
    """Requests with one query token. `token_sel` selects their tokens (in group order);
    `block_ids` [Nd*nb] long are their block-table rows truncated to nb blocks, flattened;
    `mask` [Nd, 1, 1, nb*block_size] bool, True = attend (key slot < seq_len);
    `seq_lens` [Nd] long, the same lengths for kernels that read the cache in place."""
    num_reqs: int
    token_sel: TokenSel
    block_ids: torch.Tensor
    num_blocks: int
    mask: torch.Tensor
    seq_lens: torch.Tensor


@dataclass(frozen=True)
class PrefillGroup(_Masked):
    """Requests with more than one query token, padded to `max_query_len` rows each.

    `q_sel`: slice of the single request's tokens when num_reqs == 1, else a [Np*max_q] long
    gather index (padded rows repeat the request's first token). The padded output rows
    `out_src` [n] go to flat tokens `out_dst` [n] (both None when num_reqs == 1).
    `mask` [Np, 1, max_q, nb*block_size] bool: key j visible to row i iff j <= min(ctx+i, s-1).
    `fresh`: no request of the group has earlier context (whole prompts, or first chunks):
    request r's keys are exactly its own k/v of this step, which `q_sel` lays out like its
    queries, so the backend may skip the gather and the mask and run a plain causal SDPA
    (row i sees keys 0..i; a padded row sees padding, but its output is dropped); `mask` is
    then None.
    """
    num_reqs: int
    max_query_len: int
    q_sel: TokenSel
    out_src: torch.Tensor | None
    out_dst: torch.Tensor | None
    block_ids: torch.Tensor
    num_blocks: int
    mask: torch.Tensor | None
    fresh: bool


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention layers need for one step (tensors on the model's device).

    `decode`/`prefill` hold the buckets of each kind (empty tuple: none). `covered_by` names the
    single group holding all tokens in flat order ("decode" or "prefill"), letting the backend
    return that group's output without a scatter; else None. The three are built on first use
    (once per step, by the first layer that asks): the fused decode step never needs them.
    """
    num_reqs: int
    num_actual_tokens: int
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor   # [R+1] long
    seq_lens: torch.Tensor          # [R] long
    context_lens: torch.Tensor      # [R] long, seq_lens - query_lens
    block_table: torch.Tensor       # [R, MB] int32
    slot_mapping: torch.Tensor      # [T] long
    host: "_HostArrays" = field(repr=False, compare=False)

    @functools.cached_property
    def decode(self) -> tuple[DecodeGroup, ...]:
        h = self.host
        rows = np.flatnonzero(h.q_lens == 1)
        if not len(rows):
            return ()
        return tuple(_decode_group(h.qsl, h.seq, h.bt, rows[b], self.block_size, h.device)
                     for b in split_buckets(h.q_lens[rows], h.seq[rows]))

    @functools.cached_property
    def prefill(self) -> tuple[PrefillGroup, ...]:
        h = self.host
        rows = np.flatnonzero(h.q_lens > 1)
        if not len(rows):
            return ()
        return tuple(_prefill_group(h.qsl, h.q_lens, h.seq, h.bt, rows[b], self.block_size,
                                    h.device)
                     for b in split_buckets(h.q_lens[rows], h.seq[rows]))

    @functools.cached_property
    def covered_by(self) -> str | None:
        def is_everything(sel: TokenSel) -> bool:
            return isinstance(sel, slice) and sel == slice(0, self.num_actual_tokens)

        if not self.prefill and len(self.decode) == 1 and is_everything(self.decode[0].token_sel):
            return "decode"
        if not self.decode and len(self.prefill) == 1 and is_everything(self.prefill[0].q_sel):
            return "prefill"
        return None


@dataclass(frozen=True)
class _HostArrays:
    """The step's host arrays the groups are built from (must not change until the forward
    using the metadata has returned)."""
    qsl: np.ndarray
    q_lens: np.ndarray
    seq: np.ndarray
    bt: np.ndarray
    device: torch.device


def _to(x: np.ndarray, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


def _as_slice(idx: np.ndarray) -> slice | None:
    """slice(a, a+n) when idx is exactly a, a+1, ..., a+n-1, else None."""
    if idx.size and idx[-1] - idx[0] == idx.size - 1 and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return None


def _gather_blocks(block_table: np.ndarray, rows: np.ndarray, seq_lens: np.ndarray,
                   block_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    num_blocks = int(-(-int(seq_lens.max()) // block_size))
    assert num_blocks <= block_table.shape[1], \
        f"seq_len {int(seq_lens.max())} needs {num_blocks} blocks; " \
        f"block_table has {block_table.shape[1]}"
    ids = block_table[rows, :num_blocks].reshape(-1)
    return _to(ids, device), num_blocks


def _decode_group(qsl: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
                  rows: np.ndarray, block_size: int, device: torch.device) -> DecodeGroup:
    tokens = qsl[rows]
    sel = _as_slice(tokens)
    s = seq_lens[rows]
    block_ids, nb = _gather_blocks(block_table, rows, s, block_size, device)
    key_pos = torch.arange(nb * block_size, device=device)
    lens = _to(s, device)
    mask = key_pos[None, :] < lens[:, None]
    return DecodeGroup(num_reqs=len(rows),
                       token_sel=sel if sel is not None else _to(tokens, device),
                       block_ids=block_ids, num_blocks=nb, mask=mask[:, None, None, :],
                       seq_lens=lens)


def split_buckets(query_lens: np.ndarray, seq_lens: np.ndarray,
                  max_buckets: int = MAX_BUCKETS,
                  min_gain: int = MIN_BUCKET_GAIN) -> list[np.ndarray]:
    """Partition requests (indices into the arrays) into buckets of similar shape.

    A padded bucket costs n * max(query_len) * max(seq_len) query-key pairs. Greedy, over the
    requests sorted by query_len * seq_len: repeatedly make the single split that saves the
    most pairs, while it saves >= `min_gain`. A single bucket keeps the original order (so a
    batch of decodes in order stays one contiguous slice).
    """
    n = len(seq_lens)
    order = np.argsort(query_lens * seq_lens, kind="stable")
    q, s = query_lens[order], seq_lens[order]
    cuts = [0, n]
    while len(cuts) - 1 < max_buckets:
        best_gain, best_cut = 0, None
        for i, j in zip(cuts[:-1], cuts[1:]):
            if j - i < 2:
                continue
            qs, ss = q[i:j], s[i:j]
            k = np.arange(1, j - i)                          # left bucket = first k requests
            left = k * np.maximum.accumulate(qs)[k - 1] * np.maximum.accumulate(ss)[k - 1]
            q_suf = np.maximum.accumulate(qs[::-1])[::-1]
            s_suf = np.maximum.accumulate(ss[::-1])[::-1]
            right = (j - i - k) * q_suf[k] * s_suf[k]
            gain = (j - i) * qs.max() * ss.max() - left - right
            g = int(gain.argmax())
            if gain[g] > best_gain:
                best_gain, best_cut = int(gain[g]), i + int(k[g])
        if best_cut is None or best_gain < min_gain:
            break
        cuts = sorted(cuts + [best_cut])
    if len(cuts) == 2:
        return [np.arange(n)]
    return [order[i:j] for i, j in zip(cuts[:-1], cuts[1:])]


def _prefill_group(qsl: np.ndarray, query_lens: np.ndarray, seq_lens: np.ndarray,
                   block_table: np.ndarray, rows: np.ndarray, block_size: int,
                   device: torch.device) -> PrefillGroup:
    q = query_lens[rows]
    s = seq_lens[rows]
    ctx = s - q
    max_q = int(q.max())
    starts = qsl[rows]
    block_ids, nb = _gather_blocks(block_table, rows, s, block_size, device)
    if len(rows) == 1:
        q_sel: TokenSel = slice(int(starts[0]), int(starts[0] + q[0]))
        out_src = out_dst = None
    else:
        i = np.arange(max_q)[None, :]
        valid = i < q[:, None]                                   # [Np, max_q]
        q_idx = np.where(valid, starts[:, None] + i, starts[:, None])
        q_sel = _to(q_idx.reshape(-1), device)
        out_src = _to(np.flatnonzero(valid.reshape(-1)), device)  # row r*max_q + i
        out_dst = _to(q_idx[valid], device)
    if not ctx.any():
        return PrefillGroup(num_reqs=len(rows), max_query_len=max_q, q_sel=q_sel,
                            out_src=out_src, out_dst=out_dst, block_ids=block_ids,
                            num_blocks=nb, mask=None, fresh=True)
    row = torch.arange(max_q, device=device)
    key_pos = torch.arange(nb * block_size, device=device)
    last = torch.minimum(_to(ctx, device)[:, None] + row[None, :], _to(s - 1, device)[:, None])
    mask = key_pos[None, None, :] <= last[:, :, None]            # [Np, max_q, L]
    return PrefillGroup(num_reqs=len(rows), max_query_len=max_q, q_sel=q_sel, out_src=out_src,
                        out_dst=out_dst, block_ids=block_ids, num_blocks=nb,
                        mask=mask[:, None, :, :], fresh=False)


def build_attention_metadata(query_start_loc: np.ndarray, seq_lens: np.ndarray,
                             block_table: np.ndarray, slot_mapping: np.ndarray,
                             block_size: int, device: torch.device) -> AttentionMetadata:
    """Build the step's metadata from host arrays (see the module docstring for meanings).

    Requires seq_lens[r] >= query_len[r] and every block referenced by a position < seq_len
    present in block_table. Requests with query_len 0 are allowed and ignored.
    The arrays must not change until the forward using this metadata has returned.
    """
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    seq = np.asarray(seq_lens, dtype=np.int64)
    bt = np.asarray(block_table)
    slots = np.asarray(slot_mapping, dtype=np.int64)
    num_reqs = len(seq)
    num_tokens = int(qsl[-1]) if num_reqs else 0
    assert qsl.shape == (num_reqs + 1,) and bt.shape[0] == num_reqs, \
        f"shapes: query_start_loc {qsl.shape}, seq_lens {seq.shape}, block_table {bt.shape}"
    assert len(slots) == num_tokens, \
        f"slot_mapping has {len(slots)} entries, batch has {num_tokens} tokens"
    q_lens = np.diff(qsl)
    assert np.all(q_lens >= 0) and np.all(seq >= q_lens), "need 0 <= query_len <= seq_len"

    return AttentionMetadata(
        num_reqs=num_reqs, num_actual_tokens=num_tokens, block_size=block_size,
        max_query_len=int(q_lens.max()) if num_reqs else 0,
        max_seq_len=int(seq.max()) if num_reqs else 0,
        query_start_loc=_to(qsl, device), seq_lens=_to(seq, device),
        context_lens=_to(seq - q_lens, device), block_table=_to(bt, device, torch.int32),
        slot_mapping=_to(slots, device), host=_HostArrays(qsl, q_lens, seq, bt, device))
