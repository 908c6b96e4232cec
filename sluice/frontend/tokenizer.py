"""The frontend's tokenizer: a thin wrapper over a Hugging Face fast tokenizer. No torch.

Contract:
* `load_tokenizer(path)` reads a local directory in Hugging Face format (`tokenizer.json` +
  `tokenizer_config.json`, optionally `chat_template.jinja`). A missing or unreadable tokenizer
  raises `ModelLoadError` naming the path. `chat_template=` (`--chat-template`: a file or the
  template itself, see `resolve_chat_template`) replaces the tokenizer's template.
* It loads `transformers.PreTrainedTokenizerFast` directly, never `AutoTokenizer`: the latter
  resolves classes through the model registry and imports torch, which the API-server process
  must not do (a test checks `'torch' not in sys.modules`).
* Text that is not valid Unicode (a lone UTF-16 surrogate such as U+D800, which JSON's `\ud800`
  escape can carry) raises `InvalidRequestError` naming the character, never a TypeError.
* `apply_chat_template(..., time_limit_s=...)` renders under a time limit enforced inside the
  rendering thread (see `call_with_time_limit`): for templates sent by a request, whose loops
  the operator has not read.
* Text decoding (`decode`, `decode_token`) goes straight to the Rust `tokenizers.Tokenizer`, so a
  full decode and the incremental detokenizer (`detokenizer.py`) agree character for character;
  no `clean_up_tokenization_spaces` post-processing is applied.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from sluice.errors import ConfigError, InvalidRequestError, ModelLoadError

T = TypeVar("T")

# Files a directory must hold for us to build a fast tokenizer from it (any one suffices;
# the non-json ones are converted by transformers when their optional libraries are present).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json",
                    "spiece.model")


def check_text(text: str, param: str) -> None:
    """Raise `InvalidRequestError(param=param)` if `text` holds a lone surrogate (not valid
    Unicode, so no tokenizer or UTF-8 encoder accepts it). ASCII text is checked in O(1)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{param} holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character "
            f"{e.start}; send valid Unicode text.", param=param) from None


class TimeLimitExceeded(BaseException):
    """Raised inside a `call_with_time_limit` call that ran out of time. A BaseException, so
    that the code being run (jinja, transformers) cannot catch and wrap it."""


_CHECK_EVERY = 256  # trace events between clock reads


def call_with_time_limit(fn: Callable[[], T], time_limit_s: float) -> T:
    """`fn()`, interrupted with `TimeLimitExceeded` once it has run `time_limit_s` seconds.

    A trace function in the calling thread (`sys.settrace`, per thread) counts Python line and
    call events and reads the clock every `_CHECK_EVERY` of them, so a template's loops are cut
    off wherever they are. Pure-Python work only (a long C call is not interrupted); tracing
    slows the call a few times, so use it for untrusted input, not on every request.
    """
    deadline = time.monotonic() + time_limit_s
    events = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal events
        events += 1
        if events % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise TimeLimitExceeded()
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(previous)


