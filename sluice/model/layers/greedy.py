"""Exact greedy tokens without full float32 logits: a bfloat16 screen of the LM head.

A greedy step (temperature 0, nothing that edits the logits, no logprobs) needs only the argmax
of each row's logits. `GreedyScreen` computes the LM head in bfloat16 (for many rows oneDNN on
the CPU's native bf16 dot products: ~2x the float32 GEMM rate; for one to four decoding rows a
pass over half the weight bytes), bounds the bf16 error of every logit, and recomputes in
float32 only the few tokens the bound cannot rule out (`greedy_screen` in
sluice/model/csrc/greedy_screen.cpp, which states the argument). The token is the one argmax
over full float32 logits picks, up to float32 rounding (which also separates any two GEMM
implementations); the bf16 scores never decide a token by themselves.

Error bound per logit l_j = x . w_j, with u = 2^-8 (bf16's unit roundoff, round to nearest) and
g = K 2^-24 / (1 - K 2^-24) (a float32 sum of K terms in any order):

    |s_j - l_j| <= c0 * sum_i |x_i w_ij|,  c0 = (2u + u^2) + g (1+u)^2 + u (1+g)(1+u)^2
                  (inputs rounded)    (sum)       (bf16 output)

and sum_i |x_i w_ij| <= ||x|| ||w_j||. The kernel uses c = 1.25 c0 (room for the float32
arithmetic of the bound itself, ~2^-23 relative against c0 >= 3u) plus an absolute `a` for
bf16 denormals flushed to zero. On the reference model (K = 512, vocab 32000) about ten tokens
per row remain to recompute.

Where it applies (`GREEDY_SCREEN_SUPPORT`, the one declaration): an LM head whose linear method
is `CpuPackedLinearMethod` over float32 weights (the screen reads the plain float32 weight and
needs the C++ operators; an adapter or a quantized method would change the logits it does not
see), on one tensor-parallel rank (with a vocabulary split no rank holds the whole head), with
the packed copies made (the memory-fit rule) and bf16 dot products on the CPU. Elsewhere the
head has no screen and the runner computes the logits. Which requests may use it (plain greedy
sampling) is the sampler's decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torch

from torch import nn

from sluice.model.host_memory import huge_page_buffer
from sluice.model.layers.greedy_bf16 import bf16_head_argmax_for
from sluice.model.layers.layer_ops import PACK_ROWS_HINT, native_bf16_products
from sluice.model.layers.linear_method import CpuPackedLinearMethod, FastPathSupport

BF16_UNIT_ROUNDOFF = 2.0 ** -8
BOUND_SAFETY = 1.25
NORM_CHUNK_ROWS = 4096  # rows per float64 chunk when measuring the weight's row norms

#: the LM heads the screen takes (module doc); any other method, dtype or a split vocabulary
#: leaves the head without a screen
GREEDY_SCREEN_SUPPORT = FastPathSupport("greedy screen", methods=(CpuPackedLinearMethod,),
                                        dtypes=(torch.float32,), single_rank=True)


def bound_constants(k: int, max_row_norm: float) -> tuple[float, float]:
    """(c, a) of the screen bound |s_j - l_j| <= c ||x|| ||w_j|| + a for dot products of
    length `k` (see the module doc). `a` covers bf16/float32 denormals flushed to zero: at most
    2^-126 per input element and per partial sum, scaled generously by the weights' size."""
    u = BF16_UNIT_ROUNDOFF
    g = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    c0 = (2 * u + u * u) + g * (1 + u) ** 2 + u * (1 + g) * (1 + u) ** 2
    a = 2.0 ** -120 * (k + math.sqrt(k) * (1.0 + max_row_norm))
    return BOUND_SAFETY * c0, a


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||w_j||_2 of each row of a float32 [V, K] weight, as float32 rounded up (float64 sums in
    chunks of NORM_CHUNK_ROWS rows, so no float64 copy of the whole weight is made)."""
    norms = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], NORM_CHUNK_ROWS):
        chunk = weight[start:start + NORM_CHUNK_ROWS].to(torch.float64)
        exact = torch.linalg.vector_norm(chunk, dim=1)
        # float64 -> float32 rounds by at most 2^-24 relative; 1 + 2^-20 rounds it up
        norms[start:start + NORM_CHUNK_ROWS] = (exact * (1 + 2.0 ** -20)).to(torch.float32)
    return norms


class GreedyScreen:
    """hidden [n, K] float32 -> greedy token ids [n] (int64), or None when some row could not
    be decided (NaN or infinity in its hidden state or scores): the caller then computes the
    full logits. `weight` is the LM head's float32 [V, K] weight, shared (not copied); the
    screen keeps two bf16 copies, plain (in huge pages, streamed for 1-4 rows) and
    oneDNN-packed (for more rows), V * K * 2 bytes each, and the row norms. Made once at load;
    it does not follow later writes to `weight`."""

    def __init__(self, ops: ModuleType, weight: torch.Tensor, rows_hint: int) -> None:
        self._ops = ops
        self.weight = weight.detach()
        with torch.no_grad():
            self.bf16 = huge_page_buffer(self.weight.numel() * 2).view(torch.bfloat16).view(
                self.weight.shape)
            self.bf16.copy_(self.weight)
            self.packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(self.bf16, rows_hint)
        self.norms = row_norms(self.weight)
        self.c, self.a = bound_constants(weight.shape[1], float(self.norms.max()))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 screen scores [n, V] of contiguous float32 rows x [n, K]: up to
        `ops.MAX_SCORE_ROWS` rows stream the plain bf16 weight once (`bf16_scores`, bandwidth
        bound: one decoding request), more run oneDNN's bf16 GEMM on the packed copy."""
        if x.shape[0] <= self._ops.MAX_SCORE_ROWS:
            scores = torch.empty(x.shape[0], self.bf16.shape[0], dtype=torch.bfloat16)
            self._ops.bf16_scores(scores, x, self.bf16)
            return scores
        return self._ops.onednn_linear(x.to(torch.bfloat16), self.packed_bf16)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor | None:
        x = hidden.contiguous()
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long)
        scores = self.scores(x)
        tokens = torch.empty(x.shape[0], dtype=torch.long)
        self._ops.greedy_screen(tokens, scores, x, self.weight, self.norms, self.c, self.a)
        if bool((tokens < 0).any()):
            return None
        return tokens


