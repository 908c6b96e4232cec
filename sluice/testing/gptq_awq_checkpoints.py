"""GPTQ and AWQ checkpoints written as AutoGPTQ / AutoAWQ lay them out (round to nearest in
place of GPTQ's error feedback: the format is the same), for tests and benchmarks
(`benchmarks/make_compressed_checkpoint.py --scheme gptq|awq`); the layouts
`sluice.model.gptq_awq` reads. Each decoder linear weight W [out, in] gets, per group of
inputs g (G groups, b bits, maxq = 2^b - 1, p = 32 / b values per int32):

    symmetric:  s = 2 max|W_g| / maxq,  Z = 2^(b-1)
    asymmetric: s = (max W_g - min W_g) / maxq,  Z = clamp(round(-min W_g / s), 0, maxq)
    u = clamp(round(W / s) + Z, 0, maxq)  (s rounded to fp16 first, as stored)

    GPTQ: qweight int32 [in / p, out] (u[k, n] in bits b * (k % p) of word [k / p, n]);
          qzeros int32 [G, out / p] (Z - 1 for checkpoint_format 'gptq', Z for 'gptq_v2', in
          bits b * (n % p) of word [g, n / p]); scales fp16 [G, out]; g_idx int32 [in]
          (k // group_size; with desc_act the groups follow a seeded permutation of the
          inputs, as act-order quantization assigns them from the layer's input statistics:
          one permutation per input, shared by q/k/v and by gate/up)
    AWQ:  qweight int32 [in, out / 8] (u[k, 8m + j] in nibble AWQ_ORDER[j] of word [k, m]);
          qzeros int32 [G, out / 8] (Z, the same interleaving); scales fp16 [G, out]

The oracle each writer returns is W' = (u - Z_read) * s with Z_read what a reader of the format
gets back (GPTQ 'gptq': ((Z - 1) mod 2^b) + 1, so a zero point of 0 reads as 2^b, the
format's known quirk).
"""

from __future__ import annotations

import torch

from sluice.model.gptq_awq import AWQ_ORDER
from sluice.testing.compressed_checkpoints import pack, quantize_linears

#: linear layers reading the same input (their activation order is the same)
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                "up_proj": "gate_up"}


def gptq_config(bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                checkpoint_format: str = "gptq", **changes) -> dict:
    """transformers' / AutoGPTQ's quantization_config of a GPTQ checkpoint."""
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
              "desc_act": desc_act, "sym": sym, "damp_percent": 0.01,
              "true_sequential": True, "static_groups": False,
              "checkpoint_format": checkpoint_format}
    config.update(changes)
    return config


def awq_config(group_size: int = 128, **changes) -> dict:
    """transformers' / AutoAWQ's quantization_config of an AWQ (GEMM) checkpoint."""
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": None}
    config.update(changes)
    return config


def _quantize(w: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int, sym: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u int64 [out, in], Z int64 [out, G], fp16 s [out, G]) of W [out, in] (module doc)."""
    maxq = (1 << bits) - 1
    out = w.shape[0]
    scale = torch.empty(out, groups)
    zero = torch.empty(out, groups, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scale[:, g] = (2 * cols.abs().amax(dim=1) / maxq).clamp_min(1e-6)
            zero[:, g] = 1 << (bits - 1)
        else:
            low, high = cols.amin(dim=1).clamp_max(0), cols.amax(dim=1).clamp_min(0)
            scale[:, g] = ((high - low) / maxq).clamp_min(1e-6)
            zero[:, g] = torch.round(-low / scale[:, g]).clamp(0, maxq).to(torch.int64)
    half = scale.to(torch.float16)
    s = half.float()[:, g_idx]
    u = (torch.round(w / s) + zero[:, g_idx]).clamp(0, maxq).to(torch.int64)
    return u, zero, half


def quantize_gptq(tensors: dict[str, torch.Tensor], bits: int = 4, group_size: int = 128,
                  sym: bool = True, desc_act: bool = False, checkpoint_format: str = "gptq",
                  seed: int = 0, shared_input_order: bool = True) -> tuple[dict, dict]:
    """A float checkpoint's tensors -> (its GPTQ tensors (module doc), the same with every
    quantized weight as its float32 oracle W'). `shared_input_order` False: every linear layer
    gets an activation order of its own (q/k/v, gate/up too), unlike GPTQ's."""
    gen = torch.Generator().manual_seed(seed)
    offset = 1 if checkpoint_format == "gptq" else 0
    mask = (1 << bits) - 1

    orders: dict[str, torch.Tensor] = {}    # one input order per layer input

    def input_order(name: str, k: int) -> torch.Tensor:
        prefix, linear = name.rsplit(".", 2)[:2]
        reads = SHARED_INPUT.get(linear, linear) if shared_input_order else linear
        if (prefix, reads) not in orders:
            orders[prefix, reads] = torch.randperm(k, generator=gen)
        return orders[prefix, reads]

    def one(name: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        k = w.shape[1]
        gs = group_size if group_size > 0 else k
        order = input_order(name, k) if desc_act else torch.arange(k)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[order] = torch.arange(k) // gs
        u, zero, half = _quantize(w, bits, g_idx, -(-k // gs), sym)
        stored_zero = zero - offset
        read_zero = (stored_zero & mask) + offset
        return ({"qweight": pack(u.t().contiguous(), bits, dim=0),
                 "qzeros": pack(stored_zero.t().contiguous(), bits, dim=1),
                 "scales": half.t().contiguous(), "g_idx": g_idx.to(torch.int32)},
                (u - read_zero[:, g_idx]).float() * half.float()[:, g_idx])

    return quantize_linears(tensors, one)


def quantize_awq(tensors: dict[str, torch.Tensor], group_size: int = 128) -> tuple[dict, dict]:
    """A float checkpoint's tensors -> (its AWQ tensors (module doc), the same with every
    quantized weight as its float32 oracle W')."""

    def one(name: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        k = w.shape[1]
        gs = group_size if group_size > 0 else k
        g_idx = torch.arange(k) // gs
        u, zero, half = _quantize(w, 4, g_idx, -(-k // gs), sym=False)
        return ({"qweight": pack(u.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
                 "qzeros": pack(zero.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
                 "scales": half.t().contiguous()},
                (u - zero[:, g_idx]).float() * half.float()[:, g_idx])

    return quantize_linears(tensors, one)
