"""ModelRunner: owns the model, the KV-cache tensors and per-request state; runs one step.

Contract: one step is two calls, as vLLM's. `execute_model(scheduler_output)` applies the step
diff (drop finished requests, add new ones, append new blocks), flattens the batch
(`input_batch.build_step_batch`), runs one forward under the attention forward context and
keeps what sampling needs (`_PendingStep`: the batch, the final hidden states). Then
`sample_tokens(grammar_output)` applies the step's grammar bitmask (structured output; None
when no sampling row has a grammar), samples the rows that reached their last known token,
appends those tokens to its own state and returns a `ModelRunnerOutput`. `step(so, grammar)`
does both. Every `execute_model` is followed by exactly one `sample_tokens`.

Tensor parallelism: every TP rank runs the same steps on its shard of the model. The LM head
gathers the logits to tp rank 0 (the driver), which alone samples (and computes logprobs) and
broadcasts the sampled token ids over the TP group; every rank appends them to its own state,
so per-request state stays identical without the ranks having to sample identically (random
sampling uses only the driver's generators). Only the driver's `ModelRunnerOutput` is
returned to the scheduler. The TP group is read from `sluice.distributed` when the model is
loaded.

Pipeline parallelism: this rank's stage (the PP group's rank) holds the decoder layers
`layer_range` (`sluice.model_spec.parallel_check.stage_layer_range`) and KV caches for those
layers only. A stage other than the first receives the previous stage's hand-off tensor
[2, T, hidden] (hidden and residual stacked; T = the step's scheduled token count, so both
ends know the shape from the `SchedulerOutput` alone) before its forward, and a stage other
than the last sends its own to the next stage after it, both point-to-point on the PP group
(tp rank r of one stage to tp rank r of the next). Only the last stage computes logits and
samples (its tp rank 0; its `ModelRunnerOutput` is the step's result); the others return an
empty output and learn the sampled tokens from the next `SchedulerOutput`
(`CachedRequestData.new_token_ids`, see `sluice.step`). Profiling and warm-up forwards run
each stage on its own (zeros as the hand-off, nothing sent).

LoRA (`--enable-lora`): before the forward, `lora_manager.prepare`
(`sluice.lora.worker_manager`) loads and activates the step's adapters (each request's
`lora_request`) and returns the batch order, requests grouped by adapter, and the token ->
adapter-slot mapping the wrapped layers read (`sluice.lora.forward_context`).

Speculative decoding: a request with draft tokens (`SchedulerOutput.scheduled_spec_decode_tokens`)
runs them after its last sampled token (`input_batch`), and its row is sampled at every draft
position (`spec_decode.verify`); it appends the 1..d + 1 emitted tokens and counts only the
positions whose tokens it kept as computed. Under TP the driver broadcasts the emitted tokens
as one [rows, max drafts + 1] tensor padded with -1. With a draft model (`drafter`,
`spec_decode.draft_model`; pp and tp 1 only) the rows that sampled then propose the next
step's drafts when the scheduler asks (`SchedulerOutput.propose_drafts`), returned in
`ModelRunnerOutput.draft_token_ids`; the draft's KV cache has as many blocks as the target's.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from dataclasses import dataclass

import torch

from sluice.config import EngineConfig
from sluice.distributed.parallel_state import get_pp_group, get_tp_group
from sluice.hf_config import ModelSpec
from sluice.lora.forward_context import LoRAMapping, set_lora_mapping
from sluice.messages import TokenLogprobs
from sluice.model.attention.forward_context import set_forward_context
from sluice.model.attention.kv_cache import allocate_kv_caches
from sluice.model.attention.kv_scales import kv_scales_note
from sluice.model.attention.metadata import build_attention_metadata
from sluice.model.cpu_ops import load_cpu_ops
from sluice.model.layers.layer_ops import make_argmax, model_compute_dtype
from sluice.model.loader import load_model
from sluice.model_spec.parallel_check import stage_layer_range
from sluice.sample.grammar import grammar_mask
from sluice.sample.metadata import SamplingRow, build_sampling_metadata, request_generator
from sluice.sample.logprobs import compute_prompt_logprobs, to_token_logprobs
from sluice.sample.sampler import Sampler
from sluice.spec_decode.verify import draft_positions, verify_drafts
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output.output import GrammarOutput
from sluice.worker.input_batch import StepBatch, build_step_batch
from sluice.worker.request_state import CachedRequestState

logger = logging.getLogger(__name__)


def _release_freed_memory() -> None:
    """Collect unreachable tensors (a model's modules can form reference cycles) and ask
    glibc to return free heap pages to the system (best effort; other allocators: no-op)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class _PendingStep:
    """A step between `execute_model` and `sample_tokens`: `batch` None for an empty step;
    `hidden` [T, hidden] on the last pipeline stage, else None (nothing to sample)."""
    batch: StepBatch | None
    request_ids: list[str]
    states: list[CachedRequestState]
    num_scheduled: list[int]
    hidden: torch.Tensor | None
    drafts: list[list[int]] | None = None   # per batch row (speculative decoding); None: none
    propose_drafts: bool = False            # the draft model proposes after sampling


class ModelRunner:
    def __init__(self, config: EngineConfig, spec: ModelSpec, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, attn_backend: str | None = None,
                 layer_ops: str = "torch", kv_cache_dtype: torch.dtype | None = None):
        self.config = config
        self.spec = spec
        self.device = device
        self.dtype = dtype   # --dtype; the weights' dtype
        # the activations' dtype: float32 under 16-bit weights on a CPU (`half_linear`)
        self.compute_dtype = model_compute_dtype(layer_ops, dtype, device)
        self.kv_cache_dtype = kv_cache_dtype or self.compute_dtype
        self.max_model_len = max_model_len
        self.attn_backend = attn_backend
        self.layer_ops = layer_ops
        self.block_size = config.cache.block_size
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0
        self.sleep_level = 0  # 0 awake; 1 KV cache released; 2 weights released too
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.shared_generator = torch.Generator(device="cpu").manual_seed(config.model.seed)
        self._pending: _PendingStep | None = None   # between execute_model and sample_tokens
        self.lora_manager = None   # `sluice.lora.worker_manager.LoRAWorkerManager` (--enable-lora)
        self.drafter = None   # `spec_decode.draft_model.DraftModelProposer` (method draft_model)
        self._read_groups()  # again in load_model, once the groups exist

    def _read_groups(self) -> None:
        """This rank's TP and PP groups and its stage's layer range."""
        self.tp_group, self.pp_group = get_tp_group(), get_pp_group()
        pp = self.pp_group
        self.layer_range = stage_layer_range(self.spec.num_hidden_layers, pp.size, pp.rank,
                                             self.config.parallel.pp_layer_partition)
        self.is_first_stage, self.is_last_stage = pp.rank == 0, pp.rank == pp.size - 1

    @property
    def num_layers(self) -> int:
        """Decoder layers (and KV caches) this rank holds: its pipeline stage's."""
        return self.layer_range[1] - self.layer_range[0]

    # ---- setup -------------------------------------------------------------------------
    def load_model(self) -> None:
        self._read_groups()
        self.model = load_model(self.spec, self.dtype, self.device, self.config.load.load_format,
                                max_model_len=self.max_model_len, seed=self.config.model.seed,
                                attn_backend=self.attn_backend,
                                layer_ops=self.layer_ops, layer_range=self.layer_range,
                                lora=self.config.lora,
                                quantization=self.config.model.quantization)
        note = kv_scales_note(self.model, self.kv_cache_dtype)
        if note is not None:
            logger.info(note)
        if self.config.lora.enable_lora:
            from sluice.lora.layers import lora_layers
            from sluice.lora.worker_manager import LoRAWorkerManager
            self.lora_manager = LoRAWorkerManager(self.config.lora, self.spec,
                                                  lora_layers(self.model), self.compute_dtype,
                                                  self.device)
        if self.layer_ops == "cpu":
            self.sampler = Sampler(argmax=make_argmax(load_cpu_ops()))
        self._load_drafter()

    def _load_drafter(self) -> None:
        """The draft model of `--speculative-config` method draft_model (none otherwise)."""
        from sluice.spec_decode.config import parse_speculative_config
        spec = parse_speculative_config(self.config.scheduler.speculative_config)
        if spec is None or spec.method != "draft_model":
            return
        if self.drafter is None:
            from sluice.spec_decode.draft_model import DraftModelProposer
            self.drafter = DraftModelProposer(
                spec.model, self.spec, spec.num_speculative_tokens, self.device, self.dtype,
                self.kv_cache_dtype, self.block_size, self.max_model_len, self.attn_backend,
                self.layer_ops, self.config.model.seed)
        self.drafter.load()

    def model_memory_bytes(self) -> int:
        """Bytes of the tensors the loaded model holds: parameters, buffers, and tensors kept on
        its modules' helper objects (e.g. the pre-packed GEMM weights of layer ops 'cpu');
        each counted once, also when held through another tensor object over the same memory
        (a `detach()`ed alias, as the greedy screen keeps of the LM head)."""
        seen: set[tuple[int, int]] = set()
        total = 0

        def add(t: torch.Tensor) -> None:
            nonlocal total
            nbytes = t.numel() * t.element_size()
            try:
                key = (t.data_ptr(), nbytes)
            except RuntimeError:   # an opaque tensor (a oneDNN packed weight): no alias of it
                key = (id(t), -1)
            if key not in seen:
                seen.add(key)
                total += nbytes

        drafter = getattr(self, "drafter", None)
        models = [self.model] + ([drafter.model] if drafter is not None and drafter.model
                                 is not None else [])
        for module in (m for model in models for m in model.modules()):
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                add(t)
            for value in vars(module).values():
                if isinstance(value, torch.Tensor):
                    add(value)
                elif not isinstance(value, (torch.nn.Module, dict)) and hasattr(value, "__dict__"):
                    for inner in vars(value).values():
                        if isinstance(inner, torch.Tensor):
                            add(inner)
        lora = getattr(self, "lora_manager", None)   # adapters loaded later: their room
        if lora is not None:
            total += lora.reserved_bytes()
        return total

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_kv_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(self.spec, num_blocks, self.block_size,
                                            self.kv_cache_dtype, self.device,
                                            tp_size=self.tp_group.size,
                                            num_layers=self.num_layers)
        if self.drafter is not None:
            self.drafter.initialize_kv_cache(num_blocks)

    # ---- sleep mode ----------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        """Release device memory until `wake_up`: level 1 the KV cache, level 2 the weights
        too (reloaded from disk on wake). Contents are lost, so the caller makes sure no
        request is running and the prefix cache was reset. A deeper level than the current
        one releases more; a shallower one changes nothing.

        This runner holds the only references: the forward context and the fused decode
        stack see the caches during a step only, and the weights (and their packed copies
        and the fused stack's references) hang off `self.model`. On CPU both live in
        anonymous mappings (`sluice.model.host_memory`) that are unmapped when the last
        tensor viewing them is freed, so the process's RSS drops at once."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self.kv_caches = []
        if self.drafter is not None:
            self.drafter.kv_caches = []
        if level == 2:
            self.model = None
            if self.drafter is not None:
                self.drafter.model = None
        self.sleep_level = max(self.sleep_level, level)
        _release_freed_memory()

    def wake_up(self) -> None:
        """Undo `sleep`: reload the weights (level 2) and reallocate a zeroed KV cache of the
        same number of blocks. No-op when awake."""
        if self.model is None:
            self.load_model()
        if not self.kv_caches and self.num_kv_blocks:
            self.initialize_kv_cache(self.num_kv_blocks)
        self.sleep_level = 0

    @torch.inference_mode()
    def dummy_run(self, num_tokens: int, num_reqs: int = 1) -> None:
        """Run a throw-away prefill of `num_tokens` tokens over `num_reqs` requests using a
        temporary KV cache (used for warm-up and activation-memory profiling). No request is
        longer than max_model_len (its positions must stay inside the RoPE cache): more
        requests than `num_reqs` are used when `num_tokens` needs them."""
        num_reqs = max(1, min(max(num_reqs, -(-num_tokens // self.max_model_len)), num_tokens))
        per_req = [num_tokens // num_reqs + (1 if r < num_tokens % num_reqs else 0)
                   for r in range(num_reqs)]
        blocks_per_req = [-(-n // self.block_size) for n in per_req]
        kv = allocate_kv_caches(self.spec, 1 + sum(blocks_per_req), self.block_size,
                                self.kv_cache_dtype, self.device, tp_size=self.tp_group.size,
                                num_layers=self.num_layers)
        states, next_block = [], 1
        for r, n in enumerate(per_req):
            ids = list(range(next_block, next_block + blocks_per_req[r]))
            next_block += blocks_per_req[r]
            states.append(CachedRequestState(f"dummy-{r}", [1] * n, n, None, ids, 0, None, None))
        batch = build_step_batch(states, per_req, self.block_size)
        lora = None
        if self.lora_manager is not None:   # max_loras adapters of rank max_lora_rank
            self.lora_manager.activate_dummy()
            lora = self.lora_manager.dummy_mapping(per_req)
        try:
            hidden = self._forward(batch, kv, exchange=False, lora=lora)
        finally:
            if self.lora_manager is not None:
                self.lora_manager.deactivate_dummy()
        if hidden is None:   # not the last pipeline stage
            return
        hidden_rows = hidden[torch.from_numpy(batch.logits_indices)]
        self.model.compute_logits(hidden_rows)
        self.model.greedy_tokens(hidden_rows)

    # ---- one step ----------------------------------------------------------------------
    def step(self, scheduler_output: SchedulerOutput,
             grammar_output: GrammarOutput | None = None) -> ModelRunnerOutput:
        """`execute_model` then `sample_tokens`: one whole step."""
        self.execute_model(scheduler_output)
        return self.sample_tokens(grammar_output)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """The step's forward; `sample_tokens` samples from it (see the module docstring)."""
        assert self._pending is None, "execute_model twice without sample_tokens"
        self._update_states(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            self._pending = _PendingStep(None, [], [], [], None)
            return
        request_ids = ([r.request_id for r in scheduler_output.scheduled_new_reqs]
                       + [r.request_id for r in scheduler_output.scheduled_cached_reqs])
        states = [self.requests[rid] for rid in request_ids]
        num_scheduled = [scheduler_output.num_scheduled_tokens[rid] for rid in request_ids]
        lora = None
        if self.lora_manager is not None:   # requests grouped by adapter (the same order on
            # every rank; outputs are keyed by request id), the step's token -> slot mapping
            order, lora = self.lora_manager.prepare([s.lora_request for s in states],
                                                    num_scheduled)
            if order is not None:
                request_ids, states, num_scheduled = ([xs[i] for i in order] for xs in
                                                      (request_ids, states, num_scheduled))
        spec = scheduler_output.scheduled_spec_decode_tokens
        drafts = [spec.get(rid, []) for rid in request_ids] if spec else None
        batch = build_step_batch(states, num_scheduled, self.block_size, drafts)
        hidden = self._forward(batch, self.kv_caches, lora=lora)
        self._pending = _PendingStep(batch, request_ids, states, num_scheduled, hidden, drafts,
                                     scheduler_output.propose_drafts)

    @torch.inference_mode()
    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        """Sample the pending step's rows under `grammar_output`'s bitmask (read by the
        sampling rank only: tp rank 0 of the last stage) and return its output."""
        pending, self._pending = self._pending, None
        assert pending is not None, "sample_tokens without execute_model"
        batch, request_ids, states, hidden = (pending.batch, pending.request_ids,
                                              pending.states, pending.hidden)
        if batch is None:
            return ModelRunnerOutput()
        output = ModelRunnerOutput()
        if hidden is not None:   # the last pipeline stage: sample
            output = ModelRunnerOutput(sampled_token_ids={rid: [] for rid in request_ids})
            self._prompt_logprobs(batch, states, hidden, output)
            if pending.drafts is not None:
                self._sample_speculative(batch, states, hidden, output, pending.drafts)
            elif len(batch.sample_rows):
                self._sample(batch, states, hidden, output, grammar_output)
            if pending.propose_drafts and self.drafter is not None and len(batch.sample_rows):
                output.draft_token_ids = self.drafter.propose(
                    [states[r] for r in batch.sample_rows.tolist()])
        for r, (state, n) in enumerate(zip(states, pending.num_scheduled)):
            if pending.drafts is not None and pending.drafts[r]:   # rejected drafts: not kept
                n -= len(pending.drafts[r]) + 1 - len(output.sampled_token_ids[state.request_id])
            state.num_computed_tokens += n
        return output

    def _forward(self, batch: StepBatch, kv_caches: list[torch.Tensor],
                 exchange: bool = True, lora: LoRAMapping | None = None) -> torch.Tensor | None:
        """This stage's forward: the final hidden states [T, hidden] on the last stage, else
        None after sending the hand-off on (`exchange`; without it, for profiling, a stage
        other than the first starts from zeros and nothing is sent). `lora`: the step's
        token -> adapter slot mapping (`sluice.lora.forward_context`), None for none."""
        attn_metadata = build_attention_metadata(
            batch.query_start_loc, batch.seq_lens, batch.block_table, batch.slot_mapping,
            self.block_size, self.device)
        input_ids = torch.from_numpy(batch.input_ids).to(self.device)
        positions = torch.from_numpy(batch.positions).to(self.device)
        pp, intermediate = self.pp_group, None
        if not self.is_first_stage:
            shape = (2, len(input_ids), self.spec.hidden_size)
            if exchange:
                intermediate = pp.recv(torch.empty(shape, dtype=self.compute_dtype,
                                                   device=self.device),
                                       src=pp.rank - 1)
            else:
                intermediate = torch.zeros(shape, dtype=self.compute_dtype, device=self.device)
        with set_forward_context(attn_metadata, kv_caches), set_lora_mapping(lora):
            out = self.model(input_ids, positions, intermediate)
        if self.is_last_stage:
            return out
        if exchange:
            pp.send(out, dst=pp.rank + 1)
        return None

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_request_ids:
            self.requests.pop(rid, None)
            if self.drafter is not None:
                self.drafter.forget(rid)
        for new in so.scheduled_new_reqs:
            generator = request_generator(new.sampling_params, "cpu",
                                          len(new.token_ids) - new.num_prompt_tokens)
            self.requests[new.request_id] = CachedRequestState(
                new.request_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                list(new.block_ids), new.num_computed_tokens, generator, new.eos_token_id,
                new.lora_request)
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.new_token_ids:   # pp > 1: the tokens a later stage sampled
                new = cached.new_token_ids
                start = (cached.num_computed_tokens + so.num_scheduled_tokens[cached.request_id]
                         - len(new))   # index of new[0] in the request's tokens
                assert len(state.token_ids) >= start, (cached.request_id, start)
                state.token_ids.extend(new[len(state.token_ids) - start:])

    def _sample(self, batch: StepBatch, states: list[CachedRequestState],
                hidden: torch.Tensor, output: ModelRunnerOutput,
                grammar_output: GrammarOutput | None = None) -> None:
        """One token per row of `batch.sample_rows`. A plain greedy step (all rows greedy,
        nothing edits the logits, no logprobs) asks the model for its greedy tokens directly
        (`greedy_tokens`: the LM head's bf16 screen, no full float32 logits); everything else,
        or a step the screen cannot decide, computes the logits and runs the sampler.

        With tp > 1 the driver (tp rank 0) samples and broadcasts the token ids; the other
        ranks take part in the logits gather and receive them (see the module docstring)."""
        hidden_rows = hidden[torch.from_numpy(batch.logits_indices)]
        rows = [states[r] for r in batch.sample_rows.tolist()]
        tp = self.tp_group
        if tp.rank != 0:
            self.model.compute_logits(hidden_rows)   # collective: its gather goes to the driver
            token_ids = tp.broadcast(torch.empty(len(rows), dtype=torch.long,
                                                 device=self.device), src=0)
            for state, token_id in zip(rows, token_ids.tolist()):
                state.token_ids.append(token_id)
                output.sampled_token_ids[state.request_id] = [token_id]
            return
        metadata = build_sampling_metadata(
            [SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids,
                         s.eos_token_id, s.generator) for s in rows],
            vocab_size=self.spec.vocab_size, device=self.device,
            shared_generator=self.shared_generator)
        metadata.grammar_mask = grammar_mask(
            grammar_output, {s.request_id: i for i, s in enumerate(rows)}, self.spec.vocab_size,
            self.device)
        # The greedy screen supports no logits processing: `is_plain_greedy` is False when a
        # row has a grammar mask (or any other feature), and the full sampler runs instead.
        # (under TP there is no greedy screen, `layer_ops`: every rank reaches the collective
        # compute_logits)
        token_ids = self.model.greedy_tokens(hidden_rows) if metadata.is_plain_greedy else None
        logprobs = None
        if token_ids is None:
            result = self.sampler(self.model.compute_logits(hidden_rows), metadata)
            token_ids, logprobs = result.sampled_token_ids, result.logprobs
        if tp.size > 1:
            tp.broadcast(token_ids.to(device=self.device, dtype=torch.long).contiguous(), src=0)
        for i, (state, token_id) in enumerate(zip(rows, token_ids.tolist())):
            state.token_ids.append(token_id)
            output.sampled_token_ids[state.request_id] = [token_id]
            k = state.sampling_params.logprobs
            if k is not None and logprobs is not None:
                output.logprobs[state.request_id] = [to_token_logprobs(logprobs, i, k)]

    def _sample_speculative(self, batch: StepBatch, states: list[CachedRequestState],
                            hidden: torch.Tensor, output: ModelRunnerOutput,
                            drafts: list[list[int]]) -> None:
        """Sample every draft position of the sampling rows and keep each row's accepted
        drafts plus one token (`spec_decode.verify`); under TP the driver decides and
        broadcasts (see the module docstring)."""
        sample_rows = batch.sample_rows.tolist()
        rows = [states[r] for r in sample_rows]
        row_drafts = [drafts[r] for r in sample_rows]
        positions = draft_positions(batch.logits_indices, [len(d) for d in row_drafts])
        hidden_rows = hidden[torch.from_numpy(positions)]
        tp = self.tp_group
        width = 1 + max((len(d) for d in row_drafts), default=0)
        if tp.rank != 0:
            self.model.compute_logits(hidden_rows)   # collective: its gather goes to the driver
            padded = tp.broadcast(torch.empty(len(rows), width, dtype=torch.long,
                                              device=self.device), src=0).tolist()
            emitted = [[t for t in row if t >= 0] for row in padded]
            logprobs: list = [None] * len(rows)
        else:
            emitted, logprobs = verify_drafts(
                self.model, self.sampler.argmax, hidden_rows, rows, row_drafts,
                self.spec.vocab_size, self.device, self.shared_generator)
            if tp.size > 1:
                padded = torch.full((len(rows), width), -1, dtype=torch.long)
                for i, tokens in enumerate(emitted):
                    padded[i, :len(tokens)] = torch.tensor(tokens)
                tp.broadcast(padded.to(self.device), src=0)
        for state, tokens, entries in zip(rows, emitted, logprobs):
            state.token_ids.extend(tokens)
            output.sampled_token_ids[state.request_id] = tokens
            if entries is not None:
                output.logprobs[state.request_id] = entries

    def _prompt_logprobs(self, batch: StepBatch, states: list[CachedRequestState],
                         hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """For prompt positions p computed this step with p + 1 < num_prompt_tokens, the entry
        describes token p + 1 given tokens 0..p (flat index query_start_loc[r] + p - c_r)."""
        for r, state in enumerate(states):
            k = state.sampling_params.prompt_logprobs
            if k is None or state.output_token_ids:  # resumed after preemption: already sent
                continue
            c, start = int(batch.num_computed[r]), int(batch.query_start_loc[r])
            end_pos = min(int(batch.seq_lens[r]), state.num_prompt_tokens - 1)
            if end_pos <= c:
                continue
            flat = torch.arange(start, start + end_pos - c)
            targets = torch.tensor(state.token_ids[c + 1:end_pos + 1])
            logits = self.model.compute_logits(hidden[flat])  # every TP rank: a collective
            if logits is None:                                 # not the driver
                continue
            lp = compute_prompt_logprobs(logits, targets, k)
            entries: list[TokenLogprobs] = [to_token_logprobs(lp, i, k)
                                            for i in range(len(targets))]
            output.prompt_logprobs.setdefault(state.request_id, []).extend(entries)
