"""The fused decode step: every decoder layer of a Llama-family model in one C++ call.

In a step where every request computes at most `FUSED_MAX_QUERY_LEN` tokens (every decode step,
a speculative verification of 1 + k tokens, a short prompt), the decoder layers run as
`cpu_ops.DecodeStack.forward` (sluice/model/csrc/decode_stack.cpp): the same C++ operators the
Python layers call with layer ops 'cpu', without returning to Python between them. At one
request that Python is about a third of the step. The C++ stack's attention takes one query row
per "request"; a request computing q > 1 tokens is given as q rows (`_token_rows`), row j
(position p = seq_len - q + j) attending keys 0..p through the request's block table. Every
row's k/v is written to the cache before any attention of that layer, so row j sees the keys of
rows 0..j-1 of its own request, which is exactly causal attention. Longer queries (prefill
chunks) and anything the stack does not cover run the Python layers.

`install_fused_decode(model, ops)` (called by the model loader after the weights are loaded,
with the C++ operators of layer ops 'cpu') attaches a `FusedDecode` to
`model.model.fused_decode` when the model is a Llama-family decoder whose attention layers use
the C++ paged kernel and whose layers are all ones the stack supports.

Supported (`FUSED_DECODE_SUPPORT`, the one declaration; anything else runs the Python layers,
which are always correct):
* linear methods `DenseLinearMethod` and `CpuPackedLinearMethod` (the stack reads each
  projection's plain float32 weight and its oneDNN packed copy, `layer.packed_weight`, or
  none), `GgufBlockLinearMethod` (the uint8 GGUF blocks and their GGML type id: the stack
  runs the same `gguf_linear` as the layer; `ActOrderBlockLinearMethod` likewise, on the
  activations gathered in the layer's `input_order`) and `HalfWeightLinearMethod` (bf16 /
  fp16 weights, as the layer: oneDNN's bf16 GEMM on the layer's packed copy where there is one, else
  `gguf_linear` with type BF16 / F16); a method that changes
  the product otherwise is not seen by the C++ stack, so the stack steps aside for it. LoRA
  (`--enable-lora`, `sluice.lora.layers.LoRALinearMethod` around one of those) is a step
  wrapper: the stack is installed, and runs only the decode steps in which no token uses an adapter
  (`FusedDecode.applies`: no `current_lora_mapping()`); steps with adapter tokens run the
  Python layers, which add the adapters' deltas;
* float32 activations and weights (the stack's arithmetic; uint8 for GGUF blocks, bf16 / fp16
  for 16-bit weights, which it widens to float32) and a float32, bfloat16, float16 or fp8 KV
  cache (`FusedDecode.applies`), with the layers' KV-cache scales over an fp8 one as the Python
  `Attention` applies them (`sluice.model.attention.kv_scales`);
* one tensor-parallel rank: the C++ stack has no all-reduce between o_proj / down_proj and the
  residual, so with tp > 1 (any layer with `tp_size` > 1) decode steps run the Python layers,
  which all-reduce over the TP group;
* the whole model on one pipeline stage: it runs embeddings through every layer to the final
  norm, so a model holding one stage's layers (`start_layer`/`end_layer` not the whole model)
  runs the Python layers.
"""

from __future__ import annotations

import logging
from types import ModuleType

import numpy as np
import torch
from torch import nn

from sluice.lora.forward_context import current_lora_mapping
from sluice.lora.layers import LoRALinearMethod
from sluice.model.attention.backends.cpu_paged import KERNEL_CACHE_DTYPES, CpuPagedBackend
from sluice.model.attention.forward_context import get_forward_context
from sluice.model.attention.metadata import AttentionMetadata
from sluice.model.layers.act_order_linear import ActOrderBlockLinearMethod
from sluice.model.layers.gguf_linear import GgufBlockLinearMethod
from sluice.model.layers.half_linear import HalfWeightLinearMethod
from sluice.model.layers.layer_ops import fast_path_ok
from sluice.model.layers.linear_method import (CpuPackedLinearMethod, DenseLinearMethod,
                                               FastPathSupport)

