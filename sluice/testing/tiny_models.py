"""Build random-weight models in real Hugging Face format, with a locally trained tokenizer.

Nothing here touches a network: the tokenizer is a byte-level BPE trained on the CPython
documentation that ships with the interpreter (`pydoc_data`), and the weights come from
`transformers`' own model classes with a fixed seed, saved with `save_pretrained` (config.json +
safetensors + tokenizer files + chat template). Used by the test suite and the benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def training_corpus() -> list[str]:
    """Offline English text: the topic help pages of the CPython docs (PSF license)."""
    import pydoc_data.topics as topics
    return [text for _, text in sorted(topics.topics.items())]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 2048,
                    texts: list[str] | None = None, chat_template: str | None = CHAT_TEMPLATE):
    """Train a byte-level BPE tokenizer and save it as a `PreTrainedTokenizerFast` in `out_dir`.

    Special tokens take ids 0..3: `<|endoftext|>` (bos/eos), `<|im_start|>`, `<|im_end|>`,
    `<|pad|>`. Returns the tokenizer object.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts if texts is not None else training_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    return fast


@dataclass
class TinyModelSpec:
    """Shape of a tiny model. `extra` is merged into the HF config (e.g. rope_scaling)."""
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    initializer_range: float = 0.08
    extra: dict[str, Any] = field(default_factory=dict)


_CONFIG_CLASSES = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}


def build_model(out_dir: str | Path, spec: TinyModelSpec | None = None, seed: int = 0,
                tokenizer_dir: str | Path | None = None, dtype: str = "float32",
                max_shard_size: str | None = None) -> Path:
    """Save a random-weight `spec.architecture` model plus tokenizer to `out_dir`.

    The tokenizer is copied from `tokenizer_dir` when given (train once, reuse), else trained.
    `max_shard_size` (e.g. "200KB") produces sharded safetensors with an index file.
    """
    import shutil

    import torch
    import transformers

    spec = spec or TinyModelSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name not in ("config.json", "generation_config.json") \
                    and not f.name.endswith(".safetensors") \
                    and not f.name.endswith(".safetensors.index.json"):
                shutil.copy(f, out_dir / f.name)
    else:
        build_tokenizer(out_dir, vocab_size=min(spec.vocab_size, 2048))

    config_cls = getattr(transformers, _CONFIG_CLASSES[spec.architecture])
    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, initializer_range=spec.initializer_range,
        bos_token_id=0, eos_token_id=0, pad_token_id=3, rms_norm_eps=1e-6,
    )
    kwargs.update(spec.extra)
    config = config_cls(**kwargs)
    config.architectures = [spec.architecture]
    torch.manual_seed(seed)
    model_cls = getattr(transformers, spec.architecture)
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out_dir), **save_kwargs)
    return out_dir


def read_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
