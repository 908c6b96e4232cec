"""The frontend's tokenizer: a thin wrapper over a Hugging Face fast tokenizer. No torch.

Contract:
* `load_tokenizer(path)` reads a local directory in Hugging Face format (`tokenizer.json` +
  `tokenizer_config.json`, optionally `chat_template.jinja`). A missing or unreadable tokenizer
  raises `ModelLoadError` naming the path.
* It loads `transformers.PreTrainedTokenizerFast` directly, never `AutoTokenizer`: the latter
  resolves classes through the model registry and imports torch, which the API-server process
  must not do (a test checks `'torch' not in sys.modules`).
* Text decoding (`decode`, `decode_token`) goes straight to the Rust `tokenizers.Tokenizer`, so a
  full decode and the incremental detokenizer (`detokenizer.py`) agree character for character;
  no `clean_up_tokenization_spaces` post-processing is applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sluice.errors import InvalidRequestError, ModelLoadError

# Files a directory must hold for us to build a fast tokenizer from it (any one suffices;
# the non-json ones are converted by transformers when their optional libraries are present).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json",
                    "spiece.model")


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
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS as the tokenizer is set up to."""
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
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation to prompt text with the model's chat template.

        Extra keyword arguments (`chat_template=`, `tools=`, `continue_final_message=`, template
        variables) are passed to transformers. Raises `InvalidRequestError(param="messages")`
        when the model has no chat template or the template rejects the conversation.
        """
        if not self.chat_template and not kwargs.get("chat_template"):
            raise InvalidRequestError(
                f"The model's tokenizer ({self.path or 'in memory'}) has no chat template "
                "(no 'chat_template' in tokenizer_config.json and no chat_template.jinja), so "
                "chat messages cannot be formatted. Use the completions API with a plain "
                "prompt, or supply a chat template.", param="messages")
        kwargs.pop("tokenize", None)
        try:
            text = self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
        except InvalidRequestError:
            raise
        except Exception as e:  # jinja2 TemplateError (raise_exception), bad message shapes
            raise InvalidRequestError(f"The chat template could not format these messages: {e}",
                                      param="messages") from e
        assert isinstance(text, str), type(text)
        return text


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer in the local directory `path`.

    Raises `ModelLoadError` naming the path when the directory or its tokenizer files are
    missing, or when transformers cannot build a fast tokenizer from them.
    """
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
    return Tokenizer(hf, directory)