class Tokenizer:
    """Encode/decode, special tokens and chat templates for one model.

    `vocab_size` is `len(tokenizer)`: base vocabulary plus added tokens, i.e. one past the
    largest id the tokenizer can produce (the model's embedding may be larger).
    """

    def __init__(self, hf_tokenizer: Any, path: str | Path | None = None):
        self.hf = hf_tokenizer
        self.path = str(path) if path is not None else None
        self._backend = hf_tokenizer.backend_tokenizer  # tokenizers.Tokenizer (Rust)
        self.vocab_size: int = len(hf_tokenizer)
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.eos_token: str | None = hf_tokenizer.eos_token
        self.bos_token: str | None = hf_tokenizer.bos_token
        self.all_special_ids: frozenset[int] = frozenset(hf_tokenizer.all_special_ids)
        self._token_text_cache: dict[int, str] = {}

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (Rust), for hot paths."""
        return self._backend

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.hf, "chat_template", None)
        return template or None

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS as the tokenizer is set up to.
        Raises `InvalidRequestError(param="prompt")` for text that is not valid Unicode."""
        check_text(text, "prompt")
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids` (bytes that are not valid UTF-8 become U+FFFD)."""
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included), cached; used for the
        `decoded_token` of logprobs. A token holding part of a UTF-8 character yields U+FFFD."""
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self._backend.decode([token_id], skip_special_tokens=False)
            self._token_text_cache[token_id] = text
        return text

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of `token_ids` (e.g. 'Ġhello' for byte-level BPE)."""
        return [self._backend.id_to_token(int(t)) or "" for t in token_ids]

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, *,
                            time_limit_s: float | None = None, **kwargs: Any) -> str:
        """Render a conversation to prompt text with the model's chat template.

        Extra keyword arguments (`chat_template=`, `tools=`, `continue_final_message=`, template
        variables) are passed to transformers. Raises `InvalidRequestError(param="messages")`
        when the model has no chat template or the template rejects the conversation, and
        `InvalidRequestError(param="chat_template")` when rendering takes longer than
        `time_limit_s` (None: no limit).
        """
        if not self.chat_template and not kwargs.get("chat_template"):
            raise InvalidRequestError(
                f"The model's tokenizer ({self.path or 'in memory'}) has no chat template "
                "(no 'chat_template' in tokenizer_config.json and no chat_template.jinja), so "
                "chat messages cannot be formatted. Use the completions API with a plain "
                "prompt, or supply a chat template.", param="messages")
        kwargs.pop("tokenize", None)

        def render() -> Any:
            return self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)

        try:
            text = render() if time_limit_s is None else call_with_time_limit(render,
                                                                              time_limit_s)
        except TimeLimitExceeded:
            raise InvalidRequestError(
                f"The chat template took longer than {time_limit_s:g} s to render; send a "
                "simpler template.", param="chat_template") from None
        except InvalidRequestError:
            raise
        except Exception as e:  # jinja2 TemplateError (raise_exception), bad message shapes
            raise InvalidRequestError(f"The chat template could not format these messages: {e}",
                                      param="messages") from e
        assert isinstance(text, str), type(text)
        return text


_JINJA_CHARS = ("{", "}", "\n")


def resolve_chat_template(value: str) -> str:
    """The template `--chat-template value` means: the contents of the file `value` names, or,
    when no such file exists and `value` looks like a template (has '{', '}' or a newline, as
    vLLM decides), `value` itself. Raises `ConfigError` for a missing file, an unreadable one, or
    a template Jinja cannot parse."""
    path = Path(value).expanduser()
    template, source = value, "the inline template"
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # e.g. a template too long to be a file name
        is_file = False
    if is_file:
        try:
            template, source = path.read_text(encoding="utf-8"), f"file {str(path)!r}"
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template: cannot read {str(path)!r}: {e}. Fix: pass a "
                              "readable UTF-8 template file.") from None
    elif not any(c in value for c in _JINJA_CHARS):
        raise ConfigError(f"--chat-template: {value!r} is neither a file nor a Jinja template. "
                          "Fix: pass the path of a template file, or the template text itself.")
    import jinja2
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template: {source} is not a valid Jinja template (line "
                          f"{e.lineno}: {e.message}). Fix: correct the template.") from None
    return template


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer in the local directory `path`; `chat_template` (a file or the
    template, `resolve_chat_template`) replaces its chat template.

    Raises `ModelLoadError` naming the path when the directory or its tokenizer files are
    missing, or when transformers cannot build a fast tokenizer from them; `ConfigError` for a
    bad `chat_template`.
    """
    template = None if chat_template is None else resolve_chat_template(chat_template)
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"Tokenizer directory {str(path)!r} does not exist or is not a "
                             "directory; pass --tokenizer or --model pointing at a local "
                             "Hugging Face model directory.")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"No tokenizer files in {str(path)!r}: expected one of "
                             f"{', '.join(_TOKENIZER_FILES)} (normally tokenizer.json next to "
                             "tokenizer_config.json).")
    from transformers import PreTrainedTokenizerFast  # imports no torch (unlike AutoTokenizer)
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"Could not load the tokenizer in {str(path)!r}: "
                             f"{type(e).__name__}: {e}") from e
    if template is not None:
        hf.chat_template = template
    return Tokenizer(hf, directory)
