"""`resolve_model_config(config)`: the one startup step that turns the model (and tokenizer) the
user named into local Hugging Face-format directories, before any process is spawned. No torch.

    local directory            -> itself
    .gguf file (any load format, or --load-format gguf)
                               -> its HF-format sidecar directory (model_spec.gguf.prepare_gguf:
                                  config, tokenizer and chat template from the file's metadata;
                                  the weights stay in the file, named by the sidecar's marker)
    hub id `org/name`          -> its local snapshot (model_spec.hf.snapshot_dir: downloaded
                                  once, or read from the cache with HF_HUB_OFFLINE=1)

The result is a new frozen config whose `model.model` / `model.tokenizer` are those directories;
everything downstream (engine core, loader, tokenizer) reads local directories only, and the
engine process never resolves again. `served_model_name` already holds what the user typed
(config_sources sets it), so the API keeps reporting that name. Resolving a resolved config
returns it unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sluice.config import EngineConfig
from sluice.errors import ModelLoadError
from sluice.model_spec.gguf import GGUF_MARKER
from sluice.model_spec.hf import looks_like_hub_id, snapshot_dir

TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                      "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      "chat_template.jinja", "chat_template.json", "generation_config.json")


def resolve_model_config(config: EngineConfig) -> EngineConfig:
    """`config` with its model and tokenizer as local directories (see the module docstring);
    raises `ModelLoadError` with one line naming every place looked at."""
    model_cfg, load = config.model, config.load
    model_dir = resolve_model(model_cfg.model or "", load_format=load.load_format,
                              revision=model_cfg.revision, download_dir=load.download_dir,
                              hf_token=load.hf_token)
    tokenizer = model_cfg.tokenizer
    if tokenizer is not None:
        tokenizer = str(resolve_tokenizer(tokenizer, revision=model_cfg.revision,
                                          download_dir=load.download_dir,
                                          hf_token=load.hf_token))
    config = _resolve_draft_model(config)
    if str(model_dir) == model_cfg.model and tokenizer == model_cfg.tokenizer:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(
        model_cfg, model=str(model_dir), tokenizer=tokenizer))


def _resolve_draft_model(config: EngineConfig) -> EngineConfig:
    """A `--speculative-config` draft "model" (directory, .gguf file or hub id) resolved the
    same way as the model."""
    from sluice.spec_decode.config import parse_speculative_config, with_draft_model
    text = config.scheduler.speculative_config
    spec = parse_speculative_config(text)
    if spec is None or spec.model is None:
        return config
    load = config.load
    draft_dir = str(resolve_model(spec.model, revision=None, download_dir=load.download_dir,
                                  hf_token=load.hf_token))
    if draft_dir == spec.model:
        return config
    return dataclasses.replace(config, scheduler=dataclasses.replace(
        config.scheduler, speculative_config=with_draft_model(text, draft_dir)))


def resolve_model(name: str, *, load_format: str = "auto", revision: str | None = None,
                  download_dir: str | None = None, hf_token: str | None = None) -> Path:
    """The local HF-format directory for the model `name` (see the module docstring)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if load_format == "gguf" and not (path / GGUF_MARKER).is_file():
            raise ModelLoadError(f"--load-format gguf needs a .gguf file, but {name!r} is a "
                                 "directory; pass the .gguf file itself.")
        return path
    if path.is_file():
        from sluice.model_spec import gguf
        is_gguf = gguf.is_gguf_file(path)
        if is_gguf and load_format == "safetensors":
            raise ModelLoadError(f"{name!r} is a GGUF file, but --load-format safetensors was "
                                 "given; use --load-format auto or gguf.")
        if load_format == "gguf" or is_gguf:
            return gguf.prepare_gguf(path)
        raise ModelLoadError(f"model {name!r} is a file but not a GGUF file; pass a model "
                             "directory in Hugging Face format, a .gguf file or a hub id.")
    if name.endswith(".gguf"):
        raise ModelLoadError(f"GGUF file {name!r} not found ({path.absolute()} does not "
                             "exist).")
    if looks_like_hub_id(name):
        return snapshot_dir(name, revision=revision, cache_dir=download_dir, token=hf_token)
    raise ModelLoadError(f"model {name!r} not found: not a local directory or file "
                         f"({path.absolute()}), and not a Hugging Face hub id (org/name).")


def resolve_tokenizer(name: str, *, revision: str | None = None,
                      download_dir: str | None = None, hf_token: str | None = None) -> Path:
    """The local directory of the tokenizer `name`: a directory, or a hub id whose tokenizer
    files only are fetched."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if looks_like_hub_id(name):
        return snapshot_dir(name, revision=revision, cache_dir=download_dir, token=hf_token,
                            patterns=TOKENIZER_PATTERNS)
    raise ModelLoadError(f"tokenizer {name!r} not found: not a local directory "
                         f"({path.absolute()}), and not a Hugging Face hub id (org/name).")
