"""The offline `LLM` API: generate or chat for a list of prompts, results in input order.

`LLM` drives an engine-core client (in-process by default) through the same input and output
processors as the server: tokenize → `EngineCoreRequest` → engine steps → detokenize, stop
strings → `RequestOutput`. Imports no torch itself; the engine is created by the client.

Its calls take what vLLM's take, so vLLM code runs unchanged:

* `generate(prompts, sampling_params)`: a prompt is a string, a list of token ids,
  `{"prompt": text}` or `{"prompt_token_ids": ids}` (optionally with `"prompt"` for the echoed
  text and `"cache_salt"`); pass one or a list (kinds may be mixed). Any other dict key
  (`multi_modal_data` …) is a `ValueError` naming it. `sampling_params` is one
  `SamplingParams`, one per prompt, or None: `get_default_sampling_params()`, which holds the
  model's generation_config.json defaults (`--generation-config`, see
  `hf_config.generation_defaults`).
* `chat(messages)`: one conversation (a list of message dicts) or a list of them, rendered by
  the same code as the server's chat endpoint (`chat_template.template_kwargs`).
* `get_tokenizer()`: the Hugging Face tokenizer.
* `lora_request=` on both (with `LLM(..., enable_lora=True, max_loras=...)`): one
  `LoRARequest` for every prompt, a list with one per prompt (None entries: the base model), or
  None (the base model). Each adapter is checked once (`sluice.lora.registry.AdapterValidator`);
  without --enable-lora a `LoRARequest` is a `ValueError`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from sluice.config import EngineConfig
from sluice.config_sources import build_engine_config
from sluice.frontend.chat_template import message_for_template, template_kwargs
from sluice.frontend.sync_client import InprocClient, SyncEngineCoreClient, SyncMPClient
from sluice.frontend.input_processor import InputProcessor
from sluice.frontend.output_processor import OutputProcessor
from sluice.frontend.tokenizer import Tokenizer, load_tokenizer, resolve_chat_template
from sluice.hf_config import generation_defaults
from sluice.lora.registry import check_lora_request, validator_from_config
from sluice.lora.request import LoRARequest
from sluice.model_spec.resolve import resolve_model_config
from sluice.outputs import RequestOutput
from sluice.sampling_params import RequestOutputKind, SamplingParams

PromptInput = str | Sequence[int] | Mapping[str, Any]
"""One prompt as `generate` takes it: text, token ids, or a `{"prompt": ...}` /
`{"prompt_token_ids": ...}` dict (vLLM's TextPrompt / TokensPrompt)."""
Messages = list[dict[str, Any]]

_PROMPT_KEYS = frozenset(("prompt", "prompt_token_ids", "cache_salt"))


@dataclass(frozen=True)
class _Prompt:
    """One parsed prompt: what to tokenize (text or ids), the text to echo, the cache salt."""
    source: str | list[int]
    text: str | None
    cache_salt: str | None = None


class LLM:
    """An engine for offline batch generation.

    `LLM(model, **engine_kwargs)` takes the config fields by their flat names
    (`max_num_seqs=8`, `enable_prefix_caching=False`, `kv_cache_memory="1GiB"` …);
    `model=None` uses the built-in demo model. Pass `config=` to use a prebuilt EngineConfig.
    `use_process=True` runs the engine core in a child process (`SyncMPClient`); so does
    `data_parallel_size=N` (N engine cores, requests spread over them as by the server).
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
        # Read before the engine starts, so that a bad --generation-config fails fast.
        self._default_sampling = generation_defaults(config.model.generation_config,
                                                     config.model.model)
        several = len(config.parallel.engine_indexes) > 1
        self.client: SyncEngineCoreClient = (SyncMPClient(config) if use_process or several
                                             else InprocClient(config))
        ready = self.client.ready
        self.tokenizer: Tokenizer = load_tokenizer(config.model.tokenizer or config.model.model,
                                                   chat_template=config.model.chat_template)
        self.input_processor = InputProcessor.from_ready(self.tokenizer, ready,
                                                         config.model.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer, log_stats=False)
        self._request_counter = itertools.count()
        self._lora_validator = validator_from_config(config)   # None without --enable-lora

    def get_tokenizer(self) -> Any:
        """The Hugging Face tokenizer (`PreTrainedTokenizerFast`: `tok("hi")`, `tok.encode`,
        `tok.apply_chat_template` …), as vLLM's `LLM.get_tokenizer()` returns."""
        return self.tokenizer.hf

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams used when a call passes none: sluice's defaults with the model's
        generation_config.json values on top (none with `generation_config="vllm"`)."""
        return SamplingParams(**self._default_sampling)

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for each prompt (see the module docstring for the prompt forms and
        `lora_request`); returns outputs in input order. Raises `ValueError`
        (`InvalidRequestError`) for a bad prompt, parameter or adapter, before anything is
        sent to the engine."""
        return self._run(_parse_prompts(prompts), sampling_params, use_tqdm, priority,
                         add_special_tokens=True, lora_request=lora_request)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool = True, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate (outputs in input
        order). `messages` is one conversation (a list of `{"role", "content"}` dicts; content
        may be a list of text parts) or a list of conversations. The template is
        `chat_template` (a file or the template itself) if given, else the engine's
        `chat_template=` option, else the tokenizer's. `tools` and `chat_template_kwargs`
        reach the template; `continue_final_message=True` (with
        `add_generation_prompt=False`) continues the last message instead of starting a new
        one. Raises `ValueError` (`InvalidRequestError`) for a conversation the template
        rejects."""
        conversations = _as_conversations(messages)
        if chat_template is not None:
            chat_template = resolve_chat_template(chat_template)
        kwargs = template_kwargs(add_generation_prompt, chat_template, chat_template_kwargs,
                                 tools=tools, continue_final_message=continue_final_message)
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                [message_for_template(m) for m in conversation], **kwargs)
            prompts.append(_Prompt(text, text))
        return self._run(prompts, sampling_params, use_tqdm, None, add_special_tokens=False,
                         lora_request=lora_request)

    def _run(self, prompts: list[_Prompt],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool, priority: Sequence[int] | None,
             add_special_tokens: bool,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _broadcast_params(sampling_params, len(prompts))
        loras = _broadcast_loras(lora_request, len(prompts))
        for lora in loras:   # each adapter's files are checked once (then a dict lookup)
            check_lora_request(self._lora_validator, lora)
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts; pass "
                             "one per prompt.")
        # Validate every prompt before any reaches the engine: a bad one fails the call whole.
        requests = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            params = params.with_updates(output_kind=RequestOutputKind.FINAL_ONLY)
            requests.append((prompt, self.input_processor.process(
                str(next(self._request_counter)), prompt.source, params, time.monotonic(),
                priority=priority[i] if priority else 0, add_special_tokens=add_special_tokens,
                cache_salt=prompt.cache_salt, lora_request=loras[i])))
        for prompt, request in requests:
            for engine_request in self.output_processor.add_request(request, prompt.text):
                self.client.add_request(engine_request)
        return self._run_engine([request.request_id for _, request in requests], use_tqdm)

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


def _parse_prompts(prompts: PromptInput | Sequence[PromptInput]) -> list[_Prompt]:
    """`generate`'s prompts argument as a list of `_Prompt`s: a single prompt (text, dict,
    or token ids) or a sequence of them."""
    if isinstance(prompts, (str, Mapping)):
        return [_parse_prompt(prompts)]
    items = list(prompts)
    if items and not isinstance(items[0], (str, Mapping)) and _is_token_id(items[0]):
        return [_parse_prompt(items)]  # one token-id prompt
    return [_parse_prompt(item) for item in items]


def _is_token_id(value: object) -> bool:
    return (not isinstance(value, bool) and hasattr(value, "__index__")
            and not hasattr(value, "__len__"))


def _parse_prompt(prompt: PromptInput) -> _Prompt:
    if isinstance(prompt, str):
        return _Prompt(prompt, prompt)
    if isinstance(prompt, Mapping):
        unknown = sorted(str(k) for k in prompt if k not in _PROMPT_KEYS)
        if unknown:
            raise ValueError(
                f"Prompt dict key(s) {', '.join(map(repr, unknown))} are not supported: sluice "
                "serves text-only models, so a prompt is {'prompt': str} or "
                "{'prompt_token_ids': list[int]} (optionally with 'cache_salt').")
        text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"'prompt' must be a string, got {type(text).__name__}.")
        salt = prompt.get("cache_salt")
        if token_ids is not None:
            if isinstance(token_ids, (str, bytes, Mapping)):
                raise ValueError("'prompt_token_ids' must be a list of integers.")
            return _Prompt(list(token_ids), text, salt)
        if text is None:
            raise ValueError("A prompt dict needs 'prompt' (text) or 'prompt_token_ids'.")
        return _Prompt(text, text, salt)
    if isinstance(prompt, bytes):
        raise ValueError("A prompt must be text, token ids or a prompt dict, not bytes.")
    return _Prompt(list(prompt), None)


def _as_conversations(messages: Messages | Sequence[Messages]) -> list[Messages]:
    """One conversation (its first item is a message dict) or a list of conversations."""
    items = list(messages)
    if not items:
        raise ValueError("chat() needs at least one conversation.")
    if isinstance(items[0], Mapping):
        return [items]
    return [list(conversation) for conversation in items]


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


def _broadcast_loras(lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
                     count: int) -> list[LoRARequest | None]:
    """One adapter (or None) per prompt from one for all, or a list of one per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * count
    if isinstance(lora_request, (str, bytes)) or not isinstance(lora_request, Sequence):
        raise ValueError(f"lora_request must be a LoRARequest, a list of them (one per "
                         f"prompt) or None, got {type(lora_request).__name__}.")
    loras = list(lora_request)
    if len(loras) != count:
        raise ValueError(f"got {len(loras)} lora requests for {count} prompts; pass one "
                         "LoRARequest or one per prompt.")
    return loras
