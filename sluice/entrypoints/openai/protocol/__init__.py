"""Pydantic models of the OpenAI-compatible HTTP API (requests, responses, stream chunks).

Shapes follow OpenAI's API (and vLLM's extras). Every top-level field of a completion or chat
request is honoured or refused with a 400 naming it (`check_supported`, which runs
`unsupported.check_fields`: fields OpenAI or vLLM define that sluice does not implement yet, and
fields nobody defines); nested objects other than `stream_options` ignore unknown keys (logged
at debug level). Every string of a request (keys included, at any depth) must be valid Unicode:
`RequestModel` rejects lone surrogates with a 400 naming the top-level field. Each request type
converts itself to `SamplingParams` in exactly one place (`to_sampling_params`); value ranges are
checked by `SamplingParams` itself (which raises `InvalidRequestError` naming the parameter), so
there is one source of truth.
No torch.

One module per concern, every name re-exported here: `base` (model bases, errors, usage),
`sampling` (the fields both endpoints share), `completion`, `chat`, `tokenize` (with
/v1/models).
"""

from __future__ import annotations

from sluice.entrypoints.openai.protocol.base import (random_id, now_seconds, OpenAIBaseModel,
                                                     check_all_text, RequestModel, ResponseModel,
                                                     ErrorInfo, ErrorResponse, UsageInfo, usage,
                                                     PromptLogprobs)
from sluice.entrypoints.openai.protocol.sampling import (JsonSchemaFormat, ResponseFormat,
                                                         StreamOptions, SamplingFields,
                                                         default_max_tokens)
from sluice.entrypoints.openai.protocol.completion import (Prompt, CompletionRequest,
                                                           CompletionLogprobs, CompletionChoice,
                                                           CompletionResponse,
                                                           CompletionStreamResponse)
from sluice.entrypoints.openai.protocol.chat import (ContentPart, ChatMessageParam,
                                                     FunctionDefinition, ChatTool, NamedFunction,
                                                     NamedToolChoice, ChatCompletionRequest,
                                                     FunctionCall, ToolCall, DeltaFunctionCall,
                                                     DeltaToolCall, ChatMessage, ChatLogprob,
                                                     ChatLogprobContent, ChatLogprobs, ChatChoice,
                                                     ChatCompletionResponse, DeltaMessage,
                                                     ChatStreamChoice,
                                                     ChatCompletionStreamResponse)
from sluice.entrypoints.openai.protocol.tokenize import (TokenizeCompletionRequest,
                                                         TokenizeChatRequest, TokenizeResponse,
                                                         DetokenizeRequest, DetokenizeResponse,
                                                         ModelCard, ModelList)

__all__ = ['random_id', 'now_seconds', 'OpenAIBaseModel', 'check_all_text', 'RequestModel',
           'ResponseModel', 'ErrorInfo', 'ErrorResponse', 'UsageInfo', 'usage', 'PromptLogprobs',
           'JsonSchemaFormat', 'ResponseFormat', 'StreamOptions', 'SamplingFields',
           'default_max_tokens', 'Prompt', 'CompletionRequest', 'CompletionLogprobs',
           'CompletionChoice', 'CompletionResponse', 'CompletionStreamResponse', 'ContentPart',
           'ChatMessageParam', 'FunctionDefinition', 'ChatTool', 'NamedFunction',
           'NamedToolChoice', 'ChatCompletionRequest', 'FunctionCall', 'ToolCall',
           'DeltaFunctionCall', 'DeltaToolCall', 'ChatMessage', 'ChatLogprob',
           'ChatLogprobContent', 'ChatLogprobs', 'ChatChoice', 'ChatCompletionResponse',
           'DeltaMessage', 'ChatStreamChoice', 'ChatCompletionStreamResponse',
           'TokenizeCompletionRequest', 'TokenizeChatRequest', 'TokenizeResponse',
           'DetokenizeRequest', 'DetokenizeResponse', 'ModelCard', 'ModelList']
