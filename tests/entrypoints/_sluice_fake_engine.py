"""A stand-in for `AsyncLLM` for in-process tests of the HTTP layer's pure parts (request
parsing, error mapping). It uses the real `InputProcessor` (so validation errors carry the real
wording) and `OutputProcessor`, and "generates" deterministic token ids without a model.
End-to-end behaviour is tested against a real `sluice serve` process instead.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from sluice.errors import EngineDeadError
from sluice.frontend.input_processor import InputProcessor
from sluice.frontend.output_processor import OutputProcessor
from sluice.frontend.tokenizer import Tokenizer
from sluice.messages import EngineCoreOutput, EngineReady, FinishReason, TokenLogprobs
from sluice.outputs import RequestOutput
from sluice.sampling_params import SamplingParams


class FakeAsyncLLM:
    """`generate` yields token `4 + (prompt_sum + 7 * step + sample) % (vocab - 4)`."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int = 256, model_name: str = "tiny",
                 config=None, step_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.config = config
        self.ready = EngineReady(num_kv_blocks=64, block_size=16, max_model_len=max_model_len,
                                 vocab_size=tokenizer.vocab_size, model_name=model_name)
        self.input_processor = InputProcessor(tokenizer, max_model_len, tokenizer.vocab_size,
                                              20, tokenizer.eos_token_id)
        self.is_dead = False
        self.num_unfinished_requests = 0
        self.listeners: list[Callable] = []
        self.aborted: list[str] = []
        self.step_delay = step_delay

    def add_stats_listener(self, fn: Callable) -> None:
        self.listeners.append(fn)

    async def check_health(self) -> None:
        if self.is_dead:
            raise EngineDeadError()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str, *, priority: int = 0,
                       add_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        if self.is_dead:
            raise EngineDeadError()
        request = self.input_processor.process(request_id, prompt, sampling_params,
                                               priority=priority,
                                               add_special_tokens=add_special_tokens)
        processor = OutputProcessor(self.tokenizer)
        children = processor.add_request(request, prompt if isinstance(prompt, str) else None)
        vocab = self.tokenizer.vocab_size
        base = sum(request.prompt_token_ids)
        self.num_unfinished_requests += 1
        try:
            for step in range(request.sampling_params.max_tokens):
                outputs = []
                for index, child in enumerate(children):
                    token = 4 + (base + 7 * step + index) % (vocab - 4)
                    logprobs = None
                    if child.sampling_params.logprobs is not None:
                        k = child.sampling_params.logprobs
                        ids = [token] + [4 + (token + j) % (vocab - 4) for j in range(1, k + 1)]
                        logprobs = [TokenLogprobs(ids, [-0.5 * (j + 1) for j in range(len(ids))],
                                                  list(range(1, len(ids) + 1)))]
                    last = step + 1 == request.sampling_params.max_tokens
                    outputs.append(EngineCoreOutput(
                        child.request_id, [token], new_logprobs=logprobs,
                        finish_reason=FinishReason.LENGTH if last else None))
                for out in processor.process_outputs(outputs).request_outputs:
                    yield out
                await asyncio.sleep(self.step_delay)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self.num_unfinished_requests -= 1
