"""The offline `LLM` API: generate or chat for a list of prompts, results in input order.

`LLM` drives an engine-core client (in-process by default) through the same input and output
processors as the server: tokenize → `EngineCoreRequest` → engine steps → detokenize, stop
strings → `RequestOutput`. Imports no torch itself; the engine is created by the client.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from sluice.config import EngineConfig
from sluice.config_sources import build_engine_config
from sluice.frontend.client import EngineCoreClient, InprocClient, SyncMPClient
from sluice.frontend.input_processor import InputProcessor
from sluice.frontend.output_processor import OutputProcessor
from sluice.frontend.tokenizer import Tokenizer, load_tokenizer
from sluice.model_spec.resolve import resolve_model_config
from sluice.outputs import RequestOutput
from sluice.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]


class LLM:
    """An engine for offline batch generation.

    `LLM(model, **engine_kwargs)` takes the config fields by their flat names
    (`max_num_seqs=8`, `enable_prefix_caching=False`, `kv_cache_memory="1GiB"` …);
    `model=None` uses the built-in demo model. Pass `config=` to use a prebuilt EngineConfig.
    `use_process=True` runs the engine core in a child process (`SyncMPClient`).
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 use_process: bool = False, **engine_kwargs: Any):
        if config is None:
            overrides = dict(engine_kwargs)
            if model is not None:
                overrides["model"] = str(model)
            config = build_engine_config(overrides=overrides)
        elif model is not None or engine_kwargs:
            raise TypeError("LLM: pass either config= or model/engine keyword arguments.")
        config = resolve_model_config(config)  # hub id / .gguf -> local directory
        self.config = config
        self.client: EngineCoreClient = (SyncMPClient(config) if use_process
                                         else InprocClient(config))
        ready = self.client.ready
        self.tokenizer: Tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
        self.input_processor = InputProcessor.from_ready(self.tokenizer, ready,
                                                         config.model.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer, log_stats=False)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); returns outputs in input order."""
        prompt_list = _as_prompt_list(prompts)
        return self._run(prompt_list, sampling_params, use_tqdm, priority,
                         add_special_tokens=True)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = ([messages] if messages and isinstance(messages[0], dict)
                         else list(messages))
        texts = [self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
            for conv in conversations]
        return self._run(texts, sampling_params, use_tqdm, None, add_special_tokens=False)

    def _run(self, prompts: list[Prompt],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool, priority: Sequence[int] | None,
             add_special_tokens: bool) -> list[RequestOutput]:
        params_list = _broadcast_params(sampling_params, len(prompts))
        request_ids = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            request_id = str(next(self._request_counter))
            params = params.with_updates(output_kind=RequestOutputKind.FINAL_ONLY)
            request = self.input_processor.process(
                request_id, prompt, params, time.monotonic(),
                priority=priority[i] if priority else 0, add_special_tokens=add_special_tokens)
            for engine_request in self.output_processor.add_request(
                    request, prompt if isinstance(prompt, str) else None):
                self.client.add_request(engine_request)
            request_ids.append(request_id)
        return self._run_engine(request_ids, use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while self.output_processor.has_unfinished_requests():
                engine_outputs = self.client.get_output()
                processed = self.output_processor.process_outputs(engine_outputs.outputs)
                if processed.request_ids_to_abort:
                    self.client.abort_requests(processed.request_ids_to_abort)
                for output in processed.request_outputs:
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            pending = [rid for rid in request_ids if rid not in finished]
            self.client.abort_requests(self.output_processor.abort_requests(pending))
            raise
        finally:
            bar.close()
        return [finished[rid] for rid in request_ids]

    def shutdown(self) -> None:
        self.client.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # a single token-id prompt
    return prompts


def _broadcast_params(params: SamplingParams | Sequence[SamplingParams] | None,
                      count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts; pass one "
                         "SamplingParams or one per prompt.")
    return params
