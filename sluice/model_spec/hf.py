"""Hugging Face hub ids (`org/name`) → a local snapshot directory, with `huggingface_hub`.
No torch.

Only what sluice reads is fetched (`SNAPSHOT_PATTERNS`: config, generation config, tokenizer
files, chat template, safetensors and their index), never other formats' weights. Offline
(`HF_HUB_OFFLINE=1`) the local cache answers and the hub is not asked. `huggingface_hub` shows
its own progress bars while downloading.

Every failure is a `ModelLoadError` in one line that names each place looked at.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sluice.errors import ModelLoadError

SNAPSHOT_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                     "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                     "chat_template.json", "*.safetensors", "model.safetensors.index.json")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = ("1", "on", "yes", "true")


def looks_like_hub_id(name: str) -> bool:
    """`org/name` with the hub's characters (a local path that exists is checked first)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network calls."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def snapshot_dir(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None,
                 token: str | None = None,
                 patterns: tuple[str, ...] = SNAPSHOT_PATTERNS) -> Path:
    """The local snapshot of `repo_id` at `revision` (default: main) holding the files that
    match `patterns`, downloaded into `cache_dir` (default: the Hugging Face cache) unless
    already there; offline, only the cache is read. Raises `ModelLoadError` naming where it
    looked."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = hub_offline()
    cache = cache_dir or constants.HF_HUB_CACHE
    where = (f"not a local directory ({Path(repo_id).absolute()}), not in the Hugging Face "
             f"cache ({cache})")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                 allow_patterns=list(patterns),
                                 local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            raise ModelLoadError(f"model '{repo_id}' not found: {where}, and the hub was not "
                                 "asked (HF_HUB_OFFLINE=1). Fix: download it once online, pass "
                                 "--download-dir where it is cached, or pass a local "
                                 "directory.") from None
        raise ModelLoadError(f"model '{repo_id}' not found: {where}, and the hub could not be "
                             "reached. Fix: check the network, or pass a local "
                             "directory.") from None
    except GatedRepoError:
        raise ModelLoadError(f"model '{repo_id}' is gated on the hub: accept its license on "
                             "huggingface.co and pass --hf-token (or set HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model '{repo_id}' not found: {where}, and the hub has no such "
                             "repository (or it is private: pass --hf-token).") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model '{repo_id}': the hub has no revision "
                             f"'{revision}'. Fix: pass an existing --revision.") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"model '{repo_id}' could not be fetched from the hub into "
                             f"{cache}: {type(e).__name__}: {e}") from None
    return Path(path)