def make_greedy_screen(ops: ModuleType | None, weight: torch.Tensor | None,
                       rows_hint: int) -> GreedyScreen | None:
    """A GreedyScreen for the LM-head `weight`, or None where it would not pay or not apply:
    no C++ ops, no native bf16 dot products, or a weight that is not a float32 CPU matrix."""
    if ops is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
            or weight.dtype != torch.float32 or weight.device.type != "cpu" \
            or not weight.is_contiguous() or not native_bf16_products():
        return None
    try:
        return GreedyScreen(ops, weight, rows_hint)
    except (RuntimeError, AttributeError):  # a torch without the oneDNN bf16 ops
        return None


def greedy_screen_for(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """The greedy fast path for a loaded LM head (`embedding.LMHead.greedy`): a bf16 head's
    argmax over its bf16 logits (`greedy_bf16`) where that applies, else the screen, or None
    where both step aside: outside `GREEDY_SCREEN_SUPPORT`, no packed copy (the memory-fit
    rule), or what `make_greedy_screen` refuses."""
    argmax = bf16_head_argmax_for(head)
    if argmax is not None:
        return argmax
    if GREEDY_SCREEN_SUPPORT.unsupported(head) is not None \
            or head.__dict__.get("packed_weight") is None:
        return None
    return make_greedy_screen(head.linear_method.ops, head.lm_weight, PACK_ROWS_HINT)
