"""`sluice chat`: an interactive client of a running OpenAI-compatible server, as `vllm chat`.

    sluice chat --url http://127.0.0.1:8000/v1 [--model-name NAME] [--system-prompt TEXT]
    sluice chat --quick "What is the capital of France?"

Each line read from stdin is a user message; the reply streams to stdout and the conversation
(system prompt, messages and replies) is kept and sent with the next line. End of input (Ctrl-D)
ends the session with exit 0. `--quick MESSAGE` sends one message, prints the reply and exits.
Without --model-name the server's first model (/v1/models) is used. The API key is --api-key,
else $OPENAI_API_KEY. A server that cannot be reached or answers with an error ends the command
with one line `error: ...` (exit 1). Loads no engine and imports no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from sluice.errors import SluiceError

DEFAULT_URL = "http://localhost:8000/v1"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat", help="Chat in the terminal with a running server.",
        description="Chat with a model served by `sluice serve` (or any OpenAI-compatible "
                    "server): each line on stdin is a message, replies stream to stdout.")
    parser.add_argument("--url", default=DEFAULT_URL, metavar="URL",
                        help=f"Base URL of the server's API. [default: {DEFAULT_URL}]")
    parser.add_argument("--model-name", "--model", dest="model_name", default=None,
                        metavar="NAME",
                        help="The model to chat with. Default: the server's first model.")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="API key sent as a Bearer token. [env: OPENAI_API_KEY]")
    parser.add_argument("--system-prompt", default=None, metavar="TEXT",
                        help="A system message that starts the conversation.")
    parser.add_argument("--quick", "-q", default=None, metavar="MESSAGE",
                        help="Send one message, print the reply and exit.")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="Maximum tokens per reply. Default: the server's.")
    return parser


def _reply(client: Any, model: str, conversation: list[dict[str, str]], max_tokens: int | None,
           out: TextIO) -> str:
    """Stream one reply to `out` and return its text."""
    stream = client.chat.completions.create(model=model, messages=conversation, stream=True,
                                            max_tokens=max_tokens)
    parts = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            out.write(parts[-1])
            out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def chat(client: Any, model: str, system_prompt: str | None, quick: str | None,
         max_tokens: int | None, lines: TextIO, out: TextIO) -> None:
    """Run the session: `quick` alone, else one turn per non-empty line of `lines`."""
    conversation: list[dict[str, str]] = []
    if system_prompt:
        conversation.append({"role": "system", "content": system_prompt})
    messages = [quick] if quick is not None else (line.rstrip("\n") for line in lines)
    interactive = quick is None and lines.isatty()
    if interactive:
        print(f"Chatting with {model}; end with Ctrl-D.", file=sys.stderr)
    for message in messages:
        if not message.strip():
            continue
        conversation.append({"role": "user", "content": message})
        conversation.append({"role": "assistant",
                             "content": _reply(client, model, conversation, max_tokens, out)})


def run(args: argparse.Namespace) -> int:
    import openai
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    try:
        with openai.OpenAI(base_url=args.url, api_key=api_key, max_retries=0) as client:
            model = args.model_name or _first_model(client, args.url)
            chat(client, model, args.system_prompt, args.quick, args.max_tokens, sys.stdin,
                 sys.stdout)
    except openai.APIConnectionError as e:
        raise SluiceError(f"cannot reach the server at {args.url} ({e.__cause__ or e}); start "
                          "one with `sluice serve`, or pass --url") from None
    except openai.APIStatusError as e:
        raise SluiceError(f"the server at {args.url} answered {e.status_code}: "
                          f"{_message(e)}") from None
    return 0


def _first_model(client: Any, url: str) -> str:
    models = client.models.list().data
    if not models:
        raise SluiceError(f"the server at {url} serves no models; pass --model-name")
    return models[0].id


def _message(error: Any) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(error.message)
