"""`kv_transfer_params`: the per-request dict of vLLM's disaggregation flow, checked here.

A client (the router) asks a prefill engine for::

    {"do_remote_decode": true}            → the engine computes the prompt, samples one token,
                                            and holds the prompt's KV blocks for a consumer

and the prefill's response carries what the decode request must send::

    {"do_remote_prefill": true, "do_remote_decode": false,
     "remote_engine_id": "...", "remote_host": "10.0.0.5", "remote_port": 14579,
     "remote_block_ids": [3, 4, 9], "remote_request_id": "cmpl-...-0",
     "remote_num_tokens": 40, "remote_prompt_digest": "…",      # which prompt they hold
     "kv_layout": {"model": ..., "dtype": ..., "kv_cache_dtype": ..., "block_size": 16,
                   "num_kv_heads": 2, "head_dim": 64, "num_layers": 2, "tp_size": 1}}

Malformed params (unknown keys, wrong types) are a 400 naming `kv_transfer_params.<key>`
(`validate_request_params`, in the API server). Well-formed params that do not fit this engine
(another layout, another prompt) are no error: the decode engine recomputes the prompt,
logs a warning and counts a transfer failure (`layout_problem`, in the engine core). No torch.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from typing import Any, Sequence

from sluice.errors import InvalidRequestError

PARAM = "kv_transfer_params"
LAYOUT_KEYS = ("model", "dtype", "kv_cache_dtype", "block_size", "num_kv_heads", "head_dim",
               "num_layers", "tp_size")

# key -> allowed types; bools are checked apart (bool is an int in Python)
_KEYS: dict[str, tuple[type, ...]] = {
    "do_remote_decode": (bool,), "do_remote_prefill": (bool,), "remote_engine_id": (str,),
    "remote_host": (str,), "remote_port": (int,), "remote_block_ids": (list,),
    "remote_request_id": (str,), "remote_num_tokens": (int,), "remote_prompt_digest": (str,),
    "kv_layout": (dict,),
}
_REMOTE_PREFILL_REQUIRED = ("remote_host", "remote_port", "remote_block_ids",
                            "remote_request_id", "remote_num_tokens", "kv_layout")


def _bad(key: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{PARAM}.{key}: {message}", param=f"{PARAM}.{key}")


def validate_request_params(params: Any, *, is_producer: bool, is_consumer: bool,
                            configured: bool, n: int = 1) -> dict[str, Any] | None:
    """`params` as the engine gets them, or a 400 (`InvalidRequestError`) naming the key.
    `configured`: the server runs with --kv-transfer-config."""
    if params is None:
        return None
    if not configured:
        raise InvalidRequestError(
            f"{PARAM} needs a server started with --kv-transfer-config (a KV connector); this "
            "one has none. Leave the field out.", param=PARAM)
    if not isinstance(params, dict):
        raise InvalidRequestError(f"{PARAM} must be an object.", param=PARAM)
    for key, value in params.items():
        if key not in _KEYS:
            raise _bad(key, f"unknown key; known keys: {', '.join(_KEYS)}.")
        types = _KEYS[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise _bad(key, f"wrong type ({type(value).__name__}).")
    if params.get("do_remote_decode") and params.get("do_remote_prefill"):
        raise _bad("do_remote_prefill", "a request cannot both do_remote_decode and "
                                        "do_remote_prefill.")
    if params.get("do_remote_decode") and not is_producer:
        raise _bad("do_remote_decode", "this engine's kv_role is kv_consumer; send it to a "
                                       "kv_producer or kv_both engine.")
    if params.get("do_remote_prefill"):
        if not is_consumer:
            raise _bad("do_remote_prefill", "this engine's kv_role is kv_producer; send it "
                                            "to a kv_consumer or kv_both engine.")
        for key in _REMOTE_PREFILL_REQUIRED:
            if key not in params:
                raise _bad(key, "required with do_remote_prefill.")
        ids = params["remote_block_ids"]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
            raise _bad("remote_block_ids", "must be a list of positive block ids.")
        if not 1 <= params["remote_port"] <= 65535:
            raise _bad("remote_port", f"{params['remote_port']} is out of range.")
        if params["remote_num_tokens"] < 1:
            raise _bad("remote_num_tokens", "must be >= 1.")
    if n != 1 and (params.get("do_remote_decode") or params.get("do_remote_prefill")):
        raise InvalidRequestError(f"{PARAM} supports n=1 only (got n={n}).", param="n")
    return params


def prompt_digest(token_ids: Sequence[int]) -> str:
    """A short digest of a prompt's token ids: the consumer checks it holds the same prompt."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=12).hexdigest()


def layout_problem(params: dict[str, Any], local_layout: dict[str, Any],
                   prompt_token_ids: Sequence[int], block_size: int) -> str | None:
    """Why the remote KV in `params` cannot be used here (None: it can)."""
    remote = params.get("kv_layout") or {}
    for key in LAYOUT_KEYS:
        if remote.get(key) != local_layout.get(key):
            return (f"KV layout mismatch on {key}: remote {remote.get(key)!r}, local "
                    f"{local_layout.get(key)!r}")
    if params.get("remote_num_tokens") != len(prompt_token_ids):
        return (f"the remote engine holds {params.get('remote_num_tokens')} prompt tokens, "
                f"this request has {len(prompt_token_ids)}")
    digest = params.get("remote_prompt_digest")
    if digest is not None and digest != prompt_digest(prompt_token_ids):
        return "the remote engine holds another prompt (digest mismatch)"
    if len(params["remote_block_ids"]) < -(-len(prompt_token_ids) // block_size):
        return (f"{len(params['remote_block_ids'])} remote blocks cannot hold "
                f"{len(prompt_token_ids)} tokens")
    return None


@functools.lru_cache(maxsize=8)
def _roles(kv_transfer_config: str | None) -> tuple[bool, bool]:
    from sluice.kv_transfer.config import parse_kv_transfer_config
    config = parse_kv_transfer_config(kv_transfer_config)
    return (config.is_producer, config.is_consumer) if config else (False, False)


def check_for_server(params: Any, kv_transfer_config: str | None,
                     n: int = 1) -> dict[str, Any] | None:
    """`validate_request_params` for a server started with `kv_transfer_config` (the flag's
    text, None without one)."""
    if params is None:
        return None
    is_producer, is_consumer = _roles(kv_transfer_config)
    return validate_request_params(params, is_producer=is_producer, is_consumer=is_consumer,
                                   configured=kv_transfer_config is not None, n=n)
