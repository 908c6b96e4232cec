"""The worker side of speculative decoding with a draft model (method draft_model): a smaller
model sharing the target's vocabulary proposes the next k tokens of each request greedily.

KV cache: the draft keeps its own paged cache, one tensor per draft layer, with the same
number of blocks as the target's and indexed by the SAME block ids (the request's block table),
so the scheduler's allocation covers both. Its contents are caught up lazily, per request:

    draft_computed[r]  positions 0 .. draft_computed[r] - 1 of request r hold valid draft KV

A proposal for a request with T known tokens (the last one just sampled) runs:

    forward 1:   tokens[draft_computed : T] at positions draft_computed .. T - 1  (catch-up
                 and the last token in one prefill-shaped forward; its last logits give d_1)
    forward j:   d_{j-1} at position T + j - 2, giving d_j                  (j = 2 .. k_r)

and then sets draft_computed[r] = T: the KV written for the drafts (positions >= T) is valid
only if the target accepts them, so the next proposal recomputes from T (a few tokens). A new
or preempted request starts at 0, so prefix-cache hits and recomputation need no care (a
block shared through the prefix cache gets the same draft KV written by every sharer). The
positions written reach T + k_r - 2, so the scheduler allocates k lookahead slots beyond the
step's own (`SpeculationPlanner.extra_lookahead`); k_r is also cut so that drafts stay below
max_model_len and inside the slots actually held:

    k_r = min(k, max_model_len - T, len(block_ids) * block_size - (T - 1))

Drafts are greedy (the draft's argmax), so the rejection sampler treats the proposer as
deterministic (q one-hot on the draft), which keeps the target's distribution exactly.
Only rows that sampled this step propose, and only when the scheduler asked for proposals
(`SchedulerOutput.propose_drafts`: speculation is on for the batch); rows with structured
output never do (they get no drafts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sluice.errors import ConfigError
from sluice.hf_config import ModelSpec, load_model_spec
from sluice.model.attention.forward_context import set_forward_context
from sluice.model.attention.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from sluice.model.attention.metadata import build_attention_metadata
from sluice.model.loader import load_model
from sluice.worker.input_batch import build_step_batch
from sluice.worker.request_state import CachedRequestState

logger = logging.getLogger(__name__)


@dataclass
class _RowView:
    """What `build_step_batch` reads of a request, for a draft forward."""
    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


def check_same_vocabulary(draft: ModelSpec, target: ModelSpec) -> None:
    """Refuse a draft whose vocabulary differs from the target's: its token ids would mean
    other text. Compares the models' vocabulary sizes and, where both directories carry a
    tokenizer, the token -> id maps."""
    if draft.vocab_size != target.vocab_size:
        raise ConfigError(
            f"--speculative-config: the draft model {draft.path} has a vocabulary of "
            f"{draft.vocab_size} tokens, the target {target.path} one of {target.vocab_size}; "
            "a draft model must share the target's tokenizer. Fix: use a draft of the same "
            "model family (same tokenizer), or method ngram.")
    from sluice.frontend.tokenizer import load_tokenizer
    try:
        draft_vocab = load_tokenizer(draft.path).hf.get_vocab()
        target_vocab = load_tokenizer(target.path).hf.get_vocab()
    except Exception:   # a directory without a tokenizer: the sizes are all we can compare
        return
    if draft_vocab != target_vocab:
        raise ConfigError(
            f"--speculative-config: the draft model {draft.path} and the target {target.path} "
            "have vocabularies of the same size but different tokens; a draft model must "
            "share the target's tokenizer. Fix: use a draft of the same model family, or "
            "method ngram.")


class DraftModelProposer:
    """See the module docstring. Built and loaded by the model runner (driver rank)."""

    def __init__(self, draft_dir: str | Path, target_spec: ModelSpec, k: int,
                 device: torch.device, dtype: torch.dtype, kv_cache_dtype: torch.dtype,
                 block_size: int, max_model_len: int, attn_backend: str | None,
                 layer_ops: str, seed: int) -> None:
        self.spec = load_model_spec(draft_dir)
        check_same_vocabulary(self.spec, target_spec)
        self.k = k
        self.device, self.dtype, self.kv_cache_dtype = device, dtype, kv_cache_dtype
        self.block_size, self.max_model_len = block_size, max_model_len
        self.attn_backend, self.layer_ops, self.seed = attn_backend, layer_ops, seed
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.draft_computed: dict[str, int] = {}

    def load(self) -> None:
        self.model = load_model(self.spec, self.dtype, self.device, "auto",
                                max_model_len=self.max_model_len, seed=self.seed,
                                attn_backend=self.attn_backend, layer_ops=self.layer_ops)
        logger.info("Draft model for speculative decoding: %s (%d layers)", self.spec.path,
                    self.spec.num_hidden_layers)

    def kv_cache_bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(self.spec, self.block_size, self.kv_cache_dtype)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(self.spec, num_blocks, self.block_size,
                                            self.kv_cache_dtype, self.device)
        self.draft_computed.clear()

    def forget(self, request_id: str) -> None:
        """The request finished or was preempted: its draft KV is no longer valid."""
        self.draft_computed.pop(request_id, None)

    def _num_drafts(self, state: CachedRequestState) -> int:
        """k_r of the module docstring."""
        t = len(state.token_ids)
        slots = len(state.block_ids) * self.block_size - (t - 1)
        return max(0, min(self.k, self.max_model_len - t, slots))

    @torch.inference_mode()
    def propose(self, states: list[CachedRequestState]) -> dict[str, list[int]]:
        """Greedy drafts for `states` (requests that just sampled; their token_ids end with
        the new tokens), at most k_r each; requests with structured output get none."""
        rows = [s for s in states if s.sampling_params.structured_outputs is None
                and self._num_drafts(s) > 0]
        if not rows:
            return {}
        budget = {s.request_id: self._num_drafts(s) for s in rows}
        drafts: dict[str, list[int]] = {s.request_id: [] for s in rows}
        views = [_RowView(s.request_id, list(s.token_ids), s.block_ids,
                          self.draft_computed.get(s.request_id, 0)) for s in rows]
        num_new = [len(v.token_ids) - v.num_computed_tokens for v in views]
        while views:
            tokens = self._forward(views, num_new)
            for view, token in zip(views, tokens):
                drafts[view.request_id].append(token)
                view.num_computed_tokens = len(view.token_ids)
                view.token_ids.append(token)
            views = [v for v in views if len(drafts[v.request_id]) < budget[v.request_id]]
            num_new = [1] * len(views)
        for s in rows:
            self.draft_computed[s.request_id] = len(s.token_ids)
        return drafts

    def _forward(self, views: list[_RowView], num_new: list[int]) -> list[int]:
        """One draft forward of `num_new[r]` tokens per row (writing their draft KV); the
        greedy next token of each row."""
        batch = build_step_batch(views, num_new, self.block_size)   # type: ignore[arg-type]
        metadata = build_attention_metadata(batch.query_start_loc, batch.seq_lens,
                                            batch.block_table, batch.slot_mapping,
                                            self.block_size, self.device)
        input_ids = torch.from_numpy(batch.input_ids).to(self.device)
        positions = torch.from_numpy(batch.positions).to(self.device)
        with set_forward_context(metadata, self.kv_caches):
            hidden = self.model(input_ids, positions, None)
        rows = hidden[torch.from_numpy(np.asarray(batch.logits_indices))]
        tokens = self.model.greedy_tokens(rows)
        if tokens is None:
            tokens = self.model.compute_logits(rows).argmax(dim=-1)
        return tokens.tolist()
