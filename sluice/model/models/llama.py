"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 differ only in flags), on paged attention.

Model interface (shared by every registered architecture):
    __init__(spec, dtype, *, max_model_len=None, attn_backend=None, layer_range=None)
    forward(input_ids [T] long, positions [T] long, intermediate=None) -> hidden [T, hidden_size]
        (all scheduled tokens of the step flattened; must run inside set_forward_context);
        on a pipeline stage other than the last it returns the stage's hand-off instead
        (below), and a stage other than the first takes the previous one's as `intermediate`
    compute_logits(hidden [n, hidden_size]) -> [n, vocab] float32 (None on tensor-parallel
        ranks other than 0: the LM head gathers the logits to the driver; every TP rank must
        call it, as it takes part in the gather)
    load_weights(iterable of (hf_name, tensor)) -> None, ModelLoadError on any mismatch

Pipeline parallelism: `layer_range=(start, end)` (the stage's range, from
`sluice.model_spec.parallel_check.stage_layer_range`; default all layers) builds only decoder
layers [start, end): the others are parameter-free `PPMissingLayer` placeholders (module names
stay HF's, no memory for other stages' weights, `load_weights` skips their tensors). The stage
with start == 0 owns the embedding, the one with end == num_hidden_layers the final norm and
the LM head (with tied embeddings and more than one stage, that head is a copy loaded from
`model.embed_tokens.weight`). A stage hands on `hand-off [2, T, hidden_size]` = stack(hidden,
residual) after its last layer. Attention layer i of the stage reads KV cache i - start (the
stage's caches hold its layers only).

Module names mirror HF's, except the fused `qkv_proj` (q_proj|k_proj|v_proj) and
`gate_up_proj` (gate_proj|up_proj), so checkpoint names map by suffix replacement.

Tensor parallelism: every parallel layer reads `get_tp_group()` once in its constructor (the
model is built after `sluice.distributed` is initialised) and holds its shard: q/k/v, gate/up
and the vocabulary split by rows, o_proj and down_proj by columns with an all-reduce. Attention
sees the rank's local heads. The split rules: `sluice.model_spec.parallel_check`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from sluice.distributed.parallel_state import get_tp_group
from sluice.errors import ModelLoadError
from sluice.hf_config import ModelSpec
from sluice.model.attention import Attention, AttentionBackend, get_attn_backend
from sluice.model.attention.kv_scales import (FP8_ATTENTION_SCALE_SUFFIXES, kv_scale_target,
                                              scale_value)
from sluice.model.layers import (LMHead, MergedColumnLinear, QKVLinear, RMSNorm,
                                 RotaryEmbedding, RowParallelLinear, VocabEmbedding,
                                 default_weight_loader, get_act_and_mul)
from sluice.model.layers.half_linear import bf16_mlp_layers
from sluice.model.layers.layer_ops import current_layer_ops
from sluice.model.layers.linear import LazyTensor, materialize
from sluice.model.layers.rotary import default_cache_len
from sluice.model_spec.parallel_check import check_tensor_parallel

if TYPE_CHECKING:
    from sluice.model.fused_decode import FusedDecode

# (our fused module, HF module, shard id)
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")

logger = logging.getLogger(__name__)


class PPMissingLayer(nn.Module):
    """Stands in for a decoder layer another pipeline stage holds: no parameters, never run."""

    def forward(self, *args: object) -> None:
        raise AssertionError("a layer of another pipeline stage was called")


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = MergedColumnLinear(spec.hidden_size, [inter, inter], False, dtype)
        self.down_proj = RowParallelLinear(inter, spec.hidden_size, False, dtype)
        self.act_fn = get_act_and_mul(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        method = bf16_mlp_layers(self.gate_up_proj, self.down_proj)
        if method is not None:
            gate_up = method.bf16_product(self.gate_up_proj, x)   # bf16, rounded by oneDNN
            if gate_up is not None:
                return self.down_proj(self.act_fn(gate_up))     # silu in bf16 rows, then down
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """qkv GEMM -> (Qwen3: per-head RMSNorm on q, k) -> RoPE -> paged attention -> o_proj."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, layer_idx: int, o_bias: bool,
                 backend: AttentionBackend) -> None:
        super().__init__()
        d = spec.head_dim
        self.qkv_proj = QKVLinear(spec.hidden_size, d, spec.num_attention_heads,
                                  spec.num_key_value_heads, spec.attention_bias, dtype)
        self.o_proj = RowParallelLinear(spec.num_attention_heads * d, spec.hidden_size, o_bias,
                                        dtype)
        # this rank's heads (all of them with one rank)
        h, kvh = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.q_norm = RMSNorm(d, spec.rms_norm_eps, dtype) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps, dtype) if spec.qk_norm else None
        self.attn = Attention(h, d, kvh, d ** -0.5, layer_idx, backend)
        # fused RoPE: the C++ operators of the model's layer ops, or None
        self.cpu_ops: ModuleType | None = current_layer_ops().cpu_ops

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        t, h, kvh, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj.split(qkv)
        if self.q_norm is None:
            # q and k are adjacent columns: rotate both with one set of ops.
            qk = RotaryEmbedding.apply(qkv[:, :(h + kvh) * d].view(t, h + kvh, d), cos, sin,
                                       self.cpu_ops)
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = RotaryEmbedding.apply(self.q_norm(q.view(t, h, d)), cos, sin, self.cpu_ops)
            k = RotaryEmbedding.apply(self.k_norm(k.view(t, kvh, d)), cos, sin, self.cpu_ops)
        return self.o_proj(self.attn(q, k, v.view(t, kvh, d)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, layer_idx: int, o_bias: bool,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(spec, dtype, layer_idx, o_bias, backend)
        self.mlp = LlamaMLP(spec, dtype)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (mlp_out, residual); the caller adds the last pair."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """The decoder layers [start, end) of `layer_range` (see the module docstring)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, o_bias: bool, max_position: int,
                 backend: AttentionBackend, layer_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        n = spec.num_hidden_layers
        start, end = self.start_layer, self.end_layer = layer_range or (0, n)
        assert 0 <= start < end <= n or n == 0, (layer_range, n)
        self.is_first_stage, self.is_last_stage = start == 0, end == n
        self.embed_tokens = (VocabEmbedding(spec.vocab_size, spec.hidden_size, dtype)
                             if self.is_first_stage else None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, dtype, i - start, o_bias, backend) if start <= i < end
            else PPMissingLayer() for i in range(n))
        self.norm = (RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
                     if self.is_last_stage else None)
        self.rotary_emb = RotaryEmbedding(spec.head_dim, max_position, spec.rope,
                                          spec.max_position_embeddings)
        # the layers of a decode step in one C++ call (sluice.model.fused_decode), or None
        self.fused_decode: FusedDecode | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """-> final hidden [T, hidden] on the last stage, else the hand-off [2, T, hidden]."""
        residual = None
        if self.is_first_stage:
            hidden = self.embed_tokens(input_ids)
        else:
            hidden, residual = intermediate[0], intermediate[1]
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)  # once per step
        if self.fused_decode is not None and self.fused_decode.applies(hidden):
            return self.fused_decode(hidden, cos, sin)
        layers = (self.layers if self.start_layer == 0 and self.is_last_stage
                  else self.layers[self.start_layer:self.end_layer])
        for layer in layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        if not self.is_last_stage:
            return torch.stack((hidden, residual))
        if residual is None:          # no layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def check_supported(spec: ModelSpec, max_model_len: int | None) -> None:
    """Refuse configurations this implementation would compute wrongly."""
    max_len = max_model_len or spec.max_position_embeddings
    if spec.sliding_window is not None and spec.sliding_window < max_len:
        raise ModelLoadError(
            f"{spec.path}: sliding-window attention (sliding_window={spec.sliding_window}) is "
            f"not supported and would change outputs for sequences longer than the window; "
            f"max_model_len is {max_len}. Set --max-model-len {spec.sliding_window} or less.")
    if spec.hidden_act not in ("silu", "swish"):
        raise ModelLoadError(f"{spec.path}: hidden_act '{spec.hidden_act}' is not supported; "
                             "supported: silu.")


