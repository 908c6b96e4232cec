"""Runtime LoRA adapter management, as vLLM's: POST /v1/load_lora_adapter and
POST /v1/unload_lora_adapter. The routes exist only when the environment variable
`SLUICE_ALLOW_RUNTIME_LORA_UPDATING` (or vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING`) is 1/true;
otherwise they are unknown routes (404), as in vLLM.

    load {"lora_name", "lora_path"}           200 "Success: LoRA adapter 'n' added successfully."
      bad path / incompatible adapter         400 naming the path and the problem (lora_path)
      a name already loaded, or the base's    400 (param lora_name)
    unload {"lora_name"} (+ vLLM's lora_int_id)
                                              200 "Success: LoRA adapter 'n' removed successfully."
      unknown name                            404 (param lora_name)
    either, server without --enable-lora      400 saying so

Both only change the server's name table (`sluice.lora.registry`). Loading checks the adapter
(config and tensor shapes, on a worker thread) and makes the name usable at once; the workers
read the weights on the adapter's first request. Unloading affects only later requests: those
already running with the adapter finish with it (the workers keep its weights in their LRU cache).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from sluice.entrypoints.openai.protocol import RequestModel
from sluice.entrypoints.openai.serving import ServerState, get_state
from sluice.errors import InvalidRequestError

if TYPE_CHECKING:
    from sluice.lora.registry import LoRARegistry

RUNTIME_LORA_ENVS = ("SLUICE_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")

router = APIRouter()


def runtime_updating_allowed(env: dict[str, str] | None = None) -> bool:
    """Whether one of `RUNTIME_LORA_ENVS` is 1 or true (case-insensitive)."""
    env = os.environ if env is None else env
    return any(env.get(name, "").strip().lower() in ("1", "true") for name in RUNTIME_LORA_ENVS)


class LoadLoRAAdapterRequest(RequestModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(RequestModel):
    lora_name: str
    lora_int_id: int | None = None


def _registry(state: ServerState) -> "LoRARegistry":
    if state.lora is None:
        raise InvalidRequestError("LoRA adapters are not enabled on this server; start it with "
                                  "--enable-lora.", param="lora_name")
    return state.lora


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, raw_request: Request) -> Response:
    state = get_state(raw_request)
    registry = _registry(state)
    if not body.lora_name or not body.lora_path:
        raise InvalidRequestError("Both 'lora_name' and 'lora_path' must be provided.",
                                  param="lora_name" if not body.lora_name else "lora_path")
    await state.offloader.run(registry.add, body.lora_name, body.lora_path)
    return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                    media_type="text/plain")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, raw_request: Request) -> Response:
    state = get_state(raw_request)
    registry = _registry(state)
    known = registry.get(body.lora_name)
    if (known is not None and body.lora_int_id is not None
            and body.lora_int_id != known.lora_int_id):
        raise InvalidRequestError(f"The lora adapter '{body.lora_name}' has id "
                                  f"{known.lora_int_id}, not {body.lora_int_id}.",
                                  param="lora_int_id")
    registry.remove(body.lora_name)
    return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                    media_type="text/plain")