logger = logging.getLogger(__name__)

#: the layers the C++ stack computes (module doc); any other layer makes it step aside
FUSED_DECODE_SUPPORT = FastPathSupport(
    "fused decode stack", methods=(DenseLinearMethod, CpuPackedLinearMethod,
                                   GgufBlockLinearMethod, ActOrderBlockLinearMethod,
                                   HalfWeightLinearMethod),
    dtypes=(torch.float32,), single_rank=True, step_wrappers=(LoRALinearMethod,),
    method_dtypes=((GgufBlockLinearMethod, (torch.uint8,)),
                   (ActOrderBlockLinearMethod, (torch.uint8,)),
                   (HalfWeightLinearMethod, HalfWeightLinearMethod.DTYPES)))

#: the longest query (tokens of one request in one step) the stack takes: it recomputes each
#: query token's attention over the request's keys on its own, which beats the Python layers
#: for a speculative verification (1 + k tokens, k <= 15) but not for a prefill chunk
FUSED_MAX_QUERY_LEN = 16


class FusedDecode:
    """Runs the decoder layers and final norm of a decode step in one C++ call."""

    def __init__(self, ops: ModuleType, model: nn.Module) -> None:
        layers = list(model.layers)
        attn = layers[0].self_attn

        def weight(m: nn.Module | None) -> torch.Tensor | None:
            return None if m is None else m.weight

        def bias(m: nn.Module) -> torch.Tensor | None:
            return getattr(m, "bias", None)

        def packed(m: nn.Module) -> torch.Tensor | None:  # CpuPackedLinearMethod's copy
            return m.__dict__.get("packed_weight")

        self.stack = ops.DecodeStack(
            n_heads=attn.num_heads, n_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            eps=model.norm.eps, scale=attn.attn.scale,
            input_norm=[l.input_layernorm.weight for l in layers],
            qkv=[l.self_attn.qkv_proj.weight for l in layers],
            qkv_bias=[bias(l.self_attn.qkv_proj) for l in layers],
            q_norm=[weight(l.self_attn.q_norm) for l in layers],
            k_norm=[weight(l.self_attn.k_norm) for l in layers],
            o=[l.self_attn.o_proj.weight for l in layers],
            o_bias=[bias(l.self_attn.o_proj) for l in layers],
            post_norm=[l.post_attention_layernorm.weight for l in layers],
            gate_up=[l.mlp.gate_up_proj.weight for l in layers],
            down=[l.mlp.down_proj.weight for l in layers],
            final_norm=model.norm.weight,
            packed=[packed(m) for l in layers for m in _projections(l)],
            quant_types=[_quant_type(m) for l in layers for m in _projections(l)],
            input_orders=[getattr(m, "input_order", None)
                          for l in layers for m in _projections(l)],
            kv_scales=[scale for l in layers
                       for scale in (l.self_attn.attn.k_scale, l.self_attn.attn.v_scale)])

    @staticmethod
    def applies(hidden: torch.Tensor) -> bool:
        """True in a step whose requests each compute 1..`FUSED_MAX_QUERY_LEN` tokens (a decode
        step; a speculative verification of 1 + d tokens, `spec_decode.verify`; a short
        prompt) over a KV cache the C++ attention reads (float32, bfloat16, float16 or fp8:
        `KERNEL_CACHE_DTYPES`); and no token uses a LoRA adapter (the stack cannot add their
        deltas)."""
        ctx = get_forward_context()
        md = ctx.attn_metadata
        return (current_lora_mapping() is None and md is not None and md.num_reqs > 0
                and md.max_query_len <= FUSED_MAX_QUERY_LEN
                and hidden.shape[0] == md.num_actual_tokens and fast_path_ok(hidden)
                and hidden.is_contiguous() and bool(ctx.kv_caches)
                and ctx.kv_caches[0].dtype in KERNEL_CACHE_DTYPES)

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> torch.Tensor:
        """hidden [T, hidden] embeddings, cos/sin [T, 1, D/2] -> final-norm output; writes the
        step's k/v into the context's caches. Row t's keys: its request's block-table row
        truncated to nb = ceil(max seq_len / block_size) blocks."""
        ctx = get_forward_context()
        md = ctx.attn_metadata
        nb = -(-md.max_seq_len // md.block_size)
        if md.max_query_len == 1 and md.num_actual_tokens == md.num_reqs:  # row t = request t
            block_ids = md.block_table[:, :nb].to(torch.long).reshape(-1)
            seq_lens = md.seq_lens
        else:
            block_ids, seq_lens = _token_rows(md, nb)
        return self.stack.forward(hidden, cos, sin, list(ctx.kv_caches), md.slot_mapping,
                                  block_ids, nb, seq_lens)


def _token_rows(md: AttentionMetadata, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention row per query token: (block ids [T * nb] int64, seq lens [T] int64).
    Token t is query token j = t - query_start[r] of request r; it sits at position
    seq_len[r] - q_len[r] + j, so it attends seq_len[r] - q_len[r] + j + 1 keys through
    request r's first nb block-table entries."""
    h = md.host
    req = np.repeat(np.arange(len(h.q_lens)), h.q_lens)              # [T] request of token t
    j = np.arange(len(req)) - h.qsl[:-1][req]
    lens = (h.seq - h.q_lens)[req] + j + 1
    block_ids = np.ascontiguousarray(h.bt[req, :nb], dtype=np.int64).reshape(-1)
    device = md.slot_mapping.device
    return (torch.from_numpy(block_ids).to(device),
            torch.from_numpy(lens.astype(np.int64)).to(device))


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The linear layers of a decoder layer the stack computes."""
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj)


def _quant_type(layer: nn.Module) -> int:
    """The `gguf_linear` type id of a projection that runs it (`kernel_type`: a GGUF block
    type's GGML id, | 256 for int8 activations, | 1024 VNNI-packed; BF16 / F16 for 16-bit
    weights), 0 for a float32 weight."""
    method = layer.linear_method
    if isinstance(method, LoRALinearMethod):
        method = method.base
    if isinstance(method, GgufBlockLinearMethod):
        return method.layer_kernel_type(layer)
    return method.kernel_type if isinstance(method, HalfWeightLinearMethod) else 0


def _weights_ok(model: nn.Module) -> bool:
    """float32 CPU contiguous weights (GGUF blocks or 16-bit weights for the projections that
    run `gguf_linear`, and an embedding read by Python), no tensor-parallel sharding (the
    stack does no all-reduce)."""
    blocks = {id(m.weight) for l in model.layers for m in _projections(l) if _quant_type(m)}
    blocks.add(id(model.embed_tokens.weight))  # looked up by Python, whatever its form
    return all((p.dtype == torch.float32 or id(p) in blocks)
               and p.device.type == "cpu" and p.is_contiguous()
               for p in model.parameters()) and all(
        getattr(m, "tp_size", 1) == 1 for m in model.modules())


def install_fused_decode(model: nn.Module, ops: ModuleType | None) -> bool:
    """Attach a `FusedDecode` to `model.model` where it applies (see module doc); returns
    whether it did."""
    inner = getattr(model, "model", None)
    if ops is None or inner is None or not hasattr(inner, "fused_decode"):
        return False
    inner.fused_decode = None  # a re-install starts from the Python layers
    layers = list(inner.layers)
    whole = (getattr(inner, "start_layer", 0) == 0
             and getattr(inner, "end_layer", len(layers)) == len(layers))
    if not layers or not whole or not all(
            isinstance(l.self_attn.attn.backend, CpuPagedBackend) for l in layers):
        return False
    reason = FUSED_DECODE_SUPPORT.first_unsupported(m for l in layers for m in _projections(l))
    if reason is not None:
        logger.info("Decode steps run the Python layers: %s.", reason)
        return False
    if not _weights_ok(inner):
        return False
    inner.fused_decode = FusedDecode(ops, inner)
    return True
