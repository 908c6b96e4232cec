"""Operations endpoints, as vLLM's: POST /reset_prefix_cache always; with --enable-sleep-mode
POST /sleep?level=1|2, POST /wake_up and GET /is_sleeping. All need the API key when one is set.

| route                      | answer                                                         |
|----------------------------|----------------------------------------------------------------|
| POST /reset_prefix_cache   | 200 {"success": true}; 409 while requests hold KV blocks       |
| POST /sleep?level=1|2      | 200; 400 other levels; 409 while requests are in flight        |
| POST /wake_up              | 200 (also when awake); vLLM's `tags` are accepted and ignored   |
| GET /is_sleeping           | 200 {"is_sleeping": bool} (asked of the engine)                |

Sleep levels on CPU: 1 frees the KV cache (vLLM also offloads the weights to host memory, where
they already are here), 2 frees the weights too; wake-up reallocates the cache and reloads the
weights from disk. Sleep never interrupts requests: vLLM sleeps whatever runs, sluice refuses
(409) until the server is idle. While asleep the generation routes answer 503 (app.py's
`SleepingMiddleware`) and /health says so. vLLM answers /reset_prefix_cache 200 without
checking; sluice says when it could not reset (409).
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from sluice.entrypoints.openai.errors import APIError
from sluice.entrypoints.openai.serving import ServerState, get_state
from sluice.errors import EngineBusyError

router = APIRouter()
sleep_router = APIRouter()

BUSY = ("Cannot sleep with {} requests in flight: sleep only frees memory on an idle server; "
        "retry once they have finished.")


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(raw_request: Request) -> Response:
    state = get_state(raw_request)
    if not await state.engine.reset_prefix_cache():
        raise APIError(409, "The prefix cache was not reset: running requests still hold "
                       "KV-cache blocks. Retry when the server is idle.")
    return JSONResponse({"success": True})


@sleep_router.post("/sleep")
async def sleep(raw_request: Request, level: int = Query(1)) -> Response:
    state = get_state(raw_request)
    if level not in (1, 2):
        raise APIError(400, f"level must be 1 (free the KV cache) or 2 (free the KV cache and "
                       f"the weights), got {level}.", param="level")
    if state.num_in_flight > 0:
        raise APIError(409, BUSY.format(state.num_in_flight))
    try:
        await state.engine.sleep(level)
    except EngineBusyError as e:
        raise APIError(409, str(e)) from None
    _show_sleep_level(state)
    return Response(status_code=200)


@sleep_router.post("/wake_up")
async def wake_up(raw_request: Request) -> Response:
    state = get_state(raw_request)
    await state.engine.wake_up()
    _show_sleep_level(state)
    return Response(status_code=200)


@sleep_router.get("/is_sleeping")
async def is_sleeping(raw_request: Request) -> JSONResponse:
    return JSONResponse({"is_sleeping": await get_state(raw_request).engine.is_sleeping()})


def _show_sleep_level(state: ServerState) -> None:
    if state.metrics is not None:
        state.metrics.set_sleep_level(state.engine.sleep_level)