class LlamaForCausalLM(nn.Module):
    """Causal LM head over `LlamaModel`. Subclasses set `o_proj_bias` rules."""

    #: o_proj carries a bias when the config's attention_bias is set (Llama, Qwen3);
    #: Qwen2 biases only q/k/v.
    o_proj_bias_follows_attention_bias: bool = True

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, *,
                 max_model_len: int | None = None, attn_backend: str | None = None,
                 layer_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        check_supported(spec, max_model_len)
        check_tensor_parallel(spec, get_tp_group().size)
        self.spec = spec
        self.dtype = dtype
        o_bias = spec.attention_bias and self.o_proj_bias_follows_attention_bias
        backend = get_attn_backend(attn_backend)  # one instance shared by all layers
        max_position = default_cache_len(spec.rope, spec.max_position_embeddings, max_model_len)
        self.model = LlamaModel(spec, dtype, o_bias, max_position, backend, layer_range)
        # a last stage without the embedding loads a tied head from the embedding's tensor
        self._head_copies_embedding = (spec.tie_word_embeddings and self.model.is_last_stage
                                       and not self.model.is_first_stage)
        self.lm_head = (LMHead(spec.vocab_size, spec.hidden_size, dtype,
                               tied_to=self.model.embed_tokens if spec.tie_word_embeddings
                               and self.model.is_first_stage else None)
                        if self.model.is_last_stage else None)
        self._expected = self._expected_checkpoint_names()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [n, hidden_size] (only the rows that need logits) -> [n, vocab] float32 on
        tp rank 0, None on the other tensor-parallel ranks (see the module docstring). Last
        pipeline stage only."""
        assert self.lm_head is not None, "compute_logits on a pipeline stage before the last"
        return self.lm_head(hidden)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [n, hidden_size] -> the argmax token of each row's logits [n] int64, when the
        LM head can find it without full float32 logits; else None (use compute_logits)."""
        return self.lm_head.greedy_tokens(hidden)

    # ---- weights -------------------------------------------------------------------------

    def _other_stage_holds(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to another pipeline stage (never with
        one stage)."""
        m = self.model
        match = _LAYER_NAME.match(name)
        if match:
            return not m.start_layer <= int(match.group(1)) < m.end_layer
        if name.startswith("model.embed_tokens."):
            return not (m.is_first_stage or self._head_copies_embedding)
        return name.startswith(("model.norm.", "lm_head.")) and not m.is_last_stage

    def _expected_checkpoint_names(self) -> set[str]:
        """HF names the checkpoint must hold: one per parameter, fused ones expanded."""
        names = set()
        for name, _ in self.named_parameters():
            fused = [(ours, hf) for ours, hf, _ in STACKED_PARAMS if f".{ours}." in name]
            names.update(name.replace(f".{ours}.", f".{hf}.") for ours, hf in fused)
            if not fused:
                names.add(name)
        return names

    @staticmethod
    def map_checkpoint_name(name: str) -> tuple[str, str | int | None]:
        """HF tensor name -> (our parameter name, shard id)."""
        for ours, hf, shard in STACKED_PARAMS:
            if f".{hf}." in name:
                return name.replace(f".{hf}.", f".{ours}."), shard
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | LazyTensor]]) -> None:
        """Copy checkpoint tensors (or this rank's slices of lazy ones) into parameters;
        ModelLoadError lists every missing, unexpected or shape-mismatched tensor. Tied models
        skip `lm_head.weight`; tensors of other pipeline stages are skipped unread. KV-cache
        scales (`sluice.model.attention.kv_scales`) go to the layers' `Attention`; fp8
        attention's query / softmax scales are read past."""
        params = dict(self.named_parameters())
        skipped_attention_scales = 0
        seen: set[str] = set()
        unexpected: list[str] = []
        mismatched: list[str] = []
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue
            if self._other_stage_holds(name):
                continue
            if name.endswith(FP8_ATTENTION_SCALE_SUFFIXES):
                skipped_attention_scales += 1
                continue
            if self._load_kv_scale(name, tensor):
                continue
            if self._head_copies_embedding and name == "model.embed_tokens.weight":
                name = "lm_head.weight"
            target, shard = self.map_checkpoint_name(name)
            param = params.get(target)
            if param is None or name not in self._expected:
                unexpected.append(name)
                continue
            try:
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor, shard)
            except ValueError as e:
                mismatched.append(f"{name} ({e})")
            seen.add(name)
        missing = sorted(self._expected - seen)
        problems = []
        for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f" … and {len(items) - 8} more"
                                                if len(items) > 8 else "")
                problems.append(f"{label}: {shown}")
        if problems:
            raise ModelLoadError(f"{self.spec.path}: checkpoint does not match "
                                 f"{self.spec.architecture}: " + "; ".join(problems))
        if skipped_attention_scales:
            logger.info("%d fp8-attention query / softmax scales (%s) not read: sluice's "
                        "attention computes in float32.", skipped_attention_scales,
                        ", ".join(FP8_ATTENTION_SCALE_SUFFIXES))

    def _load_kv_scale(self, name: str, tensor: torch.Tensor | LazyTensor) -> bool:
        """Whether `name` is a KV-cache scale of one of this model's layers; if so its value
        is set on that layer's `Attention` (`set_kv_scale`)."""
        target = kv_scale_target(name)
        if target is None or not 0 <= target[0] < len(self.model.layers):
            return False
        layer, which = target
        attn = self.model.layers[layer].self_attn.attn
        attn.set_kv_scale(which, scale_value(name, materialize(tensor)))
        return True
